"""The JSON endpoints behind the console: refusals are stored (per event and per call) and
survive a restart, counters cover what is stored, rates count per second of the injected wall
clock, the summary long poll wakes on a refusal, and a database written by an older version
gets the filter columns when it is opened."""

from __future__ import annotations

import datetime as dt
import sqlite3
import threading
import urllib.error
import urllib.parse
import urllib.request

import pytest
from emusupport import CHANNEL_ARN, audit_event, batch, client, event_data, get_json

OLD_SCHEMA = """
CREATE TABLE events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id TEXT NOT NULL,
    channel_arn TEXT NOT NULL,
    uid TEXT,
    body TEXT NOT NULL,
    event_data TEXT GENERATED ALWAYS AS (json_extract(body, '$.eventData')) VIRTUAL
);
"""


def _get(emu, path, **params):
    return get_json(f"{emu.url}{path}?" + urllib.parse.urlencode(params))


def test_refusals_are_stored_per_event_and_per_call_and_survive_a_restart(make_emulator):
    emu = make_emulator()
    c = client(emu)
    c.put_audit_events(channelArn=CHANNEL_ARN, auditEvents=[
        audit_event("a"), audit_event("b", data=event_data(uid="uid-b", eventName=None))])
    with pytest.raises(c.exceptions.ChannelNotFound):
        c.put_audit_events(channelArn=CHANNEL_ARN.replace("us-east-1", "eu-west-1"),
                           auditEvents=batch(1))
    emu.stop()
    again = make_emulator(db_path=emu.db_path)
    refusals = _get(again, "/_emulator/search", kind="refusals")["items"]
    assert [(r["kind"], r["errorCode"], r["UID"], r["entryId"]) for r in refusals] == [
        ("request", "ChannelNotFound", None, None),
        ("event", "FieldNotFound", "uid-b", "b")]
    assert refusals[0]["channelARN"].endswith(CHANNEL_ARN.split(":", 4)[4])
    detail = _get(again, "/_emulator/refusal", seq=refusals[1]["seq"])
    assert "eventName" not in detail["eventData"] and '"uid-b"' in detail["eventData"]
    summary = _get(again, "/_emulator/summary")
    assert summary["stored"] == {"events": 1,
                                 "refusals": {"ChannelNotFound": 1, "FieldNotFound": 1}}
    assert summary["sinceStart"] == {"accepted": 0, "failed": {}, "requests": {}}
    assert _get(again, "/_emulator/search", kind="refusals", errorCode="FieldNotFound",
                q="UID-B")["items"] == [refusals[1]]  # free text ignores case


def test_an_event_is_found_by_its_event_id(make_emulator):
    emu = make_emulator()
    answer = client(emu).put_audit_events(channelArn=CHANNEL_ARN, auditEvents=batch(2))
    event_id = answer["successful"][1]["eventID"]
    found = _get(emu, "/_emulator/event", id=event_id)
    assert found["event"] == emu.events()[1] and found["seq"] == 2
    with pytest.raises(urllib.error.HTTPError) as missing:
        _get(emu, "/_emulator/event", id="nope")
    assert missing.value.code == 404


def test_rates_count_per_second_of_the_wall_clock(make_emulator):
    from cloudtrail_sink.emulator.storage import EventRow, RefusalRow

    emu = make_emulator()
    emu.wall_clock = lambda: dt.datetime(2026, 5, 1, 12, 0, 3, tzinfo=dt.timezone.utc)
    for stamp, count in (("12:00:00.100", 3), ("12:00:00.900", 2), ("12:00:02.500", 1),
                         ("11:59:50.000", 7)):
        emu._store.add(EventRow(f"{stamp}-{i}", CHANNEL_ARN, None, "{}", None, None, None,
                                f"2026-05-01T{stamp}Z") for i in range(count))
    emu._store.add_refusals([RefusalRow("2026-05-01T12:00:01.000Z", "request", None, None, None,
                                        "ThrottlingException", "Rate exceeded")])
    rates = _get(emu, "/_emulator/rates", seconds=10)
    assert rates["events"] == [["2026-05-01T12:00:00", 5], ["2026-05-01T12:00:02", 1]]
    assert rates["refusals"] == [["2026-05-01T12:00:01", 1]]
    assert rates["now"] == "2026-05-01T12:00:03.000Z"
    assert _get(emu, "/_emulator/rates", seconds=2)["events"] == [["2026-05-01T12:00:02", 1]]


def test_the_summary_long_poll_wakes_on_a_refusal(make_emulator):
    emu = make_emulator()
    first = _get(emu, "/_emulator/summary")
    answers = []
    poll = threading.Thread(target=lambda: answers.append(_get(
        emu, "/_emulator/summary", wait=20, events=first["last"]["events"],
        refusals=first["last"]["refusals"])))
    poll.start()
    while not emu._store._changed._waiters:
        poll.join(0.01)
    c = client(emu)
    c.put_audit_events(channelArn=CHANNEL_ARN, auditEvents=[
        audit_event("x", data=event_data(uid="uid-x", eventTime="never"))])
    poll.join(10)
    assert not poll.is_alive()
    assert answers[0]["last"] == {"events": 0, "refusals": 1}


def test_a_database_from_before_the_console_gets_its_filter_columns(make_emulator, tmp_path):
    old = tmp_path / "old.sqlite"
    con = sqlite3.connect(old)
    con.executescript(OLD_SCHEMA)
    body = ('{"eventID":"e-1","metadata":{"ingestionTime":"2026-01-01T00:00:00.000Z"},'
            '"eventData":{"UID":"u-1","eventSource":"old.example.com","eventName":"Get",'
            '"userIdentity":{"type":"T","principalId":"pat"}}}')
    con.execute("INSERT INTO events (event_id, channel_arn, uid, body) VALUES (?, ?, ?, ?)",
                ("e-1", CHANNEL_ARN, "u-1", body))
    con.commit()
    con.close()
    emu = make_emulator(db_path=old)
    [item] = _get(emu, "/_emulator/search", eventSource="old.example.com", eventName="Get",
                  principal="pat")["items"]
    assert (item["UID"], item["ingestionTime"]) == ("u-1", "2026-01-01T00:00:00.000Z")
    assert [e["eventID"] for e in emu.events()] == ["e-1"]  # the old contract still reads it
    assert _get(emu, "/_emulator/search", uid="u-1")["items"][0]["eventID"] == "e-1"
    assert _get(emu, "/_emulator/event", id="e-1")["seq"] == 1


def test_a_database_with_plain_id_indexes_gets_bucketed_ones(make_emulator, tmp_path):
    """Databases written with plain event_id/uid indexes (each costs a page rewrite per stored
    event) lose them for the bucketed ones, and every lookup still finds every event."""
    old = tmp_path / "plain.sqlite"
    con = sqlite3.connect(old)
    con.executescript(OLD_SCHEMA)
    for column in ("event_source", "event_name", "principal", "ingested"):
        con.execute(f"ALTER TABLE events ADD COLUMN {column} TEXT")
    con.execute("CREATE INDEX events_event_id ON events(event_id)")
    con.execute("CREATE INDEX events_uid ON events(uid)")
    con.executemany("INSERT INTO events (event_id, channel_arn, uid, body) VALUES (?, ?, ?, ?)",
                    [(f"e-{i}", CHANNEL_ARN, f"u-{i}", '{"eventID":"e-%d"}' % i)
                     for i in range(1, 5001)])
    con.commit()
    con.close()
    emu = make_emulator(db_path=old)
    client(emu).put_audit_events(channelArn=CHANNEL_ARN,
                                 auditEvents=[audit_event("n", data=event_data(uid="u-new"))])
    for i in (1, 4095, 4096, 5000):
        assert _get(emu, "/_emulator/event", id=f"e-{i}")["seq"] == i
        assert [e["seq"] for e in _get(emu, "/_emulator/search", uid=f"u-{i}")["items"]] == [i]
    [new] = _get(emu, "/_emulator/search", uid="u-new")["items"]
    assert _get(emu, "/_emulator/event", id=new["eventID"])["seq"] == 5001
    emu.stop()
    con = sqlite3.connect(old)
    try:
        indexes = {row[0] for row in con.execute(
            "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'events'")}
        buckets = dict(con.execute("SELECT bucket, COUNT(*) FROM events GROUP BY bucket"))
    finally:
        con.close()
    assert not indexes & {"events_event_id", "events_uid"}
    assert buckets == {0: 4095, 1: 906}  # seq >> 12


@pytest.mark.parametrize("query", ["kind=other", "limit=0", "limit=1001", "before=0",
                                   "before=x", "q=" + "a" * 1025])
def test_bad_search_parameters_are_a_400_naming_them(make_emulator, query):
    emu = make_emulator()
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"{emu.url}/_emulator/search?{query}", timeout=10)
    assert err.value.code == 400
    assert query.split("=")[0] in err.value.read().decode()
