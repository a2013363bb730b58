#!/usr/bin/env python3
"""A cluster's nodes sharing one account's PutAuditEvents quota, scaled down onto one machine.

Each "node" gets a small sealed segment every second (as the Lua filter's age seal produces at
low rates), written with the project's SpoolWriter; one emulator process enforces the quota for
all of them. Modes:

``per-node``    one sink process per node (the DaemonSet topology), each on its own spool;
``aggregator``  the nodes' events go to ``--aggregators`` sinks (default 1), as when Fluent Bit on
                each node forwards to an aggregator StatefulSet whose Lua filter spools them
                (segments sealed at 1 s or 500 events, like the filter's defaults);
``latency``     one sink at ``--latency-rate`` events/s (one event per segment), no quota
                pressure: spool-to-acknowledgement latency (segment published in ready/ to
                segment deleted after its last event was accepted), p50/p99/max.

Printed for per-node and aggregator: attempted calls/s, throttled share, events per accepted
call, peak backlog (events written and not yet accepted, also in seconds of writes), time to
catch up after the writers stop, events lost, and the spread of delivered events across nodes
(min/max per node when the writers stop). Per-node runs twice: with the defaults and, as the
baseline measured in the same run, with pacing off (``--max-pacing-delay-ms 0``: each batch
leaves after the plain linger, as before pacing existed); ``--no-baseline`` skips it.

Usage (repository root, package installed):

    python bench/cluster_scale.py [--mode per-node|aggregator|latency|all] [--nodes 40]
        [--rate 5] [--quota 10] [--seconds 60] [--sink-arg=--linger-ms=5000 ...] [--json]

Everything listens on 127.0.0.1 only; every process started here is stopped on exit.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sink_common as common  # noqa: E402

DELIVERED_RE = re.compile(r"^cloudtrail_sink_events_delivered_total (\S+)$", re.M)


def get(url: str, timeout: float = 10.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read()


class Sinks:
    """``n`` sink processes, one per spool, each with its /metrics on a port of its own."""

    def __init__(self, tmp: str, spools: list[str], url: str, env: dict, extra: list[str]):
        self.tmp, self.spools, self.url, self.env, self.extra = tmp, spools, url, env, extra
        # Ports are unique in the run: free_port() can give the same one twice, and a second
        # sink's /readyz would then be answered by the first one.
        self.ports: list[int] = []
        self.procs: list[subprocess.Popen] = []
        for k in range(len(spools)):
            self.ports.append(0)
            self.procs.append(self._start(k))
        deadline = time.monotonic() + 300  # 40 Python processes on a busy 2-core machine
        for k in range(len(spools)):
            restarts = 0
            while True:
                try:
                    get(f"http://127.0.0.1:{self.ports[k]}/readyz", timeout=2)
                    break
                except OSError:
                    if self.procs[k].poll() is not None and restarts < 3:
                        # Its port was taken meanwhile (another process's connection on a
                        # busy machine): start it again on another one.
                        restarts += 1
                        self.procs[k] = self._start(k)
                    elif self.procs[k].poll() is not None or time.monotonic() > deadline:
                        self.stop()
                        raise RuntimeError(f"a sink did not start (logs in {tmp})") from None
                    time.sleep(0.2)

    def _start(self, k: int) -> subprocess.Popen:
        port = common.free_port()
        while port in self.ports:
            port = common.free_port()
        self.ports[k] = port
        cmd = [common.PY, "-m", "cloudtrail_sink", "run", "--spool-dir", self.spools[k],
               "--channel-arn", common.CHANNEL_ARN, "--endpoint-url", self.url,
               "--listen", f"127.0.0.1:{port}", "--log-level", "warning", *self.extra]
        with open(os.path.join(self.tmp, f"sink-{k:03d}.log"), "ab") as log:
            return subprocess.Popen(cmd, env=self.env, stdout=subprocess.DEVNULL, stderr=log,
                                    start_new_session=True)

    def delivered(self) -> list[int]:
        out = []
        for port in self.ports:
            m = DELIVERED_RE.search(get(f"http://127.0.0.1:{port}/metrics").decode())
            out.append(int(float(m.group(1))) if m else 0)
        return out

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        for p in self.procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


def emulator_stats(url: str) -> dict:
    st = json.loads(get(url + "/_emulator/stats"))
    req = st.get("requests", {})
    throttled = sum(n for k, n in req.items() if "hrottl" in k)
    return {"accepted": st["accepted"], "calls": sum(req.values()), "throttled": throttled}


def segments_left(spools: list[str]) -> int:
    return sum(len([n for n in os.listdir(os.path.join(r, "ready")) if n.endswith(".seg")])
               + len(os.listdir(os.path.join(r, "failed"))) for r in spools)


def run_cluster(tmp: str, url: str, env: dict, label: str, nodes: int, rate: int, seconds: float,
                aggregators: int, extra: list[str], catch_up_limit: float = 180.0) -> dict:
    """Writers for ``nodes`` nodes for ``seconds``, into ``aggregators`` spools (0: one spool
    per node); measured from the writers' start until everything was accepted."""
    from cloudtrail_sink.spool import SpoolWriter

    n_spools = aggregators or nodes
    spools = [os.path.join(tmp, f"{label}-spool-{k:03d}") for k in range(n_spools)]
    if aggregators:
        writers = [SpoolWriter(r, kind="lua", max_events=500, max_age=1.0, fsync=False)
                   for r in spools]
    else:
        writers = [SpoolWriter(r, kind="lua", max_events=rate, fsync=False) for r in spools]
    sinks = Sinks(tmp, spools, url, env, extra)
    written = [0] * nodes
    stop = threading.Event()
    lock = threading.Lock()

    def write_all() -> None:
        # Node k writes its second's events at phase k/nodes of each second (nodes do not seal
        # in step); aggregator spools seal by age, checked at each write and each 50 ms.
        start = time.monotonic()
        tick = 0
        while not stop.is_set():
            second, slot = divmod(tick, nodes)
            at = start + second + slot / nodes
            if at - start >= seconds:
                break
            stop.wait(max(0.0, at - time.monotonic()))
            w = writers[slot % n_spools]
            with lock:
                for i in range(rate):
                    n = written[slot]
                    w.write(common.event(0, 500) | {"UID": f"{label}-{slot}-{n}"}, tag="bench")
                    written[slot] = n + 1
            tick += 1
            if aggregators and slot == nodes - 1:
                with lock:
                    for x in writers:
                        x.tick()
        with lock:
            for x in writers:
                x.seal()

    def age_seal() -> None:
        while not stop.wait(0.05):
            with lock:
                for x in writers:
                    x.tick()

    try:
        before = emulator_stats(url)
        t0 = time.monotonic()
        threads = [threading.Thread(target=write_all, daemon=True)]
        if aggregators:
            threads.append(threading.Thread(target=age_seal, daemon=True))
        for t in threads:
            t.start()
        peak = 0
        per_node_at_stop = None
        timeline = []  # every 5 s: seconds, calls, throttled calls (since the start)
        while threads[0].is_alive():
            st = emulator_stats(url)
            with lock:
                total = sum(written)
            peak = max(peak, total - (st["accepted"] - before["accepted"]))
            now = time.monotonic() - t0
            if not timeline or now - timeline[-1][0] >= 5:
                timeline.append((round(now, 1), st["calls"] - before["calls"],
                                 st["throttled"] - before["throttled"]))
            time.sleep(0.5)
        stop.set()
        for t in threads:
            t.join()
        t_stop = time.monotonic()
        total = sum(written)
        if not aggregators:
            per_node_at_stop = sinks.delivered()
        caught = None
        while time.monotonic() - t_stop < catch_up_limit:
            st = emulator_stats(url)
            accepted = st["accepted"] - before["accepted"]
            peak = max(peak, total - accepted)
            if accepted >= total and segments_left(spools) == 0:
                caught = time.monotonic() - t_stop
                break
            time.sleep(0.25)
        end = time.monotonic()
        st = emulator_stats(url)
    finally:
        stop.set()
        sinks.stop()
    calls = st["calls"] - before["calls"]
    throttled = st["throttled"] - before["throttled"]
    accepted = st["accepted"] - before["accepted"]
    result = {
        "label": label, "nodes": nodes, "sinks": n_spools, "events_per_node_per_second": rate,
        "seconds": seconds, "sink_args": extra, "written": total, "accepted": accepted,
        "lost": max(0, total - accepted) + segments_left(spools),
        "calls": calls, "throttled_calls": throttled,
        "attempted_calls_per_second": round(calls / (end - t0), 1),
        "throttled_share": round(throttled / calls, 4) if calls else None,
        "events_per_accepted_call": round(accepted / (calls - throttled), 1)
        if calls > throttled else None,
        "peak_backlog_events": peak,
        "peak_backlog_seconds_of_writes": round(peak / (nodes * rate), 1),
        "catch_up_seconds": None if caught is None else round(caught, 1),
        "timeline": timeline,
    }
    if per_node_at_stop:
        mean = statistics.mean(per_node_at_stop)
        result.update({"delivered_per_node_min": min(per_node_at_stop),
                       "delivered_per_node_max": max(per_node_at_stop),
                       "delivered_per_node_mean": round(mean, 1),
                       "min_over_mean": round(min(per_node_at_stop) / mean, 2) if mean else None})
    return result


def run_latency(tmp: str, url: str, env: dict, rate: float, seconds: float,
                extra: list[str]) -> dict:
    from cloudtrail_sink.spool import SpoolWriter

    root = os.path.join(tmp, "latency-spool")
    w = SpoolWriter(root, kind="lua", max_events=1, fsync=False)
    sinks = Sinks(tmp, [root], url, env, extra)
    published: dict[str, float] = {}
    gone: dict[str, float] = {}
    ready = os.path.join(root, "ready")
    try:
        start = time.monotonic()
        n = int(seconds * rate)
        i = 0
        while True:
            now = time.monotonic()
            if i < n and now >= start + i / rate:
                w.write(common.event(i, 500) | {"UID": f"lat-{i}"}, tag="bench")
                published[os.path.basename(w.sealed[-1])] = time.monotonic()
                i += 1
            present = set(os.listdir(ready))
            for name in published:
                if name not in gone and name not in present:
                    gone[name] = now
            if i >= n and len(gone) == len(published):
                break
            if now - start > seconds + 60:
                raise RuntimeError("latency round: segments not delivered within 60 s")
            time.sleep(0.005)
    finally:
        sinks.stop()
    lat = [gone[k] - published[k] for k in published]
    return {"events": len(lat), "rate": rate, "sink_args": extra,
            "p50_ms": round(1000 * common.pct(lat, 50), 1),
            "p99_ms": round(1000 * common.pct(lat, 99), 1),
            "max_ms": round(1000 * max(lat), 1)}


def show_cluster(r: dict, name: str) -> None:
    share = "n/a" if r["throttled_share"] is None else f"{100 * r['throttled_share']:.1f}%"
    caught = ("not within the limit" if r["catch_up_seconds"] is None
              else f"{r['catch_up_seconds']} s")
    print(f"  {name}")
    print(f"    attempted calls/s {r['attempted_calls_per_second']}, throttled {share} "
          f"({r['throttled_calls']} of {r['calls']}), events per accepted call "
          f"{r['events_per_accepted_call']}")
    print(f"    peak backlog {r['peak_backlog_events']} events "
          f"({r['peak_backlog_seconds_of_writes']} s of writes), caught up {caught} after the "
          f"writers stopped; written {r['written']}, accepted {r['accepted']}, lost {r['lost']}")
    if "delivered_per_node_min" in r:
        print(f"    delivered per node when the writers stopped: min {r['delivered_per_node_min']}"
              f", mean {r['delivered_per_node_mean']}, max {r['delivered_per_node_max']} "
              f"(min/mean {r['min_over_mean']})")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", choices=("per-node", "aggregator", "latency", "all"), default="all")
    ap.add_argument("--nodes", type=int, default=40)
    ap.add_argument("--rate", type=int, default=5, help="events per node per second")
    ap.add_argument("--quota", type=float, default=10.0, help="calls/s the emulator allows")
    ap.add_argument("--seconds", type=float, default=60.0, help="how long the writers write")
    ap.add_argument("--aggregators", type=int, default=1)
    ap.add_argument("--latency-rate", type=float, default=10.0)
    ap.add_argument("--latency-seconds", type=float, default=30.0)
    ap.add_argument("--sink-arg", action="append", default=[],
                    help="extra argument for every sink (repeat; e.g. --sink-arg=--linger-ms=5000)")
    ap.add_argument("--no-baseline", action="store_true",
                    help="per-node: skip the pacing-off round")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder (sink logs)")
    args = ap.parse_args(argv)
    common.exit_on_sigterm()

    tmp = tempfile.mkdtemp(prefix="bench-cluster-scale-")
    env = common.fake_aws_env(tmp)
    os.environ.update({k: env[k] for k in env if k.startswith("AWS_")})
    out: dict = {"quota_calls_per_second": args.quota, "nodes": args.nodes,
                 "events_per_node_per_second": args.rate}
    modes = ("per-node", "aggregator", "latency") if args.mode == "all" else (args.mode,)
    try:
        if "per-node" in modes or "aggregator" in modes:
            with common.emulator_process(tmp, quota=args.quota) as (url, _):
                if "per-node" in modes:
                    if not args.no_baseline:
                        out["per_node_baseline"] = run_cluster(
                            tmp, url, env, "baseline", args.nodes, args.rate, args.seconds, 0,
                            args.sink_arg + ["--max-pacing-delay-ms", "0"])
                    out["per_node"] = run_cluster(tmp, url, env, "pernode", args.nodes,
                                                  args.rate, args.seconds, 0, args.sink_arg)
                if "aggregator" in modes:
                    out["aggregator"] = run_cluster(tmp, url, env, "aggregator", args.nodes,
                                                    args.rate, args.seconds, args.aggregators,
                                                    args.sink_arg)
        if "latency" in modes:
            with common.emulator_process(tmp, quota=100) as (url, _):
                out["latency"] = run_latency(tmp, url, env, args.latency_rate,
                                             args.latency_seconds, args.sink_arg)
    except BaseException:
        print(f"cluster_scale: failed; logs kept in {tmp}", file=sys.stderr)
        raise
    if args.keep:
        print(f"cluster_scale: logs kept in {tmp}", file=sys.stderr)
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"cluster scale: {args.nodes} nodes x {args.rate} events/s, quota {args.quota:g} "
          f"calls/s, writers run {args.seconds:g} s (load average before: "
          f"{open('/proc/loadavg').read().split()[0]})")
    if "per_node_baseline" in out:
        show_cluster(out["per_node_baseline"], "per-node, pacing off (baseline, "
                                               "--max-pacing-delay-ms 0)")
    if "per_node" in out:
        show_cluster(out["per_node"], "per-node, defaults (pacing on)")
    if "aggregator" in out:
        show_cluster(out["aggregator"], f"aggregator: {args.aggregators} sink(s) fed by all "
                                        f"{args.nodes} nodes")
    if "latency" in out:
        r = out["latency"]
        print(f"  one sink alone at {r['rate']:g} events/s (one event per segment, no quota "
              f"pressure): spool-to-ack p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms, "
              f"max {r['max_ms']} ms over {r['events']} events")
    return 0


if __name__ == "__main__":
    sys.exit(main())
