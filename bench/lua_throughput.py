#!/usr/bin/env python3
"""Records per second through ``cb_cloudtrail`` under plain LuaJIT, next to an identity filter.

Figure (target from the issue: at least 50,000 records/s on one core with the shipped mappings):
Debian's ``luajit`` binary runs a pure-Lua driver (no Python in the loop) that

- loads ``fluent-bit/cloudtrail.lua`` the way filter_lua does (``dofile`` of the entry, then
  calls of the global ``cb_cloudtrail``), configured through the environment with the shipped
  ``mappings/*.yaml`` compiled by ``cloudtrail-sink mappings compile`` and a spool in a temp dir;
- feeds it the records of the mappings' ``examples:`` (NeuVector, Kubernetes audit, Falco, sshd,
  catch-all), built as Fluent Bit builds them (every table with its array/map metatable),
  cycling through a pool of pre-built records, with a tick record once per simulated second;
- times the same loop through an identity filter (``return 0, ts, record``) in the same run.

It prints records/s and microseconds per record for both (CPU time of the one thread: the
filter runs on the engine's single thread, so one core; wall time too), how many events and
rejected records the spool got, and whether the 50,000 records/s target is met.

Each round runs in a fresh luajit process and the best round is shown: on a shared machine
the slowest rounds measure the neighbours, not the filter. ``--compare-with DIR`` (the
``fluent-bit/`` folder of another checkout, e.g. ``git worktree add /tmp/old HEAD~3``) runs that
filter in the same rounds, alternating with this one, so before/after figures come from the
same machine state. When that checkout has a ``mappings/`` folder next to its ``fluent-bit/``,
its filter runs with its own rules (compiled here) on the same records, so a change of the
shipped rules is measured too.

``--dropped-only`` feeds only the examples a ``drop:`` rule takes (Kubernetes audit stages before
the final one), to time the drop path alone.

Usage: python bench/lua_throughput.py [--records 200000] [--pool 2000] [--rounds 5]
                                      [--compare-with OTHER/fluent-bit] [--dropped-only]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "sink" / "src"))

from cloudtrail_sink.mappings import compile_files  # noqa: E402

TARGET = 50_000

DRIVER = r"""
local entry, module_dir, n, pool_size, rounds = arg[1], arg[2], tonumber(arg[3]), tonumber(arg[4]), tonumber(arg[5])
package.path = module_dir .. "/?.lua;" .. package.path
local clock = require("cloudtrail.clock")
local AMT, MMT = { type = 1 }, { type = 2 }
-- Fluent Bit gives every table its own metatable; one shared table per kind is equivalent here.
local function A(t) return setmetatable(t, { type = 1 }) end
local function M(t) return setmetatable(t, { type = 2 }) end
local SAMPLES = dofile(arg[6])   -- { {tag, time, record_builder}, ... }

local pool = {}
for i = 1, pool_size do
  local s = SAMPLES[(i - 1) % #SAMPLES + 1]
  pool[i] = { s[1], s[2] + i, s[3](A, M) }
end

local function run(cb)
  local t0 = clock.now()
  local c0 = os.clock()
  local dropped = 0
  local last_tick = 0
  for i = 1, n do
    local p = pool[(i - 1) % pool_size + 1]
    local code = cb(p[1], p[2], p[3])
    if code == -1 then dropped = dropped + 1 end
    if i - last_tick >= 50000 then  -- ~one tick per simulated second at the target rate
      last_tick = i
      cb("cloudtrail.tick", p[2], M({ tick = 1 }))
    end
  end
  return clock.now() - t0, os.clock() - c0, dropped
end

local function identity(tag, ts, record) return 0, ts, record end

dofile(entry)
local filter = cb_cloudtrail
-- The mapping engine alone (same compiled rules), to show what the spool writer adds.
local mapper = require("cloudtrail.mapper").new(require("cloudtrail.filter").load_mappings(os.getenv("CLOUDTRAIL_MAPPINGS")))
local function map_only(tag, ts, record)
  if tag == "cloudtrail.tick" then return -1 end
  local ev = mapper:map(tag, ts, record)
  return ev and -1 or 0
end
-- The spool writer alone: a filter instance whose mapper hands back events mapped beforehand.
local premapped = {}
for i = 1, pool_size do premapped[pool[i][3]] = mapper:map(pool[i][1], pool[i][2], pool[i][3]) end
local filter_mod = require("cloudtrail.filter")
local cfg = filter_mod.config_from_env(os.getenv, ".")
cfg.spool_dir = os.getenv("CLOUDTRAIL_SPOOL_DIR") .. "/writer-only"
local writer_only = filter_mod.new(cfg, { mapper = { new = function()
  return { map = function(_, tag, ts, record) return premapped[record], "not premapped" end }
end } })
local function spool_only(tag, ts, record) return writer_only:process(tag, ts, record) end
for r = 1, rounds do
  local wi, ci = run(identity)
  local wm, cm = run(map_only)
  local ww, cw = run(spool_only)
  local wf, cf, dropped = run(filter)
  io.write(string.format("round %d identity %.6f %.6f filter %.6f %.6f dropped %d mapper %.6f %.6f writer %.6f %.6f\n", r, wi, ci, wf, cf, dropped, wm, cm, ww, cw))
end
cb_cloudtrail("cloudtrail.tick", 4102444800, M({ tick = 1 }))
"""


def lua_literal(value) -> str:
    """A Lua expression building ``value`` with Fluent Bit's metatables (A{...} / M{...})."""
    if value is None:
        return "nil"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            return "(0/0)" if math.isnan(value) else ("math.huge" if value > 0 else "-math.huge")
        return repr(value)
    if isinstance(value, str):
        return "[=====[" + value + "]=====]" if "\n" not in value else json.dumps(value)
    if isinstance(value, list):
        return "A{" + ", ".join(lua_literal(v) for v in value) + "}"
    if isinstance(value, dict):
        return "M{" + ", ".join(f"[ {lua_literal(k)} ] = {lua_literal(v)}"
                                for k, v in value.items()) + "}"
    raise TypeError(type(value))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=200_000, help="records per timed loop")
    parser.add_argument("--pool", type=int, default=2000, help="distinct pre-built records")
    parser.add_argument("--rounds", type=int, default=5,
                        help="rounds (one luajit process each, best shown)")
    parser.add_argument("--compare-with", type=pathlib.Path, default=None, metavar="DIR",
                        help="fluent-bit/ folder of another checkout, timed in the same rounds")
    parser.add_argument("--dropped-only", action="store_true",
                        help="only the examples a drop: rule takes (times the drop path)")
    args = parser.parse_args()
    if args.compare_with is not None and not (args.compare_with / "cloudtrail.lua").is_file():
        print(f"--compare-with {args.compare_with}: no cloudtrail.lua there", file=sys.stderr)
        return 2

    luajit = shutil.which("luajit")
    if luajit is None:
        print("luajit is not installed (apt-get install luajit)", file=sys.stderr)
        return 2
    work = pathlib.Path(tempfile.mkdtemp(prefix="lua-bench-"))
    try:
        compiled = compile_files([REPO / "mappings"],
                                 defaults={"recipientAccountId": "123456789012"})
        mappings = work / "mappings.lua"
        mappings.write_text(compiled.lua_text())
        other_mappings = mappings
        if args.compare_with is not None and (args.compare_with.parent / "mappings").is_dir():
            other_mappings = work / "mappings-compared.lua"
            other_mappings.write_text(compile_files(
                [args.compare_with.parent / "mappings"],
                defaults={"recipientAccountId": "123456789012"}).lua_text())
        examples = [ex for ex in compiled.examples
                    if not args.dropped_only or ex.expect_dropped is not None]
        samples = work / "samples.lua"
        samples.write_text("return {\n" + ",\n".join(
            f"{{ {lua_literal(ex.tag)}, {float(ex.time)!r}, function(A, M) return "
            f"{lua_literal(ex.record)} end }}" for ex in examples) + "\n}\n")
        driver = work / "driver.lua"
        driver.write_text(DRIVER)
        spool = work / "spool"
        other_spool = work / "spool-compared"

        def one_round(fluent_bit: pathlib.Path, spool_dir: pathlib.Path, rules=mappings):
            env = dict(os.environ, CLOUDTRAIL_SPOOL_DIR=str(spool_dir),
                       CLOUDTRAIL_MAPPINGS=str(rules))
            proc = subprocess.run(
                [luajit, str(driver), str(fluent_bit / "cloudtrail.lua"),
                 str(fluent_bit / "lua"), str(args.records), str(args.pool), "1", str(samples)],
                env=env, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                print(proc.stdout, proc.stderr, file=sys.stderr)
                return None, proc.stderr
            return ([line.split() for line in proc.stdout.splitlines()
                     if line.startswith("round")], proc.stderr)

        rounds, other_rounds, stderr_text = [], [], ""
        for _ in range(args.rounds):
            got, stderr_text = one_round(REPO / "fluent-bit", spool)
            if got is None:
                return 1
            rounds += got
            if args.compare_with is not None:
                got, _ = one_round(args.compare_with, other_spool, other_mappings)
                if got is None:
                    return 1
                other_rounds += got
        # CPU seconds of the one thread (the machine may be shared; wall time shown too)
        cpu_identity = min(float(r[4]) for r in rounds)
        wall_filter = min(float(r[6]) for r in rounds)
        cpu_filter = min(float(r[7]) for r in rounds)
        cpu_mapper = min(float(r[12]) for r in rounds)
        cpu_writer = min(float(r[15]) for r in rounds)
        dropped = int(rounds[-1][9])
        events = sum(1 for p in (spool / "ready").iterdir())
        rejected = sum(1 for _ in (spool / "rejected").iterdir())
        n = args.records
        print(f"luajit: {subprocess.run([luajit, '-v'], capture_output=True, text=True).stdout.strip()}")
        print(f"records per loop: {n}, distinct records: {args.pool} from "
              f"{len(examples)} mapping examples, rounds: {args.rounds} (best shown; "
              f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")
        cpu_identity = max(cpu_identity, 1e-9)
        print(f"identity filter      : {n / cpu_identity:12,.0f} records/s  "
              f"({cpu_identity / n * 1e6:.2f} us CPU/record)")
        print(f"mapping engine alone : {n / cpu_mapper:12,.0f} records/s  "
              f"({cpu_mapper / n * 1e6:.2f} us CPU/record)")
        print(f"spool writer alone   : {n / cpu_writer:12,.0f} records/s  "
              f"({cpu_writer / n * 1e6:.2f} us CPU/record: encode + write, events mapped before)")
        print(f"cb_cloudtrail        : {n / cpu_filter:12,.0f} records/s  "
              f"({cpu_filter / n * 1e6:.2f} us CPU/record; wall {wall_filter / n * 1e6:.2f} us)")
        if other_rounds:
            cpu_other = min(float(r[7]) for r in other_rounds)
            cpu_other_mapper = min(float(r[12]) for r in other_rounds)
            print(f"  compared filter    : {n / cpu_other:12,.0f} records/s  "
                  f"({cpu_other / n * 1e6:.2f} us CPU/record; its mapping engine alone "
                  f"{cpu_other_mapper / n * 1e6:.2f} us) from {args.compare_with}")
            print(f"  this filter is {cpu_other / cpu_filter:.2f}x the compared one (best rounds)")
        print(f"spool: {events} segment(s) in ready/, {rejected} rejected file(s); "
              f"records dropped from the pipeline in the last loop: {dropped}/{n}")
        ok = n / cpu_filter >= TARGET
        print(f"target >= {TARGET:,} records/s on one core: {'met' if ok else 'NOT met'}")
        if stderr_text.strip():
            print("filter log:\n" + stderr_text.strip())
        return 0
    finally:
        if not os.environ.get("LUA_BENCH_KEEP"):
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"kept {work}")


if __name__ == "__main__":
    sys.exit(main())
