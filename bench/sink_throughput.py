#!/usr/bin/env python3
"""Sink throughput and CPU per event, next to a bare boto3 loop measured in the same run.

Figures (targets from the issue: >= 10,000 events/s to a local endpoint with ~1 KB events; the
sink's CPU per event within 1.5x of a bare boto3 loop sending the same pre-built batches):

- sink: ``cloudtrail-sink run --drain`` over a spool of N events (read, check, batch, send,
  settle, delete); events/s and CPU microseconds per event, with the cost of an empty start/stop
  run (Python + boto3 import) subtracted and also shown;
- baseline: one Python process that builds the same 100-event requests in advance, then only
  calls ``put_audit_events`` in a loop (CPU counted for the loop only), once with boto3's default
  client and once with the client settings the sink uses (adaptive retries, no botocore
  parameter validation, which the sink replaces by its own checks).

Sink runs and baseline runs alternate for --rounds rounds (default 3) and the medians are printed,
so that a busy neighbour on a shared machine hurts both alike.

Usage: python bench/sink_throughput.py [--events 100000] [--event-bytes 1000] [--rounds 3] [--emulator]
(``--emulator`` sends to the real emulator process, quota off, instead of the minimal endpoint.)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sink_common as common  # noqa: E402

BARE_LOOP = r'''
import json, resource, sys, time
sys.path.insert(0, sys.argv[5])
import boto3
from botocore.config import Config
from cloudtrail_sink import events
import sink_common as common
n, size, url, mode = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
batches, batch = [], []
for i in range(n):
    p = events.build({"eventData": common.event(i, size)}, common.ACCOUNT)
    batch.append(p.entry())
    if len(batch) == 100:
        batches.append(batch); batch = []
if batch:
    batches.append(batch)
if mode == "default":
    client = boto3.client("cloudtrail-data", endpoint_url=url)
else:
    client = boto3.client("cloudtrail-data", endpoint_url=url, config=Config(
        retries={"mode": "adaptive", "max_attempts": 3}, parameter_validation=False,
        tcp_keepalive=True))
client.put_audit_events(channelArn=common.CHANNEL_ARN, auditEvents=batches[0][:1])  # connect
r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
sent = 0
for b in batches:
    resp = client.put_audit_events(channelArn=common.CHANNEL_ARN, auditEvents=b)
    sent += len(resp["successful"])
r1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
print(json.dumps({"events": sent, "wall": t1 - t0,
                  "cpu": (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)}))
'''


def figures(args, empty: dict, sink: dict, bare: dict, left: int) -> dict:
    n = args.events
    result = {
        "events": n, "event_bytes": args.event_bytes,
        "endpoint": "emulator (quota off)" if args.emulator else "minimal local endpoint",
        "sink_events_per_s": n / sink["wall"],
        "sink_events_per_s_excl_startup": n / (sink["wall"] - empty["wall"]),
        "sink_cpu_us_per_event": 1e6 * sink["cpu"] / n,
        "sink_cpu_us_per_event_excl_startup": 1e6 * (sink["cpu"] - empty["cpu"]) / n,
        "startup_cpu_s": float(empty["cpu"]), "startup_wall_s": float(empty["wall"]),
        "sink_segments_left": left,
    }
    for mode, res in bare.items():
        result[f"bare_{mode}_events_per_s"] = res["events"] / res["wall"]
        result[f"bare_{mode}_cpu_us_per_event"] = 1e6 * res["cpu"] / res["events"]
    result["cpu_ratio_vs_bare_sink_config"] = (result["sink_cpu_us_per_event_excl_startup"]
                                               / result["bare_sink-config_cpu_us_per_event"])
    result["cpu_ratio_vs_bare_default"] = (result["sink_cpu_us_per_event_excl_startup"]
                                           / result["bare_default_cpu_us_per_event"])
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--events", type=int, default=100_000)
    ap.add_argument("--event-bytes", type=int, default=1000)
    ap.add_argument("--max-in-flight", type=int, default=4)
    ap.add_argument("--emulator", action="store_true")
    ap.add_argument("--sink-arg", action="append", default=[],
                    help="extra argument for cloudtrail-sink run (repeatable)")
    ap.add_argument("--rounds", type=int, default=3,
                    help="interleaved sink/baseline rounds; medians are printed")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    common.exit_on_sigterm()

    tmp = tempfile.mkdtemp(prefix="sink-throughput-")
    env = common.fake_aws_env(tmp)
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        empty_dir = os.path.join(tmp, "empty")
        common.fill_spool(empty_dir, 0)
        endpoint = (common.emulator_process(tmp, quota=0) if args.emulator
                    else common.fast_endpoint())
        rounds = []
        with endpoint as (url, _):
            extra = ["--max-in-flight", str(args.max_in_flight)] + args.sink_arg
            for r in range(args.rounds):
                # Sink and baselines alternate, so a busy neighbour hurts both alike.
                spool_dir = os.path.join(tmp, f"spool-{r}")
                common.fill_spool(spool_dir, args.events, args.event_bytes)
                empty = common.run_measured(common.sink_run_cmd(empty_dir, url, *extra), env)
                sink = common.run_measured(common.sink_run_cmd(spool_dir, url, *extra), env)
                if sink["rc"] != 0:
                    print(sink["err"], file=sys.stderr)
                    return 1
                left = len(os.listdir(os.path.join(spool_dir, "ready")))
                shutil.rmtree(spool_dir, ignore_errors=True)
                bare = {}
                for mode in ("default", "sink-config"):
                    res = common.run_measured([common.PY, "-c", BARE_LOOP, str(args.events),
                                               str(args.event_bytes), url, mode, here], env)
                    if res["rc"] != 0:
                        print(res["err"], file=sys.stderr)
                        return 1
                    bare[mode] = json.loads(res["out"])
                rounds.append(figures(args, empty, sink, bare, left))
        result = {k: (statistics.median(r[k] for r in rounds)
                      if isinstance(rounds[0][k], float) else rounds[0][k]) for k in rounds[0]}
        result["rounds"] = args.rounds
        result["sink_segments_left"] = max(r["sink_segments_left"] for r in rounds)
        result["cpu_ratio_vs_bare_sink_config_each_round"] = [
            round(r["cpu_ratio_vs_bare_sink_config"], 2) for r in rounds]
        n = args.events
        if args.json:
            print(json.dumps(result))
        else:
            print(f"events: {n} x ~{args.event_bytes} B to the {result['endpoint']}; medians of "
                  f"{args.rounds} interleaved rounds")
            print(f"sink:                      {result['sink_events_per_s']:9.0f} events/s "
                  f"({result['sink_events_per_s_excl_startup']:.0f} excluding a "
                  f"{result['startup_wall_s']:.2f} s start/stop), "
                  f"{result['sink_cpu_us_per_event_excl_startup']:6.1f} us CPU/event "
                  f"({result['sink_cpu_us_per_event']:.1f} with start-up)")
            for mode in ("default", "sink-config"):
                print(f"bare boto3 loop ({mode:11}): {result[f'bare_{mode}_events_per_s']:9.0f} "
                      f"events/s, {result[f'bare_{mode}_cpu_us_per_event']:6.1f} us CPU/event")
            print(f"sink CPU/event vs bare loop: {result['cpu_ratio_vs_bare_sink_config']:.2f}x "
                  f"(same client settings), {result['cpu_ratio_vs_bare_default']:.2f}x "
                  f"(boto3 defaults); target <= 1.5x; per round (same settings): "
                  f"{result['cpu_ratio_vs_bare_sink_config_each_round']}")
            print("target >= 10000 events/s: "
                  + ("met" if result["sink_events_per_s_excl_startup"] >= 10_000 else "NOT met"))
        return 0 if result["sink_segments_left"] == 0 else 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
