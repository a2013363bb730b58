"""``cloudtrail-sink failed list|replay``: inspect dead letters and send them again.

``failed list [--code CODE] [--json]`` prints one line per dead-lettered event (file, code, id,
message; never the payload unless ``--json``) and a count per code.

``failed replay [--code CODE]`` writes the matching events back into ``ready/`` as new segments
(writer kind ``replay``, same ``id``, ``tag`` and ``time``), fsynced and published, and only then
removes the replayed lines: a file whose every line was replayed is deleted, a file with lines
left (other codes) is rewritten with those lines (tmp + rename). A crash in between can only
replay an event twice, never lose it. Lines that are not valid JSON are reported and kept.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys

from .. import spool
from ..spool.failed import failed_files, keep_only, read_lines
from . import SubParsers


def register(subparsers: SubParsers) -> None:
    parser = subparsers.add_parser("failed", help="list or replay dead-lettered events")
    sub = parser.add_subparsers(dest="failed_command", metavar="SUBCOMMAND")
    parser.set_defaults(func=lambda args: (parser.print_help(sys.stderr), 2)[1])
    for name, func, text in (("list", cmd_list, "print dead-lettered events"),
                             ("replay", cmd_replay, "put dead-lettered events back into ready/")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--spool-dir", default=os.environ.get("CLOUDTRAIL_SPOOL_DIR"),
                       required="CLOUDTRAIL_SPOOL_DIR" not in os.environ,
                       help="spool root [CLOUDTRAIL_SPOOL_DIR]")
        p.add_argument("--code", action="append", default=None,
                       help="only events with this errorCode (repeatable)")
        if name == "list":
            p.add_argument("--json", action="store_true", help="print the full JSON lines")
        p.set_defaults(func=func)


def cmd_list(args: argparse.Namespace) -> int:
    lay = spool.layout(args.spool_dir)
    counts: collections.Counter = collections.Counter()
    for name in failed_files(lay):
        for lineno, text, obj in read_lines(os.path.join(lay.failed, name)):
            if obj is None:
                print(f"{name}:{lineno}: not a JSON object (kept)", file=sys.stderr)
                continue
            code = obj.get("errorCode")
            if args.code and code not in args.code:
                continue
            counts[code] += 1
            if args.json:
                print(text)
            else:
                print(f"{name}\t{code}\t{obj.get('id')}\t{obj.get('errorMessage')}")
    summary = ", ".join(f"{code}: {n}" for code, n in sorted(counts.items(), key=str)) or "none"
    print(f"failed events: {sum(counts.values())} ({summary})", file=sys.stderr)
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    lay = spool.ensure_layout(args.spool_dir)
    replayed_files: list[tuple[str, list[str]]] = []
    bad = 0
    with spool.SpoolWriter(lay.root, kind="replay") as writer:
        for name in failed_files(lay):
            path = os.path.join(lay.failed, name)
            keep: list[str] = []
            took = 0
            for lineno, text, obj in read_lines(path):
                if obj is None or not isinstance(obj.get("eventData"), dict):
                    bad += 1
                    print(f"{name}:{lineno}: not a dead-lettered event (kept)", file=sys.stderr)
                    keep.append(text)
                    continue
                if args.code and obj.get("errorCode") not in args.code:
                    keep.append(text)
                    continue
                tag = obj.get("tag") if isinstance(obj.get("tag"), str) else "replay"
                when = obj.get("time") if isinstance(obj.get("time"), (int, float)) else None
                eid = obj.get("id") if isinstance(obj.get("id"), str) else None
                writer.write(obj["eventData"], tag=tag, time=when, id=eid)
                took += 1
            if took:
                replayed_files.append((path, keep))
        # Seal (fsync + rename) before touching failed/: the events exist twice, never zero times.
    for path, keep in replayed_files:
        keep_only(lay, path, keep, writer.writer)
    print(f"failed replay: {writer.events_written} events back in ready/ "
          f"({len(writer.sealed)} segments)" + (f"; {bad} unreadable lines kept" if bad else ""),
          file=sys.stderr)
    return 1 if bad else 0
