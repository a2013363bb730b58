"""Shared pieces of the sink benchmarks (bench/sink_*.py): fake AWS environment, ~1 KB events,
a spool filler, a minimal local PutAuditEvents endpoint and the emulator as a process.

The minimal endpoint (``fast_endpoint``) answers every event as successful after parsing the
request: it measures the sink, not a store. ``emulator_process`` runs the real emulator (SQLite,
checks, quota) in its own process for figures that want the full path. Everything binds to
127.0.0.1; every process started here is killed by the context managers, also when the
benchmark itself is stopped with SIGTERM (:func:`exit_on_sigterm`).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

ACCOUNT = "123456789012"
CHANNEL_ARN = f"arn:aws:cloudtrail:us-east-1:{ACCOUNT}:channel/0b9a1c0e-5d33-4a5f-9f55-3c7a1a2b3c4d"
PY = sys.executable

_FAST_ENDPOINT = r'''
import json, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
import threading, time
ARRIVALS = {}
LOCK = threading.Lock()
RECORD = sys.argv[2] == "record"
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    def log_message(self, *a): pass
    def do_GET(self):  # /arrivals: {id: first arrival time} when started with "record"
        with LOCK:
            out = json.dumps(ARRIVALS).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)
    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        ids = [e["id"] for e in json.loads(body)["auditEvents"]]
        if RECORD:
            now = time.time()
            with LOCK:
                for i in ids:
                    ARRIVALS.setdefault(i, now)
        out = json.dumps({"successful": [{"id": i, "eventID": i} for i in ids],
                          "failed": []}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)
s = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H)
s.daemon_threads = True
print("ready", flush=True)
s.serve_forever()
'''


def fake_aws_env(tmp: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update({
        "AWS_ACCESS_KEY_ID": "AKIDEXAMPLE",
        "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": os.path.join(tmp, "aws-config-absent"),
        "AWS_SHARED_CREDENTIALS_FILE": os.path.join(tmp, "aws-credentials-absent"),
        "AWS_EC2_METADATA_DISABLED": "true",
    })
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(values: list[float], p: float) -> float:
    """The ``p``-th percentile of ``values``: the sample at the rounded position."""
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def event(i: int, size: int = 1000) -> dict:
    ev = {"version": "1.0", "UID": f"bench-{i}",
          "userIdentity": {"type": "CustomUserIdentity", "principalId": "bench-user"},
          "eventSource": "bench.example.com", "eventName": "Benchmark",
          "eventTime": "2026-11-27T10:00:00Z", "sourceIPAddress": "203.0.113.7",
          "recipientAccountId": ACCOUNT, "additionalEventData": {"seq": i, "pad": ""}}
    pad = size - len(json.dumps(ev, separators=(",", ":")))
    ev["additionalEventData"]["pad"] = "x" * max(0, pad)
    return ev


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit, so the context managers and ``finally`` blocks stop every
    process the benchmark started (by default SIGTERM ends Python without running them, and
    dozens of sinks and an emulator would be left behind)."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def fill_spool(spool_dir: str, n: int, size: int = 1000, per_segment: int = 500) -> None:
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "sink", "src"))
    from cloudtrail_sink.spool import SpoolWriter

    with SpoolWriter(spool_dir, max_events=per_segment, max_bytes=1 << 30, fsync=False) as w:
        for i in range(n):
            w.write(event(i, size), tag="bench", time=1.0)


@contextlib.contextmanager
def fast_endpoint(record: bool = False):
    port = free_port()
    proc = subprocess.Popen([PY, "-c", _FAST_ENDPOINT, str(port),
                             "record" if record else "-"], stdout=subprocess.PIPE, text=True)
    try:
        proc.stdout.readline()
        yield f"http://127.0.0.1:{port}", proc
    finally:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def emulator_process(tmp: str, quota: int = 0, faults: str | None = None):
    port = free_port()
    cmd = [PY, "-m", "cloudtrail_sink", "emulator", "--listen", f"127.0.0.1:{port}",
           "--db", os.path.join(tmp, "emulator.sqlite"), "--channel", CHANNEL_ARN,
           "--quota", str(quota), "--log-level", "WARNING"]
    if faults:
        cmd += ["--faults", faults]
    proc = subprocess.Popen(cmd, env=fake_aws_env(tmp))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(url + "/_emulator/stats", timeout=1).read()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("emulator did not start")
                time.sleep(0.1)
        yield url, proc
    finally:
        proc.kill()
        proc.wait()


def run_measured(cmd: list[str], env: dict, poll_rss: bool = False) -> dict:
    """Run a process to its end; returns wall seconds, CPU seconds (user+sys) and peak RSS."""
    start = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - start
    out = proc.stdout.read().decode()
    err = proc.stderr.read().decode()
    proc.stdout.close()
    proc.stderr.close()
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"wall": wall, "cpu": usage.ru_utime + usage.ru_stime,
            "maxrss_mb": usage.ru_maxrss / 1024.0, "rc": proc.returncode, "out": out, "err": err}


def sink_run_cmd(spool_dir: str, url: str, *extra: str) -> list[str]:
    return [PY, "-m", "cloudtrail_sink", "run", "--spool-dir", spool_dir, "--channel-arn",
            CHANNEL_ARN, "--endpoint-url", url, "--listen", "", "--drain",
            "--log-level", "warning", *extra]
