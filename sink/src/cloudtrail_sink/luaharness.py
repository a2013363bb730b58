"""Run a Fluent Bit Lua filter script outside Fluent Bit, exactly as ``filter_lua`` runs it.

This module is the contract between our Lua code and Fluent Bit: tests and
``cloudtrail-sink mappings test`` / ``rejected replay`` call the real Lua files through it, under
LuaJIT 2.1 (``lupa.luajit21``; plain ``lupa.LuaRuntime`` is Lua 5.5, which Fluent Bit never runs).
It reproduces, from Fluent Bit's ``plugins/filter_lua/lua.c`` and ``src/flb_lua.c`` (5.1.x):

Loading (``FilterHarness``)
  One Lua state per filter, all standard libraries open (``luaL_openlibs``); the script is
  loaded with ``loadfile`` (chunk name ``@<path>``) and run once; its globals persist between
  calls; ``call`` must then name a global function. ``package.path`` is LuaJIT's default, which
  does NOT contain the script's folder (the script must extend it itself). ``os.getenv`` is
  replaced inside the Lua state by a lookup in the ``env`` mapping given to the harness, so
  tests never touch the process environment.

Python -> Lua (what ``flb_lua_pushmsgpack`` does with the record's msgpack)
  ``dict`` -> table whose metatable is ``{type = 2}`` (FLB_LUA_L2C_TYPE_MAP); ``list``/``tuple``
  -> table with metatable ``{type = 1}`` (FLB_LUA_L2C_TYPE_ARRAY), items at 1..n, a ``None``
  item leaves a hole; every table gets its own fresh metatable. ``int`` -> Lua number (a
  double: above 2^53 precision is lost; ``lua_pushinteger((double) u64)`` overflows for values
  that round to 2^63 or more and gives -2^63, as on x86-64); ``float`` -> number; ``bool`` -> boolean; ``str`` -> its UTF-8 bytes; ``bytes`` (msgpack
  bin) and ``msgpack.ExtType`` (ext: only its data) -> string; ``None`` -> the global
  ``flb_null`` (nil unless the script or ``enable_flb_null`` set it). A ``None`` or NaN map key
  makes Fluent Bit's ``lua_settable`` fail outside any protection: the harness raises
  ``HarnessError``.

Lua -> Python (what ``flb_lua_tompack`` does with the returned record)
  A table whose (raw) metatable has a numeric ``type``: 1 -> array of ``#t`` items, any other
  value >= 0 -> map. Otherwise ``table.maxn(t)``: an integral value > 0 -> array of that many
  items (holes become ``None``; non-integer keys are silently lost); else a map (an empty ``{}``
  is an empty MAP). A number whose value fits int64 exactly -> ``int``, else ``float``.
  Strings -> ``str`` when valid UTF-8, else ``bytes`` (Fluent Bit writes them as msgpack str
  either way; ``to_msgpack`` gives those exact bytes). A function, userdata, thread or coroutine
  inside the record makes Fluent Bit write a malformed record: ``MalformedRecord`` is raised.

Calling (``FilterHarness.call``)
  ``cb(tag, timestamp, record)`` with the tag as a string, the timestamp as a number (or
  ``{sec=, nsec=}`` with ``time_as_table``). In protected mode a Lua error means Fluent Bit
  passes the WHOLE batch through unmodified: the harness raises ``FilterRaised``. The returned
  code goes through ``lua_tointeger`` (non-numbers -> 0, fractions truncated); ``-1`` drop,
  ``0`` keep the original, ``1`` replace timestamp and record, ``2`` replace the record; any
  other code keeps the original (Fluent Bit logs an error). For 1/2 the record must convert to a
  map (one output record, possibly empty) or an array of maps (one output record each, none
  for an empty array marked as an array), otherwise Fluent Bit logs "invalid table returned"
  and passes the whole batch through: ``InvalidReturn`` is raised. ``call_batch`` applies
  those batch semantics to a list of records. (This is the default build's log-event path,
  which converts with ``flb_lua_pushmsgpack``: maps are created with ``lua_createtable(0, n)``,
  arrays with ``lua_createtable(n, 0)``.)
"""

from __future__ import annotations

import math
import os
import pathlib
from typing import Any, Iterable, Mapping

import lupa.luajit21 as _lupa
import msgpack

PACKAGE_DIR = pathlib.Path(__file__).resolve().parent


def _find_lua_dir() -> pathlib.Path:
    """The folder holding ``cloudtrail.lua`` and ``lua/cloudtrail/*.lua``.

    Installed packages carry a copy in ``cloudtrail_sink/lua``; a source checkout has it in
    ``<repo>/fluent-bit`` (``cloudtrail_sink/lua`` is a symlink to it there).
    """
    packaged = PACKAGE_DIR / "lua"
    if (packaged / "cloudtrail.lua").is_file():
        return packaged
    checkout = PACKAGE_DIR.parent.parent.parent / "fluent-bit"
    return checkout if (checkout / "cloudtrail.lua").is_file() else packaged


LUA_DIR = _find_lua_dir()
ENTRY_SCRIPT = LUA_DIR / "cloudtrail.lua"
ENTRY_CALL = "cb_cloudtrail"
MODULE_DIR = LUA_DIR / "lua"

FLB_LUA_L2C_TYPE_ARRAY = 1
FLB_LUA_L2C_TYPE_MAP = 2
INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
UINT64_MAX = 2**64 - 1
# Fluent Bit would try to allocate this; the harness refuses instead of eating memory.
MAX_ARRAY_LENGTH = 10_000_000


class HarnessError(Exception):
    """The input cannot be given to a filter the way Fluent Bit would (or Fluent Bit would crash)."""


class FilterRaised(Exception):
    """The filter raised: Fluent Bit (protected mode) passes the whole batch through unmapped."""


class InvalidReturn(Exception):
    """Code 1/2 with a record that is not a non-empty map (or array of them): batch untouched."""


class MalformedRecord(Exception):
    """The returned record holds a value Fluent Bit cannot serialize (function, userdata...)."""


# Helpers compiled into every state. They use the raw primitives captured at creation, so a
# script replacing globals cannot change how the harness converts values.
_HELPERS = r"""
local setmetatable, getmetatable, rawset, rawget, next, type, maxn, tostring =
      setmetatable, debug.getmetatable, rawset, rawget, next, type, table.maxn, tostring
local H = {}
-- lua_createtable(l, narr, nrec): the preallocation decides what `#` says about holes.
local ok_new, table_new = pcall(require, "table.new")
if not ok_new then table_new = function() return {} end end
function H.new_table(kind, narr, nrec) return setmetatable(table_new(narr, nrec), { type = kind }) end
function H.rawset(t, k, v) rawset(t, k, v) end
function H.settable(t, k, v) t[k] = v end
-- flb_lua_tompack's decision for one table: "array", n | "map"
function H.classify(t)
  local mt = getmetatable(t)
  if type(mt) == "table" then
    local data_type = -1
    for k, v in next, mt do
      if k == "type" and type(v) == "number" then
        data_type = v >= 0 and math.floor(v) or math.ceil(v)
      end
    end
    if data_type >= 0 then
      if data_type == 1 then return "array", #t end
      return "map", 0
    end
  end
  local n = maxn(t)
  return "maxn", n
end
function H.items(t)
  local keys, values, i = {}, {}, 0
  for k, v in next, t do i = i + 1; keys[i] = k; values[i] = v end
  return keys, values, i
end
function H.rawget(t, i) return rawget(t, i) end
function H.kind(v)
  local tv = type(v)
  if tv == "userdata" and v == nil then return "nil" end
  return tv
end
-- lua_tointeger on the returned code, lua_tonumber on the timestamp
function H.tointeger(v)
  local n = tonumber(v)
  if n == nil or n ~= n then return 0 end
  if n >= 0 then return math.floor(n) end
  return math.ceil(n)
end
function H.tonumber(v) return tonumber(v) or 0 end
function H.install_env(tbl)
  os.getenv = function(name)
    if type(name) ~= "string" and type(name) ~= "number" then
      error("bad argument #1 to 'getenv' (string expected, got " .. type(name) .. ")", 2)
    end
    return tbl[tostring(name)]
  end
end
function H.loadrun(path)
  local chunk, err = loadfile(path)
  if not chunk then return false, "cannot load: " .. tostring(err) end
  local ok, run_err = pcall(chunk)
  if not ok then return false, "error while running the script: " .. tostring(run_err) end
  return true, nil
end
function H.call(fn, a, b, c)
  return pcall(fn, a, b, c)
end
function H.is_lightuserdata_null(v)
  return type(v) == "userdata" and tostring(v):find("^userdata: NULL") ~= nil
end
return H
"""

LUAJIT_DEFAULT_PATH = (
    b"./?.lua;/usr/local/share/luajit-2.1/?.lua;/usr/local/share/lua/5.1/?.lua;"
    b"/usr/local/share/lua/5.1/?/init.lua"
)


class _Helpers:
    """The helper functions as plain attributes (lupa tables shadow names like ``items``)."""

    NAMES = ("new_table", "rawset", "settable", "classify", "items", "rawget", "kind",
             "tointeger", "tonumber", "install_env", "loadrun", "call", "is_lightuserdata_null")

    def __init__(self, table: Any) -> None:
        for name in self.NAMES:
            setattr(self, name, table[name.encode()])


def new_runtime() -> Any:
    """A fresh LuaJIT 2.1 state with every standard library, as ``flb_luajit_create`` makes.

    Strings cross the boundary as bytes (``encoding=None``); LuaJIT's default ``package.path``.
    Dropping the last reference closes the state (``lua_close``: finalizers run, files close).
    """
    lua = _lupa.LuaRuntime(encoding=None, unpack_returned_tuples=True, register_eval=False)
    lua.globals()[b"package"][b"path"] = LUAJIT_DEFAULT_PATH
    # lupa installs a global `python` table; Fluent Bit has none.
    lua.globals()[b"python"] = None
    return lua


def _helpers(lua: Any) -> "_Helpers":
    # Not cached on the runtime: helper functions reference it, and lupa runtimes do not take
    # part in cycle collection, so a cache would keep every state (and its files) alive.
    return _Helpers(lua.execute(_HELPERS))


def _int_to_number(value: int) -> float:
    if value < INT64_MIN or value > UINT64_MAX:
        raise HarnessError(f"integer {value} does not fit msgpack (int64/uint64)")
    number = float(value)  # (double) o->via.u64 / i64
    if number >= 2.0**63:
        # then converted to lua_Integer (int64): out of range, x86-64 yields INT64_MIN
        return float(INT64_MIN)
    return number


def to_lua(lua: Any, value: Any, helpers: "_Helpers | None" = None) -> Any:
    """``value`` as Fluent Bit hands a decoded msgpack value to Lua (see module docstring)."""
    return _to_lua(lua, helpers or _helpers(lua), value, 0)


def _to_lua(lua: Any, h: Any, value: Any, depth: int) -> Any:
    if value is None:
        return lua.globals()[b"flb_null"]
    if value is True or value is False:
        return value
    if isinstance(value, int):
        return _int_to_number(value)
    if isinstance(value, float):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")  # strict: a str msgpack could not pack is not a record
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, msgpack.ExtType):
        return bytes(value.data)
    if isinstance(value, dict):
        table = h.new_table(FLB_LUA_L2C_TYPE_MAP, 0, len(value))
        for key, item in value.items():
            lkey = _to_lua(lua, h, key, depth + 1)
            if lkey is None or (isinstance(lkey, float) and math.isnan(lkey)):
                raise HarnessError(f"map key {key!r}: Lua cannot index a table with it "
                                   "(Fluent Bit would abort in lua_settable)")
            h.settable(table, lkey, _to_lua(lua, h, item, depth + 1))
        return table
    if isinstance(value, (list, tuple)):
        table = h.new_table(FLB_LUA_L2C_TYPE_ARRAY, len(value), 0)
        for index, item in enumerate(value, start=1):
            h.rawset(table, index, _to_lua(lua, h, item, depth + 1))
        return table
    raise HarnessError(f"{type(value).__name__} is not a msgpack value")


def _number(value: Any) -> int | float:
    if isinstance(value, int):
        if INT64_MIN <= value <= INT64_MAX:
            return value
        return float(value)
    if math.isfinite(value) and value.is_integer() and INT64_MIN <= value < 2.0**63:
        return int(value)
    return float(value)


def _string(value: bytes) -> str | bytes:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return value


def from_lua(value: Any, lua: Any | None = None, helpers: "_Helpers | None" = None) -> Any:
    """A Lua value as Fluent Bit packs it (see module docstring); ``lua`` is the runtime that
    owns ``value`` (needed only for tables)."""
    return _from_lua(value, lua, helpers, raw=False)


def _from_lua(value: Any, lua: Any, h: Any, raw: bool) -> Any:
    if value is None or value is True or value is False:
        return value
    if isinstance(value, (int, float)):
        return _number(value)
    if isinstance(value, bytes):
        return value if raw else _string(value)
    kind = _lupa.lua_type(value)
    if kind == "table":
        if h is None:
            if lua is None:
                raise HarnessError("from_lua needs the runtime to convert a table")
            h = _helpers(lua)
        mode, n = h.classify(value)
        mode = mode.decode()
        if mode == "maxn":
            n = _number(n) if n is not None else 0
            if isinstance(n, int):
                n = ((n + 2**31) % 2**32) - 2**31  # (int) truncation of the C code
                mode = "array" if n > 0 else "map"
            else:
                mode = "map"
        if mode == "array":
            if n > MAX_ARRAY_LENGTH:
                raise HarnessError(f"array of {n} items: Fluent Bit would try to allocate it")
            return [_from_lua(h.rawget(value, i), lua, h, raw) for i in range(1, int(n) + 1)]
        keys, values, count = h.items(value)
        out: dict = {}
        for i in range(1, count + 1):
            key = _from_lua(keys[i], lua, h, raw)
            if isinstance(key, (list, dict)):
                raise HarnessError("a table used as a map key cannot be represented in Python")
            out[key] = _from_lua(values[i], lua, h, raw)
        return out
    if kind == "userdata" and h is not None and h.is_lightuserdata_null(value):
        return None  # flb_null
    raise MalformedRecord(f"a Lua {kind} cannot be serialized; Fluent Bit writes a malformed record")


class _RawStr(bytes):
    """Marks bytes that Fluent Bit writes as msgpack str (it never writes bin)."""


def to_msgpack(value: Any, lua: Any | None = None) -> bytes:
    """The exact msgpack bytes Fluent Bit writes for a Lua value (strings always ``str``)."""
    tree = _from_lua(value, lua, None, raw=True)

    def default(obj: Any) -> Any:
        raise TypeError(f"cannot pack {type(obj).__name__}")

    def mark(obj: Any) -> Any:
        if isinstance(obj, bytes):
            return _RawStr(obj)
        if isinstance(obj, list):
            return [mark(o) for o in obj]
        if isinstance(obj, dict):
            return {mark(k): mark(v) for k, v in obj.items()}
        return obj

    packer = msgpack.Packer(use_bin_type=False, default=default)
    return packer.pack(mark(tree))


class FilterHarness:
    """One ``filter_lua`` instance: a script, its call name, its own Lua state and environment.

    ``FilterHarness(script, call="cb_cloudtrail", env={...})``. ``env`` is what ``os.getenv``
    sees inside the script (nothing else of the process environment leaks in).
    ``time_as_table`` and ``enable_flb_null`` mirror the filter options. ``prelude`` is Lua code
    run in the state before the script (tests use it to replace the clock or pre-load a
    stand-in module through ``package.loaded``); Fluent Bit has no such thing.
    """

    def __init__(self, script: str | os.PathLike, call: str = ENTRY_CALL,
                 env: Mapping[str, str] | None = None, time_as_table: bool = False,
                 enable_flb_null: bool = False, prelude: str | None = None) -> None:
        self.script = os.fspath(script)
        self.call_name = call
        self.env = dict(env or {})
        self.time_as_table = time_as_table
        self.enable_flb_null = enable_flb_null
        self.prelude = prelude
        self.lua = new_runtime()
        self._h = _helpers(self.lua)
        env_table = self.lua.table()
        for key, val in self.env.items():
            env_table[key.encode()] = str(val).encode()
        self._h.install_env(env_table)
        if self.enable_flb_null:
            # Fluent Bit sets a NULL light userdata; lupa cannot make one, so a unique
            # sentinel that converts back to None is the closest stand-in.
            self.lua.globals()[b"flb_null"] = self.lua.eval("newproxy(false)")
        if self.prelude:
            self.lua.execute(self.prelude.encode())
        ok, err = self._h.loadrun(self.script.encode())
        if not ok:
            raise HarnessError(f"{self.script}: {_text(err)}")
        fn = self.lua.globals()[self.call_name.encode()]
        if _lupa.lua_type(fn) != "function":
            raise HarnessError(f"{self.script}: function {self.call_name} is not found")
        nparams = self.lua.eval(b'function(f) return debug.getinfo(f, "u").nparams end')(fn)
        if nparams == 5:
            # Fluent Bit >= 4.0.4 then calls cb(tag, ts, group, metadata, record).
            raise HarnessError(f"{self.script}: {self.call_name} takes 5 arguments; the harness "
                               "emulates the 3-argument form only")
        self._fn_name = self.call_name.encode()

    # -- the call ------------------------------------------------------------------------------
    def call(self, tag: str, timestamp: float, record: dict) -> tuple[int, float, Any]:
        """Call the filter once; returns ``(code, timestamp, record)`` as Fluent Bit applies it.

        ``record`` in the result is the original for codes 0 and unknown codes, ``None`` for
        -1, the converted returned record for 1/2 (a list of records when it was split).
        """
        lua_ts: Any
        if self.time_as_table:
            table = self.lua.table()
            sec = int(math.floor(timestamp))
            table[b"sec"] = float(sec)
            table[b"nsec"] = float(round((timestamp - sec) * 1e9))
            lua_ts = table
        else:
            lua_ts = float(timestamp)
        lua_record = to_lua(self.lua, record, self._h)
        fn = self.lua.globals()[self._fn_name]
        result = self._h.call(fn, tag.encode("utf-8"), lua_ts, lua_record)
        if not isinstance(result, tuple):
            result = (result,)
        ok = result[0]
        if not ok:
            raise FilterRaised(_text(result[1] if len(result) > 1 else None))
        returned = list(result[1:4]) + [None] * (4 - len(result))
        l_code = int(self._h.tointeger(returned[0]))
        new_ts = self._timestamp(returned[1], timestamp)
        if l_code == -1:
            return -1, timestamp, None
        if l_code in (1, 2):
            new_record = from_lua(returned[2], self.lua, self._h)
            records = _checked_result(new_record, self.script, self.call_name)
            ts_out = new_ts if l_code == 1 else timestamp
            return l_code, ts_out, records
        return l_code, timestamp, record

    def _timestamp(self, value: Any, original: float) -> float:
        if self.time_as_table and _lupa.lua_type(value) == "table":
            sec = self._h.tonumber(value[b"sec"])
            nsec = self._h.tonumber(value[b"nsec"])
            return float(sec) + float(nsec) / 1e9
        return float(self._h.tonumber(value))

    def call_batch(self, tag: str, entries: Iterable[tuple[float, dict]]) -> list[tuple[float, Any]]:
        """Run one chunk through the filter as ``cb_lua_filter`` does.

        Returns the records that leave the filter. If any call raises (protected mode) or
        returns an invalid table, the WHOLE batch leaves unmodified, as in Fluent Bit.
        """
        entries = list(entries)
        out: list[tuple[float, Any]] = []
        for ts, record in entries:
            try:
                code, new_ts, new_record = self.call(tag, ts, record)
            except (FilterRaised, InvalidReturn):
                return list(entries)
            if code == -1:
                continue
            if code in (1, 2):
                for item in (new_record if isinstance(new_record, list) else [new_record]):
                    out.append((new_ts, item))
            else:
                out.append((ts, record))
        return out

    def globals(self) -> Any:
        """The script's global table (for tests that inject e.g. a clock)."""
        return self.lua.globals()

    def require(self, name: str) -> Any:
        """``require(name)`` inside the script's state (modules are shared with the script)."""
        return self.lua.globals()[b"require"](name.encode())

    def close(self) -> None:
        """What ``lua_close`` does on a clean shutdown: a full GC closes open ``io`` files."""
        self.lua.execute(b"collectgarbage('collect'); collectgarbage('collect')")


def _checked_result(record: Any, script: str, call: str) -> Any:
    # pack_result of filter_lua (log-event path, the default build): a map, even empty, is one
    # record; an array is one record per item and every item must be a map; else invalid.
    if isinstance(record, dict):
        return record
    if isinstance(record, list) and all(isinstance(r, dict) for r in record):
        return record
    raise InvalidReturn(f"invalid table returned at {call}(), {script}")


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def lua_string_literal(path: str | os.PathLike) -> str:
    """``path`` as a Lua long-bracket-free string literal (for generated driver code)."""
    data = os.fsencode(path)
    return '"' + "".join(chr(b) if chr(b).isalnum() or chr(b) in "/._-" else "\\%d" % b
                         for b in data) + '"'
