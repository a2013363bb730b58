"""Turn mapping sources into the compiled file the filter loads, with every check, atomically.

Contract:

* ``source_files(paths) -> list[Path]``: the YAML files ``paths`` stand for. A folder stands for
  its ``*.yaml``/``*.yml`` files. Files are compiled in file-name order, whatever folder they
  come from, and a file of a later path replaces an earlier one of the same name: so
  ``shipped/ mine/`` gives the shipped rules plus yours, and ``mine/40-sshd.yaml`` replaces the
  shipped ``40-sshd.yaml``. With one folder this is simply its files in name order.
* ``build(paths, defaults=None, examples=True, display_root=None) -> Built``: compiles,
  checks the Lua patterns with LuaJIT, loads the result into the real Lua mapper, and (unless
  ``examples=False``) runs every file's ``examples:`` against all the rules. Any problem raises
  ``CompileError`` holding them all as ``FILE:LINE: FIELD: MESSAGE``; a failing example is
  ``FILE:LINE: examples: NAME: MESSAGE``. With ``display_root`` (a folder, or a list of them),
  FILE is the path relative to the innermost of those folders that holds it
  (``mappings/40-sshd.yaml`` rather than ``/src/mappings/40-sshd.yaml`` inside a container),
  i.e. the name the user knows; files outside every root keep their path.
* ``write_atomic(path, text)``: a temporary file in the same folder, then ``rename(2)``: a reader
  (the Lua filter) sees the old file or the new one, never a part. On any error the temporary
  file is removed and the old file is untouched.
* ``fingerprint(paths) -> str``: a digest of the source files' names and bytes (an unreadable
  file counts with its error), so a watcher recompiles only when a source really changed.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import tempfile
from dataclasses import dataclass

from .compiler import CompileError, compile_files
from .runner import LuaMapper, MapperLoadError, check_examples, check_patterns


@dataclass
class Built:
    text: str
    rules: int
    files: int
    examples: int


def source_files(paths: list[str | pathlib.Path]) -> list[pathlib.Path]:
    by_name: dict[str, pathlib.Path] = {}
    for p in paths:
        path = pathlib.Path(p)
        if path.is_dir():
            found = [q for q in path.iterdir() if q.suffix in (".yaml", ".yml") and q.is_file()]
        else:
            found = [path]  # missing: compile_files reports it with its name
        for q in found:
            by_name[q.name] = q
    return [by_name[name] for name in sorted(by_name)]


def _renamer(files: list[pathlib.Path], display_root: str | list[str] | None):
    if not display_root:
        return lambda line: line
    roots = [display_root] if isinstance(display_root, str) else list(display_root)
    # Innermost first: /a/b/mappings/x.yaml under both /a and /a/b is named from /a/b.
    roots = sorted({os.path.abspath(r) for r in roots}, key=len, reverse=True)
    names = {}
    for f in files:
        full = os.path.abspath(f)
        for root in roots:
            if os.path.commonpath([root, full]) == root:
                names[str(f)] = os.path.relpath(full, root)
                break

    order = sorted(names, key=len, reverse=True)  # a message may name another file too

    def rename(line: str) -> str:
        for full in order:
            line = line.replace(full, names[full])
        return line
    return rename


def build(paths: list[str | pathlib.Path], defaults: dict | None = None, examples: bool = True,
          display_root: str | list[str] | None = None) -> Built:
    files = source_files(paths)
    rename = _renamer(files, display_root)
    try:
        compiled = compile_files(files or paths, defaults)
    except CompileError as exc:
        raise CompileError([rename(p) for p in exc.problems]) from None
    problems = check_patterns(compiled)
    if problems:
        raise CompileError([rename(p) for p in problems])
    text = compiled.lua_text()
    try:
        mapper = LuaMapper(text)
    except MapperLoadError as exc:
        raise CompileError([f"the Lua mapper refuses the compiled rules: {exc}"]) from None
    ran = 0
    if examples:
        failed = []
        for r in check_examples(compiled, mapper):
            ran += 1
            if not r.ok:
                ex = r.example
                failed.append(rename(f"{ex.file}:{ex.line}: examples: {ex.name}: {r.message}"))
        if failed:
            raise CompileError(failed)
    return Built(text=text, rules=len(compiled.rules), files=len(compiled.files), examples=ran)


def write_atomic(path: str | pathlib.Path, text: str) -> None:
    out = pathlib.Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=str(out.parent))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def fingerprint(paths: list[str | pathlib.Path]) -> str:
    digest = hashlib.sha256()
    for path in source_files(paths):
        digest.update(os.fsencode(path) + b"\0")
        try:
            data = path.read_bytes()
        except OSError as exc:
            data = f"<unreadable: {exc.strerror or exc}>".encode()
        digest.update(hashlib.sha256(data).digest())
    return digest.hexdigest()
