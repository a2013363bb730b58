"""Helpers for the sink tests: events, spool filling, running the sink as a process."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time

ACCOUNT = "123456789012"
CHANNEL_ARN = f"arn:aws:cloudtrail:us-east-1:{ACCOUNT}:channel/0b9a1c0e-5d33-4a5f-9f55-3c7a1a2b3c4d"
MISSING_CHANNEL_ARN = f"arn:aws:cloudtrail:us-east-1:{ACCOUNT}:channel/1b9a1c0e-5d33-4a5f-9f55-3c7a1a2b3c4d"


def event(i: int | str, pad: int = 0, **extra) -> dict:
    data = {"UID": f"evt-{i}", "userIdentity": {"type": "CustomUserIdentity", "principalId": "alice"},
            "eventSource": "app.example.com", "eventName": "Login",
            "eventTime": "2026-11-27T10:00:00Z"}
    if pad:
        data["additionalEventData"] = {"pad": "x" * pad}
    data.update(extra)
    return data


def fill(spool_dir, events, max_events: int = 500, tag: str = "test") -> list[str]:
    from cloudtrail_sink.spool import SpoolWriter

    with SpoolWriter(spool_dir, max_events=max_events, fsync=False) as w:
        for e in events:
            w.write(e, tag=tag)
    return [os.path.basename(p) for p in w.sealed]


def uids_in_segment(path) -> list[str]:
    from cloudtrail_sink import spool
    from cloudtrail_sink.delivery.reader import Record, read_segment

    with spool.open_segment(str(path)) as f:
        return [r.value["eventData"]["UID"] for r in read_segment(f) if isinstance(r, Record)]


def stored_uids(emu) -> list[str]:
    return [e["eventData"]["UID"] for e in emu.events()]


def failed_lines(spool_dir) -> list[dict]:
    out = []
    folder = pathlib.Path(spool_dir) / "failed"
    for p in sorted(folder.glob("*.jsonl")):
        # Lines end at "\n" only: str.splitlines() would also cut at U+0085 and U+2028 that
        # JSON text may hold unescaped.
        out += [json.loads(line) for line in p.read_text().split("\n") if line]
    return out


def sink_cmd(spool_dir, *args) -> list[str]:
    return [sys.executable, "-m", "cloudtrail_sink", "run", "--spool-dir", str(spool_dir),
            "--listen", "127.0.0.1:0", *args]


def run_sink(spool_dir, url, *args, timeout: float = 60, channel=CHANNEL_ARN):
    return subprocess.run(sink_cmd(spool_dir, "--channel-arn", channel, "--endpoint-url", url,
                                   *args), capture_output=True, text=True, timeout=timeout)


class SinkProcess:
    """A ``cloudtrail-sink run`` child process, always killed at exit."""

    def __init__(self, spool_dir, url, *args, channel=CHANNEL_ARN):
        self.proc = subprocess.Popen(sink_cmd(spool_dir, "--channel-arn", channel,
                                              "--endpoint-url", url, *args),
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate(timeout=30)

    def terminate(self, timeout=30):
        self.proc.send_signal(signal.SIGTERM)
        out, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, out, err


def wait_for(predicate, timeout: float = 20.0, interval: float = 0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s")


def drain_config(spool_dir, url=None, **kw):
    """A ``run --drain`` configuration for in-process runs: quick linger and backoff."""
    from cloudtrail_sink.config import SinkConfig

    base = dict(spool_dir=str(spool_dir), channel_arn=CHANNEL_ARN, endpoint_url=url, listen="",
                drain=True, linger_ms=20, max_backoff_seconds=0.3, grace_seconds=5)
    base.update(kw)
    return SinkConfig(**base).validate()


def run_drain(cfg, rc: int = 0, **kw):
    """Run a Runner to the end of its drain in a thread; asserts its exit code is ``rc``."""
    from cloudtrail_sink.delivery.coordinator import Runner

    runner = Runner(cfg, **kw)
    done = threading.Event()
    result = {}

    def go():
        result["rc"] = runner.run()
        done.set()

    t = threading.Thread(target=go, name="test-runner", daemon=True)
    t.start()
    if not done.wait(90):
        runner.request_stop()
        t.join(10)
        raise AssertionError("sink did not drain within 90 s")
    assert result["rc"] == rc
    return runner
