"""The Lua mapping engine (fluent-bit/lua/cloudtrail/mapper.lua and helpers), run in LuaJIT
through the filter_lua harness: what each construct of the mapping language produces, and the
guarantees every returned eventData keeps (UTF-8, sizes, eventTime, UID)."""

from __future__ import annotations

import json
import math

import pytest

from cloudtrail_sink import luaharness, schema
from cloudtrail_sink.mappings.runner import filled, module_dir
from tests.mappings.murmur_ref import murmur3_x86_128

BASE = """\
rules:
  - name: r
    match:
      tag: "app.*"
{match}
{steps}
    oversize: {oversize}
    event:
      userIdentity:
        type: T
        principalId: {principal}
      eventSource: src
      eventName: {name}
{extra}
"""


def rules(name="n", principal="p", extra="", match="", steps="", oversize="truncate"):
    return BASE.format(name=name, principal=principal, extra=extra, match=match, steps=steps,
                       oversize=oversize)


def ok(event):
    """Every eventData the mapper returns must pass the service's schema check."""
    problem = schema.check_event(filled(event), "123456789012")
    assert problem is None, problem
    return event


T0 = 1764237600.0  # 2025-11-27T10:00:00Z


@pytest.mark.parametrize("value, fmt, expected", [
    (1579901965, "epoch_s", "2020-01-24T21:39:25Z"),
    (1579901965.999, "auto", "2020-01-24T21:39:25Z"),
    (1579901965123, "epoch_ms", "2020-01-24T21:39:25Z"),
    (1579901965123, "auto", "2020-01-24T21:39:25Z"),
    ("1579901965123456789", "epoch_ns", "2020-01-24T21:39:25Z"),
    (1579901965123456, "auto", "2020-01-24T21:39:25Z"),
    ("2024-10-10T11:16:48Z", "rfc3339", "2024-10-10T11:16:48Z"),
    ("2024-10-10T11:16:48.123456+02:00", "rfc3339", "2024-10-10T09:16:48Z"),
    ("2024-10-10T01:16:48-05:30", "auto", "2024-10-10T06:46:48Z"),
    ("2024-02-29 23:59:59.9", "auto", "2024-02-29T23:59:59Z"),
    ("Nov 27 09:59:58", "syslog", "2025-11-27T09:59:58Z"),
    ("Nov  2 09:59:58", "syslog", "2025-11-02T09:59:58Z"),
    ("Dec 31 23:59:59", "syslog", "2024-12-31T23:59:59Z"),      # year closest to the record time
    ("2020-01-24T21:39:29.000Z", "syslog", "2020-01-24T21:39:29Z"),  # RFC 5424 times too
])
def test_time_conversions(mapper_for, value, fmt, expected):
    ts = T0 if fmt != "syslog" or not value.startswith("Dec") else 1735689700.0  # 2025-01-01
    m = mapper_for(rules(extra=f"      eventTime: {{time: $t, format: {fmt}}}"))
    assert ok(m.map("app.x", ts, {"t": value}).event)["eventTime"] == expected


@pytest.mark.parametrize("bad", ["2024-02-30T00:00:00Z", "2024-10-10T25:00:00Z", "yesterday",
                                 "Foo 12 10:00:00", "2024-10-10T10:00:00+2"])
def test_bad_times_fall_back_or_reject(mapper_for, bad):
    m = mapper_for(rules(extra="      eventTime: {time: [$t, $u], format: auto}"))
    assert m.map("app.x", T0, {"t": bad, "u": 0}).event["eventTime"] == "1970-01-01T00:00:00Z"
    res = m.map("app.x", T0, {"t": bad})
    assert res.event is None and "eventTime has no value" in res.reason


def test_eventtime_defaults_to_the_fluent_bit_timestamp(mapper_for):
    m = mapper_for(rules())
    assert m.map("app.x", T0 + 0.75, {}).event["eventTime"] == "2025-11-27T10:00:00Z"


def test_record_accessor_fallbacks_defaults_templates_and_objects(mapper_for):
    m = mapper_for(rules(
        principal="{first: [\"$user['name']\", \"$user['id']\"], default: nobody}",
        name="{template: \"{$verb}:{$obj['items'][1]} {{literal}} {@tag}\"}",
        extra="""\
      requestParameters:
        object:
          verb: $verb
          nested: {object: {first: "$obj['items'][0]", missing: $nope}}
          tag: "@tag"
          lit: {literal: {"$not": "an accessor"}}
      additionalEventData: $obj"""))
    ev = ok(m.map("app.x", T0, {"user": {"id": 42}, "verb": "get",
                                "obj": {"items": ["a", "b"]}}).event)
    assert ev["userIdentity"]["principalId"] == "42"            # numbers become text
    assert ev["eventName"] == "get:b {literal} app.x"          # [1] is the second item
    assert ev["requestParameters"] == {"verb": "get", "nested": {"first": "a"}, "tag": "app.x",
                                       "lit": {"$not": "an accessor"}}
    assert ev["additionalEventData"] == {"items": ["a", "b"]}
    ev = m.map("app.x", T0, {"verb": "get"}).event               # template part absent
    assert ev is None or ev["userIdentity"]["principalId"] == "nobody"
    res = m.map("app.x", T0, {"verb": "get"})
    assert res.event is None and "eventName has no value" in res.reason


def test_non_object_values_are_wrapped_and_tables_become_json_text(mapper_for):
    m = mapper_for(rules(principal="$who", extra="      additionalEventData: $list"))
    ev = ok(m.map("app.x", T0, {"who": {"b": [1, True]}, "list": [1, 2]}).event)
    assert ev["userIdentity"]["principalId"] == '{"b":[1,true]}'
    assert ev["additionalEventData"] == {"value": [1, 2]}


def test_conditions_first_rule_wins_and_decode_steps(mapper_for):
    text = """\
rules:
  - name: json-payload
    match:
      tag: ["app.*", "other"]
      fields:
        $kind: {one_of: [a, 5]}
        $p['n']: {exists: true}
        $msg: {pattern: "^%s*{"}
    decode:
      - {name: p, from: $msg, format: json}
    oversize: reject
    event:
      userIdentity: {type: T, principalId: "$p['n']"}
      eventSource: s
      eventName: json
  - name: kv-payload
    match:
      tag: "app.*"
      fields:
        $kind: {equals: a}
        $gone: {exists: false}
    decode:
      - {name: p, from: $msg, format: kv, on_failure: reject}
    oversize: reject
    event:
      userIdentity: {type: T, principalId: "$p['n']"}
      eventSource: s
      eventName: kv
"""
    m = mapper_for(text)
    assert m.map("app.x", T0, {"kind": "a", "msg": '{"n": "j"}'}).rule == "json-payload"
    assert m.map("other", T0, {"kind": 5, "msg": '{"n": "j"}'}).rule == "json-payload"
    assert m.map("app.x", T0, {"kind": "5", "msg": '{"n": "j"}'}).rule == "json-payload"
    res = m.map("app.x", T0, {"kind": "a", "msg": "n=k,x=1"})
    assert (res.rule, res.event["eventName"], res.event["userIdentity"]["principalId"]) == \
        ("kv-payload", "kv", "k")
    res = m.map("app.x", T0, {"kind": "a", "msg": "not a list"})
    assert res.event is None and "decode 'p'" in res.reason and res.rule == "kv-payload"
    res = m.map("app.x", T0, {"kind": "a", "msg": "n=k", "gone": 1})
    assert res.event is None and res.reason == "no mapping rule matched tag 'app.x'"
    assert m.map("nope", T0, {"kind": "a", "msg": "n=k"}).rule is None


@pytest.mark.parametrize("text, expected", [
    ("a=1,b=x y,c=,d=1,5", {"a": "1", "b": "x y", "c": "", "d": "1,5"}),
    ("k=v,message=x, y=z,w=1", {"k": "v", "message": "x, y=z,w=1"}),
    (" a.b-c_d=v=w ", {"a.b-c_d": "v=w"}),
    ("a=1,a=2", {"a": "2"}),
])
def test_key_value_rules(mapper_for, text, expected):
    m = mapper_for(rules(steps="    decode:\n      - {name: p, from: $m, format: kv, "
                               "rest_keys: [message]}", extra="      additionalEventData: $p"))
    assert ok(m.map("app.x", T0, {"m": text}).event)["additionalEventData"] == expected


def test_captures_pull_fields_from_free_text(mapper_for):
    m = mapper_for(rules(
        principal="$s['user']",
        steps="    capture:\n      - name: s\n        from: $message\n"
              "        pattern: \"^Accepted (%S+) for (.-) from (%S+) port (%d+)\"\n"
              "        fields: [method, user, ip, port]",
        extra="      sourceIPAddress: $s['ip']\n      additionalEventData: $s"))
    ev = ok(m.map("app.x", T0, {"message": "Accepted password for bob smith from 2001:db8::7 "
                                           "port 22 ssh2"}).event)
    assert ev["userIdentity"]["principalId"] == "bob smith"
    assert ev["sourceIPAddress"] == "2001:db8::7"
    assert ev["additionalEventData"] == {"method": "password", "user": "bob smith",
                                         "ip": "2001:db8::7", "port": "22"}


@pytest.mark.parametrize("ip, valid", [
    ("203.0.113.5", True), ("::1", True), ("2001:db8::1:2", True), ("::ffff:192.0.2.1", True),
    ("1:2:3:4:5:6:7:8", True), ("256.1.1.1", False), ("01.2.3.4", False), ("1:2:3:4:5:6:7:8:9", False),
    ("1::2::3", False), ("fe80::1%eth0", False), ("example.com", False), ("1.2.3", False),
])
def test_source_ip_is_kept_only_when_valid_and_never_lost(mapper_for, ip, valid):
    m = mapper_for(rules(extra="      sourceIPAddress: $ip"))
    ev = ok(m.map("app.x", T0, {"ip": ip}).event)
    if valid:
        assert ev["sourceIPAddress"] == ip
    else:
        assert "sourceIPAddress" not in ev
        assert ev["additionalEventData"] == {"invalidSourceIPAddress": ip}


def test_invalid_utf8_is_replaced_visibly_everywhere(mapper_for):
    m = mapper_for(rules(name="$n", extra="      additionalEventData: $"))
    rec = {"n": b"caf\xc3\xa9 \xff\xfe end", b"k\xc0": b"\xed\xa0\x80x", "ok": "\u00e9\U0001F600"}
    ev = ok(m.map("app.x", T0, rec).event)
    assert ev["eventName"] == "café \ufffd\ufffd end"
    assert ev["additionalEventData"]["k\ufffd"] == "\ufffd\ufffd\ufffdx"   # surrogate: 3 bytes bad
    assert ev["additionalEventData"]["ok"] == "\u00e9\U0001F600"


def test_non_finite_numbers_become_text(mapper_for):
    m = mapper_for(rules(extra="      additionalEventData: $"))
    ev = ok(m.map("app.x", T0, {"a": math.nan, "b": math.inf, "c": [-math.inf, 1.5]}).event)
    assert ev["additionalEventData"] == {"a": "NaN", "b": "Infinity", "c": ["-Infinity", 1.5]}


def test_oversize_truncate_is_visible_and_fits(mapper_for):
    m = mapper_for(rules(name="$n", extra="      errorMessage: $e\n      additionalEventData: $"))
    rec = {"n": "é" * 600, "e": "x" * 300, "big": "\"\n" * 20000}
    ev = ok(m.map("app.x", T0, rec).event)
    assert ev["eventName"].endswith("...[truncated]")
    assert len(ev["eventName"].encode()) <= 1024 and ev["eventName"].startswith("é" * 400)
    assert ev["errorMessage"] == "x" * (256 - 14) + "...[truncated]"
    aed = ev["additionalEventData"]
    assert aed["truncated"] is True and aed["originalBytes"] > 28000
    assert aed["truncatedFields"] == ["eventName", "errorMessage", "additionalEventData"]
    assert len(schema.dumps(aed).encode()) <= 28000
    full = json.dumps(rec, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    assert full.startswith(aed["preview"]) and len(schema.dumps(aed).encode()) > 27900


def test_oversize_flags_only_strings_when_objects_fit(mapper_for):
    m = mapper_for(rules(name="$n", extra="      requestParameters: $rp"))
    ev = ok(m.map("app.x", T0, {"n": "a" * 2000, "rp": {"k": "v" * 150000}}).event)
    assert ev["additionalEventData"] == {"truncatedFields": ["eventName", "requestParameters"]}
    assert ev["requestParameters"]["truncated"] is True
    assert len(schema.dumps(ev["requestParameters"]).encode()) <= 100000


def test_oversize_reject_gives_the_reason(mapper_for):
    m = mapper_for(rules(name="$n", oversize="reject", extra="      additionalEventData: $"))
    res = m.map("app.x", T0, {"n": "a" * 1025})
    assert res.event is None and "eventName is 1025 bytes; the limit is 1024" in res.reason
    res = m.map("app.x", T0, {"n": "a", "x": "y" * 28000})
    assert res.event is None and "additionalEventData is 28016 bytes; the limit is 28000" in res.reason


def test_size_measure_matches_the_sink(mapper_for):
    """The mapper measures objects as schema.dumps does: exactly at the limit passes."""
    m = mapper_for(rules(oversize="reject", extra="      additionalEventData: $"))
    for filler in ("\u00e9", "\x01", "\\", "a"):
        rec = {"k": ""}
        unit = len(schema.dumps(filler).encode()) - 2
        rec["k"] = filler * ((28000 - len(schema.dumps(rec).encode())) // unit)
        pad = 28000 - len(schema.dumps(rec).encode())
        rec["k"] += "a" * pad
        assert len(schema.dumps(rec).encode()) == 28000
        assert ok(m.map("app.x", T0, rec).event)["additionalEventData"] == rec
        rec["k"] += "a"
        assert m.map("app.x", T0, rec).event is None


def test_generated_uid_is_stable_and_distinct(mapper_for):
    m = mapper_for(rules())
    rec = {"a": 1, "b": {"c": [1, "x"]}, "d": "e"}
    first = m.map("app.x", T0, rec).event["UID"]
    reordered = {"d": "e", "b": {"c": [1, "x"]}, "a": 1}
    assert mapper_for(rules()).map("app.x", T0, reordered).event["UID"] == first
    others = {m.map("app.x", T0, dict(rec, a=2)).event["UID"],
              m.map("app.y", T0, rec).event["UID"],
              m.map("app.x", T0 + 1, rec).event["UID"],
              m.map("app.x", T0, dict(rec, b={"c": [1, "y"]})).event["UID"]}
    assert first not in others and len(others) == 4


def test_uid_from_the_record_and_fallback(mapper_for):
    m = mapper_for(rules(extra="      UID: $id"))
    assert m.map("app.x", T0, {"id": "evt-1"}).event["UID"] == "evt-1"
    assert len(m.map("app.x", T0, {}).event["UID"]) == 32
    long = m.map("app.x", T0, {"id": "x" * 2000}).event
    assert len(long["UID"]) == 32 and long["additionalEventData"] == {"truncatedFields": ["UID"]}


def test_hash_is_murmur3_x86_128():
    lua = luaharness.new_runtime()
    hex128 = lua.execute(f"package.path = '{module_dir()}/?.lua;' .. package.path; "
                         "return require('cloudtrail.hash').hex128".encode())
    for data in (b"", b"a", b"hello", b"The quick brown fox jumps over the lazy dog",
                 bytes(range(256)) * 3, b"\xff" * 31):
        assert hex128(data).decode() == murmur3_x86_128(data)


@pytest.mark.parametrize("record", [
    {}, {"n": None}, {"n": [[[[]]]]}, {"n": True}, {"n": {"t": -0.0}}, {1: "int key"},
    {"n": b"\x00\x01"}, {"n": "x" * 300000},
])
def test_map_never_raises_and_always_returns_valid_events(mapper_for, record):
    m = mapper_for(rules(name="{first: [$n, fallback]}", principal="$n",
                         extra="      additionalEventData: $\n      UID: $n\n"
                               "      eventTime: {time: $n}"))
    res = m.map("app.x", T0, record)
    if res.event is not None:
        ok(res.event)
    else:
        assert res.reason


def test_the_test_command_prints_the_event_or_the_reason(tmp_path, capsys):
    from cloudtrail_sink.cli import main
    from tests.mappings.test_shipped_mappings import SHIPPED
    rec = tmp_path / "r.json"
    rec.write_text(json.dumps({"ident": "sshd", "host": "h", "time": "Nov 27 09:00:00",
                               "message": "Failed password for root from 192.0.2.1 port 1 ssh2"}))
    assert main(["mappings", "test", "--tag", "syslog", "--time", str(T0), "-m", str(SHIPPED),
                 str(rec)]) == 0
    captured = capsys.readouterr()
    ev = json.loads(captured.out)
    assert ev["eventName"] == "FailedLogin" and ev["sourceIPAddress"] == "192.0.2.1"
    assert "rule sshd-failed" in captured.err
    only = tmp_path / "only.yaml"
    only.write_text(rules())
    assert main(["mappings", "test", "--tag", "other", "-m", str(only), str(rec)]) == 1
    assert "rejected: no mapping rule matched tag 'other'" in capsys.readouterr().out


def test_recipient_account_and_timestamp_forms(mapper_for):
    m = mapper_for(rules(extra="      recipientAccountId: $acct"))
    assert ok(m.map("app.x", T0, {"acct": "123456789012"}).event)["recipientAccountId"] == \
        "123456789012"
    res = m.map("app.x", T0, {"acct": "12345"})
    assert res.event is None and "recipientAccountId must be a 12-digit account id" in res.reason
    # year 0 is not a time the sink accepts: such a value does not convert
    m = mapper_for(rules(extra="      eventTime: {time: [$t, \"@time\"]}"))
    assert m.map("app.x", T0, {"t": "0000-06-01T00:00:00Z"}).event["eventTime"] == \
        "2025-11-27T10:00:00Z"
    assert m.map("app.x", T0, {"t": "0001-01-01T00:00:00Z"}).event["eventTime"] == \
        "0001-01-01T00:00:00Z"


def test_the_record_is_never_changed(mapper_for):
    """Clean parts of the record are shared with the event, not copied: marking truncation or
    a bad address must then change a copy, never the record the filter may still write."""
    m = mapper_for(rules(name="$n", extra="      sourceIPAddress: $ip\n      additionalEventData: $"))
    record = {"n": "x" * 1100, "ip": "not-an-ip", "nested": {"a": [1, 2]}}
    lrec = luaharness.to_lua(m.lua, record)
    ev = luaharness.from_lua(m._map(b"app.x", T0, lrec)[0], m.lua)
    assert ev["additionalEventData"]["invalidSourceIPAddress"] == "not-an-ip"
    assert ev["additionalEventData"]["truncatedFields"] == ["eventName"]
    assert luaharness.from_lua(lrec, m.lua) == record


DETAILS = """\
rules:
  - name: r
    match:
      tag: "app.*"
    oversize: {oversize}
    event:
      userIdentity:
        type: T
        principalId: p
        details: $d
      eventSource: src
      eventName: $n
      errorMessage: $e
      requestParameters: $rp
      responseElements: $re
      additionalEventData: $aed
"""


def on_the_wire(event):
    """What the sink makes of the event before it sends it: Prepared, or Rejected with why."""
    from cloudtrail_sink import events
    from cloudtrail_sink.config import DEFAULT_MAX_REQUEST_BYTES
    return events.build({"eventData": event, "tag": "app.x", "time": T0}, "123456789012",
                        DEFAULT_MAX_REQUEST_BYTES)


def test_oversize_truncate_bounds_user_identity_details_so_the_event_fits_a_request(mapper_for):
    """details has no service limit, but an event must fit one request: it is cut visibly at
    100,000 bytes instead of ending as FieldTooLong in failed/."""
    from cloudtrail_sink import events
    m = mapper_for(DETAILS.format(oversize="truncate"))
    huge = {"k": '"' * 600_000}        # 1.2 MB of JSON, 2.4 MB once escaped into a request
    ev = ok(m.map("app.x", T0, {"n": "n", "d": huge}).event)
    details = ev["userIdentity"]["details"]
    assert details["truncated"] is True
    assert details["originalBytes"] == len(schema.dumps(huge).encode())
    assert 99_900 < len(schema.dumps(details).encode()) <= 100_000
    assert schema.dumps(huge).startswith(details["preview"])
    assert ev["additionalEventData"] == {"truncatedFields": ["userIdentity.details"]}
    assert isinstance(on_the_wire(ev), events.Prepared)

    # Every field at its limit at once, all of it characters that double when escaped: the
    # bound still leaves the event inside the sink's default request budget.
    q = '"' * 300_000
    rec = {"n": q, "e": q, "d": {"k": q}, "rp": {"k": q}, "re": {"k": q}, "aed": {"k": q}}
    ev = ok(m.map("app.x", T0, rec).event)
    assert ev["additionalEventData"]["truncated"] is True
    assert ev["additionalEventData"]["truncatedFields"] == [
        "eventName", "errorMessage", "userIdentity.details", "requestParameters",
        "responseElements", "additionalEventData"]
    assert isinstance(on_the_wire(ev), events.Prepared)


def test_user_identity_details_at_the_bound_pass_and_reject_names_the_field(mapper_for):
    rec = {"n": "n", "d": {"k": ""}}
    rec["d"]["k"] = "a" * (100_000 - len(schema.dumps(rec["d"]).encode()))
    assert len(schema.dumps(rec["d"]).encode()) == 100_000
    for oversize in ("truncate", "reject"):
        m = mapper_for(DETAILS.format(oversize=oversize))
        ev = ok(m.map("app.x", T0, rec).event)
        assert ev["userIdentity"]["details"] == rec["d"] and "additionalEventData" not in ev
    res = m.map("app.x", T0, {"n": "n", "d": {"k": "a" * 100_000}})
    assert res.event is None
    assert "userIdentity.details is 100008 bytes; the limit is 100000" in res.reason
