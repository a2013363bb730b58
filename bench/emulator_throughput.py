#!/usr/bin/env python3
"""How many PutAuditEvents calls per second the emulator serves, with 100 events of ~1 KB each.

The emulator runs as its own process (``cloudtrail-sink emulator``, quota off, default checks,
SigV4 form checked); the load comes from separate client processes, each re-sending pre-signed
requests over one keep-alive connection, so the client side costs almost nothing and the figure
is the emulator's own ceiling.

Figures printed, next to baselines measured in the same run against the same process:
- PutAuditEvents calls/s and events/s with 100 x ~1 KB events per call (every event checked,
  stored in SQLite), with the CLI's default, with the checks in the serving threads
  (``--workers 0``, the in-process ``Emulator`` default) and in 2 worker processes;
- the emulator's CPU time per call (all its processes): a figure that does not depend on how
  busy the machine is with other work;
- baseline: ``GET /healthz`` calls/s (the HTTP stack alone, no checks, no storage);
- how fast everything stored pages back through ``/_emulator/events?limit=10000``;
- the target: the sink at 10,000 events/s needs 100 calls/s of 100 events.
Also prints, with --with-credentials, the figure when signatures are verified.

Usage (from the repository root, with the package installed):

    python bench/emulator_throughput.py [--seconds 10] [--clients 4] [--event-bytes 1000]
                                        [--with-credentials] [--json]
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sink_common import ACCOUNT, CHANNEL_ARN, exit_on_sigterm, free_port  # noqa: E402

KEY, SECRET = "AKIDBENCH", "bench-secret"


def event_text(uid: str, size: int) -> str:
    from cloudtrail_sink import schema

    ev = {"version": "1.0", "UID": uid,
          "userIdentity": {"type": "CustomUserIdentity", "principalId": "bench"},
          "eventSource": "bench.example.com", "eventName": "Throughput",
          "eventTime": "2026-01-01T00:00:00Z", "sourceIPAddress": "192.0.2.10",
          "recipientAccountId": ACCOUNT, "additionalEventData": {"pad": ""}}
    pad = max(0, size - len(schema.dumps(ev)))
    ev["additionalEventData"]["pad"] = "x" * pad
    return schema.dumps(ev)


def signed_put(port: int, worker: int, event_bytes: int) -> tuple[str, bytes, dict]:
    """A PutAuditEvents request signed by botocore (valid for 15 minutes of re-sending)."""
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    from cloudtrail_sink import schema

    entries = []
    for i in range(100):
        text = event_text(f"w{worker}-{i}", event_bytes)
        entries.append({"id": f"w{worker}-{i}", "eventData": text,
                        "eventDataChecksum": schema.checksum(text)})
    body = json.dumps({"auditEvents": entries}).encode()
    path = "/PutAuditEvents?channelArn=" + urllib.parse.quote(CHANNEL_ARN, safe="")
    req = AWSRequest(method="POST", url=f"http://127.0.0.1:{port}{path}", data=body,
                     headers={"Content-Type": "application/json"})
    SigV4Auth(Credentials(KEY, SECRET), "cloudtrail-data", "us-east-1").add_auth(req)
    headers = dict(req.prepare().headers)
    return path, body, headers


def client_loop(args) -> tuple[int, int]:
    """Send one kind of request in a loop until the deadline; (calls answered 200, others)."""
    port, worker, kind, event_bytes, deadline = args
    if kind == "put":
        path, body, headers = signed_put(port, worker, event_bytes)
        method = "POST"
    else:
        path, body, headers, method = "/healthz", None, {}, "GET"
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    ok = bad = 0
    while time.time() < deadline:
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        payload = resp.read()
        if resp.status == 200 and (kind != "put" or b'"failed":[]' in payload):
            ok += 1
        else:
            bad += 1
    conn.close()
    return ok, bad


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its children (the checker workers)."""
    import psutil

    proc = psutil.Process(pid)
    total = 0.0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            times = p.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


def measure(pid: int, port: int, kind: str, clients: int, seconds: float,
            event_bytes: int) -> dict:
    start_at = time.time() + 2.0  # every client has built its request by then
    deadline = start_at + seconds
    with multiprocessing.get_context("spawn").Pool(clients) as pool:
        # Clients start together after the warm-up: each waits until start_at.
        pending = pool.map_async(_delayed_loop, [(port, w, kind, event_bytes, deadline, start_at)
                                                 for w in range(clients)])
        time.sleep(max(0.0, start_at - time.time()))
        cpu_before = cpu_seconds(pid)
        results = pending.get()
        cpu_used = cpu_seconds(pid) - cpu_before
    ok = sum(r[0] for r in results)
    bad = sum(r[1] for r in results)
    return {"calls_per_s": ok / seconds, "errors": bad,
            # Load-independent figure: what one call costs the emulator (all its processes).
            "emulator_cpu_ms_per_call": 1000 * cpu_used / max(1, ok + bad)}


def _delayed_loop(args):
    port, worker, kind, event_bytes, deadline, start_at = args
    import cloudtrail_sink.schema  # noqa: F401  (import cost outside the timed window)
    time.sleep(max(0.0, start_at - time.time()))
    return client_loop((port, worker, kind, event_bytes, deadline))


def read_back(port: int) -> dict:
    """Page through everything stored with GET /_emulator/events?limit=10000 (as tests do).

    Serving time (request to last byte) and the reader's JSON decoding are timed apart: the
    second is the reader's cost, not the emulator's.
    """
    serving = decoding = 0.0
    count, cursor = 0, 0
    while True:
        url = f"http://127.0.0.1:{port}/_emulator/events?limit=10000&after={cursor}"
        started = time.perf_counter()
        with urllib.request.urlopen(url, timeout=120) as resp:
            raw = resp.read()
        read_at = time.perf_counter()
        page = json.loads(raw)
        decoding += time.perf_counter() - read_at
        serving += read_at - started
        if not page["events"]:
            break
        count, cursor = count + len(page["events"]), page["next"]
    return {"events": count, "served_events_per_s": count / serving if serving else 0.0,
            "decoded_events_per_s": count / decoding if decoding else 0.0}


def start_emulator(tmp: str, with_credentials: bool, workers: int | None
                   ) -> tuple[subprocess.Popen, int]:
    port = free_port()
    cmd = [sys.executable, "-m", "cloudtrail_sink", "emulator", "--listen", f"127.0.0.1:{port}",
           "--db", os.path.join(tmp, "bench.sqlite"), "--channel", CHANNEL_ARN, "--quota", "0",
           "--log-level", "WARNING"]
    if workers is not None:
        cmd += ["--workers", str(workers)]
    env = dict(os.environ)
    if with_credentials:
        cmd += ["--access-key", KEY]
        env["CLOUDTRAIL_EMULATOR_SECRET_KEY"] = SECRET
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
                            start_new_session=True)
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1).read()
            return proc, port
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(proc.stderr.read().decode())
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("emulator did not start")


def stop_emulator(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=10.0, help="timed window per figure")
    ap.add_argument("--clients", type=int, default=4, help="concurrent client processes")
    ap.add_argument("--event-bytes", type=int, default=1000, help="size of each eventData")
    ap.add_argument("--with-credentials", action="store_true",
                    help="also measure with SigV4 signatures verified")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args()
    exit_on_sigterm()  # the finally blocks then stop every process started here

    results = {"cpus": os.cpu_count(), "clients": args.clients, "seconds": args.seconds,
               "event_bytes": args.event_bytes}
    with tempfile.TemporaryDirectory(prefix="emu-bench-") as tmp:
        # (name, verify signatures, --workers): the default CLI configuration, checks in the
        # serving threads (the in-process default), in 2 worker processes, and optionally with
        # SigV4 verification.
        runs = [("cli_default", False, None), ("workers_0", False, 0), ("workers_2", False, 2)]
        if args.with_credentials:
            runs.append(("verified", True, None))
        for name, creds, workers in runs:
            proc, port = start_emulator(tmp, creds, workers)
            try:
                if name == "cli_default":
                    results["baseline_healthz"] = measure(proc.pid, port, "healthz",
                                                          args.clients, args.seconds,
                                                          args.event_bytes)
                put = measure(proc.pid, port, "put", args.clients, args.seconds,
                              args.event_bytes)
                put["events_per_s"] = put["calls_per_s"] * 100
                results[f"put_{name}"] = put
                if name == "cli_default":
                    results["read_back"] = read_back(port)
            finally:
                stop_emulator(proc)
            os.remove(os.path.join(tmp, "bench.sqlite"))
    try:
        results["load_average_1min"] = os.getloadavg()[0]
    except OSError:
        pass

    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print(f"emulator throughput on {results['cpus']} CPUs (load average "
          f"{results.get('load_average_1min', float('nan')):.1f}), {args.clients} client "
          f"processes, {args.seconds:g} s per figure, 100 events of {args.event_bytes} B per call")
    base = results["baseline_healthz"]
    print(f"  baseline GET /healthz (HTTP stack only): {base['calls_per_s']:7.0f} calls/s")
    for key, value in results.items():
        if key.startswith("put_"):
            print(f"  PutAuditEvents, {key[4:]:<12} {value['calls_per_s']:7.0f} calls/s = "
                  f"{value['events_per_s']:7.0f} events/s; emulator CPU "
                  f"{value['emulator_cpu_ms_per_call']:.1f} ms/call (errors: {value['errors']})")
    back = results["read_back"]
    print(f"  reading them back, /_emulator/events?limit=10000: {back['events']} events served "
          f"at {back['served_events_per_s']:.0f} events/s (the reader decoded them at "
          f"{back['decoded_events_per_s']:.0f} events/s)")
    print("  needed for the sink at 10,000 events/s:   100 calls/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
