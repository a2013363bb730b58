"""Fluent Bit's `<spool>/mappings-status.json` as the sink's metrics (mappingstatus.py).

What a user relies on: a scrape of the sink's /metrics tells whether Fluent Bit runs on stale
rules because a newer file was refused (with a bounded reason, never the error text), when the
rules in use were loaded, and how many records each drop: rule took, from the file the REAL
filter writes (run here through the filter_lua harness); and nothing in that file (missing,
arbitrary bytes, huge, deeply nested, wrong types, a FIFO, a symlink) breaks /metrics, blocks
it, or reaches a label or the log.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pathlib
import re
import threading
import urllib.request

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from cloudtrail_sink import httpserver, mappingstatus
from cloudtrail_sink.config import SinkConfig
from cloudtrail_sink.delivery.coordinator import Runner
from cloudtrail_sink.mappings import compile_files
from cloudtrail_sink.mappingstatus import MAX_BYTES, MAX_RULES, MappingsStatus
from cloudtrail_sink.sender import Result
from lua.conftest import START, LuaFilter
from sinksupport import CHANNEL_ARN

SHIPPED = pathlib.Path(__file__).resolve().parents[2] / "mappings"
DROP_RULE = "kubernetes-audit-not-final-stage"
LOOP = "local n = 0\nwhile true do n = n + 1 end\nreturn { format = 1 }\n"
P = "cloudtrail_sink_"


@pytest.fixture(scope="module")
def shipped_rules() -> tuple[str, int]:
    compiled = compile_files([SHIPPED])
    return compiled.lua_text(), len(compiled.rules)


def replace_bytes(path: pathlib.Path, data: bytes) -> None:
    """What `mappings compile -o` and the filter do: a temporary file in the same folder, then
    rename."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def replace(path: pathlib.Path, text: str) -> None:
    replace_bytes(path, text.encode())


def audit(i: int, stage: str) -> dict:
    return {"kind": "Event", "apiVersion": "audit.k8s.io/v1", "auditID": f"a-{i}", "verb": "get",
            "user": {"username": "bob"}, "sourceIPs": ["192.0.2.9"],
            "objectRef": {"resource": "pods"}, "stage": stage,
            "requestReceivedTimestamp": "2025-11-27T10:00:00.000000Z"}


class Fluent:
    """The real filter on a spool with its mappings file; each tick advances its clock 1 s."""

    def __init__(self, root: pathlib.Path, first: str | None):
        self.spool, self.mappings = root / "spool", root / "mappings.lua"
        if first is not None:
            replace(self.mappings, first)
        self.f = LuaFilter(self.spool, {"CLOUDTRAIL_SPOOL_DIR": str(self.spool),
                                        "CLOUDTRAIL_MAPPINGS": str(self.mappings)},
                           real_mapper=True)
        self.status = self.spool / mappingstatus.STATUS_FILE

    def tick(self) -> None:
        self.f.now = self.f.now + 1.0
        assert self.f.tick()[0] == -1

    def drop(self, n: int) -> None:
        for i in range(n):
            assert self.f.call("kube.audit", self.f.now, audit(i, "RequestReceived"))[0] == -1


def samples(text: str) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def mapping_samples(text: str) -> dict[tuple[str, tuple], float]:
    return {k: v for k, v in samples(text).items()
            if k[0].startswith((P + "mappings_", P + "mapping_"))}


def collected(path, clock=lambda: START) -> dict[tuple[str, tuple], float]:
    registry = CollectorRegistry()
    registry.register(MappingsStatus(str(path), clock))
    return mapping_samples(generate_latest(registry).decode())


class AcceptAll:
    def send(self, entries):
        return Result({e["id"] for e in entries}, [])


def test_a_scrape_of_the_running_sink_shows_what_the_real_filter_wrote(tmp_path, shipped_rules):
    text, n_rules = shipped_rules
    fb = Fluent(tmp_path, text)
    fb.drop(3)
    fb.tick()  # the first drops are written at once
    assert json.loads(fb.status.read_text())["dropped"] == {DROP_RULE: 3}
    now = [START + 100.0]
    cfg = SinkConfig(spool_dir=str(fb.spool), channel_arn=CHANNEL_ARN, listen="127.0.0.1:0",
                     linger_ms=20).validate()
    runner = Runner(cfg, sender=AcceptAll(), clock=lambda: now[0])
    runner.start()
    try:
        url = f"http://127.0.0.1:{runner.http.port}/metrics"

        def scrape() -> tuple[str, dict]:
            with urllib.request.urlopen(url, timeout=5) as resp:
                body = resp.read().decode()
            return body, mapping_samples(body)

        os.utime(fb.status, (START + 40, START + 40))
        _, m = scrape()
        assert m == {
            (P + "mappings_status_readable", ()): 1.0,
            (P + "mappings_status_age_seconds", ()): 60.0,
            (P + "mappings_rules", ()): float(n_rules),
            (P + "mappings_rules_loaded_timestamp_seconds", ()): START,
            (P + "mappings_reload_failed", (("reason", "none"),)): 0.0,
            (P + "mapping_dropped_records_total", (("rule", DROP_RULE),)): 3.0,
            (P + "mapping_dropped_records_created", (("rule", DROP_RULE),)): START,
        }

        replace(fb.mappings, LOOP)  # a newer file Fluent Bit refuses: it keeps the old rules
        fb.tick()
        body, m = scrape()
        assert m[(P + "mappings_reload_failed", (("reason", "evaluation"),))] == 1.0
        assert (P + "mappings_reload_failed", (("reason", "none"),)) not in m
        assert m[(P + "mappings_rules_loaded_timestamp_seconds", ())] == START
        assert m[(P + "mappings_rules", ())] == float(n_rules)
        assert "does not finish" in json.loads(fb.status.read_text())["error"]
        assert "does not finish" not in body and str(fb.mappings) not in body

        replace(fb.mappings, text + "-- edited\n")
        fb.tick()
        reloaded_at = fb.f.now
        _, m = scrape()
        assert m[(P + "mappings_reload_failed", (("reason", "none"),))] == 0.0
        assert m[(P + "mappings_rules_loaded_timestamp_seconds", ())] == reloaded_at
        assert m[(P + "mapping_dropped_records_total", (("rule", DROP_RULE),))] == 3.0
    finally:
        runner.stop()


def test_each_way_a_newer_file_is_refused_has_its_own_bounded_reason(tmp_path, shipped_rules):
    text, n_rules = shipped_rules
    fb = Fluent(tmp_path, text)
    refusals = [
        ("syntax", text[: len(text) // 2]),
        ("evaluation", LOOP),
        ("evaluation", "return { format = 1, rules = os.exit(3) }\n"),
        ("format", "return 5\n"),
        ("format", "return { format = 2 }\n"),
        ("refused", 'return { format = 1, rules = "none" }\n'),
        ("unreadable", None),
    ]
    for reason, bad in refusals:
        if bad is None:
            fb.mappings.unlink()
        else:
            replace(fb.mappings, bad)
        fb.tick()
        m = collected(fb.status)
        assert m[(P + "mappings_reload_failed", (("reason", reason),))] == 1.0, (reason, bad)
        assert m[(P + "mappings_rules_loaded_timestamp_seconds", ())] == START
        assert m[(P + "mappings_rules", ())] == float(n_rules)
        assert len([k for k in m if k[0] == P + "mappings_reload_failed"]) == 1


def test_a_filter_that_started_without_good_rules_shows_none_in_use(tmp_path):
    fb = Fluent(tmp_path, None)  # no mappings file at all: every record goes to rejected/
    m = collected(fb.status)
    assert m[(P + "mappings_rules", ())] == 0.0
    assert m[(P + "mappings_reload_failed", (("reason", "unreadable"),))] == 1.0
    assert (P + "mappings_rules_loaded_timestamp_seconds", ()) not in m


def test_rule_labels_are_capped_and_only_rule_names(tmp_path):
    status = tmp_path / mappingstatus.STATUS_FILE
    dropped = {f"rule-{i:03d}": 1 for i in range(MAX_RULES + 20)}
    dropped.update({'x"} 1\nevil{': 5, "\ud800": 7, "r" * 129: 11, "?": 2})
    status.write_text(json.dumps({"state": "ok", "rules": 3, "loaded_at": START,
                                  "started_at": START, "dropped": dropped}))
    m = collected(status)
    rules = {dict(k[1])["rule"]: v for k, v in m.items()
             if k[0] == P + "mapping_dropped_records_total"}
    # "?" sorts first; then rule-000.. up to the cap; the rest and the non-names are summed
    assert len(rules) == MAX_RULES + 1
    assert rules["?"] == 2 and rules["rule-000"] == 1 and "rule-049" not in rules
    assert rules["(other)"] == 21 + 5 + 7 + 11
    assert sum(rules.values()) == sum(dropped.values())


def test_hostile_files_never_block_or_break_a_scrape_and_never_reach_the_log(tmp_path, caplog):
    status = tmp_path / mappingstatus.STATUS_FILE
    real = tmp_path / "real.json"
    secret = "SECRET-PAYLOAD"

    def write(text: str | bytes):
        return lambda: (status.write_bytes if isinstance(text, bytes) else status.write_text)(text)

    def linked(target: str):
        def make():
            real.write_text('{"state": "ok", "rules": 1}')
            status.symlink_to(target)
        return make

    def huge():
        status.touch()
        os.truncate(status, MAX_BYTES + 1)

    cases = {
        "missing": None,
        "fifo": lambda: os.mkfifo(status),
        "folder": status.mkdir,
        "symlink to a device": linked("/dev/zero"),
        "huge": huge,
        "symlink to a status": linked(str(real)),  # never followed: Fluent Bit renames a file
        "deep": write("[" * 200_000 + "]" * 200_000),
        "long number": write('{"state": "ok", "rules": ' + "9" * 5000 + "}"),
        "overflowing number": write('{"state": "ok", "rules": 1' + "0" * 400 + "}"),
        "negative count": write('{"state": "ok", "rules": 1, "dropped": {"a": -1}}'),
        "NaN": write('{"state": "ok", "rules": NaN}'),
        "dropped not an object": write('{"state": "ok", "rules": 1, "dropped": []}'),
        "not utf-8": write(b'{"state": "\xff' + secret.encode() + b'"}'),
        "wrong state": write(json.dumps({"state": secret, "rules": 1})),
        "not an object": write(json.dumps([secret])),
        "not json": write(secret),
    }
    caplog.set_level("DEBUG", logger="cloudtrail_sink")
    for name, make in cases.items():
        for entry in (status, real):
            if entry.is_dir() and not entry.is_symlink():
                entry.rmdir()
            elif entry.exists() or entry.is_symlink():
                entry.unlink()
        if make is not None:
            make()
        done: dict = {}
        t = threading.Thread(target=lambda: done.setdefault("m", collected(status)), daemon=True)
        t.start()
        t.join(10)
        assert not t.is_alive(), f"{name}: the scrape blocked"
        m = done["m"]
        assert m[(P + "mappings_status_readable", ())] == 0.0, name
        assert {k[0] for k in m} <= {P + "mappings_status_readable",
                                     P + "mappings_status_age_seconds"}, name
    assert secret not in caplog.text and "Traceback" not in caplog.text
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert all(w.startswith(f"mappings status {status}: ") for w in warned)
    for problem in ("is not a regular file", "cannot be opened: Too many levels of symbolic links",
                    f"is larger than {MAX_BYTES} bytes", "is not JSON: nested too deeply",
                    "is not JSON: ValueError", "field 'rules' is not a finite number >= 0",
                    "a count in field 'dropped' is not a finite number >= 0",
                    "field 'dropped' is not an object", "is not JSON: UnicodeDecodeError",
                    "field 'state' is neither \"ok\" nor \"error\"", "is not a JSON object",
                    "is not JSON: Expecting value"):
        assert any(f": {problem};" in w for w in warned), problem


def test_a_problem_is_logged_once_and_the_recovery_once(tmp_path, caplog):
    status = tmp_path / mappingstatus.STATUS_FILE
    caplog.set_level("DEBUG", logger="cloudtrail_sink")
    registry = CollectorRegistry()
    registry.register(MappingsStatus(str(status), clock=lambda: START))
    for text in ("{", "{", "{", '{"state": "ok", "rules": 2}', '{"state": "ok", "rules": 2}'):
        status.write_text(text)
        registry.get_sample_value(P + "mappings_status_readable")
    assert [(r.levelname, r.getMessage().split(": ", 1)[1]) for r in caplog.records] == [
        ("WARNING", "is not JSON: Expecting property name enclosed in double quotes; only "
                    "mappings_status_readable 0 (and its age) are exported until it is fixed"),
        ("INFO", "readable again")]


# -- property: any bytes or JSON in the file, scraped over HTTP ---------------------------------

NAMES = st.one_of(st.from_regex(r"\A[A-Za-z0-9_.-]{1,20}\Z"), st.text(max_size=10))
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-10**400, max_value=10**400)
    | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=20)
COUNTS = st.integers(min_value=0, max_value=2**53) | st.floats(min_value=0, max_value=1e300)
KNOWN_ERRORS = {  # the filter's messages (filter.lua), each with its reason
    "cannot load mappings: /m.lua: No such file or directory": "unreadable",
    "cannot load mappings /m.lua: [string]:3: unexpected symbol near 'x'": "syntax",
    "mappings /m.lua failed to evaluate: /m.lua:1: does not finish (more than 20000000 "
    "instructions)": "evaluation",
    "mappings /m.lua does not return a table": "format",
    "mappings /m.lua has format 2, expected 1": "format",
    "mappings /m.lua rejected by the mapping engine: no schema section: compile them again":
        "refused",
    "mapping engine unavailable: module 'cloudtrail.mapper' not found": "other",
}
ERRORS = st.sampled_from(sorted(KNOWN_ERRORS)) | st.text(max_size=30).filter(
    lambda t: t not in KNOWN_ERRORS and not t.startswith(("cannot load mappings", "mappings ")))
GOOD_STATUS = st.fixed_dictionaries(
    {"state": st.sampled_from(["ok", "error"]), "rules": st.integers(0, 500),
     "started_at": COUNTS, "dropped": st.dictionaries(NAMES, COUNTS, max_size=MAX_RULES + 10)},
    optional={"loaded_at": COUNTS, "error": ERRORS, "error_at": COUNTS,
              "mappings": st.text(max_size=20)})
# A status whose fields may each be replaced by any JSON value.
MUTATED = GOOD_STATUS.flatmap(lambda d: st.fixed_dictionaries(
    {k: st.just(v) | JSON_VALUES for k, v in d.items()}))
HOSTILE = st.sampled_from([-1, -0.5, math.nan, math.inf, -math.inf, 10**400, True, "1", None,
                           [], {}]) | JSON_VALUES
# A status with one field, or one drop count, wrong.
ONE_WRONG = st.tuples(GOOD_STATUS, st.sampled_from(["state", "rules", "loaded_at", "error_at",
                                                    "started_at", "dropped", "a count"]),
                      HOSTILE).map(
    lambda t: {**t[0], "dropped": {**t[0]["dropped"], "r": t[2]}} if t[1] == "a count"
    else {**t[0], t[1]: t[2]})
FILES = st.one_of(
    st.binary(max_size=300),
    JSON_VALUES.map(lambda v: json.dumps(v).encode()),
    MUTATED.map(lambda v: json.dumps(v).encode()),
    ONE_WRONG.map(lambda v: json.dumps(v).encode()),
    st.tuples(st.sampled_from("[{"), st.integers(1, 50_000)).map(
        lambda t: (t[0] if t[0] == "[" else '{"a":') .encode() * t[1]),
    st.tuples(GOOD_STATUS.map(lambda v: json.dumps(v).encode()), st.integers(0, 200)).map(
        lambda t: t[0][: t[1]]),  # a partial file (a writer that did not rename)
)


@contextlib.contextmanager
def metrics_server(path: pathlib.Path):
    registry = CollectorRegistry()
    registry.register(MappingsStatus(str(path), clock=lambda: 2e9))
    server = httpserver.StatusServer("127.0.0.1", 0, registry, lambda: (True, {}),
                                     lambda: (True, {}))
    server.start()
    try:
        yield f"http://127.0.0.1:{server.port}/metrics"
    finally:
        server.stop()


def scrape(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as resp:
        assert resp.status == 200
        return mapping_samples(resp.read().decode())


def expected_from(status: dict) -> dict:
    """What the metrics must say for a well-formed status (the oracle)."""
    out = {(P + "mappings_status_readable", ()): 1.0,
           (P + "mappings_rules", ()): float(status["rules"])}
    if "loaded_at" in status:
        out[(P + "mappings_rules_loaded_timestamp_seconds", ())] = float(status["loaded_at"])
    if status["state"] == "error":
        reason = KNOWN_ERRORS.get(status.get("error"), "other")
        out[(P + "mappings_reload_failed", (("reason", reason),))] = 1.0
    else:
        out[(P + "mappings_reload_failed", (("reason", "none"),))] = 0.0
    dropped = status["dropped"]
    names = sorted(n for n in dropped if re.fullmatch(r"[A-Za-z0-9_.-]{1,128}|\?", n))
    rules = {n: float(dropped[n]) for n in names[:MAX_RULES]}
    if len(rules) < len(dropped):
        rules["(other)"] = float(sum(v for n, v in dropped.items() if n not in rules))
    for rule, count in rules.items():
        out[(P + "mapping_dropped_records_total", (("rule", rule),))] = count
        out[(P + "mapping_dropped_records_created", (("rule", rule),))] = float(
            status["started_at"])
    return out


def test_any_file_content_leaves_metrics_answering_and_a_good_status_exact(tmp_path):
    status = tmp_path / mappingstatus.STATUS_FILE
    with metrics_server(status) as url:

        @settings(max_examples=300, deadline=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
        @given(FILES)
        def any_bytes(data: bytes) -> None:
            replace_bytes(status, data)
            m = scrape(url)
            readable = m[(P + "mappings_status_readable", ())]
            assert readable in (0.0, 1.0)
            assert m[(P + "mappings_status_age_seconds", ())] >= 0
            if readable == 0.0:
                assert {k[0] for k in m} == {P + "mappings_status_readable",
                                             P + "mappings_status_age_seconds"}
                return
            failed = [k for k in m if k[0] == P + "mappings_reload_failed"]
            assert len(failed) == 1 and dict(failed[0][1])["reason"] in (
                mappingstatus.REASONS + ("none",))
            rules = [k for k in m if k[0] == P + "mapping_dropped_records_total"]
            assert len(rules) <= MAX_RULES + 1
            assert all(math.isfinite(v) and v >= 0 for v in m.values())

        @settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
        @given(GOOD_STATUS)
        def good(value: dict) -> None:
            replace_bytes(status, json.dumps(value).encode())
            m = scrape(url)
            m.pop((P + "mappings_status_age_seconds", ()))
            assert m == expected_from(value)
            total = sum(v for k, v in m.items() if k[0] == P + "mapping_dropped_records_total")
            assert total == pytest.approx(sum(value["dropped"].values()), rel=1e-9)

        any_bytes()
        good()

