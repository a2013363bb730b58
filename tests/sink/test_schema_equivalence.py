"""The fast event checks answer exactly what the reference checks answer.

``schema.check_event`` answers None through a quick "plainly valid" test and leaves everything
else to ``schema.first_problem`` (the contract's steps in order). A user relies on both giving
the same verdict: the same code and message, or the same exception, for every event. These
properties generate events near every boundary the contract names (missing, null, wrongly typed
and unknown fields, string limits in UTF-8 bytes with multi-byte characters, object limits, time,
address and account formats) and compare. They also pin the sink's pre-send path
(``events._check``, ``events.dumps``) and ``schema.parse_event_text`` against the
implementations they replaced, kept here verbatim.
"""

from __future__ import annotations

import base64
import hashlib
import json

import orjson
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from cloudtrail_sink import events, schema

ACCOUNT = "123456789012"
SETTINGS = settings(max_examples=400, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


class Text(str):
    """A str subclass: valid for the reference check, not for the quick test."""


def _verdict(fn, *args, **kwargs):
    try:
        return ("answer", fn(*args, **kwargs))
    except Exception as exc:  # the same exception, or a test failure
        return ("raised", type(exc).__name__, str(exc))


# -- generated events ------------------------------------------------------------------------
_chars = st.sampled_from(["a", "Z", "0", "-", " ", '"', "\\", "\x7f", "é", "€", "😀", "\ud800",
                          "\x00"])


def _sized_text(limit: int, over: int = 8) -> st.SearchStrategy[str]:
    """Strings of one repeated character whose UTF-8 size lands near ``limit`` bytes."""
    def build(char: str, delta: int) -> str:
        width = len(char.encode("utf-8", "surrogatepass"))
        return char * max(0, (limit + delta) // width)
    return st.builds(build, _chars, st.integers(-8, over)) | st.builds(
        lambda c, n: c * n, _chars, st.sampled_from([0, 1, limit // 4, limit // 4 + 1]))


_times = st.sampled_from(["2026-11-27T10:00:00Z", "2024-02-29T23:59:59Z", "2023-02-29T00:00:00Z",
                          "2026-13-01T00:00:00Z", "2026-11-27T24:00:00Z", "2026-11-27 10:00:00Z",
                          "2026-11-27T10:00:00", "2026-11-27T10:00:00.000Z", "", "٢٠٢٦-11-27T10:00:00Z"])
_ips = st.sampled_from(["203.0.113.7", "10.0.0.1", "256.1.1.1", "01.2.3.4", "::1",
                        "2001:db8::8a2e:370:7334", "fe80::1%eth0", "not an ip", "",
                        "1.2.3.4 ", "a" * 46, "::ffff:192.0.2.1"])
_accounts = st.sampled_from([ACCOUNT, "210987654321", "12345678901", "1234567890123",
                             "12345678901a", "١٢٣٤٥٦٧٨٩٠١٢", ""])
_scalars = st.none() | st.integers() | st.floats(allow_nan=False) | st.booleans() | st.text(
    max_size=5)
_json_values = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.text(max_size=3), inner, max_size=3), max_leaves=8)
_wrong = _scalars | st.lists(_scalars, max_size=2) | st.builds(Text, st.text(max_size=3))


def _object(limit: int) -> st.SearchStrategy[dict]:
    big = st.builds(lambda n: {"pad": "x" * n}, st.sampled_from(
        [limit - 12, limit - 11, limit - 10, limit - 9, limit // 5 - 10, limit // 5]))
    return st.dictionaries(st.text(max_size=4), _json_values, max_size=3) | big


def _good_field(name: str) -> st.SearchStrategy:
    """Values the contract accepts, up to their limits."""
    if name == "eventTime":
        return st.sampled_from(["2026-11-27T10:00:00Z", "2024-02-29T23:59:59Z"])
    if name == "sourceIPAddress":
        return st.sampled_from(["203.0.113.7", "::1", "2001:db8::8a2e:370:7334"])
    if name == "recipientAccountId":
        return st.just(ACCOUNT)
    if name == "userIdentity":
        return st.fixed_dictionaries(
            {"type": _sized_text(128, 0), "principalId": _sized_text(1024, 0)},
            optional={"details": st.dictionaries(st.text(max_size=3), _json_values, max_size=2)})
    if name in schema.STRING_LIMITS:
        return _sized_text(schema.STRING_LIMITS[name], 0)
    limit = schema.OBJECT_LIMITS[name]
    return st.dictionaries(st.text(max_size=4), _json_values, max_size=3) | st.builds(
        lambda n: {"pad": "x" * n}, st.sampled_from([limit - 10, limit // 5 - 10]))


def _field(name: str) -> st.SearchStrategy:
    if name == "eventTime":
        good = _times
    elif name == "sourceIPAddress":
        good = _ips
    elif name == "recipientAccountId":
        good = _accounts
    elif name in schema.STRING_LIMITS:
        good = _sized_text(schema.STRING_LIMITS[name]) | st.text(max_size=8)
    else:
        good = _object(schema.OBJECT_LIMITS[name])
    return st.one_of(good, good, good, _wrong)


_identity = st.fixed_dictionaries(
    {"type": st.one_of(st.just("CustomUserIdentity"), _sized_text(128), _wrong),
     "principalId": st.one_of(st.just("user-1"), _sized_text(1024), _wrong)},
    optional={"details": st.one_of(st.dictionaries(st.text(max_size=3), _scalars, max_size=2),
                                   _wrong),
              "extra": _scalars})


@st.composite
def events_near_the_rules(draw) -> dict:
    required = {"version": st.just("1.0"), "userIdentity": _identity,
                "eventSource": st.just("app.example.com"), "eventName": st.just("Login"),
                "eventTime": st.just("2026-11-27T10:00:00Z"), "UID": st.just("uid-1"),
                "recipientAccountId": st.just(ACCOUNT)}
    mode = draw(st.integers(0, 2))
    if mode < 2:  # an event the contract accepts, near its limits; or with one field broken
        data = {name: draw(_good_field(name)) for name in required}
        for name in draw(st.lists(st.sampled_from(sorted(schema.KNOWN_TOP - set(required))),
                                  max_size=6, unique=True)):
            data[name] = draw(_good_field(name))
        if mode == 1:
            name = draw(st.sampled_from(sorted(schema.KNOWN_TOP)))
            if draw(st.integers(0, 5)):
                data[name] = draw(_field(name) if name != "userIdentity" else _wrong | _identity)
            else:
                data.pop(name, None)
        order = draw(st.permutations(list(data)))
        return {key: data[key] for key in order}
    data = {}
    for name, good in required.items():
        # Mostly valid, so that the quick test is exercised, with every rule broken sometimes.
        if not draw(st.integers(0, 15)):
            continue  # missing
        data[name] = draw(good) if draw(st.integers(0, 3)) else draw(_field(name) if name != "userIdentity" else _wrong | _identity)
    for name in draw(st.lists(st.sampled_from(sorted(schema.KNOWN_TOP - set(required))),
                              max_size=6, unique=True)):
        data[name] = draw(_field(name))
    if not draw(st.integers(0, 20)):
        data[draw(st.sampled_from(["unknownField", "eventtime", ""]))] = draw(_scalars)
    if not draw(st.integers(0, 30)):
        data[1] = "non-str key"
    order = draw(st.permutations(list(data)))
    return {key: data[key] for key in order}


def _valid_event() -> dict:
    return {"version": "1.0", "UID": "uid-1",
            "userIdentity": {"type": "CustomUserIdentity", "principalId": "user-1"},
            "eventSource": "app.example.com", "eventName": "Login",
            "eventTime": "2026-11-27T10:00:00Z", "sourceIPAddress": "203.0.113.7",
            "recipientAccountId": ACCOUNT, "additionalEventData": {"k": "v"}}


_bounds = st.one_of(st.none(), st.integers(0, 40_000),
                    st.sampled_from([5600, 5601, 20_000, 20_001, 28_000, 28_001, 100_000, 100_001]))


# -- schema.check_event == schema.first_problem ------------------------------------------------
@SETTINGS
@given(data=events_near_the_rules(), account=st.sampled_from([ACCOUNT, None, "210987654321"]),
       text_bytes=_bounds, object_bytes=_bounds)
@example(data=_valid_event(), account=ACCOUNT, text_bytes=None, object_bytes=None)
def test_check_event_answers_like_the_reference(data, account, text_bytes, object_bytes):
    assert _verdict(schema.check_event, data, account, text_bytes=text_bytes,
                    object_bytes=object_bytes) == _verdict(
        schema.first_problem, data, account, text_bytes=text_bytes, object_bytes=object_bytes)


def test_generated_events_reach_both_answers():
    """The property above is not vacuous: it meets valid events (the quick test answers) and
    events refused for each kind of problem."""
    seen_codes = set()
    quick = 0

    @settings(max_examples=400, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(events_near_the_rules())
    def collect(data):
        nonlocal quick
        verdict = _verdict(schema.first_problem, data, ACCOUNT, object_bytes=None)
        if verdict[0] == "raised":
            return
        problem = verdict[1]
        if problem is None:
            quick += schema._plainly_valid(data, ACCOUNT, None, None)
        else:
            seen_codes.add(problem.code)

    collect()
    assert quick > 20
    assert {"InvalidData", "FieldNotFound", "FieldTooLong"} <= seen_codes


def test_quick_test_accepts_a_plain_event_and_refuses_every_broken_variant():
    event = _valid_event()
    assert schema._plainly_valid(event, ACCOUNT, None, None)
    assert schema.check_event(event, ACCOUNT) is None
    broken = [
        {**event, "UID": None}, {**event, "UID": Text("uid")}, {**event, "surprise": 1},
        {**event, "eventName": "é" * 513}, {**event, "eventTime": "2026-02-30T00:00:00Z"},
        {**event, "sourceIPAddress": "1.2.3"}, {**event, "recipientAccountId": "210987654321"},
        {**event, "userIdentity": {"type": "T", "principalId": "p", "details": None}},
        {**event, "additionalEventData": {"pad": "x" * 28_000}},
    ]
    for variant in broken:
        assert not schema._plainly_valid(variant, ACCOUNT, None, None)
        assert schema.check_event(variant, ACCOUNT) == schema.first_problem(variant, ACCOUNT)


# -- the sink's pre-send path against the implementations it replaced --------------------------
def _old_check(data: dict, raw: bytes, account_id):
    if len(raw) <= min(schema.OBJECT_LIMITS.values()):
        light = None
        for name in tuple(schema.OBJECT_LIMITS):
            if isinstance(data.get(name), dict):
                if light is None:
                    light = dict(data)
                del light[name]
        return schema.first_problem(light if light is not None else data, account_id)
    return schema.first_problem(orjson.loads(raw), account_id)


def _old_dumps(event_data) -> bytes:
    try:
        return orjson.dumps(event_data, option=orjson.OPT_NON_STR_KEYS)
    except orjson.JSONEncodeError as exc:
        if "ecursion" not in str(exc):
            raise
        return schema.dumps(event_data).encode("utf-8")


@SETTINGS
@given(data=events_near_the_rules(), account=st.sampled_from([ACCOUNT, None]))
def test_sink_pre_send_check_and_serialization_answer_like_before(data, account):
    old_raw = _verdict(_old_dumps, data)
    assert _verdict(events.dumps, data) == old_raw
    assume(old_raw[0] == "answer")
    raw = old_raw[1]
    assert _verdict(events._check, data, raw, account) == _verdict(_old_check, data, raw, account)


@pytest.mark.parametrize("value", [
    {1: "int key", "a": {2.5: None, True: [1]}}, {"deep": [[[[]]]]}, {"big": 1 << 70},
    {"set": {1}}, {"bytes": b"x"}, {"nan": float("nan")}, {"s": "\ud800"},
])
def test_sink_serialization_of_odd_values_is_unchanged(value):
    assert _verdict(events.dumps, value) == _verdict(_old_dumps, value)


def _nested(levels: int) -> dict:
    """An event whose eventData nests ``levels`` objects/arrays, itself included."""
    from sinksupport import event

    deep: list = []
    for _ in range(levels - 3):
        deep = [deep]
    return event("deep", additionalEventData={"d": deep})


@pytest.mark.parametrize("levels", [schema.MAX_DEPTH - 1, schema.MAX_DEPTH,
                                    schema.MAX_DEPTH + 1, 1000])
def test_sink_and_emulator_agree_on_how_deep_an_event_may_nest(levels):
    """What the sink would send, the emulator accepts; what the emulator refuses for depth,
    the sink refuses before sending (a 1,000-deep event used to pass the sink's check)."""
    data = _nested(levels)
    built = events.build({"eventData": data}, ACCOUNT)
    # The same event as wire text, built without json.dumps (which cannot go 1,000 deep).
    text = json.dumps(events.prepare(_nested(4), ACCOUNT), separators=(",", ":")).replace(
        "[[]]", "[" * (levels - 2) + "]" * (levels - 2))
    wire = schema.check_event_text(text, ACCOUNT)
    if levels <= schema.MAX_DEPTH:
        assert isinstance(built, events.Prepared) and wire is None
        assert schema.check_event_text(built.text, ACCOUNT) is None
    else:
        assert isinstance(built, events.Rejected)
        assert (built.code, built.message) == ("InvalidData", "sink: " + schema.TOO_DEEP)
        assert wire == schema.Problem("InvalidData", schema.TOO_DEEP)


# -- schema.parse_event_text against the implementation it replaced ---------------------------
def _old_parse_event_text(text, account_id, event_checksum=None):
    def encodable(t):
        try:
            t.encode("utf-8")
        except UnicodeEncodeError:
            return False
        return True

    if not isinstance(text, str):
        return None, schema.Problem("InvalidData", "eventData must be a string holding a JSON object")
    if not encodable(text):
        return None, schema.Problem("InvalidData", "eventData holds a lone UTF-16 surrogate")
    if event_checksum is not None and event_checksum != base64.b64encode(
            hashlib.sha256(text.encode("utf-8")).digest()).decode():
        return None, schema.Problem("InvalidChecksum",
                                    "eventDataChecksum does not match the SHA-256 of eventData")
    try:
        data = schema._DECODER.decode(text)
    except (ValueError, RecursionError):
        return None, schema.Problem("InvalidData", "eventData is not valid JSON")
    if "\\u" in text and not encodable(schema.dumps(data)):
        return None, schema.Problem("InvalidData", "eventData holds a lone UTF-16 surrogate")
    return data, schema.first_problem(data, account_id, text_bytes=len(text.encode("utf-8")))


def _texts(data) -> st.SearchStrategy[str]:
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=True,
                      default=str) if not isinstance(data, str) else data
    return st.sampled_from([text, text.replace("Z", "\\u005a"), text + " ", text[:-1],
                            text.replace('"', '"\\ud800', 1), "1e400", '{"a":NaN}'])


@SETTINGS
@given(data=events_near_the_rules().map(lambda d: {str(k): v for k, v in d.items()}),
       pick=st.data(), account=st.sampled_from([ACCOUNT, None]),
       checksum_kind=st.sampled_from(["right", "wrong", "none"]))
def test_parse_event_text_answers_like_before(data, pick, account, checksum_kind):
    text = pick.draw(_texts(data))
    check = None
    if checksum_kind != "none" and schema._encodable(text):
        check = schema.checksum(text) if checksum_kind == "right" else schema.checksum(text + " ")
    new = _verdict(schema.parse_event_text, text, account, check)
    old = _verdict(_old_parse_event_text, text, account, check)
    # Compared as JSON text: NaN != NaN would make equal decodes look different.
    assert json.dumps(new, default=repr) == json.dumps(old, default=repr)
