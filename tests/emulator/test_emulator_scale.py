"""The console's reads over 100,000 stored events: filtered pages are answered from indexes,
newest first, exactly as a plain scan of the stored rows would select them; and (marked
``benchmark``, run with ``-m benchmark``) how long each read takes, printed next to the cost of
a ``/healthz`` call and of the old ``tail=50`` read measured in the same run."""

from __future__ import annotations

import time
import urllib.parse

import pytest
from emusupport import ACCOUNT, CHANNEL_ARN, get_json

from cloudtrail_sink.emulator.checker import wrap
from cloudtrail_sink.emulator.storage import EventRow, EventStore, Filters, RefusalRow

N = 100_000
SOURCES = [f"svc{i}.example.com" for i in range(20)]
NAMES = ["Login", "Logout", "Read", "Write", "Delete", "Share", "Rename"]
PRINCIPALS = [f"user{i}" for i in range(50)]


def _fields(i):
    return SOURCES[i % 20], NAMES[i % 7], PRINCIPALS[i % 50]


@pytest.fixture(scope="module")
def big_db(tmp_path_factory):
    """100,000 events (and 1,000 refusals) stored directly through the storage layer."""
    path = tmp_path_factory.mktemp("scale") / "big.sqlite"
    store = EventStore(path)
    try:
        for start in range(0, N, 5000):
            rows = []
            for i in range(start, start + 5000):
                source, name, principal = _fields(i)
                note = "needle" if i % 10_000 == 1234 else "hay"
                data = (f'{{"version":"1.0","UID":"uid-{i}","userIdentity":{{"type":"Custom",'
                        f'"principalId":"{principal}"}},"eventTime":"2026-11-01T00:00:00Z",'
                        f'"eventName":"{name}","eventSource":"{source}",'
                        f'"recipientAccountId":"{ACCOUNT}","additionalEventData":'
                        f'{{"note":"{note}"}}}}')
                ingested = f"2026-11-01T00:{i // 6000 % 60:02d}:{i // 100 % 60:02d}.000Z"
                rows.append(EventRow(f"id-{i}", CHANNEL_ARN, f"uid-{i}",
                                     wrap(f"id-{i}", CHANNEL_ARN, "us-east-1", ACCOUNT,
                                          "2026-11-01T00:00:00Z", ingested, data),
                                     source, name, principal, ingested))
            store.add(rows)
        store.add_refusals(RefusalRow("2026-11-01T00:00:00.000Z", "event", CHANNEL_ARN, "r",
                                      f"e{i}", "InvalidData", "bad", f"uid-r{i}", *_fields(i))
                           for i in range(1000))
    finally:
        store.close()
    return path


def _search(emu, **params):
    return get_json(f"{emu.url}/_emulator/search?" + urllib.parse.urlencode(params))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_filtered_pages_over_100k_events_are_exact_and_use_indexes(big_db, make_emulator):
    emu = make_emulator(db_path=big_db)
    assert get_json(f"{emu.url}/_emulator/summary")["stored"] == {
        "events": N, "refusals": {"InvalidData": 1000}}

    def expected(match, limit=50, before=N + 1):
        return [f"uid-{i}" for i in range(N - 1, -1, -1) if i + 1 < before and match(i)][:limit]

    page = _search(emu, eventSource="svc3.example.com", eventName="Read")
    assert [item["UID"] for item in page["items"]] == expected(
        lambda i: _fields(i)[:2] == ("svc3.example.com", "Read"))
    second = _search(emu, eventSource="svc3.example.com", eventName="Read", before=page["next"])
    assert [item["UID"] for item in second["items"]] == expected(
        lambda i: _fields(i)[:2] == ("svc3.example.com", "Read"), before=page["next"])
    assert [item["UID"] for item in _search(emu, principal="user7", limit=20)["items"]] == \
        expected(lambda i: i % 50 == 7, limit=20)
    rare = _search(emu, q="needle")  # free text scans everything: 10 matches, no next page
    assert [item["UID"] for item in rare["items"]] == expected(lambda i: i % 10_000 == 1234)
    assert rare["next"] is None
    refused = _search(emu, kind="refusals", eventName="Write", limit=5)
    assert [item["UID"] for item in refused["items"]] == [
        f"uid-r{i}" for i in range(999, -1, -1) if i % 7 == 3][:5]

    assert _search(emu, uid="uid-4321")["items"][0]["eventID"] == "id-4321"
    assert get_json(f"{emu.url}/_emulator/event?id=id-99999")["seq"] == N

    # The statements the store runs (as traced, values bound) are answered from indexes.
    store = EventStore(big_db)
    statements = []
    store._read.set_trace_callback(statements.append)
    try:
        for field in ("source", "name", "principal", "uid"):
            store.search_events(Filters(**{field: "x"}), 10, 50)
        store.event("id-5")
        assert len(statements) == 5
        for statement in statements:
            plan = " ".join(row[3] for row in store._read.execute(
                "EXPLAIN QUERY PLAN " + statement))
            assert "USING INDEX" in plan or "USING COVERING INDEX" in plan, (statement, plan)
    finally:
        store.close()


@pytest.mark.benchmark
@pytest.mark.timeout(300)
def test_benchmark_console_reads_over_100k_events(big_db, make_emulator, request):
    if "benchmark" not in (request.config.getoption("-m") or ""):
        pytest.skip("a benchmark: run with -m benchmark")
    emu = make_emulator(db_path=big_db)
    reads = {
        "baseline: GET /healthz": "/healthz",
        "baseline: old page read, events?tail=50": "/_emulator/events?tail=50",
        "newest 50": "/_emulator/search?limit=50",
        "eventSource": "/_emulator/search?eventSource=svc3.example.com",
        "eventSource+eventName": "/_emulator/search?eventSource=svc3.example.com&eventName=Read",
        "principal, page 100": "/_emulator/search?principal=user7&before=5000",
        "text, common (hay)": "/_emulator/search?q=hay",
        "text, rare (needle, full scan)": "/_emulator/search?q=needle",
        "refusals by code": "/_emulator/search?kind=refusals&errorCode=InvalidData",
        "event by id": "/_emulator/event?id=id-500",
        "UID": "/_emulator/search?uid=uid-500",
        "summary (counts)": "/_emulator/summary",
        "rates, 5 minutes": "/_emulator/rates?seconds=300",
    }
    print(f"\nconsole reads over {N} stored events (median of 7, ms):")
    for label, path in reads.items():
        times = []
        for _ in range(7):
            started = time.perf_counter()
            get_json(emu.url + path)
            times.append((time.perf_counter() - started) * 1000)
        print(f"  {label:42s} {sorted(times)[3]:8.2f}")
