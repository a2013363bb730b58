"""The harness converts and calls exactly as filter_lua does (flb_lua.c / filter_lua/lua.c)."""

from __future__ import annotations

import msgpack
import pytest

from cloudtrail_sink.luaharness import (FilterHarness, FilterRaised, InvalidReturn,
                                        MalformedRecord, from_lua, new_runtime, to_lua,
                                        to_msgpack)


def script(tmp_path, body: str, name: str = "f.lua"):
    path = tmp_path / name
    path.write_text(body)
    return path


def test_tables_carry_fluent_bits_array_and_map_metatables(tmp_path):
    s = script(tmp_path, """
function cb(tag, ts, r)
  local out = {}
  for k, v in pairs(r) do
    local mt = getmetatable(v)
    out[k] = mt and mt.type or type(v)
  end
  out.top = getmetatable(r).type
  return 2, ts, out
end""")
    h = FilterHarness(s, "cb")
    code, ts, out = h.call("t", 1.0, {"arr": [1], "empty_arr": [], "map": {"a": 1},
                                      "empty_map": {}, "s": "x", "n": 1})
    assert code == 2
    assert out == {"arr": 1, "empty_arr": 1, "map": 2, "empty_map": 2, "s": "string",
                   "n": "number", "top": 2}


def test_numbers_are_doubles_in_lua(tmp_path):
    s = script(tmp_path, """
function cb(tag, ts, r)
  return 2, ts, { big = r.big == 2^53, wrapped = r.u, frac = r.f, exact = r.i + 0.5 }
end""")
    h = FilterHarness(s, "cb")
    _, _, out = h.call("t", 1.0, {"big": 2**53 + 1, "u": 2**64 - 1, "f": 1.25, "i": 3})
    # 2^53+1 is not a double: it arrives as 2^53; a uint64 beyond int64 overflows the
    # (double) -> lua_Integer conversion of lua_pushinteger: INT64_MIN on x86-64.
    assert out == {"big": True, "wrapped": -(2**63), "frac": 1.25, "exact": 3.5}


def test_nil_bin_and_ext(tmp_path):
    s = script(tmp_path, """
function cb(tag, ts, r)
  local keys = {}
  for k in pairs(r) do keys[#keys + 1] = k end
  table.sort(keys)
  return 2, ts, { keys = table.concat(keys, ","), arr_len = #r.arr, hole = r.arr[2] == nil,
                  bin = r.bin, ext = r.ext }
end""")
    h = FilterHarness(s, "cb")
    _, _, out = h.call("t", 1.0, {"gone": None, "arr": [1, None, 3], "bin": b"\xff\x00",
                                  "ext": msgpack.ExtType(5, b"xy")})
    assert out["keys"] == "arr,bin,ext"  # a nil value removes its key
    assert out["hole"] is True and out["arr_len"] == 3
    assert out["bin"] == b"\xff\x00" and out["ext"] == "xy"


def test_lua_to_msgpack_rules():
    lua = new_runtime()
    value = lua.execute(b"""
      return {
        int = 3.0, float = 1.5, empty = {}, list = {1, 2}, holes = {[1] = 1, [3] = 3},
        mixed = {1, 2, name = "lost"}, neg = -2^63, huge = 2^63, nan = 0/0,
        marked_empty = setmetatable({}, {type = 1}),
        marked_map = setmetatable({1, 2}, {type = 2}),
      }""")
    out = from_lua(value, lua)
    assert out["int"] == 3 and isinstance(out["int"], int)
    assert out["float"] == 1.5
    assert out["empty"] == {}            # an empty table is an empty MAP
    assert out["list"] == [1, 2]
    assert out["holes"] == [1, None, 3]  # maxn decides the length
    assert out["mixed"] == [1, 2]        # string keys in a mixed table are lost
    assert out["neg"] == -(2**63) and isinstance(out["neg"], int)
    assert isinstance(out["huge"], float)
    assert out["nan"] != out["nan"]
    assert out["marked_empty"] == []
    assert out["marked_map"] == {1: 1, 2: 2}


def test_round_trip_keeps_arrays_maps_and_empties():
    lua = new_runtime()
    record = {"a": [], "b": {}, "c": [{"d": []}], "e": "x", "f": -7, "g": 0.5, "h": True}
    assert from_lua(to_lua(lua, record), lua) == record


def test_to_msgpack_writes_strings_as_str_even_when_not_utf8():
    lua = new_runtime()
    data = to_msgpack(lua.execute(b'return { s = "\\255", n = 1 }'), lua)
    unpacked = msgpack.unpackb(data, raw=True)
    assert unpacked == {b"s": b"\xff", b"n": 1}
    assert data.count(b"\xc4") == 0  # no bin header


def test_functions_inside_a_record_are_malformed(tmp_path):
    s = script(tmp_path, "function cb(tag, ts, r) return 2, ts, { f = print } end")
    with pytest.raises(MalformedRecord):
        FilterHarness(s, "cb").call("t", 1.0, {"a": 1})


@pytest.mark.parametrize("ret, expected", [
    ("-1, ts, r", (-1, 5.0, None)),
    ("0, 99, {x = 1}", (0, 5.0, {"a": 1})),
    ("1, 99, {x = 1}", (1, 99.0, {"x": 1})),
    ("2, 99, {x = 1}", (2, 5.0, {"x": 1})),
    ("3, 99, {x = 1}", (3, 5.0, {"a": 1})),          # unknown code keeps the original
    ("'2', 99, {x = 1}", (2, 5.0, {"x": 1})),        # lua_tointeger coerces strings
    ("nil, 99, {x = 1}", (0, 5.0, {"a": 1})),
    ("1, 99, {{x = 1}, {y = 2}}", (1, 99.0, [{"x": 1}, {"y": 2}])),  # split
])
def test_return_codes(tmp_path, ret, expected):
    s = script(tmp_path, f"function cb(tag, ts, r) return {ret} end")
    assert FilterHarness(s, "cb").call("t", 5.0, {"a": 1}) == expected


@pytest.mark.parametrize("ret, expected", [
    ("2, ts, {}", {}),                                  # an empty map is a (empty) record
    ("2, ts, {{}, {a = 1}}", [{}, {"a": 1}]),
    ("2, ts, setmetatable({}, {type = 1})", []),        # an empty array: no record at all
])
def test_maps_and_arrays_of_maps_are_valid_results(tmp_path, ret, expected):
    s = script(tmp_path, f"function cb(tag, ts, r) return {ret} end")
    assert FilterHarness(s, "cb").call("t", 5.0, {"a": 1}) == (2, 5.0, expected)


@pytest.mark.parametrize("ret", ["1, ts, 'x'", "2, ts, {1, 2}", "2, ts, 5", "2, ts, nil"])
def test_invalid_tables_leave_the_batch_untouched(tmp_path, ret):
    s = script(tmp_path, f"function cb(tag, ts, r) return {ret} end")
    h = FilterHarness(s, "cb")
    with pytest.raises(InvalidReturn):
        h.call("t", 5.0, {"a": 1})
    assert h.call_batch("t", [(1.0, {"a": 1})]) == [(1.0, {"a": 1})]


def test_an_error_sends_the_whole_batch_through_unmapped(tmp_path):
    s = script(tmp_path, """
function cb(tag, ts, r)
  if r.bad then error("boom") end
  return -1, ts, r
end""")
    h = FilterHarness(s, "cb")
    with pytest.raises(FilterRaised, match="boom"):
        h.call("t", 1.0, {"bad": 1})
    batch = [(1.0, {"ok": 1}), (2.0, {"bad": 1}), (3.0, {"ok": 2})]
    assert h.call_batch("t", batch) == batch
    assert h.call_batch("t", [(1.0, {"ok": 1})]) == []


def test_globals_persist_and_env_is_the_harness_env(tmp_path, monkeypatch):
    monkeypatch.setenv("LEAKED", "from-process")
    s = script(tmp_path, """
local n = 0
function cb(tag, ts, r)
  n = n + 1
  return 2, ts, { n = n, v = os.getenv("V"), leaked = os.getenv("LEAKED") or "none" }
end""")
    h = FilterHarness(s, "cb", env={"V": "mine"})
    h.call("t", 1.0, {"a": 1})
    assert h.call("t", 1.0, {"a": 1})[2] == {"n": 2, "v": "mine", "leaked": "none"}


def test_script_folder_is_not_on_package_path(tmp_path):
    (tmp_path / "sibling.lua").write_text("return 1")
    s = script(tmp_path, "local ok = pcall(require, 'sibling')\n"
                         "function cb(tag, ts, r) return 2, ts, { found = ok } end")
    assert FilterHarness(s, "cb").call("t", 1.0, {"a": 1})[2] == {"found": False}


def test_time_as_table(tmp_path):
    s = script(tmp_path, "function cb(tag, ts, r) return 1, {sec = ts.sec + 1, nsec = ts.nsec}, "
                         "{ sec = ts.sec } end")
    h = FilterHarness(s, "cb", time_as_table=True)
    code, ts, out = h.call("t", 10.5, {"a": 1})
    assert out == {"sec": 10} and ts == 11.5


def test_missing_call_is_an_error(tmp_path):
    from cloudtrail_sink.luaharness import HarnessError
    s = script(tmp_path, "x = 1")
    with pytest.raises(HarnessError, match="not found"):
        FilterHarness(s, "cb")
