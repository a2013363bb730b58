"""The compose demo source (deploy/demo/demo_source.py): what it sends becomes events.

A newcomer's first `docker compose up` shows events only if the demo's records survive the
real pipeline: Fluent Bit's syslog parsers (fluent-bit/parsers.yaml, applied here with the same
regexes) and the shipped mapping rules (mappings/, through the real compiler and Lua mapper).
Each record must be mapped by the rule written for its kind, not rejected or left to the
catch-all. The sending side is checked over real loopback sockets: newline-framed syslog on one
port, Fluent forward on the other, where a stand-in for Fluent Bit's in_forward answers
``{"ack": chunk}`` as the real one does; `--rate 0` sends nothing.

What the demo promises (docs/deploy.md): a Fluent Bit restart loses no forward record (a record
is kept and sent again until acknowledged), and SIGTERM (`docker compose down`, where the demo
is PID 1) ends it at once, in a plain process and in the sink image's container alike.
"""

from __future__ import annotations

import io
import json
import random
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time

import msgpack
import pytest
import yaml

import dockerkit

REPO = dockerkit.REPO
sys.path.insert(0, str(REPO / "deploy" / "demo"))
import demo_source  # noqa: E402


def fluent_bit_regex(name: str) -> re.Pattern:
    parsers = yaml.safe_load((REPO / "fluent-bit" / "parsers.yaml").read_text())["parsers"]
    (parser,) = [p for p in parsers if p["name"] == name]
    return re.compile(parser["regex"].replace("(?<", "(?P<"))


def parse_syslog(line: str) -> dict:
    # As fluent-bit.yaml does: the parser filter tries RFC 5424, then RFC 3164.
    for name in ("syslog-rfc5424", "syslog-rfc3164"):
        match = fluent_bit_regex(name).match(line)
        if match:
            return {k: v for k, v in match.groupdict().items() if v is not None}
    raise AssertionError(f"no syslog parser of fluent-bit/parsers.yaml matches {line!r}")


def mapped_rule(tag: str, record: dict, now: float) -> tuple[str, dict]:
    proc = subprocess.run([sys.executable, "-m", "cloudtrail_sink", "mappings", "test", "--tag",
                           tag, "-m", str(REPO / "mappings"), "--time", str(now), "-"],
                          input=json.dumps(record), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rule = re.search(r"rule (\S+)", proc.stderr)
    assert rule, proc.stderr
    return rule.group(1), json.loads(proc.stdout)


def test_demo_records_become_events_through_the_shipped_parsers_and_rules():
    rng = random.Random(7)
    now = time.time()
    cases = [("syslog", parse_syslog(demo_source.sshd_line(rng, now).decode().rstrip("\n")))
             for _ in range(4)]
    cases.append(("syslog", parse_syslog(
        demo_source.neuvector_line(rng, now, 1).decode().rstrip("\n"))))
    cases.append(("falco", demo_source.falco_record(rng, now, 3)))
    rules = []
    for tag, record in cases:
        rule, event = mapped_rule(tag, record, now)
        rules.append(rule)
        assert event["UID"] and event["eventName"] and event["eventTime"].endswith("Z")
    assert set(rules) >= {"neuvector", "falco"}
    assert all(r.startswith("sshd-") for r in rules[:4]), rules
    assert not any("catch" in r for r in rules), rules


class Collector:
    """A TCP listener on 127.0.0.1 that keeps every byte it receives."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.port = self.sock.getsockname()[1]
        self.data = bytearray()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return
        with conn:
            while chunk := conn.recv(65536):
                self.data += chunk

    def close(self):
        self.sock.close()
        self.thread.join(timeout=5)


class ForwardReceiver:
    """Fluent Bit's in_forward as the demo meets it: one connection at a time, messages
    ``[tag, entries, {"chunk": id}]`` answered with ``{"ack": id}``.

    ``answer(n)`` decides for the n-th message (from 0): "ack" keeps it and acknowledges it,
    "drop" closes the connection without taking it (a restart before the record was read),
    "silent" keeps the connection open and never answers (a hung Fluent Bit).
    """

    def __init__(self, answer=lambda n: "ack"):
        self.answer = answer
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.port = self.sock.getsockname()[1]
        self.messages: list[list] = []  # every message received, acknowledged or not
        self.acked: list[list] = []  # [time, record] entries acknowledged
        self.connections = 0
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stopping.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            with conn:
                self._serve(conn)

    def _serve(self, conn):
        unpacker = msgpack.Unpacker(raw=False)
        conn.settimeout(0.2)
        while not self.stopping.is_set():
            try:
                data = conn.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            if not data:
                return
            unpacker.feed(data)
            for message in unpacker:
                verdict = self.answer(len(self.messages))
                self.messages.append(message)
                if verdict == "drop":
                    return
                if verdict == "ack":
                    self.acked.extend(message[1])
                    conn.sendall(msgpack.packb({"ack": message[2]["chunk"]}))

    def close(self):
        self.stopping.set()
        self.sock.close()
        self.thread.join(timeout=5)


@pytest.fixture
def receivers():
    made = []

    def make(kind, *args):
        made.append(kind(*args))
        return made[-1]
    try:
        yield make
    finally:
        for r in made:
            r.close()


def run_demo(syslog_port, forward_port, *extra) -> int:
    return demo_source.main(["--host", "127.0.0.1", "--syslog-port", str(syslog_port),
                             "--forward-port", str(forward_port), "--seed", "1",
                             "--retry-seconds", "0.05", *extra])


def test_demo_sends_syslog_lines_and_acknowledged_forward_chunks(receivers):
    syslog, forward = receivers(Collector), receivers(ForwardReceiver)
    assert run_demo(syslog.port, forward.port, "--rate", "1000", "--count", "9") == 0
    dockerkit.wait_for(lambda: syslog.data.count(b"\n") == 6, 10, what="the demo's syslog lines")
    for line in bytes(syslog.data).decode().splitlines():
        parse_syslog(line)
    # main() returned only after every forward record was acknowledged.
    assert len(forward.messages) == 3 and len(forward.acked) == 3
    for tag, entries, options in forward.messages:
        assert tag == "falco" and isinstance(options["chunk"], str) and options["chunk"]
        ((ts, record),) = entries
        assert isinstance(ts, int) and record["rule"]
    assert len({m[2]["chunk"] for m in forward.messages}) == 3


@pytest.mark.parametrize("failure", ["drop", "silent"])
def test_a_forward_record_not_acknowledged_is_sent_again_on_a_new_connection(receivers, failure):
    # The first two messages are lost as in a Fluent Bit restart (connection closed before the
    # record was taken) or a hang (no answer); the demo resends until acknowledged.
    syslog = receivers(Collector)
    forward = receivers(ForwardReceiver, lambda n: failure if n < 2 else "ack")
    assert run_demo(syslog.port, forward.port, "--rate", "1000", "--count", "9",
                    "--ack-timeout", "0.3") == 0
    sent = [record["uuid"] for m in forward.messages for _, record in m[1]]
    acked = [record["uuid"] for _, record in forward.acked]
    assert len(set(acked)) == 3 and set(acked) == set(sent)  # every record, none lost
    assert len(forward.messages) == 5 and forward.connections == 3
    assert forward.messages[0][1] == forward.messages[2][1]  # the same entries, sent again


def test_demo_rate_zero_sends_nothing():
    listener = socket.socket()
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = str(listener.getsockname()[1])
        assert demo_source.main(["--host", "127.0.0.1", "--syslog-port", port,
                                 "--forward-port", port, "--rate", "0"]) == 0
        # main() connects synchronously: a connection would be pending now.
        readable, _, _ = select.select([listener], [], [], 0)
        assert not readable
    finally:
        listener.close()


def wait_until_sending(proc: subprocess.Popen, receiver: ForwardReceiver, timeout: float):
    dockerkit.wait_for(lambda: receiver.messages or proc.poll() is not None, timeout,
                       what="the demo's first forward record")
    assert proc.poll() is None, proc.communicate()


@pytest.mark.parametrize("state", ["sleeping", "waiting-for-ack", "reconnecting"])
def test_demo_process_exits_at_once_on_sigterm(receivers, state):
    syslog = receivers(Collector)
    forward = receivers(ForwardReceiver, lambda n: "silent" if state == "waiting-for-ack"
                        else "ack")
    forward_port = forward.port if state != "reconnecting" else dockerkit.free_port()
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "deploy" / "demo" / "demo_source.py"), "--host", "127.0.0.1",
         "--syslog-port", str(syslog.port), "--forward-port", str(forward_port),
         "--rate", "0.5" if state == "sleeping" else "20", "--retry-seconds", "30",
         "--ack-timeout", "30"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        if state == "reconnecting":
            dockerkit.wait_for(lambda: syslog.data.count(b"\n") >= 2, 10,
                               what="the demo to reach its forward record")
            time.sleep(0.2)  # now in its 30 s wait before reconnecting
        else:
            wait_until_sending(proc, forward, 10)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=2) == 0
    finally:
        proc.kill()
        proc.communicate()


@pytest.mark.docker
@pytest.mark.slow
def test_demo_container_stops_within_2_s_of_sigterm(docker_engine, sink_image, receivers):
    # As compose runs it: the sink image, the demo's folder mounted, the script as PID 1.
    syslog, forward = receivers(Collector), receivers(ForwardReceiver)
    container = docker_engine.containers.run(
        sink_image, entrypoint=["python", "/demo/demo_source.py"],
        command=["--host", "127.0.0.1", "--syslog-port", str(syslog.port),
                 "--forward-port", str(forward.port), "--rate", "2"],
        volumes={str(REPO / "deploy" / "demo"): {"bind": "/demo", "mode": "ro"}},
        network_mode="host", read_only=True, detach=True)
    try:
        dockerkit.wait_for(lambda: forward.acked, 60, what="the demo container's first record")
        started = time.monotonic()
        container.kill(signal="SIGTERM")
        status = container.wait(timeout=10)["StatusCode"]
        stopped_after = time.monotonic() - started
        assert status == 0, container.logs().decode()
        assert stopped_after < 2, f"stopped {stopped_after:.1f} s after SIGTERM"
    finally:
        container.remove(force=True)
