"""Property tests: whatever Fluent Bit hands the filter, it never raises, every record ends in
ready/ or rejected/ intact, and every event in ready/ decodes and passes the emulator's schema."""

from __future__ import annotations

import collections
import json
import math
import pathlib
import re
import tempfile

import msgpack
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from cloudtrail_sink.luaharness import from_lua, new_runtime, to_lua
from cloudtrail_sink.mappings import compile_files
from cloudtrail_sink.schema import check_event

from .conftest import ACCOUNT, STANDIN_RULES, START, LuaFilter, read_folder

REPO = pathlib.Path(__file__).resolve().parents[2]
SETTINGS = settings(max_examples=40, deadline=None, derandomize=False,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

invalid_utf8 = st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf4\x90\x80\x80",
                                b"ok\xe2\x82", b"\xc0\xaf"])
huge = st.builds(lambda n, c: c * n, st.integers(0, 300_000), st.sampled_from(["a", "é", "\U0001F600"]))
leaves = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20), st.binary(max_size=20), invalid_utf8,
    st.just(""), huge,
)
keys = st.one_of(st.text(max_size=8), st.sampled_from(["msg", "uid", "log", "message", "user"]))


def nested(depth: int, leaf):
    value = leaf
    for i in range(depth):
        value = [value] if i % 2 else {"k": value}
    return value


values = st.recursive(leaves, lambda children: st.one_of(
    st.lists(children, max_size=4), st.dictionaries(keys, children, max_size=4)), max_leaves=25)
deep = st.builds(nested, st.integers(0, 700), leaves)
records = st.dictionaries(keys, st.one_of(values, deep), max_size=6)
control = st.sampled_from([{}, {}, {}, {"reject": 1}, {"boom": 1}])
tags = st.sampled_from(["app.auth", "app.x", "other", "kube.var.log", "syslog.sshd"])
batches = st.lists(st.tuples(tags, records, control), min_size=1, max_size=8)


def same(a, b) -> bool:
    """Equality where NaN equals NaN and map order does not matter."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def as_fluent_bit_sees_it(record):
    """The record after msgpack -> Lua -> msgpack, with Fluent Bit's own rules (the harness)."""
    lua = new_runtime()
    return from_lua(to_lua(lua, record), lua)


def depth_of(value) -> int:
    d = 0
    while isinstance(value, (list, dict)) and value:
        value = value[0] if isinstance(value, list) else next(iter(value.values()))
        d += 1
    return d


def run_batch(f: LuaFilter, batch) -> list[tuple[str, dict]]:
    sent = []
    for tag, record, ctl in batch:
        record = {**record, **ctl}
        sent.append((tag, record))
        # call_batch: a raise would hand the record back unmapped; it must never happen.
        assert f.harness.call_batch(tag, [(START + len(sent), record)]) == []
    f.seal()
    return sent


def check_spool(spool: pathlib.Path, sent, account: str) -> None:
    events = read_folder(spool, "ready", ".seg")
    rejected = read_folder(spool, "rejected", ".rej")
    assert len(events) + len(rejected) == len(sent)
    assert list((spool / "tmp").iterdir()) == []
    for entry in events:
        assert set(entry) == {"eventData", "tag", "time"}
        assert check_event(entry["eventData"], account) is None, entry["eventData"].get("UID")
    for entry in rejected:
        assert set(entry) == {"tag", "time", "reason", "record"}
        assert isinstance(entry["reason"], str) and entry["reason"]
    # every rejected record is one of the records sent, kept exactly (or opaque when too deep)
    by_time = {START + i + 1: rec for i, (_, rec) in enumerate(sent)}
    for entry in rejected:
        original = by_time[entry["time"]]
        if isinstance(entry["record"], bytes):
            assert "deeper than 500" in entry["reason"]
            assert max(depth_of(v) for v in original.values()) >= 499
        else:
            assert same(entry["record"], as_fluent_bit_sees_it(original))


@SETTINGS
@given(batch=batches, max_events=st.integers(1, 5))
def test_any_record_ends_in_ready_or_rejected_intact(batch, max_events):
    with tempfile.TemporaryDirectory() as tmp:
        spool = pathlib.Path(tmp) / "spool"
        standin_mappings = pathlib.Path(tmp) / "mappings.lua"
        standin_mappings.write_text(STANDIN_RULES)
        f = LuaFilter(spool, {"CLOUDTRAIL_SPOOL_DIR": str(spool),
                              "CLOUDTRAIL_MAPPINGS": str(standin_mappings),
                              "CLOUDTRAIL_SEGMENT_MAX_EVENTS": str(max_events)})
        sent = run_batch(f, batch)
        check_spool(spool, sent, ACCOUNT)
        # the stand-in maps every app.* record without reject/boom and with a UTF-8 msg
        events = read_folder(spool, "ready", ".seg")
        assert all(e["tag"].startswith("app.") for e in events)


SHIPPED = REPO / "mappings"


def compiled_shipped(tmp: pathlib.Path) -> pathlib.Path:
    compiled = compile_files([SHIPPED], defaults={"recipientAccountId": ACCOUNT})
    path = tmp / "compiled.lua"
    path.write_text(compiled.lua_text())
    return path


@SETTINGS
@given(batch=batches)
def test_shipped_mappings_never_raise_and_every_event_passes_the_schema(batch):
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        spool = tmp / "spool"
        f = LuaFilter(spool, {"CLOUDTRAIL_SPOOL_DIR": str(spool),
                              "CLOUDTRAIL_MAPPINGS": str(compiled_shipped(tmp))},
                      real_mapper=True)
        sent = run_batch(f, [(t, r, {}) for t, r, _ in batch])
        check_spool(spool, sent, ACCOUNT)


def test_segments_decode_with_python_msgpack_strictly(lua_filter, spool):
    f = lua_filter()
    for i in range(5):
        f.call("app.x", START, {"msg": f"é{i}", "n": 2**40 + i, "neg": -(2**40), "f": 0.1})
    f.seal()
    [seg] = list((spool / "ready").iterdir())
    data = seg.read_bytes()
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=True)
    unpacker.feed(data)
    assert len(list(unpacker)) == 5


def drop_counter_name(name: bytes) -> str:
    """How the filter shows a rule name in the status file's drop counts: as it is when it is
    valid UTF-8, else with every byte 0x80-0xFF as '?' (JSON must stay UTF-8)."""
    try:
        return name.decode("utf-8")
    except UnicodeDecodeError:
        return re.sub(rb"[\x80-\xff]", b"?", name).decode("ascii")


def lua_bytes(value: bytes) -> str:
    """A Lua string literal holding exactly `value`."""
    return '"' + "".join("\\%03d" % b for b in value) + '"'


def drop_rule_file(path: pathlib.Path, name: bytes, file: bytes | None = None,
                   why: bytes = b"not the final stage") -> None:
    """A mappings file as one written by hand may be (the compiler only writes names of
    [A-Za-z0-9_.-]): one drop: rule (on line 2) whose name, source file (the real one when
    None) and drop text are any bytes."""
    src = path.with_suffix(".yaml")
    src.write_text("rules:\n  - name: PLACEHOLDER\n    match: {tag: 'kube.*'}\n"
                   "    drop: PLACEHOLDER-WHY\n")
    text = compile_files([src]).lua_text()
    text = text.replace('"PLACEHOLDER"', lua_bytes(name), 1)
    text = text.replace('"PLACEHOLDER-WHY"', lua_bytes(why), 1)
    if file is not None:
        source = f'["file"] = "{src}"'
        assert source in text
        text = text.replace(source, '["file"] = ' + lua_bytes(file), 1)
    path.write_text(text)


@SETTINGS
@given(first=st.one_of(st.binary(max_size=12), invalid_utf8,
                       st.text(max_size=6).map(lambda t: t.encode())),
       second=st.one_of(st.binary(max_size=12), invalid_utf8))
@example(first=b"bad\xffname", second="caf\u00e9".encode())
@example(first="caf\u00e9\x01".encode() + b"\xff", second=b"tab\there")
def test_drop_counts_name_each_rule_by_its_cleaned_name_across_a_reload(first, second):
    """Rule names are cleaned when the rules are built (at start and at every reload), not
    per record: the status file must show the same names the per-record clean did."""
    with tempfile.TemporaryDirectory() as tmp:
        spool = pathlib.Path(tmp) / "spool"
        rules = pathlib.Path(tmp) / "rules.lua"
        drop_rule_file(rules, first)
        f = LuaFilter(spool, {"CLOUDTRAIL_SPOOL_DIR": str(spool),
                              "CLOUDTRAIL_MAPPINGS": str(rules)}, real_mapper=True)

        def dropped():
            return json.loads((spool / "mappings-status.json").read_text("utf-8"))["dropped"]

        assert f.call("kube.audit", START, {"stage": "RequestReceived"})[0] == -1
        f.now = START + 1
        f.tick()
        assert dropped() == {drop_counter_name(first): 1}
        drop_rule_file(rules, second)
        f.now = START + 2
        f.tick()  # the file changed: the rules are rebuilt
        for _ in range(2):
            assert f.call("kube.audit", START, {"stage": "RequestReceived"})[0] == -1
        f.now = START + 20
        f.tick()
        expected = collections.Counter({drop_counter_name(first): 1})
        expected[drop_counter_name(second)] += 2
        assert dropped() == dict(expected)
        assert not (spool / "rejected").exists() or list((spool / "rejected").iterdir()) == []


# What the Fluent Bit log gets: the entry's io.stderr:write calls, kept in the Lua state.
CAPTURE_LOG = b"""
CAPTURED_LOG = {}
io.stderr = { write = function(_, ...) CAPTURED_LOG[#CAPTURED_LOG + 1] = table.concat({...}) end }
"""

drop_rule_parts = st.one_of(st.binary(max_size=10), invalid_utf8,
                            st.text(max_size=6).map(lambda t: t.encode()))


@SETTINGS
@given(first=st.tuples(drop_rule_parts, drop_rule_parts, drop_rule_parts),
       second=st.tuples(drop_rule_parts, drop_rule_parts, drop_rule_parts))
@example(first=(b"bad\xffname", b"f.yaml", "caf\u00e9".encode()),
         second=(b"bad\xffname", b"f.yaml", b"other \x01text"))
@example(first=(b"ok", "\u00e9.yaml".encode(), b"\xc3\x28"),
         second=(b"ok", b"\xff", "d\u00e9j\u00e0".encode()))
def test_a_dropped_record_logs_the_reason_the_per_record_construction_gave(first, second):
    """The drop reason is built and cleaned once per rule set (at start and at every reload),
    not per record: the log must show, byte for byte, safe_text of the whole
    "dropped by rule 'NAME' (FILE:LINE): WHY" the mapper used to build for every record, and
    after a reload the new rule's text, even when only the drop text changed."""
    with tempfile.TemporaryDirectory() as tmp:
        spool = pathlib.Path(tmp) / "spool"
        rules = pathlib.Path(tmp) / "rules.lua"
        drop_rule_file(rules, *first)
        f = LuaFilter(spool, {"CLOUDTRAIL_SPOOL_DIR": str(spool),
                              "CLOUDTRAIL_MAPPINGS": str(rules)}, real_mapper=True)
        f.harness.lua.execute(CAPTURE_LOG)
        filter_mod = f.harness.require("cloudtrail.filter")
        mapper_mod = f.harness.require("cloudtrail.mapper")
        record = {"stage": "RequestReceived"}

        def per_record_reason(name: bytes, file: bytes, why: bytes) -> bytes:
            return b"dropped by rule '" + name + b"' (" + file + b":2): " + why

        def mapper_reason() -> bytes:
            m = mapper_mod[b"new"](filter_mod[b"load_mappings"](str(rules).encode()))
            return m[b"map"](m, b"kube.audit", START, to_lua(f.harness.lua, record))[1]

        expected = []
        for n, parts in enumerate((first, second)):
            if n:
                drop_rule_file(rules, *parts)
                f.now = START + 61  # past the log's once-a-minute limit for a repeated line
                f.tick()  # a changed file is reloaded: the rules are rebuilt
            raw = per_record_reason(*parts)
            assert mapper_reason() == raw  # what `mappings test` prints is unchanged
            expected.append(b"[cloudtrail.lua] " + filter_mod[b"safe_text"](raw) + b"\n")
            assert f.call("kube.audit", START, record)[0] == -1
        logged = f.harness.globals()[b"CAPTURED_LOG"]
        lines = [logged[i] for i in range(1, len(logged) + 1)]
        dropped = [line for line in lines if line.startswith(b"[cloudtrail.lua] dropped")]
        assert dropped == expected
        f.now = START + 200
        f.tick()  # past the status file's 10 s limit for a new drop count
        status = json.loads((spool / "mappings-status.json").read_text("utf-8"))
        assert status["state"] == "ok" and sum(status["dropped"].values()) == 2
