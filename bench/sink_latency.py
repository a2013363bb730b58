#!/usr/bin/env python3
"""End-to-end latency at a trickle: 10 events/s, each sealed in its own segment, from the
moment its segment is published in ready/ to the moment the endpoint receives it.

Figures: p50 / p99 / max for the sink with its default linger (200 ms) and with ``--linger-ms
20``, next to the baseline measured in the same run: a bare boto3 ``put_audit_events`` of one
event to the same endpoint (the floor any sink pays).

Usage: python bench/sink_latency.py [--events 200] [--rate 10]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sink_common as common  # noqa: E402


def measure_sink(tmp: str, url: str, env: dict, n: int, rate: float, linger: int) -> list[float]:
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "sink", "src"))
    from cloudtrail_sink.spool import SpoolWriter

    spool_dir = os.path.join(tmp, f"spool-{linger}")
    os.makedirs(spool_dir)
    cmd = [common.PY, "-m", "cloudtrail_sink", "run", "--spool-dir", spool_dir, "--channel-arn",
           common.CHANNEL_ARN, "--endpoint-url", url, "--listen", "", "--linger-ms", str(linger),
           "--log-level", "warning"]
    proc = subprocess.Popen(cmd, env=env)
    sealed: dict[str, float] = {}
    try:
        time.sleep(2.0)  # start-up is measured by sink_startup.py, not here
        with SpoolWriter(spool_dir, max_events=1, fsync=False) as w:
            start = time.monotonic()
            for i in range(n):
                uid = f"lat-{linger}-{i}"
                w.write(common.event(i) | {"UID": uid}, tag="bench")  # max_events=1: sealed now
                sealed[uid] = time.time()
                time.sleep(max(0.0, start + (i + 1) / rate - time.monotonic()))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            arrivals = json.loads(urllib.request.urlopen(url + "/arrivals", timeout=5).read())
            if all(uid in arrivals for uid in sealed):
                break
            time.sleep(0.2)
    finally:
        proc.terminate()
        proc.wait(30)
    return [arrivals[uid] - t for uid, t in sealed.items() if uid in arrivals]


def measure_bare(url: str, env: dict, n: int) -> list[float]:
    code = r'''
import json, sys, time, boto3
sys.path.insert(0, sys.argv[2])
import sink_common as common
from cloudtrail_sink import events
c = boto3.client("cloudtrail-data", endpoint_url=sys.argv[1])
out = []
for i in range(int(sys.argv[3])):
    p = events.build({"eventData": common.event(i) | {"UID": f"bare-{i}"}}, common.ACCOUNT)
    t = time.time()
    c.put_audit_events(channelArn=common.CHANNEL_ARN, auditEvents=[p.entry()])
    out.append(time.time() - t)
    time.sleep(0.01)
print(json.dumps(out))
'''
    here = os.path.dirname(os.path.abspath(__file__))
    res = subprocess.run([common.PY, "-c", code, url, here, str(n)], env=env,
                         capture_output=True, text=True, check=True)
    return json.loads(res.stdout)[5:]  # the first calls open the connection


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--events", type=int, default=200)
    ap.add_argument("--rate", type=float, default=10.0)
    args = ap.parse_args()
    common.exit_on_sigterm()
    tmp = tempfile.mkdtemp(prefix="sink-latency-")
    env = common.fake_aws_env(tmp)
    try:
        with common.fast_endpoint(record=True) as (url, _):
            rows = [("bare boto3 call, 1 event", measure_bare(url, env, 100))]
            for linger in (200, 20):
                rows.append((f"sink, --linger-ms {linger}",
                             measure_sink(tmp, url, env, args.events, args.rate, linger)))
        print(f"latency from segment published to event received, {args.rate:g} events/s, "
              f"one event per segment")
        for name, values in rows:
            ms = [v * 1000 for v in values]
            print(f"{name:28} n={len(ms):4}  p50 {statistics.median(ms):7.1f} ms  "
                  f"p99 {common.pct(ms, 99):7.1f} ms  max {max(ms):7.1f} ms")
        return 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
