"""Inspection endpoints: paging through stored events, stats, health, the live page's data."""

from __future__ import annotations

import threading
import urllib.error
import urllib.request

import pytest
from emusupport import CHANNEL_ARN, audit_event, batch, client, get_json


def _wait_until_parked(emu):
    """Wait until a long-polling reader is blocked inside the emulator."""
    import time

    deadline = time.monotonic() + 10
    while not emu._store._changed._waiters:
        assert time.monotonic() < deadline, "the long poll never parked"
        time.sleep(0.01)


def _send(emu, n, prefix):
    client(emu).put_audit_events(channelArn=CHANNEL_ARN, auditEvents=batch(n, prefix))


def test_events_page_with_limit_and_after_cursor(make_emulator):
    emu = make_emulator(quota_per_second=0)
    c = client(emu)
    for k in range(5):
        c.put_audit_events(channelArn=CHANNEL_ARN, auditEvents=batch(100, f"p{k}-"))
    expected = [f"uid-p{k}-{i}" for k in range(5) for i in range(100)]

    seen, cursor, pages = [], 0, 0
    while True:
        page = get_json(f"{emu.url}/_emulator/events?limit=64&after={cursor}")
        if not page["events"]:
            assert page["next"] == cursor  # polling an idle cursor keeps it
            break
        assert len(page["events"]) <= 64
        seen += [e["eventData"]["UID"] for e in page["events"]]
        cursor, pages = page["next"], pages + 1
    assert seen == expected  # every event once, oldest first
    assert pages == 8

    # The Python API pages the same way.
    first = emu.events(limit=3)
    assert [e["eventData"]["UID"] for e in first] == expected[:3]
    assert [e["eventData"]["UID"] for e in emu.events(limit=2, after=3)] == expected[3:5]
    assert len(emu.events()) == 500


def test_events_default_limit_and_tail(make_emulator):
    emu = make_emulator(quota_per_second=0)
    for k in range(11):
        _send(emu, 100, f"t{k}-")
    page = get_json(f"{emu.url}/_emulator/events")
    assert len(page["events"]) == 1000 and page["next"] == 1000
    tail = get_json(f"{emu.url}/_emulator/events?tail=3")
    assert [e["eventData"]["UID"] for e in tail["events"]] == [
        "uid-t10-97", "uid-t10-98", "uid-t10-99"]
    assert tail["next"] == 1100


@pytest.mark.parametrize("query", ["limit=0", "limit=10001", "after=-1", "limit=abc", "wait=99"])
def test_bad_paging_parameters_are_refused(make_emulator, query):
    emu = make_emulator()
    with pytest.raises(urllib.error.HTTPError) as excinfo:
        get_json(f"{emu.url}/_emulator/events?{query}")
    assert excinfo.value.code == 400
    assert excinfo.value.headers["x-amzn-ErrorType"] == "ValidationException"


def test_wait_returns_as_soon_as_a_new_event_is_stored(make_emulator):
    emu = make_emulator()
    _send(emu, 1, "w")
    result = {}

    def long_poll():
        result["page"] = get_json(f"{emu.url}/_emulator/events?after=1&wait=20")

    poller = threading.Thread(target=long_poll)
    poller.start()
    try:
        _wait_until_parked(emu)  # nothing but a new event wakes it before 20 s
        _send(emu, 1, "x")
    finally:
        poller.join(timeout=15)
    assert not poller.is_alive()
    assert [e["eventData"]["UID"] for e in result["page"]["events"]] == ["uid-x0"]


def test_stop_wakes_a_waiting_reader(make_emulator):
    emu = make_emulator()
    errors = []

    def long_poll():
        try:
            get_json(f"{emu.url}/_emulator/events?after=0&wait=25")
        except Exception as exc:  # the answer or a closed connection are both fine
            errors.append(exc)

    poller = threading.Thread(target=long_poll)
    poller.start()
    _wait_until_parked(emu)
    emu.stop()
    poller.join(timeout=10)
    assert not poller.is_alive()


def test_stats_count_events_and_requests_by_outcome(make_emulator):
    emu = make_emulator()
    c = client(emu)
    c.put_audit_events(channelArn=CHANNEL_ARN, auditEvents=batch(3))
    c.put_audit_events(channelArn=CHANNEL_ARN, auditEvents=[
        audit_event("ok"), audit_event("bad", data="[]"), audit_event("worse", data="{")])
    with pytest.raises(c.exceptions.ChannelNotFound):
        c.put_audit_events(channelArn=CHANNEL_ARN.replace("0b9a", "ffff"), auditEvents=batch(1))
    expected = {"accepted": 4, "failed": {"InvalidData": 2},
                "requests": {"ok": 1, "partial": 1, "ChannelNotFound": 1}}
    assert emu.stats() == expected
    assert get_json(f"{emu.url}/_emulator/stats") == expected


def test_healthz_and_page(make_emulator):
    emu = make_emulator()
    assert get_json(f"{emu.url}/healthz") == {"status": "ok"}
    with urllib.request.urlopen(f"{emu.url}/", timeout=10) as resp:
        assert resp.headers["Content-Type"].startswith("text/html")
        html = resp.read().decode()
    assert "/_emulator/search" in html and "/_emulator/summary" in html
