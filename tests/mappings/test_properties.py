"""Property tests of the mapper's building blocks against Python references: the size it
measures (which decides truncation/rejection) equals what the sink measures, time conversion
agrees with Python's datetime, and the key=value parser follows its documented rules."""

from __future__ import annotations

import datetime as dt
import re

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cloudtrail_sink import luaharness, schema
from cloudtrail_sink.mappings import LuaMapper, compile_files
from cloudtrail_sink.mappings.runner import module_dir

SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])

RULES = """\
rules:
  - name: whole
    match: {tag: "*"}
    oversize: reject
    event:
      userIdentity: {type: T, principalId: p}
      eventSource: s
      eventName: n
      additionalEventData: $
"""

text = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=12)
scalars = st.one_of(text, st.integers(-10**12, 10**12), st.booleans(),
                    st.integers(-10**6, 10**6).map(lambda x: x / 4))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(text, inner, max_size=4)), max_leaves=20)


def _mapper():
    import pathlib
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:  # the rules file is needed only to compile
        d = pathlib.Path(tmp)
        (d / "r.yaml").write_text(RULES)
        return LuaMapper(compile_files([d / "r.yaml"]).lua_text())


MAPPER = None


def whole_mapper():
    global MAPPER
    if MAPPER is None:
        MAPPER = _mapper()
    return MAPPER


@SETTINGS
@given(st.dictionaries(text, values, max_size=6))
def test_size_limit_decision_matches_the_sink(record):
    record.pop("pad", None)
    m = whole_mapper()
    # Fluent Bit packs an integral Lua number as an int: 0.0 reaches the sink as 0
    record = luaharness.from_lua(luaharness.to_lua(m.lua, record), m.lua)
    # what the sink will see (ints stay ints, x/4 floats keep their value)
    base = len(schema.dumps(dict(record, pad="")).encode())
    if base > 28000:
        return
    record["pad"] = "a" * (28000 - base)
    res = m.map("t", 1.0, record)
    assert res.event is not None, res.reason
    assert res.event["additionalEventData"] == record
    record["pad"] += "a"
    res = m.map("t", 1.0, record)
    assert res.event is None and "additionalEventData is 28001 bytes" in res.reason


def _timeconv():
    lua = luaharness.new_runtime()
    return lua.execute(f"package.path = '{module_dir()}/?.lua;' .. package.path; "
                       "return require('cloudtrail.timeconv').to_utc".encode())


TO_UTC = _timeconv()


@SETTINGS
@given(st.datetimes(min_value=dt.datetime(1, 1, 1), max_value=dt.datetime(9999, 12, 30)),
       st.integers(-23 * 60 - 59, 23 * 60 + 59), st.sampled_from(["", ".5", ".123456789"]),
       st.sampled_from(["T", " "]))
def test_rfc3339_agrees_with_datetime(local, offset_min, frac, sep):
    tz = dt.timezone(dt.timedelta(minutes=offset_min))
    stamp = local.replace(microsecond=0, tzinfo=tz)
    sign = "+" if offset_min >= 0 else "-"
    off = f"{sign}{abs(offset_min) // 60:02d}:{abs(offset_min) % 60:02d}"
    txt = stamp.strftime(f"%Y-%m-%d{sep}%H:%M:%S") + frac + off
    if txt[0] != "0" and len(txt.split("-")[0]) < 4:
        txt = txt.zfill(len(txt) + 4 - len(txt.split("-")[0]))
    try:
        want = stamp.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        want = want.zfill(20)
    except OverflowError:
        return
    got = TO_UTC(txt.encode(), b"rfc3339", 0)
    utc_year = int(want[:4]) if want[:4].isdigit() else -1
    if not (0 <= utc_year <= 9999) or stamp.year < 1:
        return
    assert got is not None and got.decode() == want, txt


@SETTINGS
@given(st.integers(-62135596800, 253402300799), st.sampled_from([
    (b"epoch_s", 1), (b"epoch_ms", 1000), (b"epoch_us", 10**6), (b"epoch_ns", 10**9)]))
def test_epochs_agree_with_datetime(seconds, unit):
    fmt, scale = unit
    want = (dt.datetime(1970, 1, 1) + dt.timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert TO_UTC(str(seconds * scale).encode(), fmt, 0).decode() == want.zfill(20)


KEY = st.from_regex(r"\A[A-Za-z_][A-Za-z0-9_.-]{0,8}\Z")
VALUE = st.text(st.sampled_from("ab =,.-_1é"), max_size=10)
NEXT_KEY = re.compile(r",[A-Za-z_][A-Za-z0-9_.-]*=")


def _kv_decode():
    lua = luaharness.new_runtime()
    return lua, lua.execute(f"package.path = '{module_dir()}/?.lua;' .. package.path; "
                            "local kv = require('cloudtrail.kv'); "
                            "return function(s) return kv.decode(s, {message = true}) end"
                            .encode())


KV_LUA, KV = _kv_decode()


@SETTINGS
@given(st.lists(st.tuples(KEY, VALUE), min_size=1, max_size=6), VALUE)
def test_key_value_lists_follow_the_documented_rules(pairs, last_message):
    # the rule: a value ends at the first ',' followed by key '='; build inputs where every
    # value obeys it, then a final message= that may hold anything
    pairs = [(k, v) for k, v in pairs if k != "message" and not NEXT_KEY.search(v + ",x=")
             and not NEXT_KEY.search(v)]
    if not pairs:
        return
    line = ",".join(f"{k}={v}" for k, v in pairs) + ",message=" + last_message
    line = line.strip()
    expected = {}
    for k, v in pairs:
        expected[k] = v
    expected["message"] = last_message
    if line != ",".join(f"{k}={v}" for k, v in pairs) + ",message=" + last_message:
        return  # surrounding spaces are trimmed; not this property
    got = luaharness.from_lua(KV(line.encode()), KV_LUA)
    assert got == expected, line
