"""Run compiled mapping rules in the real Lua mapper (LuaJIT 2.1), as the Fluent Bit filter does.

Contract:

* ``LuaMapper(lua_text, name)`` loads a compiled chunk with the filter's own loader
  (``cloudtrail.filter.parse_mappings``: text mode only, an EMPTY environment, at most 20 million
  instructions to evaluate, ``format = 1``) into a fresh ``luaharness.new_runtime()`` state, then
  ``require("cloudtrail.mapper").new(data)``. A chunk that does not load, calls anything, never
  finishes (a hand-written loop), or that the mapper refuses raises ``MapperLoadError`` naming
  ``name``, so ``mappings test`` and ``rejected replay`` accept exactly the files the filter
  accepts and cannot hang on one.
* ``LuaMapper.map(tag, time, record) -> MapResult`` converts ``record`` with
  ``luaharness.to_lua`` (what filter_lua does to a msgpack record), calls ``m:map`` and converts
  the eventData back with ``luaharness.from_lua``; ``dropped`` is true when a ``drop:`` rule
  took the record (no event, on purpose).
* ``LuaMapper.explain(tag, time, record) -> list[str]``: ``m:explain``, one line per rule tried.
* ``check_examples(compiled) -> list[ExampleResult]``: every file's ``examples:`` run against
  ALL the rules, in the order given (so an earlier rule that steals a record shows up).
  An example naming (``rule:``) a rule switched off with ``enabled: false`` is skipped.
  An ``expect`` must equal the eventData exactly, and that eventData (with ``version`` and
  ``recipientAccountId`` filled as the sink would) must pass ``schema.check_event``.
* ``check_patterns(compiled) -> list[str]``: Lua patterns LuaJIT refuses, as compile problems.
"""

from __future__ import annotations

import json
import pathlib
from dataclasses import dataclass
from typing import Any

from .. import luaharness, schema
from .compiler import Compiled, Example

EXAMPLE_ACCOUNT = "123456789012"
DEFAULT_VERSION = "1.0"

_LOADER = rb"""
local text, chunkname, module_dir = ...
package.path = module_dir .. "/?.lua;" .. package.path
local data, err = require("cloudtrail.filter").parse_mappings(text, chunkname)
if not data then return nil, err end
local mapper = require("cloudtrail.mapper")
local m, merr = mapper.new(data)
if not m then return nil, merr end
return function(tag, ts, record) return m:map(tag, ts, record) end,
       function(tag, ts, record) return m:explain(tag, ts, record) end
"""

_PATTERN_CHECK = rb"""
return function(pat)
  local ok, err = pcall(string.find, "", pat)
  if ok then return nil end
  return tostring(err)
end
"""


class MapperLoadError(Exception):
    """The compiled mappings cannot be loaded by the Lua mapper."""


@dataclass
class MapResult:
    event: dict | None
    reason: str | None
    rule: str | None
    dropped: bool = False


def module_dir() -> pathlib.Path:
    """Where ``cloudtrail/mapper.lua`` lives (installed copy, else this checkout)."""
    candidates = [luaharness.MODULE_DIR,
                  pathlib.Path(__file__).resolve().parents[4] / "fluent-bit" / "lua"]
    for c in candidates:
        if (c / "cloudtrail" / "mapper.lua").is_file():
            return c
    return candidates[0]


class LuaMapper:
    def __init__(self, lua_text: str, name: str = "compiled mappings") -> None:
        self.lua = luaharness.new_runtime()
        loader = self.lua.execute(_LOADER, lua_text.encode("utf-8"), name.encode("utf-8"),
                                  str(module_dir()).encode())
        fn, second = (loader + (None,))[:2] if isinstance(loader, tuple) else (loader, None)
        if fn is None:
            raise MapperLoadError(luaharness._text(second))
        self._map, self._explain = fn, second

    @classmethod
    def from_file(cls, path: str | pathlib.Path) -> "LuaMapper":
        return cls(pathlib.Path(path).read_text(encoding="utf-8"), str(path))

    def map(self, tag: str, time: float, record: Any) -> MapResult:
        lrec = luaharness.to_lua(self.lua, record)
        out = self._map(tag.encode("utf-8"), float(time), lrec)
        if not isinstance(out, tuple):
            out = (out,)
        out = tuple(out) + (None, None, None, None)
        event, reason, rule = out[0], out[1], out[2]
        return MapResult(
            event=luaharness.from_lua(event, self.lua) if event is not None else None,
            reason=luaharness._text(reason) if reason is not None else None,
            rule=luaharness._text(rule) if rule is not None else None,
            dropped=out[3] is True,
        )

    def explain(self, tag: str, time: float, record: Any) -> list[str]:
        lines = self._explain(tag.encode("utf-8"), float(time), luaharness.to_lua(self.lua, record))
        return [luaharness._text(v) for v in luaharness.from_lua(lines, self.lua)]


def check_patterns(compiled: Compiled) -> list[str]:
    lua = luaharness.new_runtime()
    fn = lua.execute(_PATTERN_CHECK)
    problems = []
    for where, pat in compiled.patterns:
        err = fn(pat.encode("utf-8"))
        if err is not None:
            problems.append(f"{where}: invalid Lua pattern: {luaharness._text(err)}")
    return problems


def filled(event: dict) -> dict:
    """``event`` as the sink sends it: ``version``/``recipientAccountId`` filled when absent."""
    out = dict(event)
    out.setdefault("version", DEFAULT_VERSION)
    out.setdefault("recipientAccountId", EXAMPLE_ACCOUNT)
    return out


@dataclass
class ExampleResult:
    example: Example
    ok: bool
    message: str
    skipped: bool = False


def check_examples(compiled: Compiled, mapper: LuaMapper | None = None) -> list[ExampleResult]:
    mapper = mapper or LuaMapper(compiled.lua_text())
    results = []
    for ex in compiled.examples:
        if ex.rule is not None and ex.rule in compiled.disabled:
            results.append(ExampleResult(ex, True, f"skipped: rule {ex.rule} has enabled: false",
                                         skipped=True))
            continue
        res = mapper.map(ex.tag, ex.time, ex.record)
        results.append(ExampleResult(ex, *_judge(ex, res)))
    return results


def _judge(ex: Example, res: MapResult) -> tuple[bool, str]:
    if ex.rule is not None and res.rule != ex.rule:
        return False, f"expected rule '{ex.rule}' to apply, got {res.rule!r} ({res.reason or 'mapped'})"
    if ex.expect_dropped is not None:
        if not res.dropped:
            return False, "expected the record to be dropped, got " + (
                _compact(res.event) if res.event is not None else f"rejected: {res.reason}")
        if ex.expect_dropped not in (res.reason or ""):
            return False, f"dropped, but the reason {res.reason!r} does not contain {ex.expect_dropped!r}"
        return True, f"dropped: {res.reason}"
    if res.dropped:
        return False, f"expected {'a rejection' if ex.expect_rejected else 'an event'}, but {res.reason}"
    if ex.expect_rejected is not None:
        if res.event is not None:
            return False, "expected a rejection, got an event: " + _compact(res.event)
        if ex.expect_rejected not in (res.reason or ""):
            return False, f"rejected, but the reason {res.reason!r} does not contain {ex.expect_rejected!r}"
        return True, f"rejected: {res.reason}"
    if res.event is None:
        return False, f"rejected: {res.reason}"
    problem = schema.check_event(filled(res.event), None)
    if problem is not None:
        return False, f"eventData fails the schema check: {problem.code}: {problem.message}"
    if res.event != ex.expect:
        return False, "eventData differs from expect:\n" + _diff(ex.expect or {}, res.event)
    return True, f"rule {res.rule}"


def _compact(v: Any) -> str:
    return json.dumps(v, ensure_ascii=False, sort_keys=True, separators=(",", ":"))


def _diff(want: dict, got: dict) -> str:
    lines = []
    for key in sorted(set(want) | set(got)):
        if want.get(key) != got.get(key):
            lines.append(f"    {key}: expected {_compact(want.get(key))}")
            lines.append(f"    {' ' * len(key)}  got      {_compact(got.get(key))}")
    return "\n".join(lines)
