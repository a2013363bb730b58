"""``cloudtrail-sink mappings compile|watch|test|check``: build and try the YAML mapping rules.

``mappings compile [PATH...] -o FILE.lua`` validates the YAML files (a folder means its
``*.yaml``; several paths are layered by file name, see ``mappings.build.source_files``;
default ``$CLOUDTRAIL_MAPPINGS`` or ``./mappings``), loads the result into the real Lua mapper,
runs every file's ``examples:`` (``--no-examples`` skips them) and writes the data-only Lua file
atomically (temporary file + rename, so the filter's live reload never reads half a file).
Problems are printed one per line as ``FILE:LINE: FIELD: MESSAGE`` (FILE relative to
``--display-root`` when given, repeatable for layered folders); exit 1 and nothing written when
there is any.
``--event-version`` / ``--account-id`` add ``version`` / ``recipientAccountId`` to every rule
that does not set them (the sink fills both when absent, so they are optional).

``mappings watch [PATH...] -o FILE.lua`` does the same at start and again whenever a source
changes (watchdog, debounced), until SIGTERM/SIGINT (exit 0). A broken edit prints its problems
and leaves FILE as it was: the last good rules stay live (``mappings.watch``).

``mappings test --tag TAG [RECORD.json|-] [-m PATH...] [--time EPOCH]`` maps one record (a JSON
object; a file of JSON lines maps each line) with the real Lua code and prints the eventData as
JSON with the rule that applied, ``rejected: REASON``, or ``dropped: REASON`` (a ``drop:`` rule
took it, on purpose); exit 1 if any record was rejected. ``-m`` takes YAML files/folders or a
compiled ``.lua`` file. ``--explain`` first prints, per record, one line per rule tried: which
rule applied and, for each earlier rule, the first ``match`` condition or step that failed and
the value it saw.

``mappings check [PATH...]`` compiles and runs every file's ``examples:`` against all the rules
and prints ``ok``/``FAIL`` per example (``skip`` for examples of a rule with ``enabled: false``);
exit 1 on any failure or compile problem.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time as _time

from ..mappings import CompileError, LuaMapper, MapperLoadError, check_examples, check_patterns, compile_files
from ..mappings.build import build, source_files, write_atomic
from ..mappings.runner import filled
from . import SubParsers


def _default_paths() -> list[str]:
    return [os.environ.get("CLOUDTRAIL_MAPPINGS", "mappings")]


def register(subparsers: SubParsers) -> None:
    parser = subparsers.add_parser("mappings", help="compile, test and check YAML mapping rules")
    sub = parser.add_subparsers(dest="mappings_command", metavar="SUBCOMMAND")
    parser.set_defaults(func=lambda args: (parser.print_help(sys.stderr), 2)[1])

    c = sub.add_parser("compile", help="validate YAML rules and write the data-only Lua file")
    c.add_argument("paths", nargs="*", metavar="PATH",
                   help="YAML files or folders (default: $CLOUDTRAIL_MAPPINGS or ./mappings)")
    c.add_argument("-o", "--output", required=True, metavar="FILE.lua", help="file to write")
    c.add_argument("--event-version", metavar="V",
                   help="version for rules that set none (default: left to the sink)")
    c.add_argument("--account-id", metavar="ID",
                   help="recipientAccountId for rules that set none (default: left to the sink)")
    _build_options(c)
    c.set_defaults(func=cmd_compile)

    w = sub.add_parser("watch", help="compile now and again on every change; keep the last good file")
    w.add_argument("paths", nargs="*", metavar="PATH",
                   help="YAML files or folders (default: $CLOUDTRAIL_MAPPINGS or ./mappings)")
    w.add_argument("-o", "--output", required=True, metavar="FILE.lua", help="file to keep up to date")
    w.add_argument("--debounce", type=float, default=0.5, metavar="SECONDS",
                   help="build once no change came for this long (default: 0.5)")
    w.add_argument("--poll-seconds", type=float, default=5.0, metavar="SECONDS",
                   help="also look for changes this often, in case file events do not arrive "
                        "(default: 5)")
    _build_options(w)
    w.set_defaults(func=cmd_watch)

    t = sub.add_parser("test", help="map a record with the real Lua mapper and print the result")
    t.add_argument("record", nargs="?", default="-", metavar="RECORD.json|-",
                   help="a JSON object, or JSON lines (default: standard input)")
    t.add_argument("--tag", required=True, help="the Fluent Bit tag the record arrives with")
    t.add_argument("-m", "--mappings", action="append", metavar="PATH",
                   help="YAML files/folders or a compiled .lua (repeatable; default: "
                        "$CLOUDTRAIL_MAPPINGS or ./mappings)")
    t.add_argument("--time", type=float, default=None,
                   help="the record's Fluent Bit timestamp, epoch seconds (default: now)")
    t.add_argument("--explain", action="store_true",
                   help="say which rule applied and why each earlier rule did not")
    t.set_defaults(func=cmd_test)

    k = sub.add_parser("check", help="run the examples: of every mapping file")
    k.add_argument("paths", nargs="*", metavar="PATH",
                   help="YAML files or folders (default: $CLOUDTRAIL_MAPPINGS or ./mappings)")
    k.set_defaults(func=cmd_check)


def _build_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-examples", dest="examples", action="store_false",
                   help="do not run the files' examples: before writing")
    p.add_argument("--display-root", metavar="DIR", action="append",
                   help="name files in messages relative to DIR (e.g. mappings/40-sshd.yaml "
                        "for /src/mappings/40-sshd.yaml with --display-root /src); repeatable, "
                        "one per folder of layered sources")


def _builder(args: argparse.Namespace, defaults: dict | None = None):
    return lambda paths: build(paths, defaults, examples=args.examples,
                               display_root=args.display_root)


def _compile(paths: list[str], defaults: dict | None = None):
    compiled = compile_files(source_files(paths) or paths, defaults)
    problems = check_patterns(compiled)
    if problems:
        raise CompileError(problems)
    return compiled


def _report(exc: CompileError) -> int:
    for p in exc.problems:
        print(p, file=sys.stderr)
    print(f"{len(exc.problems)} problem(s); nothing written", file=sys.stderr)
    return 1


def cmd_compile(args: argparse.Namespace) -> int:
    defaults = {}
    if args.event_version:
        defaults["version"] = args.event_version
    if args.account_id:
        defaults["recipientAccountId"] = args.account_id
    try:
        built = _builder(args, defaults)(args.paths or _default_paths())
    except CompileError as exc:
        return _report(exc)
    try:
        write_atomic(args.output, built.text)
    except OSError as exc:
        print(f"{args.output}: cannot write: {exc.strerror or exc}", file=sys.stderr)
        return 1
    print(f"{args.output}: {built.rules} rules from {built.files} file(s), "
          f"{built.examples} examples passed", file=sys.stderr)
    return 0


def cmd_watch(args: argparse.Namespace) -> int:
    import signal
    import threading

    from ..mappings.watch import MappingsWatch

    watch = MappingsWatch(args.paths or _default_paths(), args.output, _builder(args),
                          debounce=args.debounce, poll_seconds=args.poll_seconds)
    stop = threading.Event()

    def stop_now(signum, frame):
        stop.set()
        watch.stop_waiting()

    signal.signal(signal.SIGTERM, stop_now)
    signal.signal(signal.SIGINT, stop_now)
    watch.run(stop)
    return 0


def _load_mapper(paths: list[str]) -> LuaMapper:
    if len(paths) == 1 and paths[0].endswith(".lua"):
        return LuaMapper.from_file(paths[0])
    return LuaMapper(_compile(paths).lua_text())


def _records(source: str):
    text = sys.stdin.read() if source == "-" else pathlib.Path(source).read_text(encoding="utf-8")
    name = "<stdin>" if source == "-" else source
    try:
        yield name, 1, json.loads(text)
        return
    except json.JSONDecodeError:
        pass
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield name, number, json.loads(line)
        except json.JSONDecodeError as exc:
            yield name, number, ValueError(f"not JSON: {exc.msg}")


def cmd_test(args: argparse.Namespace) -> int:
    try:
        mapper = _load_mapper(args.mappings or _default_paths())
    except CompileError as exc:
        return _report(exc)
    except (MapperLoadError, OSError) as exc:
        print(f"cannot load the mappings: {exc}", file=sys.stderr)
        return 1
    ts = args.time if args.time is not None else _time.time()
    status = 0
    try:
        records = list(_records(args.record))
    except OSError as exc:
        print(f"{args.record}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    for name, number, record in records:
        where = f"{name}:{number}"
        if isinstance(record, Exception) or not isinstance(record, dict):
            print(f"{where}: {record if isinstance(record, Exception) else 'not a JSON object'}",
                  file=sys.stderr)
            status = 1
            continue
        if args.explain:
            for text in mapper.explain(args.tag, ts, record):
                print(f"{where}: {text}")
        res = mapper.map(args.tag, ts, record)
        if res.dropped:
            print(f"{where}: {res.reason}")
            continue
        if res.event is None:
            print(f"{where}: rejected: {res.reason}")
            status = 1
            continue
        print(f"{where}: rule {res.rule}", file=sys.stderr)
        print(json.dumps(res.event, ensure_ascii=False, indent=2, sort_keys=True))
        from .. import schema
        problem = schema.check_event(filled(res.event), None)
        if problem is not None:  # the mapper promises this never happens: say so loudly
            print(f"{where}: WARNING: eventData fails the schema check: {problem.message}",
                  file=sys.stderr)
            status = 1
    return status


def cmd_check(args: argparse.Namespace) -> int:
    try:
        compiled = _compile(args.paths or _default_paths())
        results = check_examples(compiled)
    except CompileError as exc:
        return _report(exc)
    except MapperLoadError as exc:
        print(f"the Lua mapper refuses the compiled rules: {exc}", file=sys.stderr)
        return 1
    failed = 0
    for r in results:
        ex = r.example
        label = f"{ex.file}:{ex.line}: {ex.name}"
        if r.skipped:
            print(f"skip {label} ({r.message})")
        elif r.ok:
            print(f"ok   {label} ({r.message})")
        else:
            failed += 1
            print(f"FAIL {label}: {r.message}")
    with_examples = {r.example.file for r in results}
    for f in compiled.files:
        if f not in with_examples:
            print(f"note {f}: no examples: (its rules are untested)")
    skipped = sum(r.skipped for r in results)
    print(f"{len(results) - failed - skipped} examples passed, {failed} failed"
          + (f", {skipped} skipped" if skipped else ""))
    return 1 if failed else 0
