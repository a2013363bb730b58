#!/usr/bin/env python3
"""Peak memory while draining a large backlog (target: under 100 MB for 1,000,000 events).

Figures: the sink's peak RSS (``ru_maxrss`` of the process) draining N ~1 KB events already in
``ready/`` (500 per segment, as the Lua writer seals them), next to the baseline measured in the
same run: the same sink starting and stopping on an empty spool (interpreter + boto3 + threads).
Also prints the drain rate. The spool needs N x ~1.1 KB of disk.

Usage: python bench/sink_rss.py [--events 1000000] [--event-bytes 1000]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sink_common as common  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--event-bytes", type=int, default=1000)
    args = ap.parse_args()
    common.exit_on_sigterm()
    tmp = tempfile.mkdtemp(prefix="sink-rss-")
    env = common.fake_aws_env(tmp)
    try:
        spool_dir, empty_dir = os.path.join(tmp, "spool"), os.path.join(tmp, "empty")
        t = time.monotonic()
        common.fill_spool(spool_dir, args.events, args.event_bytes)
        common.fill_spool(empty_dir, 0)
        print(f"spool filled with {args.events} events in {time.monotonic() - t:.1f} s",
              flush=True)
        with common.fast_endpoint() as (url, _):
            empty = common.run_measured(common.sink_run_cmd(empty_dir, url), env)
            full = common.run_measured(common.sink_run_cmd(spool_dir, url), env)
        if full["rc"] != 0:
            print(full["err"], file=sys.stderr)
            return 1
        left = len(os.listdir(os.path.join(spool_dir, "ready")))
        print(f"baseline, empty spool:            peak RSS {empty['maxrss_mb']:6.1f} MB")
        print(f"draining {args.events:>9} events:     peak RSS {full['maxrss_mb']:6.1f} MB "
              f"(+{full['maxrss_mb'] - empty['maxrss_mb']:.1f} MB), "
              f"{args.events / full['wall']:.0f} events/s, {left} segments left")
        print("target peak RSS < 100 MB: " + ("met" if full["maxrss_mb"] < 100 else "NOT met"))
        return 0 if left == 0 else 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
