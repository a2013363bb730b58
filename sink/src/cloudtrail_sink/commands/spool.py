"""``cloudtrail-sink spool write|stats``: fill a spool from JSON lines; show what waits in it.

``spool write --spool-dir D [FILE|-]`` reads one JSON object per line: either an ``eventData``
object, or a wrapper ``{"eventData": {...}, "tag": "...", "time": <float>, "id": "..."}``. Events
are published as sealed segments exactly as the Lua writer does (writer kind ``cli``). A line
that is not a JSON object, or holds what a spool record cannot (an integer beyond 64 bits,
nesting too deep), is reported on stderr as ``FILE:LINE: reason`` and skipped; every valid line
is still written, and the exit code is 1 when any line was skipped. When the spool cannot be
written (full disk), it stops, removes the unsealed segment's ``tmp/`` file, says which lines
are not in the spool and exits 1. On a terminal a
progress line is drawn on stderr. Streamed input (a pipe, FIFO or terminal, e.g. ``tail -f log |
cloudtrail-sink spool write -``) is read as it comes, and a segment open for ``--max-age``
seconds is sealed even while no line arrives, so events reach ``ready/`` promptly.

``spool stats --spool-dir D [--json]`` counts segments and bytes per folder and the age of the
oldest ready segment.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import stat
import sys
import time
from typing import Iterator

from .. import spool
from . import SubParsers


def register(subparsers: SubParsers) -> None:
    parser = subparsers.add_parser("spool", help="write events into a spool; show its contents")
    sub = parser.add_subparsers(dest="spool_command", metavar="SUBCOMMAND")
    parser.set_defaults(func=lambda args: (parser.print_help(sys.stderr), 2)[1])

    w = sub.add_parser("write", help="publish JSON-lines events as sealed segments")
    _spool_dir(w)
    w.add_argument("file", nargs="?", default="-", metavar="FILE|-",
                   help="JSON lines to read (default: standard input)")
    w.add_argument("--tag", default="cli", help="tag for events without one (default: cli)")
    w.add_argument("--max-events", type=int, default=500,
                   help="events per segment (default: 500, as the Lua writer)")
    w.add_argument("--max-bytes", type=int, default=1 << 20,
                   help="bytes per segment (default: 1 MiB, as the Lua writer)")
    w.add_argument("--max-age", type=float, default=1.0,
                   help="with streamed input (pipe, FIFO, terminal), seal a segment open this "
                        "many seconds even while no line arrives (default: 1.0, as the Lua "
                        "writer; 0: only by count and size)")
    w.add_argument("--no-fsync", action="store_true",
                   help="do not fsync each segment before publishing it (faster benchmarks)")
    w.add_argument("--progress", choices=("auto", "always", "never"), default="auto",
                   help="progress line on stderr (auto: when stderr is a terminal)")
    w.set_defaults(func=cmd_write)

    s = sub.add_parser("stats", help="count segments and bytes per spool folder")
    _spool_dir(s)
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.set_defaults(func=cmd_stats)


def _spool_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--spool-dir", default=os.environ.get("CLOUDTRAIL_SPOOL_DIR"),
                        required="CLOUDTRAIL_SPOOL_DIR" not in os.environ,
                        help="spool root [CLOUDTRAIL_SPOOL_DIR]")


class _Progress:
    def __init__(self, enabled: bool, total_bytes: int | None):
        self.enabled = enabled
        self.total = total_bytes
        self.last = 0.0

    def update(self, events: int, done_bytes: int, final: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not final and now - self.last < 0.2:
            return
        self.last = now
        pct = f" {100.0 * done_bytes / self.total:5.1f}%" if self.total else ""
        sys.stderr.write(f"\rspool write: {events} events{pct}")
        if final:
            sys.stderr.write("\n")
        sys.stderr.flush()


def cmd_write(args: argparse.Namespace) -> int:
    name = "<stdin>" if args.file == "-" else args.file
    try:
        stream = sys.stdin.buffer if args.file == "-" else open(args.file, "rb")
    except OSError as exc:
        print(f"cloudtrail-sink spool write: cannot read {name}: {exc.strerror}", file=sys.stderr)
        return 2
    total = None
    streamed = False
    try:
        st = os.fstat(stream.fileno())
        streamed = not stat.S_ISREG(st.st_mode)
        if args.file != "-" and not streamed:
            total = st.st_size
    except (OSError, ValueError):
        pass
    max_age = args.max_age if streamed and args.max_age > 0 else None
    show = args.progress == "always" or (args.progress == "auto" and sys.stderr.isatty())
    progress = _Progress(show, total)
    bad = 0
    done = 0
    lineno = 0
    try:
        writer = spool.SpoolWriter(args.spool_dir, kind="cli", max_events=args.max_events,
                                   max_bytes=args.max_bytes, fsync=not args.no_fsync,
                                   max_age=max_age)
    except OSError as exc:
        print(f"cloudtrail-sink spool write: cannot use spool {args.spool_dir}: "
              f"{exc.strerror or exc}", file=sys.stderr)
        if stream is not sys.stdin.buffer:
            stream.close()
        return 2
    first_open = 0  # input line of the open segment's first event
    try:
        lines = _streamed_lines(stream.fileno(), writer) if max_age else stream
        for lineno, raw in enumerate(lines, 1):
            done += len(raw)
            if not raw.strip():
                continue
            problem = _line_problem(raw)
            if isinstance(problem, str):
                bad += 1
                print(f"{name}:{lineno}: {problem}", file=sys.stderr)
                continue
            if writer.open_events == 0:
                first_open = lineno
            try:
                _write_line(writer, problem, args.tag)
            except OverflowError:
                bad += 1
                print(f"{name}:{lineno}: holds an integer beyond 64 bits, which a spool record "
                      "cannot carry", file=sys.stderr)
                continue
            except (ValueError, TypeError, UnicodeEncodeError) as exc:
                bad += 1
                print(f"{name}:{lineno}: {_short(exc)}", file=sys.stderr)
                continue
            progress.update(writer.events_written, done)
        writer.close()
        progress.update(writer.events_written, done, final=True)
    except OSError as exc:
        writer.discard()
        where = f"{name}:{lineno}" if lineno else name
        print(f"{where}: cannot write to spool {args.spool_dir} ({exc.strerror or exc}); "
              f"stopped: the {writer.discarded} events of the unsealed segment (lines "
              f"{first_open} to {lineno}) and the lines after it are not in the spool (no "
              "partial file is left)", file=sys.stderr)
        print(f"spool write: {writer.events_written - writer.discarded} events in "
              f"{len(writer.sealed)} segments; failed", file=sys.stderr)
        return 1
    finally:
        if stream is not sys.stdin.buffer:
            stream.close()
    print(f"spool write: {writer.events_written} events in {len(writer.sealed)} segments"
          + (f", {bad} lines skipped" if bad else ""), file=sys.stderr)
    return 1 if bad else 0


def _short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 200 else text[:200] + "..."


def _line_problem(raw: bytes) -> dict | str:
    """The line's JSON object, or why it is not one (never raises)."""
    try:
        obj = json.loads(raw)
    except RecursionError:
        return "not JSON (nested too deep to read)"
    except ValueError as exc:  # JSONDecodeError, and integers of more than 4,300 digits
        return f"not JSON ({getattr(exc, 'msg', None) or _short(exc)})"
    if not isinstance(obj, dict):
        return f"expected a JSON object, got {type(obj).__name__}"
    return obj


def _streamed_lines(fd: int, writer: spool.SpoolWriter) -> Iterator[bytes]:
    """The lines of ``fd`` as they arrive; while none comes, the writer's open segment is
    sealed once it is ``max_age`` old (select with a timeout, no thread)."""
    partial: list[bytes] = []
    while True:
        ready, _, _ = select.select([fd], [], [], writer.seconds_to_seal())
        if not ready:
            writer.tick()
            continue
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            break
        pieces = chunk.split(b"\n")
        if len(pieces) > 1:
            partial.append(pieces[0])
            yield b"".join(partial) + b"\n"
            partial = []
            for piece in pieces[1:-1]:
                yield piece + b"\n"
        if pieces[-1]:
            partial.append(pieces[-1])
    if partial:
        yield b"".join(partial)


def _write_line(writer: spool.SpoolWriter, obj: dict, default_tag: str) -> None:
    if not isinstance(obj.get("eventData"), dict):
        writer.write(obj, tag=default_tag)
        return
    tag, when, eid = obj.get("tag", default_tag), obj.get("time"), obj.get("id")
    if when is not None and (isinstance(when, bool) or not isinstance(when, (int, float))):
        raise ValueError("field time must be a number")
    if not isinstance(tag, str):
        raise ValueError("field tag must be a string")
    if eid is not None and not isinstance(eid, str):
        raise ValueError("field id must be a string")
    writer.write(obj["eventData"], tag=tag, time=when, id=eid)


def stats(root: str, now: float | None = None) -> dict:
    lay = spool.layout(root)
    out: dict = {"spool": lay.root}
    for folder in spool.FOLDERS:
        count = size = 0
        oldest = None
        try:
            with os.scandir(os.path.join(lay.root, folder)) as it:
                for entry in it:
                    if not entry.is_file(follow_symlinks=False):
                        continue
                    count += 1
                    size += entry.stat(follow_symlinks=False).st_size
                    parsed = spool.parse_ready_name(entry.name) if folder == "ready" else None
                    if parsed and (oldest is None or parsed[0] < oldest):
                        oldest = parsed[0]
        except FileNotFoundError:
            pass
        out[folder] = {"files": count, "bytes": size}
        if folder == "ready":
            now = time.time() if now is None else now
            out[folder]["oldest_age_seconds"] = (round(now - oldest / 1e6, 3)
                                                 if oldest is not None else None)
    return out


def cmd_stats(args: argparse.Namespace) -> int:
    if not os.path.isdir(args.spool_dir):
        print(f"cloudtrail-sink spool stats: {args.spool_dir} is not a directory", file=sys.stderr)
        return 2
    result = stats(args.spool_dir)
    if args.json:
        print(json.dumps(result))
        return 0
    for folder in spool.FOLDERS:
        info = result[folder]
        line = f"{folder + '/':12} {info['files']:>8} files {info['bytes']:>14} bytes"
        if folder == "ready" and info.get("oldest_age_seconds") is not None:
            line += f"  oldest {info['oldest_age_seconds']:.1f}s"
        print(line)
    return 0
