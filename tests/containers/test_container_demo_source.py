"""The compose demo source (deploy/demo/demo_source.py): what it sends becomes events.

A newcomer's first `docker compose up` shows events only if the demo's records survive the
real pipeline: Fluent Bit's syslog parsers (fluent-bit/parsers.yaml, applied here with the same
regexes) and the shipped mapping rules (mappings/, through the real compiler and Lua mapper).
Each record must be mapped by the rule written for its kind, not rejected or left to the
catch-all. The sending side is checked over real loopback sockets: newline-framed syslog on one
port, Fluent forward ([tag, time, record] msgpack) on the other, and `--rate 0` sends nothing.
"""

from __future__ import annotations

import io
import json
import random
import select
import re
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


@pytest.fixture
def collectors():
    made = [Collector(), Collector()]
    try:
        yield made
    finally:
        for c in made:
            c.close()


def test_demo_sends_syslog_lines_and_forward_messages(collectors):
    syslog, forward = collectors
    code = demo_source.main(["--host", "127.0.0.1", "--syslog-port", str(syslog.port),
                             "--forward-port", str(forward.port), "--rate", "1000",
                             "--count", "9", "--seed", "1"])
    assert code == 0
    dockerkit.wait_for(lambda: syslog.data.count(b"\n") == 6 and forward.data, 10,
                       what="the demo's records")
    for line in bytes(syslog.data).decode().splitlines():
        parse_syslog(line)
    messages = list(msgpack.Unpacker(io.BytesIO(bytes(forward.data)), raw=False))
    assert len(messages) == 3
    for tag, ts, record in messages:
        assert tag == "falco" and isinstance(ts, int) and record["rule"]


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
