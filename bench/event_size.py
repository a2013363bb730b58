#!/usr/bin/env python3
"""Bytes per event against bytes per source record, for every shipped mapping file.

CloudTrail Lake bills per GB ingested, so what a mapping adds to each record is money. For the
``examples:`` of every file in ``mappings/`` (or the folders/files given), each record is mapped
by the real Lua mapper (``cloudtrail-sink mappings``' runner) and measured the way the sink sends
it: the compact JSON of ``eventData`` with ``version`` and ``recipientAccountId`` filled
(``schema.dumps``), in UTF-8 bytes. The baseline next to it is the record as Fluent Bit hands it
over, measured the same way (compact JSON of the record). Records a ``drop:`` rule takes count
as records with no event (0 bytes); rejected records are listed separately.

``--compare-with DIR`` maps the same records with the mapping files in DIR (for example the
``mappings/`` folder of an older checkout: ``git worktree add /tmp/old HEAD~5``) in the same
run, and prints its bytes per event in a third column.

Usage: python bench/event_size.py [PATH...] [--compare-with DIR]
"""

from __future__ import annotations

import argparse
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "sink" / "src"))

from cloudtrail_sink import schema  # noqa: E402
from cloudtrail_sink.mappings import LuaMapper, compile_files  # noqa: E402
from cloudtrail_sink.mappings.runner import filled  # noqa: E402


def size(value) -> int:
    return len(schema.dumps(value).encode("utf-8"))


def event_bytes(mapper: LuaMapper, ex) -> tuple[int | None, bool]:
    """(bytes of the event or None when rejected, dropped)."""
    res = mapper.map(ex.tag, ex.time, ex.record)
    if res.dropped:
        return 0, True
    return (size(filled(res.event)) if res.event is not None else None), False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="*", default=[str(REPO / "mappings")])
    parser.add_argument("--compare-with", type=pathlib.Path, metavar="DIR",
                        help="mapping files to map the same records with, in the same run")
    args = parser.parse_args()
    compiled = compile_files(args.paths)
    mapper = LuaMapper(compiled.lua_text())
    other = LuaMapper(compile_files([args.compare_with]).lua_text()) if args.compare_with else None

    rows: dict[str, list[int]] = {}
    print(f"{'file':<26} {'records':>7} {'events':>6} {'dropped':>7} {'rejected':>8} "
          f"{'record B':>9} {'event B':>8} {'event/record':>12}"
          + (f" {'compared B':>10} {'compared/record':>15}" if other else ""))
    for name in compiled.files:
        examples = [ex for ex in compiled.examples if ex.file == name]
        if not examples:
            continue
        rec_total = ev_total = other_total = events = dropped = rejected = 0
        for ex in examples:
            got, was_dropped = event_bytes(mapper, ex)
            if got is None:
                rejected += 1
                continue
            rec_total += size(ex.record)
            ev_total += got
            dropped += was_dropped
            events += not was_dropped
            if other is not None:
                other_got, _ = event_bytes(other, ex)
                other_total += other_got or 0
        label = pathlib.Path(name).name
        n = events + dropped
        rows[label] = [n, rec_total, ev_total, other_total]
        line = (f"{label:<26} {n:>7} {events:>6} {dropped:>7} {rejected:>8} "
                f"{rec_total / n:>9,.0f} {ev_total / n:>8,.0f} {ev_total / rec_total:>12.2f}")
        if other is not None:
            line += f" {other_total / n:>10,.0f} {other_total / rec_total:>15.2f}"
        print(line)
    n = sum(r[0] for r in rows.values())
    rec = sum(r[1] for r in rows.values())
    ev = sum(r[2] for r in rows.values())
    line = (f"{'all':<26} {n:>7} {'':>6} {'':>7} {'':>8} {rec / n:>9,.0f} {ev / n:>8,.0f} "
            f"{ev / rec:>12.2f}")
    if other is not None:
        compared = sum(r[3] for r in rows.values())
        line += f" {compared / n:>10,.0f} {compared / rec:>15.2f}"
    print(line)
    print("B = bytes per record (mean); event bytes include version and recipientAccountId as "
          "the sink sends them; a dropped record counts 0 event bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
