#!/usr/bin/env python3
"""Many nodes sharing one channel: N sinks drain their own spools into ONE emulator that
enforces the service's per-account call quota (default 100 calls/s, as CloudTrail Data does).

Figures printed, each next to a baseline measured in the same run:
- total events/s delivered by N sinks together, next to ONE sink alone against the same quota
  (and the quota's ceiling: calls/s x 100 events per call);
- the share of PutAuditEvents calls the emulator answered with ThrottlingException.

Usage (from the repository root, with the package installed):

    python bench/many_sinks.py [--sinks 10] [--events-per-sink 20000] [--quota 100]
                               [--event-bytes 1000] [--json]

On a small machine the sinks' own CPU may cap the rate below the quota (the script says so);
``--quota 20 --events-per-sink 4000`` shows the shares when the quota binds.

Everything listens on 127.0.0.1 only; every process started here is killed on exit.
The emulator runs as its own process (``cloudtrail-sink emulator``) so that it does not share a
Python interpreter with the sinks or with this script.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

# bench/ is on sys.path when this runs as a script.
from sink_common import ACCOUNT, CHANNEL_ARN, exit_on_sigterm, fake_aws_env, free_port


def event(uid: str, size: int) -> dict:
    ev = {"version": "1.0", "UID": uid,
          "userIdentity": {"type": "CustomUserIdentity", "principalId": "bench"},
          "eventSource": "bench.example.com", "eventName": "ManySinks",
          "eventTime": "2026-11-27T10:00:00Z", "recipientAccountId": ACCOUNT,
          "sourceIPAddress": "192.0.2.1"}
    base = len(json.dumps(ev, separators=(",", ":")))
    if size > base + 40:
        ev["additionalEventData"] = {"pad": "x" * (size - base - 40)}
    return ev


def fill_spool(root: str, prefix: str, n: int, size: int) -> None:
    from cloudtrail_sink.spool import SpoolWriter

    with SpoolWriter(root, kind="cli", max_events=500, fsync=False) as w:
        for i in range(n):
            w.write(event(f"{prefix}-{i:07d}", size), tag="bench")


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


class Emulator:
    def __init__(self, tmp: str, quota: float, env: dict):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.db = os.path.join(tmp, f"emulator-{self.port}.sqlite")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cloudtrail_sink", "emulator", "--listen",
             f"127.0.0.1:{self.port}", "--db", self.db, "--channel", CHANNEL_ARN,
             "--quota", str(quota)],
            env=env, stdout=subprocess.DEVNULL, stderr=open(os.path.join(tmp, "emulator.log"), "ab"),
            start_new_session=True)
        deadline = time.monotonic() + 30
        while True:
            try:
                self.stats()
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"emulator did not start (see {tmp}/emulator.log)")
                time.sleep(0.1)

    def stats(self) -> dict:
        return get_json(f"{self.url}/_emulator/stats")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


def run_round(tmp: str, n_sinks: int, per_sink: int, size: int, quota: float, env: dict,
              label: str) -> dict:
    """Fill ``n_sinks`` spools, start one emulator and the sinks (--drain), time the delivery."""
    spools = []
    for k in range(n_sinks):
        root = os.path.join(tmp, f"{label}-spool-{k:02d}")
        fill_spool(root, f"{label}-{k:02d}", per_sink, size)
        spools.append(root)
    emu = Emulator(tmp, quota, env)
    procs = []
    try:
        before = emu.stats()
        t0 = time.monotonic()
        for k, root in enumerate(spools):
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "cloudtrail_sink", "run", "--spool-dir", root,
                 "--channel-arn", CHANNEL_ARN, "--endpoint-url", emu.url, "--listen", "",
                 "--drain", "--log-level", "warning"],
                env=env, stdout=subprocess.DEVNULL,
                stderr=open(os.path.join(tmp, f"{label}-sink-{k:02d}.log"), "ab"),
                start_new_session=True))
        # Steady-state rate: from the first accepted event to the last, sampled every 0.2 s from
        # the emulator (excludes the sinks' start-up and exit, which the wall time includes).
        first_t = last_t = None
        total = n_sinks * per_sink
        accepted = 0
        while any(p.poll() is None for p in procs):
            st = emu.stats()
            now = time.monotonic()
            if st["accepted"] - before["accepted"] > accepted:
                last_t = now  # the last sample at which events were still arriving
            accepted = st["accepted"] - before["accepted"]
            if first_t is None and accepted > 0:
                first_t = now
            if now - t0 > 3600:
                raise RuntimeError("round took over an hour")
            time.sleep(0.2)
        wall = time.monotonic() - t0
        st = emu.stats()
        accepted = st["accepted"] - before["accepted"]
        codes = [p.returncode for p in procs]
        if any(codes):
            raise RuntimeError(f"{label}: sink exit codes {codes} (logs in {tmp})")
        requests = st.get("requests", {})
        calls = sum(requests.values())
        throttled = sum(n for outcome, n in requests.items() if "hrottl" in outcome)
        if last_t is None or st["accepted"] - before["accepted"] > accepted:
            last_t = time.monotonic()
        steady = (last_t - first_t) if first_t and last_t > first_t else wall
        return {"sinks": n_sinks, "events": total, "accepted": accepted,
                "wall_seconds": round(wall, 2),
                "events_per_second_wall": round(accepted / wall, 1),
                "events_per_second_steady": round(accepted / steady, 1) if steady > 0 else None,
                "calls": calls, "throttled_calls": throttled,
                "calls_per_second": round(calls / steady, 1) if steady > 0 else None,
                "throttled_share": round(throttled / calls, 4) if calls else None,
                "requests": requests}
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        emu.stop()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sinks", type=int, default=10)
    ap.add_argument("--events-per-sink", type=int, default=20_000)
    ap.add_argument("--quota", type=float, default=100.0, help="calls/s the emulator allows")
    ap.add_argument("--event-bytes", type=int, default=1000)
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = ap.parse_args(argv)
    exit_on_sigterm()  # the finally blocks then stop every process started here

    tmp = tempfile.mkdtemp(prefix="bench-many-sinks-")
    try:
        env = fake_aws_env(tmp)
        os.environ.update({k: env[k] for k in env if k.startswith("AWS_")})
        # Baseline: one sink alone carrying the same total, against the same quota.
        total = args.sinks * args.events_per_sink
        one = run_round(tmp, 1, total, args.event_bytes, args.quota, env, "one")
        many = run_round(tmp, args.sinks, args.events_per_sink, args.event_bytes, args.quota,
                         env, "many")
    except BaseException:
        print(f"many_sinks: failed; logs kept in {tmp}", file=sys.stderr)
        raise
    ceiling = args.quota * 100
    result = {"quota_calls_per_second": args.quota, "ceiling_events_per_second": ceiling,
              "event_bytes": args.event_bytes, "one_sink": one, "many_sinks": many}
    shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"many sinks sharing one channel (quota {args.quota:g} calls/s -> ceiling "
          f"{ceiling:,.0f} events/s; ~{args.event_bytes} B events)")
    for name, r in (("1 sink (baseline)", one), (f"{args.sinks} sinks", many)):
        share = "n/a" if r["throttled_share"] is None else f"{100 * r['throttled_share']:.1f}%"
        print(f"  {name:18s} {r['events_per_second_steady']:>10,.0f} events/s steady "
              f"({r['events_per_second_wall']:,.0f} incl. start-up, {r['accepted']:,} events in "
              f"{r['wall_seconds']} s); calls {r['calls']:,}, throttled {r['throttled_calls']:,} "
              f"= {share}")
        if r["calls_per_second"] and r["calls_per_second"] < 0.9 * args.quota:
            print(f"  {'':18s} (quota not binding: {r['calls_per_second']:.0f} calls/s offered < "
                  f"{args.quota:g}; the machine, not the quota, limited this round)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
