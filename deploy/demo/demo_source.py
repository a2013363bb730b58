"""Demo source for `docker compose up`: realistic security records sent to Fluent Bit.

Sends, at ``--rate`` records per second (0: send nothing and exit 0, for real-AWS setups):

- OpenSSH sshd logins (accepted and failed) as RFC 3164 syslog lines over TCP (port 5140),
- NeuVector incidents as RFC 5424 syslog lines (key=value payload) over TCP (port 5140),
- Falco alerts as JSON records over the Fluent forward protocol (port 24224, tag ``falco``),
  when the ``msgpack`` module is importable (it is in the sink image), else as more syslog.

Each record is new (fresh timestamps, counters), so the CloudTrail UIDs differ and every event
shows on the emulator's page. Connection failures are retried every ``--retry-seconds`` (Fluent
Bit may start after this script, or restart). Standard library plus optional msgpack.

Delivery: forward records are sent in Forward mode with a ``chunk`` option and kept until
Fluent Bit answers ``{"ack": chunk}``; without that answer (Fluent Bit restarted, connection
lost, no answer within ``--ack-timeout``) they are sent again on a new connection. So a
Fluent Bit restart loses no forward record (it may duplicate one: same Falco uuid, same UID).
Syslog over TCP has no acknowledgement: a line in flight when Fluent Bit stops can be lost.

SIGTERM or SIGINT (``docker stop``, ``docker compose down``; this script is the container's
PID 1, which gets no default signal handling) ends it at once with exit code 0.

    python demo_source.py --host 127.0.0.1 --rate 2 [--count N]
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import signal
import socket
import sys
import time
import uuid

try:  # Fluent forward needs msgpack; without it Falco alerts are skipped.
    import msgpack
except ImportError:  # pragma: no cover - depends on the image
    msgpack = None

USERS = ["alice", "bob", "deploy", "root", "svc-backup"]
HOSTS = ["bastion-1", "web-2", "db-1"]
ADDRS = ["192.0.2.10", "198.51.100.23", "203.0.113.77", "2001:db8::42"]


def sshd_line(rng: random.Random, now: float) -> bytes:
    stamp = time.strftime("%b %e %H:%M:%S", time.gmtime(now))
    user, ip = rng.choice(USERS), rng.choice(ADDRS)
    port = rng.randint(30000, 65000)
    if rng.random() < 0.6:
        msg = f"Accepted publickey for {user} from {ip} port {port} ssh2: ED25519 SHA256:demo"
    else:
        msg = f"Failed password for invalid user {user} from {ip} port {port} ssh2"
    return f"<38>{stamp} {rng.choice(HOSTS)} sshd[{rng.randint(1000, 60000)}]: {msg}\n".encode()


def neuvector_line(rng: random.Random, now: float, seq: int) -> bytes:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(now))
    reported = int(now)
    proc = rng.choice(["curl", "nc", "wget", "bash"])
    payload = ",".join([
        "notification=incident", "name=Process.Profile.Violation", "level=Warning",
        f"reported_timestamp={reported}",
        f"reported_at={time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(now))}",
        "cluster_name=demo.local", "host_name=node-1", f"workload_name=web-{seq % 3}",
        "workload_domain=default", "workload_image=nginx:1.27", f"proc_name={proc}",
        f"proc_path=/usr/bin/{proc}", f"proc_cmd={proc} example.com",
        "proc_effective_user=www-data", "client_ip=", "server_ip=", "action=violate",
        "group=nv.web.default", f"aggregation_from={reported}", "count=1",
        "message=Process profile violation",
    ])
    return (f"<12>1 {stamp} neuvector-controller-pod-0 /usr/local/bin/controller 12 neuvector - "
            f"{payload}\n").encode()


def falco_record(rng: random.Random, now: float, seq: int) -> dict:
    user = rng.choice(USERS)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{seq % 1000:03d}000000Z"
    return {
        "hostname": rng.choice(HOSTS),
        "output": f"Warning Sensitive file opened for reading by non-trusted program "
                  f"(user={user} program=cat file=/etc/shadow)",
        "priority": "Warning",
        "rule": "Read sensitive file untrusted",
        "source": "syscall",
        "tags": ["filesystem", "mitre_credential_access"],
        "time": stamp,
        "uuid": f"demo-{int(now)}-{seq}-{rng.randrange(1 << 30):08x}",
        "output_fields": {"user.name": user, "proc.name": "cat", "fd.name": "/etc/shadow",
                          "evt.time": int(now * 1e9)},
    }


class Sender:
    """One TCP connection, reconnected on failure (syslog: no acknowledgement)."""

    def __init__(self, host: str, port: int, retry_seconds: float = 2.0):
        self.address = (host, port)
        self.retry_seconds = retry_seconds
        self.sock: socket.socket | None = None

    def send(self, data: bytes) -> None:
        while True:
            try:
                if self.sock is None:
                    self.sock = socket.create_connection(self.address, timeout=5)
                self.sock.sendall(data)
                return
            except OSError as exc:
                self.retry(exc)

    def retry(self, exc: Exception) -> None:
        print(f"demo: {self.address[0]}:{self.address[1]}: {exc}; "
              f"retrying in {self.retry_seconds:g} s", file=sys.stderr, flush=True)
        self.close()
        time.sleep(self.retry_seconds)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


class AckedForward(Sender):
    """Fluent forward, at least once: ``[tag, [[time, record], ...], {"chunk": id}]`` is sent
    and its entries kept until Fluent Bit answers ``{"ack": id}``; else resent on a new
    connection.

    Fluent Bit's in_forward answers the ack after it appended the entries to its input, and
    appending runs the filters (fluent-bit plugins/in_forward/fw_prot.c, fw_prot_process:
    flb_input_log_append per entry, then send_ack; src/flb_input_chunk.c: flb_filter_do inside
    the append). Our Lua filter has then written the event to the spool, unbuffered. That holds
    while the forward input runs on the engine's thread, as fluent-bit.yaml configures it (no
    ``threaded: on``, whose appends go through a ring buffer and may follow the ack).
    """

    def __init__(self, host: str, port: int, tag: str, retry_seconds: float = 2.0,
                 ack_timeout: float = 10.0):
        super().__init__(host, port, retry_seconds)
        self.tag, self.ack_timeout = tag, ack_timeout
        self.pending: list[list] = []  # [time, record] entries not acknowledged yet

    def send_record(self, now: float, record: dict) -> None:
        self.pending.append([int(now), record])
        while self.pending:
            try:
                self._send_pending()
            except (OSError, ValueError) as exc:
                self.retry(exc)

    def _send_pending(self) -> None:
        if self.sock is None:
            self.sock = socket.create_connection(self.address, timeout=5)
        chunk = uuid.uuid4().hex
        self.sock.sendall(msgpack.packb([self.tag, self.pending, {"chunk": chunk}]))
        self.sock.settimeout(self.ack_timeout)
        replies = msgpack.Unpacker(raw=False)
        while True:
            data = self.sock.recv(4096)
            if not data:
                raise ConnectionError("connection closed before the ack")
            replies.feed(data)
            for reply in replies:
                if isinstance(reply, dict) and reply.get("ack") == chunk:
                    self.pending.clear()
                    return


def _stop(signum, frame):
    raise SystemExit(0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1", help="Fluent Bit host")
    parser.add_argument("--syslog-port", type=int, default=5140)
    parser.add_argument("--forward-port", type=int, default=24224)
    parser.add_argument("--rate", type=float, default=2.0, help="records per second (0: none)")
    parser.add_argument("--count", type=int, default=0, help="stop after N records (0: never)")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--retry-seconds", type=float, default=2.0,
                        help="wait before reconnecting after a failure")
    parser.add_argument("--ack-timeout", type=float, default=10.0,
                        help="seconds to wait for Fluent Bit's forward ack before resending")
    args = parser.parse_args(argv)
    if args.rate <= 0:
        print("demo: rate 0, sending nothing", flush=True)
        return 0
    # PID 1 in a container gets no default action for SIGTERM: without a handler, `docker stop`
    # waits its 10 s and kills.
    previous = signal.signal(signal.SIGTERM, _stop)
    rng = random.Random(args.seed)
    syslog = Sender(args.host, args.syslog_port, args.retry_seconds)
    forward = AckedForward(args.host, args.forward_port, "falco", args.retry_seconds,
                           args.ack_timeout)
    print(f"demo: sending {args.rate:g} records/s to {args.host}", flush=True)
    try:
        for seq in itertools.count(1):
            now = time.time()
            kind = seq % 3
            if kind == 0 and msgpack is not None:
                forward.send_record(now, falco_record(rng, now, seq))
            elif kind == 1:
                syslog.send(neuvector_line(rng, now, seq))
            else:
                syslog.send(sshd_line(rng, now))
            if args.count and seq >= args.count:
                return 0
            time.sleep(1.0 / args.rate)
    except KeyboardInterrupt:
        return 0
    finally:
        syslog.close()
        forward.close()
        signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
