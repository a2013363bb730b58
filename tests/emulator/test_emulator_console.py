"""The console page at ``/`` in headless Chromium (driven over the DevTools pipe, see
``browser.py``): refused events show their code and UID, a selected event its full JSON (also
from a link), the filters list exactly what the JSON API returns, the query box renders what
``POST /_emulator/query`` answers (and, typed into the box, real SQL shows exactly what boto3's
``cloudtrail`` client gets for it; the store id it needs is listed above it, and the example it
is pre-filled with runs as is), and the counters show what is stored next to what came since
start. Each test keeps screenshots in its tmp_path (the path is printed)."""

from __future__ import annotations

import json
import os
import shutil
import urllib.parse

import pytest
from botocore.exceptions import ClientError
from browser import Browser
from emusupport import ACCOUNT, CHANNEL_ARN, audit_event, batch, client, event_data, get_json
from lakesupport import lake, run, store, store_id
from test_emulator_lake_queries import KNOWN, known_event

from cloudtrail_sink.emulator import server as emulator_server

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if CHROMIUM is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is not installed (tests/run installs Debian's chromium as root)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    b = Browser(CHROMIUM, tmp_path_factory.mktemp("chromium-profile"))
    try:
        yield b
    finally:
        b.close()


def _rows(browser, kind="event"):
    return browser.js(f"[...document.querySelectorAll('#list tr.{kind}')].map(r => "
                      "[...r.children].map(td => td.textContent))")


def _uids(browser, kind="event"):
    return browser.js(f"[...document.querySelectorAll('#list tr.{kind}')].map(r => r.dataset.uid)")


def _search(emu, **params):
    return get_json(f"{emu.url}/_emulator/search?" + urllib.parse.urlencode(params))["items"]


def test_a_refused_event_shows_its_code_message_and_uid(make_emulator, browser, tmp_path):
    emu = make_emulator()
    bad = audit_event("bad1", data=event_data(uid="uid-refused-1", sourceIPAddress="not-an-ip"))
    answer = client(emu).put_audit_events(channelArn=CHANNEL_ARN,
                                          auditEvents=[audit_event("ok1"), bad])
    [failed] = answer["failed"]
    browser.goto(f"{emu.url}/#tab=refusals")
    browser.wait_for("document.querySelectorAll('#list tr.refusal').length === 1")
    [row] = _rows(browser, "refusal")
    time, code, message, uid, entry_id = row[:5]
    assert (code, message, uid, entry_id) == (failed["errorCode"], failed["errorMessage"],
                                              "uid-refused-1", "bad1")
    assert time.startswith("20") and time.endswith("Z")
    browser.js("document.querySelector('#list tr.refusal').click()")
    detail = json.loads(browser.wait_for(
        "!document.getElementById('detail').hidden && "
        "document.getElementById('detail-json').textContent"))
    assert detail["eventData"] == json.loads(bad["eventData"])  # what was sent, to fix it
    assert browser.js("location.hash").startswith("#tab=refusals&refusal=")
    assert browser.js("document.getElementById('stored-refusals').textContent") == "1"
    browser.screenshot(tmp_path / "refused-event.png")


def test_a_selected_event_shows_its_full_json_and_its_link_opens_it(make_emulator, browser,
                                                                   tmp_path):
    emu = make_emulator()
    client(emu).put_audit_events(channelArn=CHANNEL_ARN, auditEvents=batch(3, "sel"))
    stored = {e["eventData"]["UID"]: e for e in emu.events()}
    browser.goto(f"{emu.url}/")
    browser.wait_for("document.querySelectorAll('#list tr.event').length === 3")
    browser.js("document.querySelector('#list tr.event[data-uid=\"uid-sel1\"]').click()")
    shown = json.loads(browser.wait_for(
        "!document.getElementById('detail').hidden && "
        "document.getElementById('detail-json').textContent"))
    assert shown == stored["uid-sel1"]  # the whole wrapped event, metadata included
    link = browser.js("location.href")
    assert link.endswith("#event=" + stored["uid-sel1"]["eventID"])
    browser.screenshot(tmp_path / "selected-event.png")

    browser.goto(f"{emu.url}/?fresh#event=" + stored["uid-sel2"]["eventID"])  # a link, opened
    shown = json.loads(browser.wait_for(
        "!document.getElementById('detail').hidden && "
        "document.getElementById('detail-json').textContent"))
    assert shown == stored["uid-sel2"]
    browser.wait_for("document.querySelector('#list tr.selected')?.dataset.uid === 'uid-sel2'")
    browser.screenshot(tmp_path / "linked-event.png")


def _varied(n):
    sources = ["auth.example.com", "billing.example.com", "files.example.com"]
    names = ["Login", "Logout", "Upload", "Charge"]
    principals = ["alice", "bob", "carol"]
    events = []
    for i in range(n):
        data = event_data(uid=f"uid-v{i}", eventSource=sources[i % 3], eventName=names[i % 4],
                          userIdentity={"type": "CustomUserIdentity",
                                        "principalId": principals[i % 5 % 3]},
                          requestParameters={"note": "needle" if i % 7 == 0 else "hay"})
        events.append(audit_event(f"v{i}", data=data))
    return events


def _apply_filters(browser, **values):
    fields = {"eventSource": "", "eventName": "", "principal": "", "errorCode": "", "q": ""}
    fields.update(values)
    browser.js("(() => { const f = document.getElementById('filters');"
               + "".join(f"f.elements[{json.dumps(k)}].value = {json.dumps(v)};"
                         for k, v in fields.items())
               + "document.getElementById('apply').click(); })()")


def test_the_filters_list_what_the_api_returns(make_emulator, browser, tmp_path):
    emu = make_emulator()
    c = client(emu)
    events = _varied(120)
    for start in range(0, len(events), 60):
        c.put_audit_events(channelArn=CHANNEL_ARN, auditEvents=events[start:start + 60])
    browser.goto(f"{emu.url}/")
    browser.wait_for("document.querySelectorAll('#list tr.event').length === 50")
    cases = [
        {"eventSource": "billing.example.com"},
        {"eventSource": "auth.example.com", "eventName": "Login"},
        {"principal": "bob"},
        {"q": "needle"},
        {"eventName": "Upload", "principal": "carol", "q": "hay"},
        {"eventSource": "nowhere.example.com"},
    ]
    for case in cases:
        expected = [item["UID"] for item in _search(emu, kind="events", limit=50, **case)]
        _apply_filters(browser, **case)
        as_js = json.dumps(json.dumps(expected, separators=(",", ":")))
        browser.wait_for(f"JSON.stringify([...document.querySelectorAll('#list tr.event')]"
                         f".map(r => r.dataset.uid)) === {as_js}")
        assert browser.js("location.hash").startswith("#")  # the view is linkable
        assert len(expected) == len({u for u in expected})
    # the API's filter is right, not only the page's copy of it
    principal_of = {f"uid-v{i}": ["alice", "bob", "carol"][i % 5 % 3] for i in range(120)}
    assert {principal_of[u] for u in _uids(browser)} <= {"carol"}
    browser.screenshot(tmp_path / "filtered.png")

    # Paging: the second page of an unfiltered list is what the API's next cursor gives.
    _apply_filters(browser)
    browser.wait_for("document.querySelectorAll('#list tr.event').length === 50")
    first = get_json(f"{emu.url}/_emulator/search?kind=events&limit=50")
    second = _search(emu, kind="events", limit=50, before=first["next"])
    browser.js("document.getElementById('older').click()")
    browser.wait_for(f"document.querySelector('#list tr.event')?.dataset.uid === "
                     f"{json.dumps(second[0]['UID'])}")
    assert _uids(browser) == [item["UID"] for item in second]
    browser.screenshot(tmp_path / "second-page.png")


def test_the_query_box_renders_what_the_query_endpoint_answers(make_emulator, browser, tmp_path,
                                                                monkeypatch):
    asked = []

    def stand_in(handler, query, body):  # only the JSON contract of POST /_emulator/query
        sql = json.loads(body)["sql"]
        asked.append(sql)
        if "bad" in sql:
            return handler._json(200, {"queryId": "q-2", "status": "FAILED", "columns": [],
                                       "rows": [], "error": {
                                           "code": "InvalidQueryStatementException",
                                           "message": "bad is not supported"}})
        handler._json(200, {"queryId": "q-1", "status": "FINISHED",
                            "columns": ["principal", "n"],
                            "rows": [["alice", "2"], ["bob", "1"], [None, "0"]], "error": None})

    monkeypatch.setitem(emulator_server.ROUTES, ("POST", "/_emulator/query"),
                        emulator_server.Route(stand_in))
    emu = make_emulator()
    browser.goto(f"{emu.url}/")
    sql = "SELECT eventData.userIdentity.principalId, count(*) FROM x GROUP BY 1"
    browser.js(f"document.getElementById('sql').value = {json.dumps(sql)};"
               "document.getElementById('run-query').click()")
    cells = browser.wait_for("document.getElementById('query-table') && "
                             "[...document.querySelectorAll('#query-table tr')].map(r => "
                             "[...r.children].map(c => c.textContent))")
    assert cells == [["principal", "n"], ["alice", "2"], ["bob", "1"], ["", "0"]]
    assert asked == [sql]
    browser.screenshot(tmp_path / "query-finished.png")

    browser.js("document.getElementById('sql').value = 'SELECT bad';"
               "document.getElementById('run-query').click()")
    error = browser.wait_for("document.getElementById('query-error')?.textContent")
    assert error == "InvalidQueryStatementException: bad is not supported"
    browser.screenshot(tmp_path / "query-failed.png")


# What the page shows for a query: the error line, or the result table's cells.
QUERY_SHOWN = ("document.getElementById('query-error')?.textContent || "
               "(document.getElementById('query-table') && "
               "[...document.querySelectorAll('#query-table tr')].map(r => "
               "[...r.children].map(c => c.textContent)))")


def _type_query(browser, sql: str):
    """Type SQL into the query box as a person does (focus, then text input), run it, and
    return what the page shows: the result table's cells, or the error line."""
    browser.js("{document.getElementById('query-result').replaceChildren();"
               "const box = document.getElementById('sql'); box.value = ''; box.focus()}")
    browser.call("Input.insertText", {"text": sql}, session=True)
    assert browser.js("document.getElementById('sql').value") == sql
    browser.js("document.getElementById('run-query').click()")
    return browser.wait_for(QUERY_SHOWN)


def test_the_query_box_shows_what_the_cloudtrail_api_returns(make_emulator, browser, tmp_path):
    emu = make_emulator()
    events = [known_event(*row) for row in KNOWN]
    store(emu, events)
    store(emu, events[:1], prefix="again")  # u1 re-sent, as a retried call would
    ct = lake(emu)
    eds = store_id(ct)
    browser.goto(f"{emu.url}/")
    per_principal = (
        "SELECT eventData.userIdentity.principalId AS principal, count(*) AS stored,\n"
        "       count(DISTINCT eventData.UID) AS events\n"
        f"FROM {eds} GROUP BY 1 HAVING count(*) > 1 ORDER BY events DESC, principal")
    dedup = (
        "SELECT eventData.UID, eventData.eventName, eventTime FROM (\n"
        "    SELECT *, row_number() OVER (PARTITION BY eventData.UID\n"
        "                                 ORDER BY metadata.ingestionTime) AS copy\n"
        f"    FROM {eds})\nWHERE copy = 1 ORDER BY eventTime")
    for name, sql in (("per-principal", per_principal), ("dedup-on-uid", dedup)):
        columns, rows = run(ct, sql)  # start, poll, page through GetQueryResults
        shown = _type_query(browser, sql)
        assert shown == [columns, *rows], name
        browser.screenshot(tmp_path / f"query-{name}.png")
        if name == "per-principal":
            assert rows == [["alice", "4", "3"], ["bob", "2", "2"]]
        else:
            assert [row[0] for row in rows] == [uid for uid, *_ in KNOWN]

    # DuckDB has no WITH TIES: the emulator refuses it rather than drop the ties.
    unsupported = (f"SELECT eventData.UID FROM {eds} ORDER BY eventData.eventName "
                   "FETCH FIRST 2 ROWS WITH TIES")
    try:
        ct.start_query(QueryStatement=unsupported)
    except ClientError as exc:
        error = exc.response["Error"]
    else:
        raise AssertionError("StartQuery took FETCH ... WITH TIES")
    assert error["Code"] == "InvalidQueryStatementException"
    assert _type_query(browser, unsupported) == (
        f"InvalidQueryStatementException: {error['Message']}")
    assert browser.js("document.getElementById('query-status').textContent") == "FAILED"
    browser.screenshot(tmp_path / "query-unsupported.png")


def test_counters_show_what_is_stored_after_a_restart(make_emulator, browser, tmp_path):
    first = make_emulator()
    c = client(first)
    c.put_audit_events(channelArn=CHANNEL_ARN, auditEvents=batch(8, "kept"))
    c.put_audit_events(channelArn=CHANNEL_ARN, auditEvents=[
        audit_event("r1", data=event_data(uid="uid-r1", eventTime="yesterday"))])
    first.stop()
    again = make_emulator(db_path=first.db_path)
    browser.goto(f"{again.url}/")
    browser.wait_for("document.getElementById('stored-events').textContent === '8'")
    text = {i: browser.js(f"document.getElementById('{i}').textContent") for i in (
        "stored-events", "stored-refusals", "stored-refusals-by-code", "accepted", "requests")}
    assert text == {"stored-events": "8", "stored-refusals": "1",
                    "stored-refusals-by-code": "InvalidData: 1", "accepted": "0",
                    "requests": "0"}
    # the chart counts what was stored in its window, refusals too
    browser.wait_for("document.getElementById('chart').dataset.events === '8'")
    assert browser.js("document.getElementById('chart').dataset.refusals") == "1"
    assert browser.js("document.getElementById('line-events').getAttribute('points')"
                      ).count(",") == 300
    browser.screenshot(tmp_path / "after-restart.png")


def test_the_page_names_the_store_and_its_prefilled_example_runs(make_emulator, browser,
                                                                  tmp_path):
    emu = make_emulator(channels=None)  # open mode: the store appears with the first event
    browser.goto(f"{emu.url}/")
    browser.wait_for("document.body.dataset.refreshes >= '1'")
    assert browser.js("document.querySelectorAll('#stores button.store').length") == 0
    assert browser.js("document.getElementById('sql').value") == ""

    store(emu, [known_event(*row) for row in KNOWN])  # while the page is open
    ct = lake(emu)
    eds = store_id(ct)
    shown = browser.wait_for("document.querySelector('#stores button.store')?.textContent")
    assert shown == eds
    assert browser.js("document.getElementById('stores').textContent") == (
        f"Event data store: {eds} (us-east-1, account {ACCOUNT})")
    example = browser.js("document.getElementById('sql').value")
    assert f"FROM {eds} " in example
    browser.js("document.getElementById('run-query').click()")  # nothing typed
    cells = browser.wait_for(QUERY_SHOWN)
    columns, rows = run(ct, example)
    assert cells == [columns, *rows]
    assert rows == [["Login", "3"], ["Logout", "2"], ["PutObject", "1"]]
    browser.screenshot(tmp_path / "store-and-example.png")

    # A click on the id puts it where the cursor is, as typed text would go.
    browser.js("{const box = document.getElementById('sql'); box.focus();"
               "box.value = 'SELECT count(*) FROM  WHERE true'; box.setSelectionRange(21, 21)}")
    browser.js("document.querySelector('#stores button.store').click()")
    assert browser.js("document.getElementById('sql').value") == (
        f"SELECT count(*) FROM {eds} WHERE true")
