"""Helpers shared by the reliability tests: fake AWS environment for subprocesses, event
factories, a process group that is always cleaned up, and reading back what the emulator stored.

Every process started through :class:`Processes` is SIGKILLed (and reaped) when the test ends,
whatever the outcome; every server binds to 127.0.0.1 only.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from typing import Iterable

ACCOUNT = "123456789012"
OTHER_ACCOUNT = "210987654321"
CHANNEL_ARN = f"arn:aws:cloudtrail:us-east-1:{ACCOUNT}:channel/0b9a1c0e-5d33-4a5f-9f55-3c7a1a2b3c4d"
OTHER_CHANNEL_ARN = (f"arn:aws:cloudtrail:us-east-1:{OTHER_ACCOUNT}:channel/"
                     "7c1d2e3f-4a5b-4c6d-8e9f-0a1b2c3d4e5f")


def aws_environ(tmp_path) -> dict:
    """Environment for a sink subprocess: fake static keys, a region, no profile, no IMDS."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update({
        "AWS_ACCESS_KEY_ID": "AKIDEXAMPLE",
        "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": str(tmp_path / "aws-config-absent"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "aws-credentials-absent"),
        "AWS_EC2_METADATA_DISABLED": "true",
        "PYTHONUNBUFFERED": "1",
    })
    return env


def make_event(uid: str, pad: int = 0, account: str = ACCOUNT) -> dict:
    """A valid integration event whose UID is ``uid``; ``pad`` bytes of filler make it bigger."""
    event = {
        "version": "1.0",
        "UID": uid,
        "userIdentity": {"type": "CustomUserIdentity", "principalId": "reliability"},
        "eventSource": "reliability.example.com",
        "eventName": "Ship",
        "eventTime": "2026-11-27T10:00:00Z",
        "recipientAccountId": account,
        "sourceIPAddress": "192.0.2.10",
    }
    if pad:
        event["additionalEventData"] = {"pad": "x" * pad}
    return event


def sink_cmd(spool, endpoint_url: str, channel_arn: str = CHANNEL_ARN, *extra: str) -> list[str]:
    # --listen on port 0: several sinks (and other tests) never fight over the metrics port.
    return [sys.executable, "-m", "cloudtrail_sink", "run", "--spool-dir", str(spool),
            "--channel-arn", channel_arn, "--endpoint-url", endpoint_url,
            "--listen", "127.0.0.1:0", *extra]


def cli(args: Iterable[str], env: dict, timeout: float = 120, input: str | None = None
        ) -> subprocess.CompletedProcess:
    """Run ``cloudtrail-sink ARGS`` to completion (the venv's, as ``python -m``)."""
    return subprocess.run([sys.executable, "-m", "cloudtrail_sink", *args], env=env,
                          capture_output=True, text=True, timeout=timeout, input=input)


class Processes:
    """Starts subprocesses in their own process group and kills every one of them at the end."""

    def __init__(self, log_dir):
        self.log_dir = log_dir
        self.procs: list[subprocess.Popen] = []
        self.logs: list[str] = []
        self._n = 0

    def start(self, cmd: list[str], env: dict, name: str = "proc") -> subprocess.Popen:
        self._n += 1
        log_path = os.path.join(self.log_dir, f"{self._n:03d}-{name}.log")
        log = open(log_path, "wb")
        try:
            proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        finally:
            log.close()
        self.procs.append(proc)
        self.logs.append(log_path)
        return proc

    def kill(self, proc: subprocess.Popen) -> None:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(timeout=30)

    def tail(self, proc: subprocess.Popen, lines: int = 40) -> str:
        path = self.logs[self.procs.index(proc)]
        with open(path, "rb") as f:
            return b"\n".join(f.read().splitlines()[-lines:]).decode("utf-8", "replace")

    def cleanup(self) -> None:
        for proc in self.procs:
            try:
                self.kill(proc)
            except Exception:  # keep killing the others
                pass


def wait_for(predicate, timeout: float, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def wait_exit(proc: subprocess.Popen, timeout: float) -> int | None:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return None


def spool_files(spool, folder: str) -> list[str]:
    path = os.path.join(str(spool), folder)
    if not os.path.isdir(path):
        return []
    return sorted(os.listdir(path))


def failed_lines(spool) -> list[dict]:
    """Every dead-letter line in ``failed/*.jsonl``."""
    out = []
    folder = os.path.join(str(spool), "failed")
    for name in spool_files(spool, "failed"):
        if not name.endswith(".jsonl"):
            continue
        with open(os.path.join(folder, name), encoding="utf-8") as f:
            out.extend(json.loads(line) for line in f if line.strip())
    return out


def http_json(url: str, method: str = "GET", body=None, timeout: float = 10):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read() or b"null")


def _query(emu, sql: str, args=()) -> list[tuple]:
    """Run a read-only query on the emulator's SQLite file (table ``events``: seq, event_id,
    channel_arn, uid, body); works while the emulator runs (WAL) and after it stopped."""
    db = os.fspath(emu.db_path) if hasattr(emu, "db_path") else os.fspath(emu)
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        return con.execute(sql, args).fetchall()
    finally:
        con.close()


def stored_uids(emu, channel_arn: str | None = None) -> list[str]:
    """The UID of every event the emulator stored, one entry per stored copy (duplicates kept)."""
    if channel_arn is None:
        rows = _query(emu, "SELECT uid FROM events ORDER BY seq")
    else:
        rows = _query(emu, "SELECT uid FROM events WHERE channel_arn = ? ORDER BY seq",
                      (channel_arn,))
    return [r[0] for r in rows]


def stored_event_data(emu) -> list[dict]:
    """``eventData`` of every stored event (the service's wrapper removed), oldest first."""
    return [json.loads(r[0])["eventData"] for r in _query(emu, "SELECT body FROM events ORDER BY seq")]


class RefusingProxy:
    """A loopback HTTP proxy in front of the emulator that plays the service refusing some
    events for good: while ``refusing`` is set, every event whose UID starts with ``prefix`` is
    taken out of the request and answered in ``failed[]`` with ``code`` (as CloudTrail Data
    answers ``AccountNotSubscribed`` or ``InvalidEventSource``); the rest is forwarded as is and
    the two answers merged. The emulator checks only the form of SigV4 (no credentials), so a
    shortened body still passes.
    """

    def __init__(self, upstream_url: str, prefix: str, code: str = "AccountNotSubscribed",
                 message: str = "The account is not subscribed to CloudTrail Lake"):
        import http.client
        import threading
        import urllib.parse
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        up = urllib.parse.urlsplit(upstream_url)
        proxy = self
        self.refusing = True
        self.refused = 0

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                failed = []
                try:
                    doc = json.loads(body)
                    entries = doc.get("auditEvents") or []
                except ValueError:
                    doc, entries = None, []
                if proxy.refusing and doc is not None:
                    keep = []
                    for entry in entries:
                        try:
                            uid = json.loads(entry.get("eventData") or "{}").get("UID", "")
                        except ValueError:
                            uid = ""
                        if isinstance(uid, str) and uid.startswith(prefix):
                            failed.append({"id": entry.get("id"), "errorCode": code,
                                           "errorMessage": message})
                        else:
                            keep.append(entry)
                    proxy.refused += len(failed)
                    if not keep and failed:
                        return self._answer(200, {"successful": [], "failed": failed})
                    doc["auditEvents"] = keep
                    body = json.dumps(doc).encode()
                conn = http.client.HTTPConnection(up.hostname, up.port, timeout=60)
                try:
                    headers = {k: v for k, v in self.headers.items()
                               if k.lower() not in ("content-length", "connection")}
                    headers["Content-Length"] = str(len(body))
                    conn.request("POST", self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    status, resp_headers = resp.status, resp.getheaders()
                finally:
                    conn.close()
                if status == 200 and failed:
                    answer = json.loads(data)
                    answer["failed"] = list(answer.get("failed") or []) + failed
                    return self._answer(200, answer)
                self.send_response(status)
                for k, v in resp_headers:
                    if k.lower() not in ("content-length", "connection", "transfer-encoding"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _answer(self, status, obj):
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True,
                                        name="refusing-proxy")
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)
