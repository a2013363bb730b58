#!/usr/bin/env python3
"""Start-up with a large backlog of segments: time until the first event reaches the endpoint
with 100,000 segments in ready/ (one event each), next to the same with one segment (the
baseline: interpreter, boto3 and threads, measured in the same run). Also prints the peak RSS
and how long the whole backlog takes to drain.

Usage: python bench/sink_startup.py [--segments 100000]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sink_common as common  # noqa: E402


def fill(spool_dir: str, segments: int, prefix: str) -> None:
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "sink", "src"))
    from cloudtrail_sink.spool import SpoolWriter

    with SpoolWriter(spool_dir, max_events=1, fsync=False) as w:
        for i in range(segments):
            w.write(common.event(i, 300) | {"UID": f"{prefix}-{i}"}, tag="bench")


def first_arrival(url: str, prefix: str, timeout: float = 300) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        arrivals = json.loads(urllib.request.urlopen(url + "/arrivals", timeout=5).read())
        mine = [t for uid, t in arrivals.items() if uid.startswith(prefix + "-")]
        if mine:
            return min(mine)
        time.sleep(0.01)
    raise RuntimeError("no event arrived")


def run(tmp: str, url: str, env: dict, segments: int, prefix: str) -> dict:
    spool_dir = os.path.join(tmp, prefix)
    fill(spool_dir, segments, prefix)
    cmd = common.sink_run_cmd(spool_dir, url)
    start = time.time()
    proc = subprocess.Popen(cmd, env=env)
    try:
        first = first_arrival(url, prefix) - start
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    finally:
        if proc.returncode is None:
            proc.kill()
            proc.wait()
    return {"first": first, "drain": time.time() - start, "rss": usage.ru_maxrss / 1024,
            "rc": proc.returncode, "left": len(os.listdir(os.path.join(spool_dir, "ready")))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--segments", type=int, default=100_000)
    args = ap.parse_args()
    common.exit_on_sigterm()
    tmp = tempfile.mkdtemp(prefix="sink-startup-")
    env = common.fake_aws_env(tmp)
    try:
        with common.fast_endpoint(record=True) as (url, _):
            base = run(tmp, url, env, 1, "one")
            big = run(tmp, url, env, args.segments, "many")
        for name, r in (("1 segment (baseline)", base), (f"{args.segments} segments", big)):
            print(f"{name:22} first event after {r['first']:6.2f} s, all delivered and the "
                  f"sink exited after {r['drain']:7.2f} s, peak RSS {r['rss']:6.1f} MB, "
                  f"{r['left']} left")
        return 0 if big["rc"] == 0 and big["left"] == 0 else 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
