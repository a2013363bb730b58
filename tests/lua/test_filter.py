"""cb_cloudtrail through the filter_lua harness: mapping, rejection, sealing, recovery, failures."""

from __future__ import annotations

import gc
import os
import re
import stat
import subprocess

import pytest

from cloudtrail_sink.schema import check_event
from cloudtrail_sink.spool import READY_RE

from .conftest import ACCOUNT, MODULE_DIR, START, lua_str, read_folder, require_luajit

REJ_RE = re.compile(r"\A(\d{16})-([A-Za-z0-9_]{1,64})-(\d{10})\.rej\Z")


def names(spool, folder):
    return sorted(os.listdir(spool / folder))


def test_mapped_record_becomes_an_event_in_ready(lua_filter, spool):
    f = lua_filter()
    assert f.call("app.auth", START + 0.25, {"msg": "Login", "uid": "u-1"}) == \
        (-1, START + 0.25, None)
    assert names(spool, "ready") == []  # still open in tmp/
    f.seal()
    [seg] = names(spool, "ready")
    assert READY_RE.match(seg)
    [entry] = read_folder(spool, "ready", ".seg")
    assert entry["tag"] == "app.auth" and entry["time"] == START + 0.25
    assert isinstance(entry["time"], float)
    assert entry["eventData"]["UID"] == "u-1"
    assert entry["eventData"]["requestParameters"]["empty"] == {}  # empty table -> empty map
    assert check_event(entry["eventData"], ACCOUNT) is None
    assert names(spool, "tmp") == []


def test_unmapped_failing_and_non_utf8_records_go_to_rejected_with_reason(lua_filter, spool):
    f = lua_filter()
    records = [
        ("other.tag", {"x": 1}),
        ("app.a", {"reject": True, "nested": {"arr": [], "map": {}, "bytes": b"\xff\xfe"}}),
        ("app.a", {"boom": 1}),
        ("app.a", {"msg": b"\xc3\x28"}),  # invalid UTF-8 would reach eventData
    ]
    for tag, record in records:
        assert f.call(tag, START, record)[0] == -1
    f.seal()
    assert names(spool, "ready") == []
    rejected = read_folder(spool, "rejected", ".rej")
    assert [r["record"] for r in rejected] == [r for _, r in records]
    reasons = [r["reason"] for r in rejected]
    assert "no rule matched" in reasons[0]
    assert "asks to be rejected" in reasons[1]
    assert reasons[2].startswith("mapping failed:")
    assert "not valid UTF-8" in reasons[3]
    assert all(REJ_RE.match(n) for n in names(spool, "rejected"))


def test_one_bad_record_does_not_send_its_batch_through(lua_filter, spool):
    f = lua_filter()
    batch = [(START, {"msg": "A"}), (START, {"boom": 1}), (START, {"msg": "B"})]
    assert f.harness.call_batch("app.x", batch) == []  # nothing passes unmapped
    f.seal()
    assert len(read_folder(spool, "ready", ".seg")) == 2
    assert len(read_folder(spool, "rejected", ".rej")) == 1


@pytest.mark.parametrize("content, expect", [
    (None, "cannot load mappings"),
    ("return {", "cannot load mappings"),
    ("return os.execute('true')", "failed to evaluate"),       # empty environment: no os
    ("return { format = 2, rules = {} }", "format 2"),
    ("return { format = 1, rules = 5 }", "rejected by the mapping engine"),
])
def test_missing_or_broken_mappings_reject_everything_without_raising(
        lua_filter, spool, tmp_path, content, expect):
    path = tmp_path / "broken.lua"
    if content is not None:
        path.write_text(content)
    f = lua_filter(CLOUDTRAIL_MAPPINGS=str(path))
    assert f.call("app.x", START, {"msg": "A"})[0] == -1
    f.seal()
    [entry] = read_folder(spool, "rejected", ".rej")
    assert expect in entry["reason"] and entry["record"] == {"msg": "A"}


def test_seals_at_the_event_count(lua_filter, spool):
    f = lua_filter(CLOUDTRAIL_SEGMENT_MAX_EVENTS="3")
    for i in range(7):
        f.call("app.x", START, {"msg": f"m{i}"})
    assert len(names(spool, "ready")) == 2
    f.seal()
    segs = names(spool, "ready")
    assert len(segs) == 3
    events = read_folder(spool, "ready", ".seg")
    assert [e["eventData"]["eventName"] for e in events] == [f"m{i}" for i in range(7)]


def test_seals_at_the_byte_size(lua_filter, spool):
    f = lua_filter(CLOUDTRAIL_SEGMENT_MAX_BYTES="600")
    for i in range(6):
        f.call("app.x", START, {"msg": "x" * 200})
    sizes = [os.path.getsize(spool / "ready" / n) for n in names(spool, "ready")]
    assert sizes and all(s >= 600 for s in sizes)
    assert all(s < 600 + 450 for s in sizes)  # sealed right after crossing the limit


def test_events_are_published_within_the_age_after_traffic_stops(lua_filter, spool):
    f = lua_filter(CLOUDTRAIL_SEGMENT_MAX_AGE_MS="1000")
    f.call("app.x", START, {"msg": "last"})
    f.now = START + 0.5
    f.tick()
    assert names(spool, "ready") == []
    f.now = START + 1.0
    f.tick()  # the once-a-second tick seals it: no further record is needed
    [seg] = names(spool, "ready")
    assert int(seg[:16]) == int((START + 1.0) * 1e6)
    assert names(spool, "tmp") == []


def test_an_old_segment_is_sealed_before_the_next_record_is_appended(lua_filter, spool):
    f = lua_filter()
    f.call("app.x", START, {"msg": "a"})
    f.now = START + 2
    f.call("app.x", START + 2, {"msg": "b"})
    assert len(names(spool, "ready")) == 1
    f.seal()
    first, second = names(spool, "ready")
    assert first < second  # names sort in sealing order
    assert [e["eventData"]["eventName"] for e in read_folder(spool, "ready", ".seg")] == ["a", "b"]


def test_sealed_names_increase_even_if_the_clock_steps_back(lua_filter, spool):
    f = lua_filter(CLOUDTRAIL_SEGMENT_MAX_EVENTS="1")
    f.call("app.x", START, {"msg": "a"})
    f.now = START - 100
    f.call("app.x", START, {"msg": "b"})
    a, b = names(spool, "ready")
    assert a < b


def test_tick_records_are_dropped_and_never_spooled(lua_filter, spool):
    f = lua_filter()
    assert f.tick() == (-1, START, None)
    f.seal()
    assert names(spool, "ready") == [] and names(spool, "rejected") == []


def test_restart_publishes_what_a_crash_left_in_tmp(lua_filter, spool):
    crashed = lua_filter()  # stays referenced: its Lua state never closes, like a SIGKILL
    crashed.call("app.x", START, {"msg": "a"})
    crashed.call("app.x", START, {"msg": "b"})
    crashed.call("nomatch", START, {"msg": "c"})
    assert sorted(n.rsplit(".", 1)[1] for n in names(spool, "tmp")) == ["open", "rejecting"]
    lua_filter(now=START + 10)  # the next start
    assert names(spool, "tmp") == []
    assert [e["eventData"]["eventName"] for e in read_folder(spool, "ready", ".seg")] == ["a", "b"]
    assert [r["record"] for r in read_folder(spool, "rejected", ".rej")] == [{"msg": "c"}]


def test_clean_shutdown_seals_open_files(lua_filter, spool, standin_mappings):
    from .conftest import LuaFilter
    f = LuaFilter(spool, {"CLOUDTRAIL_SPOOL_DIR": str(spool),
                          "CLOUDTRAIL_MAPPINGS": str(standin_mappings)})
    f.call("app.x", START, {"msg": "a"})
    del f
    gc.collect()  # drops the Lua state: lua_close runs finalizers, as on Fluent Bit shutdown
    assert names(spool, "tmp") == [] and len(names(spool, "ready")) == 1


def test_sigkill_loses_nothing_that_reached_the_filter(spool, standin_mappings, lua_filter):
    luajit = require_luajit()
    driver = f"""
package.path = {lua_str(MODULE_DIR)} .. '/?.lua;' .. package.path
package.loaded['cloudtrail.mapper'] = dofile({lua_str(os.path.join(os.path.dirname(__file__), 'standin_mapper.lua'))})
local filter = require('cloudtrail.filter')
local f = filter.new({{ spool_dir = {lua_str(spool)}, mappings = {lua_str(standin_mappings)},
  max_events = 1000, max_bytes = 1048576, max_age_ms = 3600000, tick_tag = 'cloudtrail.tick' }})
for i = 1, 250 do
  assert(f:process('app.x', {START}, {{ msg = 'm' .. i }}) == -1)
end
io.stdout:write('written\\n'); io.stdout:flush()
while true do end
"""
    proc = subprocess.Popen([luajit, "-e", driver], stdout=subprocess.PIPE)
    try:
        assert proc.stdout.readline() == b"written\n"
        proc.kill()
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    assert names(spool, "ready") == [] and len(names(spool, "tmp")) == 1
    lua_filter()  # restart
    events = read_folder(spool, "ready", ".seg")
    assert [e["eventData"]["eventName"] for e in events] == [f"m{i}" for i in range(1, 251)]


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores folder permissions")
def test_unwritable_spool_keeps_the_record_in_the_pipeline(lua_filter, spool):
    f = lua_filter()
    os.chmod(spool / "tmp", stat.S_IRUSR | stat.S_IXUSR)
    try:
        assert f.call("app.x", START, {"msg": "a"}) == (0, START, {"msg": "a"})
    finally:
        os.chmod(spool / "tmp", 0o750)
    assert f.call("app.x", START, {"msg": "b"})[0] == -1


def test_spool_that_cannot_exist_keeps_records_and_never_raises(lua_filter, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    f = lua_filter(CLOUDTRAIL_SPOOL_DIR=str(blocker / "spool"))
    assert f.call("app.x", START, {"msg": "a"}) == (0, START, {"msg": "a"})
    assert f.call("nomatch", START, {"msg": "b"}) == (0, START, {"msg": "b"})
    assert f.tick()[0] == -1


def test_missing_folders_are_created(lua_filter, spool):
    f = lua_filter()
    for folder in ("tmp", "ready", "failed", "rejected", "quarantine"):
        assert (spool / folder).is_dir()
    os.rmdir(spool / "tmp")
    assert f.call("app.x", START, {"msg": "a"})[0] == -1
    f.seal()
    assert len(names(spool, "ready")) == 1


def test_bad_threshold_values_fall_back_to_defaults(lua_filter, spool):
    f = lua_filter(CLOUDTRAIL_SEGMENT_MAX_EVENTS="lots", CLOUDTRAIL_SEGMENT_MAX_AGE_MS="-5")
    for i in range(3):
        f.call("app.x", START, {"msg": str(i)})
    assert names(spool, "ready") == []  # default 500 events, default age 1 s
    f.now = START + 1
    f.tick()
    assert len(names(spool, "ready")) == 1


def test_deep_records_are_kept_in_rejected(lua_filter, spool):
    f = lua_filter()
    deep = {"v": 1}
    for _ in range(120):
        deep = {"d": deep}
    very_deep = {"v": 1}
    for _ in range(700):
        very_deep = [very_deep]
    assert f.call("nomatch", START, deep)[0] == -1
    assert f.call("nomatch", START, {"x": very_deep})[0] == -1
    f.seal()
    first, second = read_folder(spool, "rejected", ".rej")
    assert first["record"] == deep
    assert isinstance(second["record"], bytes) and "deeper than 500" in second["reason"]


def test_if_the_modules_cannot_load_records_pass_unchanged_and_a_tick_retries(spool, tmp_path):
    from cloudtrail_sink.luaharness import ENTRY_SCRIPT, FilterHarness
    from .conftest import STANDIN_MAPPER
    rules = tmp_path / "rules.lua"
    rules.write_text('return { format = 1, rules = { { tag_prefix = "app." } } }')
    prelude = (f"package.path = {lua_str(MODULE_DIR)} .. '/?.lua;' .. package.path\n"
               f"package.loaded['cloudtrail.mapper'] = dofile({lua_str(STANDIN_MAPPER)})\n"
               "BROKEN = true\n"
               "package.preload['cloudtrail.filter'] = function(name)\n"
               "  if BROKEN then error('simulated broken install') end\n"
               f"  return assert(loadfile({lua_str(MODULE_DIR / 'cloudtrail' / 'filter.lua')}))(name)\n"
               "end\n")
    h = FilterHarness(ENTRY_SCRIPT, env={"CLOUDTRAIL_SPOOL_DIR": str(spool),
                                         "CLOUDTRAIL_MAPPINGS": str(rules)}, prelude=prelude)
    assert h.call("app.x", START, {"msg": "a"}) == (0, START, {"msg": "a"})  # kept, not lost
    assert h.call("cloudtrail.tick", START, {"tick": 1})[0] == -1  # still broken: retried
    h.globals()[b"BROKEN"] = False
    assert h.call("cloudtrail.tick", START, {"tick": 1})[0] == -1  # now it starts
    assert h.call("app.x", START, {"msg": "b"})[0] == -1
    [entry] = read_folder(spool, "tmp", ".open")  # in the open segment (real clock here)
    assert entry["eventData"]["eventName"] == "b"


def test_the_filter_defines_only_its_entry_globals(lua_filter, spool):
    f = lua_filter()
    before = {k for k in f.harness.globals().keys()}
    f.call("app.x", START, {"msg": "a"})
    f.call("nomatch", START, {"msg": "b"})
    f.seal()
    after = {k for k in f.harness.globals().keys()}
    assert after - before == set()
    fresh = LuaFilterGlobals()
    assert {b"cb_cloudtrail", b"CLOUDTRAIL_SHUTDOWN_HOOK"} <= before
    assert before - fresh.names - {b"FAKE_NOW"} == {b"cb_cloudtrail", b"CLOUDTRAIL_SHUTDOWN_HOOK"}


class LuaFilterGlobals:
    """The globals of a fresh state as the harness makes it (what Fluent Bit's state has)."""

    def __init__(self) -> None:
        from cloudtrail_sink.luaharness import new_runtime
        self.names = set(new_runtime().globals().keys())


def test_a_clock_stepped_back_does_not_hold_a_segment(lua_filter, spool):
    f = lua_filter()
    f.call("app.x", START, {"msg": "a"})
    f.now = START - 3600  # NTP stepped the clock back an hour
    f.tick()
    assert len(names(spool, "ready")) == 1


def test_spool_writer_without_flock_in_libc_still_spools(tmp_path):
    """A libc whose flock/open/close cannot be resolved through the ffi costs only the tmp/ lock:
    appends and sealing keep working, so no record is pushed past the spool."""
    import lupa.luajit21 as lupa_jit
    import msgpack as mp

    from cloudtrail_sink.luaharness import MODULE_DIR

    lua = lupa_jit.LuaRuntime()
    lua.execute(f"package.path = [==[{MODULE_DIR}]==] .. '/?.lua;' .. package.path")
    # The real ffi, except that flock is missing from ffi.C, as on a libc without it.
    lua.execute("""
      local real = require('ffi')
      local C = setmetatable({}, {__index = function(_, name)
        if name == 'flock' then error('missing declaration for symbol flock') end
        return real.C[name]
      end})
      package.loaded.ffi = setmetatable({C = C}, {__index = real})
    """)
    new_writer = lua.eval("function(root) return require('cloudtrail.spool').new{"
                          "root = root, max_age = 3600, writer = 'fb_1_abcdef'} end")
    append = lua.eval("function(w, data) return w:append_event(data) end")
    seal_all = lua.eval("function(w) return w:seal_all() end")
    w = new_writer(str(tmp_path))
    record = mp.packb({"eventData": {"UID": "u-1"}, "tag": "t", "time": 1.0})
    assert append(w, record)
    seal_all(w)
    [name] = os.listdir(tmp_path / "ready")
    assert list(mp.Unpacker(open(tmp_path / "ready" / name, "rb"), raw=False)) == [
        {"eventData": {"UID": "u-1"}, "tag": "t", "time": 1.0}]
    assert os.listdir(tmp_path / "tmp") == []


def stage_rules(tmp_path, extra_rules: str = "", event_extra: str = "") -> str:
    """Compiled rules: a drop: rule for the RequestReceived stage of kube.* records, then
    ``extra_rules``, then a rule mapping the rest; returns the compiled file's path."""
    from cloudtrail_sink.mappings import compile_files
    src = tmp_path / "stages.yaml"
    src.write_text(
        "rules:\n"
        "  - name: not-final\n"
        "    match: {tag: 'kube.*', fields: {$stage: {one_of: [RequestReceived]}}}\n"
        "    drop: not the final stage\n"
        + extra_rules +
        "  - name: audit\n"
        "    match: {tag: 'kube.*'}\n"
        "    oversize: truncate\n"
        "    event:\n"
        "      userIdentity: {type: T, principalId: $user}\n"
        "      eventSource: k8s.io\n"
        "      eventName: $verb\n"
        + event_extra)
    rules = tmp_path / "stages.lua"
    rules.write_text(compile_files([src]).lua_text())
    return str(rules)


def test_records_a_drop_rule_takes_are_counted_in_the_log_not_rejected(lua_filter, spool,
                                                                       tmp_path, capfd):
    rules = stage_rules(tmp_path, event_extra="      recipientAccountId: '123456789012'\n")
    f = lua_filter(real_mapper=True, CLOUDTRAIL_MAPPINGS=rules)
    for _ in range(3):
        assert f.call("kube.audit", START, {"stage": "RequestReceived", "user": "u",
                                            "verb": "get"}) == (-1, START, None)
    assert f.call("kube.audit", START, {"stage": "ResponseComplete", "user": "u",
                                        "verb": "get"})[0] == -1
    first = capfd.readouterr().err
    assert first.count("dropped by rule 'not-final'") == 1 and "not the final stage" in first
    f.now = START + 61  # the same line again after a minute carries the count of repeats
    f.call("kube.audit", START, {"stage": "RequestReceived", "user": "u", "verb": "get"})
    assert "(2 more times)" in capfd.readouterr().err  # records 2 and 3 were counted
    f.seal()
    [entry] = read_folder(spool, "ready", ".seg")
    assert entry["eventData"]["eventName"] == "get"
    assert names(spool, "rejected") == []


def test_records_a_drop_rule_takes_are_counted_per_rule_in_the_status_file(lua_filter, spool,
                                                                           tmp_path):
    """The log line is rate-limited and its repeat count only appears with the next line; the
    status file is where a user sees how many records each drop: rule took."""
    import json
    rules = stage_rules(tmp_path, extra_rules=(
        "  - name: noise\n"
        "    match: {tag: 'noise.*'}\n"
        "    drop: health checks\n"))
    f = lua_filter(real_mapper=True, CLOUDTRAIL_MAPPINGS=rules)

    def status():
        return json.loads((spool / "mappings-status.json").read_text())

    assert status()["dropped"] == {} and status()["started_at"] == START
    for _ in range(3):
        f.call("kube.audit", START, {"stage": "RequestReceived", "user": "u", "verb": "get"})
    f.call("noise.lb", START, {"path": "/healthz"})
    f.call("kube.audit", START, {"stage": "ResponseComplete", "user": "u", "verb": "get"})
    f.now = START + 1
    f.tick()
    assert status()["dropped"] == {"not-final": 3, "noise": 1}
    f.call("noise.lb", START, {"path": "/healthz"})
    f.now = START + 5
    f.tick()  # within 10 s of the last write: not rewritten for a count alone
    assert status()["dropped"] == {"not-final": 3, "noise": 1}
    f.now = START + 11
    f.tick()
    assert status()["dropped"] == {"not-final": 3, "noise": 2}
    assert status()["state"] == "ok" and status()["rules"] == 3
    assert [p.name for p in spool.iterdir() if p.name.startswith("mappings-status")] == [
        "mappings-status.json"]  # no temporary file left behind
