"""``cloudtrail-sink rejected list|show|replay``: records the mapping rules could not turn into events.

The Lua filter writes them to ``rejected/*.rej`` (``docs/spool.md``): msgpack maps
``{"tag", "time", "reason", "record"}``.

``rejected list [--json]`` prints one line per rejected record (file, tag, time, reason; never
the record) and a count per reason. ``--json`` prints each entry as JSON instead, record included.

``rejected show [FILE ...]`` prints the entries of the given files (default: all) as JSON lines,
record included. Bytes that are not UTF-8 text are shown as ``{"$base64": "..."}``.

``rejected replay --mappings FILE.lua [--dry-run]`` maps every rejected record again with the
compiled rules (``cloudtrail-sink mappings compile``), run by the real Lua mapping engine. The
records that now map are written into ``ready/`` as new segments (writer kind ``replay``, same
``tag`` and ``time``), fsynced and published; only then is each ``.rej`` file removed, or, when
some of its records still do not map, replaced (tmp + rename) by a file holding just those, with
their new reason. A crash in between can only replay a record twice, never lose one. A file that
cannot be decoded completely is reported and left untouched. A record a ``drop:`` rule takes
leaves ``rejected/`` as it would have left Fluent Bit: it is counted per rule in the summary
(``dropped N by rule NAME``), never kept as "still rejected" forever.

Exit status: 0 on success, 1 when a file could not be read or a mappings file not loaded.
"""

from __future__ import annotations

import argparse
import base64
import collections
import json
import os
import sys
from typing import Any, Iterator

from .. import spool
from ..spool.rejected import Unreadable, read_entries, rejected_files, rewrite
from . import SubParsers


def register(subparsers: SubParsers) -> None:
    parser = subparsers.add_parser("rejected",
                                   help="list, show or replay records no mapping rule took")
    sub = parser.add_subparsers(dest="rejected_command", metavar="SUBCOMMAND")
    parser.set_defaults(func=lambda args: (parser.print_help(sys.stderr), 2)[1])
    for name, func, text in (
            ("list", cmd_list, "one line per rejected record (no payload)"),
            ("show", cmd_show, "print rejected records as JSON lines"),
            ("replay", cmd_replay, "map rejected records again into ready/")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--spool-dir", default=os.environ.get("CLOUDTRAIL_SPOOL_DIR"),
                       required="CLOUDTRAIL_SPOOL_DIR" not in os.environ,
                       help="spool root [CLOUDTRAIL_SPOOL_DIR]")
        if name == "list":
            p.add_argument("--json", action="store_true", help="print full entries as JSON")
        if name == "show":
            p.add_argument("files", nargs="*", help="rejected/ file names (default: all)")
        if name == "replay":
            p.add_argument("--mappings", required=True,
                           help="compiled mappings (.lua from `cloudtrail-sink mappings compile`)")
            p.add_argument("--dry-run", action="store_true",
                           help="report what would map; change nothing")
        p.set_defaults(func=func)


def jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return {"$base64": base64.b64encode(value).decode("ascii")}
    if isinstance(value, dict):
        return {str(k) if not isinstance(k, bytes) else k.decode("utf-8", "replace"):
                jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [jsonable(v) for v in value]
    if isinstance(value, float) and value != value:
        return "NaN"
    if isinstance(value, float) and value in (float("inf"), float("-inf")):
        return "Infinity" if value > 0 else "-Infinity"
    return value


def _iter(lay: spool.Layout, names: list[str]) -> Iterator[tuple[str, list[dict] | None, str | None]]:
    for name in names:
        try:
            yield name, read_entries(os.path.join(lay.rejected, name)), None
        except Unreadable as exc:
            yield name, None, str(exc)


def cmd_list(args: argparse.Namespace) -> int:
    lay = spool.layout(args.spool_dir)
    per_reason: collections.Counter[str] = collections.Counter()
    status = 0
    for name, entries, problem in _iter(lay, rejected_files(lay)):
        if entries is None:
            print(f"error: {problem}", file=sys.stderr)
            status = 1
            continue
        for entry in entries:
            reason = str(entry.get("reason", ""))
            per_reason[reason] += 1
            if args.json:
                print(json.dumps(jsonable({"file": name, **entry}), ensure_ascii=False))
            else:
                print(f"{name}\t{entry.get('tag')}\t{entry.get('time')}\t{reason}")
    total = sum(per_reason.values())
    print(f"{total} rejected record(s)", file=sys.stderr)
    for reason, count in per_reason.most_common():
        print(f"{count:8d}  {reason}", file=sys.stderr)
    return status


def cmd_show(args: argparse.Namespace) -> int:
    lay = spool.layout(args.spool_dir)
    names = args.files or rejected_files(lay)
    status = 0
    for name, entries, problem in _iter(lay, [os.path.basename(n) for n in names]):
        if entries is None:
            print(f"error: {problem}", file=sys.stderr)
            status = 1
            continue
        for entry in entries:
            print(json.dumps(jsonable({"file": name, **entry}), ensure_ascii=False))
    return status


def cmd_replay(args: argparse.Namespace) -> int:
    from ..mappings import LuaMapper, MapperLoadError

    lay = spool.ensure_layout(args.spool_dir)
    try:
        mapper = LuaMapper.from_file(args.mappings)
    except (OSError, MapperLoadError) as exc:
        print(f"error: {args.mappings}: {exc}", file=sys.stderr)
        return 1
    status = 0
    plans: list[tuple[str, list[tuple[dict, dict]], list[dict]]] = []
    dropped: collections.Counter[str] = collections.Counter()
    dropped_from: set[str] = set()
    for name, entries, problem in _iter(lay, rejected_files(lay)):
        if entries is None:
            print(f"error: {problem} (left as is)", file=sys.stderr)
            status = 1
            continue
        mapped: list[tuple[dict, dict]] = []
        still: list[dict] = []
        for entry in entries:
            record = entry.get("record")
            if not isinstance(record, dict):
                still.append(entry)  # opaque (too deep) or not a map: cannot be mapped here
                continue
            result = mapper.map(str(entry.get("tag", "")), float(entry.get("time") or 0.0),
                                record)
            event = result.event
            if event is not None and isinstance(event.get("UID"), str) and event["UID"]:
                mapped.append((entry, event))
            elif result.dropped:
                dropped[str(result.rule)] += 1
                dropped_from.add(name)
            else:
                still.append({**entry, "reason": result.reason or "mapping produced no UID"})
        plans.append((name, mapped, still))

    n_mapped = sum(len(m) for _, m, _ in plans)
    n_still = sum(len(s) for _, _, s in plans)
    drops = "".join(f"; dropped {n} by rule {rule}" for rule, n in sorted(dropped.items()))
    if args.dry_run:
        print(f"would replay {n_mapped} record(s); {n_still} would stay rejected{drops}")
        return status
    if n_mapped:
        with spool.SpoolWriter(lay.root, kind="replay") as writer:
            for _, mapped, _ in plans:
                for entry, event in mapped:
                    writer.write(event, tag=str(entry.get("tag", "")),
                                 time=float(entry.get("time") or 0.0))
    for name, mapped, still in plans:
        if still:
            rewrite(lay, name, still)  # also refreshes the reasons of a file nothing left
        elif mapped or name in dropped_from:
            os.remove(os.path.join(lay.rejected, name))
    print(f"replayed {n_mapped} record(s) into ready/; {n_still} still rejected{drops}")
    return status
