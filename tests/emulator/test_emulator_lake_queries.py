"""CloudTrail Lake queries through boto3's ``cloudtrail`` client, against known stored events.

Events are stored with boto3 ``cloudtrail-data`` PutAuditEvents first; queries are written the
way code for the real service writes them: start, poll DescribeQuery, page GetQueryResults.
"""

from __future__ import annotations

import http.client
import json
import threading
import time

import boto3
import pytest
from botocore.exceptions import ClientError

from emusupport import (ACCOUNT, CHANNEL_ARN, KEY, NO_RETRIES, OTHER_ACCOUNT, SECRET, event_data,
                        get_json, signed_request)
from lakesupport import error_code, lake, page_query, run, store, store_id, wait_ended

# (UID, principal, eventName, eventTime)
KNOWN = [
    ("u1", "alice", "Login", "2024-01-01T10:00:00Z"),
    ("u2", "alice", "Login", "2024-01-02T09:30:00Z"),
    ("u3", "alice", "Logout", "2024-01-02T18:00:00Z"),
    ("u4", "bob", "Login", "2024-01-02T23:59:59Z"),
    ("u5", "bob", "Logout", "2024-01-03T00:00:00Z"),
    ("u6", "carol", "PutObject", "2024-01-04T12:00:00Z"),
]
CAROL_EXTRAS = {"requestParameters": {"bucket": "b1", "nested": {"x": [1, 2]}, "size": 3},
                "userIdentity": {"type": "CustomUserIdentity", "principalId": "carol",
                                 "details": {"team": "red"}}}


def known_event(uid, principal, name, when, **extra):
    data = event_data(uid=uid, eventName=name, eventTime=when,
                      userIdentity={"type": "CustomUserIdentity", "principalId": principal})
    data.update(extra)
    return data


@pytest.fixture
def known(make_emulator):
    """An emulator holding KNOWN, where u1 was sent twice (as a retried call would)."""
    emu = make_emulator()
    events = [known_event(*row, **(CAROL_EXTRAS if row[0] == "u6" else {})) for row in KNOWN]
    store(emu, events)
    store(emu, events[:1], prefix="again")
    return emu


def test_nested_fields_are_reached_with_dots(known):
    ct = lake(known)
    eds = store_id(ct)
    columns, rows = run(ct, f"""
        SELECT eventData.userIdentity.principalId, eventData.userIdentity.details['team'],
               eventData.requestParameters['bucket'] AS bucket,
               eventData.requestParameters['nested'] AS nested,
               element_at(eventData.requestParameters, 'size') AS size,
               eventCategory, eventType, awsRegion, recipientAccountId,
               metadata.channelArn, eventData.eventName
        FROM {eds} WHERE eventData.UID = 'u6'""")
    assert columns == ["principalId", "_col1", "bucket", "nested", "size", "eventCategory",
                       "eventType", "awsRegion", "recipientAccountId", "channelArn", "eventName"]
    assert rows == [["carol", "red", "b1", '{"x":[1,2]}', "3", "ActivityAuditLog", "ActivityLog",
                     "us-east-1", ACCOUNT, CHANNEL_ARN, "PutObject"]]


def test_top_level_columns_match_the_stored_events(known):
    ct = lake(known)
    eds = store_id(ct)
    stored = {e["eventID"]: e for e in known.events()}
    _, rows = run(ct, f"SELECT eventID, eventVersion, eventTime, metadata.ingestionTime, "
                      f"eventData.UID FROM {eds}")
    assert len(rows) == len(stored) == 7
    for event_id, version, event_time, ingested, uid in rows:
        event = stored[event_id]
        assert version == event["eventVersion"] and uid == event["eventData"]["UID"]
        assert event_time == event["eventTime"].replace("T", " ").replace("Z", ".000")
        assert ingested == event["metadata"]["ingestionTime"].replace("T", " ").rstrip("Z")


def test_group_by_having_counts_per_principal(known):
    ct = lake(known)
    eds = store_id(ct)
    _, rows = run(ct, f"""
        SELECT eventData.userIdentity.principalId AS principal, count(*) AS events,
               count(DISTINCT eventData.eventName) AS kinds
        FROM {eds} GROUP BY eventData.userIdentity.principalId HAVING count(*) > 1
        ORDER BY events DESC, principal""")
    assert rows == [["alice", "4", "2"], ["bob", "2", "2"]]


def test_time_range_on_event_time(known):
    ct = lake(known)
    eds = store_id(ct)
    _, rows = run(ct, f"""
        SELECT eventData.UID FROM {eds}
        WHERE eventTime >= '2024-01-02 00:00:00' AND eventTime < '2024-01-03 00:00:00'
        ORDER BY eventTime""")
    assert rows == [["u2"], ["u3"], ["u4"]]
    _, rows = run(ct, f"""
        SELECT eventData.UID FROM {eds}
        WHERE eventTime BETWEEN from_iso8601_timestamp('2024-01-02T23:59:59Z')
                            AND timestamp '2024-01-04 12:00:00'
        ORDER BY eventData.UID""")
    assert rows == [["u4"], ["u5"], ["u6"]]


def test_deduplication_on_uid_counts_a_resent_event_once(known):
    ct = lake(known)
    eds = store_id(ct)
    _, rows = run(ct, f"SELECT count(*), count(DISTINCT eventData.UID), count(*) / 2 FROM {eds}")
    assert rows == [["7", "6", "3"]]  # integers divide as in Trino
    # The docs' example: keep the first stored copy of each UID.
    _, rows = run(ct, f"""
        SELECT uid, principal FROM (
            SELECT eventData.UID AS uid, eventData.userIdentity.principalId AS principal,
                   row_number() OVER (PARTITION BY eventData.UID
                                      ORDER BY metadata.ingestionTime) AS copy
            FROM {eds})
        WHERE copy = 1 ORDER BY uid""")
    assert rows == [[uid, principal] for uid, principal, _, _ in KNOWN]


def test_get_query_results_pages_with_next_token(make_emulator):
    emu = make_emulator()
    store(emu, [event_data(uid=f"p{i:02d}") for i in range(25)])
    ct = lake(emu)
    eds = store_id(ct)
    query_id = ct.start_query(
        QueryStatement=f"SELECT eventData.UID FROM {eds} ORDER BY eventData.UID")["QueryId"]
    assert wait_ended(ct, query_id)["QueryStatus"] == "FINISHED"
    pages, token = [], None
    while True:
        page = ct.get_query_results(QueryId=query_id, MaxQueryResults=10,
                                    **({"NextToken": token} if token else {}))
        pages.append([row[0]["UID"] for row in page["QueryResultRows"]])
        assert page["QueryStatistics"]["TotalResultsCount"] == 25
        assert page["QueryStatistics"]["ResultsCount"] == len(pages[-1])
        token = page.get("NextToken")
        if token is None:
            break
    assert [len(p) for p in pages] == [10, 10, 5]
    assert sum(pages, []) == [f"p{i:02d}" for i in range(25)]
    with pytest.raises(ClientError) as bad:
        ct.get_query_results(QueryId=query_id, NextToken="not-a-token")
    assert error_code(bad) == "InvalidNextTokenException"
    with pytest.raises(ClientError) as unknown:
        ct.get_query_results(QueryId="00000000-0000-0000-0000-000000000000")
    assert error_code(unknown) == "QueryIdNotFoundException"


def test_cancel_query(known):
    ct = lake(known)
    eds = store_id(ct)
    with known.lake.queries.hold():  # keeps it QUEUED, as on a busy service
        query_id = ct.start_query(QueryStatement=f"SELECT eventID FROM {eds}")["QueryId"]
        assert ct.describe_query(QueryId=query_id)["QueryStatus"] == "QUEUED"
        answer = ct.cancel_query(QueryId=query_id)
        assert (answer["QueryId"], answer["QueryStatus"]) == (query_id, "CANCELLED")
    assert ct.describe_query(QueryId=query_id)["QueryStatus"] == "CANCELLED"
    results = ct.get_query_results(QueryId=query_id)
    assert results["QueryStatus"] == "CANCELLED" and results["QueryResultRows"] == []
    with pytest.raises(ClientError) as again:
        ct.cancel_query(QueryId=query_id)
    assert error_code(again) == "InactiveQueryException"
    done = ct.start_query(QueryStatement=f"SELECT eventID FROM {eds}")["QueryId"]
    wait_ended(ct, done)
    with pytest.raises(ClientError) as finished:
        ct.cancel_query(QueryId=done)
    assert error_code(finished) == "InactiveQueryException"


HEAVY = ("SELECT count(*) FROM {eds} CROSS JOIN UNNEST(sequence(1, 20000)) AS a(x) "
         "CROSS JOIN UNNEST(sequence(1, 20000)) AS b(y) WHERE (x * y) % 7 = 3")


def test_running_query_is_cancelled_and_a_long_one_times_out(known, make_emulator):
    ct = lake(known)
    eds = store_id(ct)
    query_id = ct.start_query(QueryStatement=HEAVY.format(eds=eds))["QueryId"]
    deadline = time.monotonic() + 10
    while ct.describe_query(QueryId=query_id)["QueryStatus"] == "QUEUED":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert ct.cancel_query(QueryId=query_id)["QueryStatus"] == "CANCELLED"
    assert wait_ended(ct, query_id, timeout=10)["QueryStatus"] == "CANCELLED"

    quick = make_emulator(query_timeout=0.3)
    store(quick, [event_data(uid="t1")])
    ct = lake(quick)
    query_id = ct.start_query(QueryStatement=HEAVY.format(eds=store_id(ct)))["QueryId"]
    described = wait_ended(ct, query_id, timeout=10)
    assert described["QueryStatus"] == "TIMED_OUT"
    assert "0.3 s" in described["ErrorMessage"]


def test_event_data_stores_are_listed_and_described(known):
    ct = lake(known)
    [listed] = ct.list_event_data_stores()["EventDataStores"]
    arn = listed["EventDataStoreArn"]
    assert arn.startswith(f"arn:aws:cloudtrail:us-east-1:{ACCOUNT}:eventdatastore/")
    by_arn = ct.get_event_data_store(EventDataStore=arn)
    by_id = ct.get_event_data_store(EventDataStore=arn.rsplit("/", 1)[1])
    for described in (by_arn, by_id):
        assert described["EventDataStoreArn"] == arn
        assert described["Name"] == listed["Name"] and described["Status"] == "ENABLED"
    with pytest.raises(ClientError) as missing:
        ct.get_event_data_store(EventDataStore="11111111-2222-3333-4444-555555555555")
    assert error_code(missing) == "EventDataStoreNotFoundException"
    with pytest.raises(ClientError) as invalid:
        ct.get_event_data_store(EventDataStore="not-a-store")
    assert error_code(invalid) == "EventDataStoreARNInvalidException"
    # Regional, as the service: nothing in another region.
    assert lake(known, "eu-west-1").list_event_data_stores()["EventDataStores"] == []


def test_channels_are_listed_and_name_their_store(known):
    ct = lake(known)
    store_arn = ct.list_event_data_stores()["EventDataStores"][0]["EventDataStoreArn"]
    assert [c["ChannelArn"] for c in ct.list_channels()["Channels"]] == [CHANNEL_ARN]
    channel = ct.get_channel(Channel=CHANNEL_ARN)
    assert channel["Destinations"] == [{"Type": "EVENT_DATA_STORE", "Location": store_arn}]
    assert channel["IngestionStatus"]["LatestIngestionSuccessEventID"] == \
        known.events()[-1]["eventID"]
    assert ct.get_channel(Channel=CHANNEL_ARN.rsplit("/", 1)[1])["ChannelArn"] == CHANNEL_ARN
    with pytest.raises(ClientError) as missing:
        ct.get_channel(Channel=CHANNEL_ARN.replace("0b9a1c0e", "1b9a1c0e"))
    assert error_code(missing) == "ChannelNotFoundException"
    with pytest.raises(ClientError) as invalid:
        ct.get_channel(Channel="arn:aws:cloudtrail:us-east-1:123:nope")
    assert error_code(invalid) == "ChannelARNInvalidException"


@pytest.mark.parametrize("sql, named", [
    ("SELECT eventID FROM {eds} MATCH_RECOGNIZE (PARTITION BY eventID ORDER BY eventTime "
     "MEASURES A.eventID AS m PATTERN (A) DEFINE A AS true)", "MATCH_RECOGNIZE"),
    ("SELECT format_datetime(eventTime, 'yyyy') FROM {eds}", "format_datetime"),
    ("SELECT * FROM read_csv('/etc/passwd')", "read_csv"),
    ("SELECT * FROM information_schema.tables", "information_schema.tables"),
    ("SELECT eventData.noSuchField FROM {eds}", "noSuchField"),
    ("SELECT 1", "FROM"),
    ("SELECT eventID FROM {eds} ORDER BY eventTime FETCH FIRST 1 ROWS WITH TIES", "WITH TIES"),
])
def test_unsupported_query_is_invalid_query_statement(known, sql, named):
    ct = lake(known)
    with pytest.raises(ClientError) as refused:
        ct.start_query(QueryStatement=sql.format(eds=store_id(ct)))
    assert error_code(refused) == "InvalidQueryStatementException"
    assert refused.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400
    assert named.lower() in refused.value.response["Error"]["Message"].lower()


@pytest.mark.parametrize("sql", [
    "DELETE FROM {eds}", "INSERT INTO {eds} VALUES (1)", "DROP TABLE {eds}",
    "CREATE TABLE x AS SELECT * FROM {eds}", "SET memory_limit = '1GB'",
    "SELECT * INTO x FROM {eds}", "SELECT 1 FROM {eds}; DELETE FROM {eds}",
])
def test_only_select_is_allowed(known, sql):
    ct = lake(known)
    with pytest.raises(ClientError) as refused:
        ct.start_query(QueryStatement=sql.format(eds=store_id(ct)))
    assert error_code(refused) == "InvalidQueryStatementException"
    assert len(run(ct, f"SELECT eventID FROM {store_id(ct)}")[1]) == 7  # nothing changed


def test_unknown_store_in_from(known):
    ct = lake(known)
    with pytest.raises(ClientError) as missing:
        ct.start_query(QueryStatement="SELECT eventID FROM 11111111-2222-3333-4444-555555555555")
    assert error_code(missing) == "EventDataStoreNotFoundException"


def test_queries_are_regional_and_signed_for_cloudtrail(known):
    ct = lake(known)
    query_id = ct.start_query(QueryStatement=f"SELECT eventID FROM {store_id(ct)}")["QueryId"]
    with pytest.raises(ClientError) as elsewhere:
        lake(known, "eu-west-1").describe_query(QueryId=query_id)
    assert error_code(elsewhere) == "QueryIdNotFoundException"
    status, headers, body = signed_request(
        known, b"{}", query="", path="/", service="cloudtrail-data",
        headers={"X-Amz-Target": "com.amazonaws.cloudtrail.v20131101.CloudTrail_20131101."
                                 "ListEventDataStores",
                 "Content-Type": "application/x-amz-json-1.1"})
    assert (status, headers["x-amzn-ErrorType"]) == (403, "InvalidSignatureException")


def test_page_query_endpoint_gives_the_api_rows(known):
    ct = lake(known)
    sql = (f"SELECT eventData.userIdentity.principalId, count(*) AS n, min(eventTime) "
           f"FROM {store_id(ct)} GROUP BY 1 ORDER BY 1")
    columns, rows = run(ct, sql)
    status, answer = page_query(known, json.dumps({"sql": sql}).encode())
    assert status == 200
    assert answer["status"] == "FINISHED" and answer["error"] is None
    assert (answer["columns"], answer["rows"]) == (columns, rows)
    assert ct.describe_query(QueryId=answer["queryId"])["QueryStatus"] == "FINISHED"

    status, refused = page_query(known, json.dumps({"sql": "DELETE FROM x"}).encode())
    assert status == 200 and refused["status"] == "FAILED" and refused["rows"] == []
    assert refused["error"]["code"] == "InvalidQueryStatementException"
    status, bad = page_query(known, b"not json")
    assert status == 400 and bad["error"]["code"] == "SerializationException"


def test_the_page_lists_the_stores_list_event_data_stores_shows_in_every_region(make_emulator):
    other = CHANNEL_ARN.replace("us-east-1", "eu-west-1").replace(ACCOUNT, OTHER_ACCOUNT)
    emu = make_emulator(channels=None)
    assert get_json(f"{emu.url}/_emulator/stores") == {"stores": []}
    store(emu, [event_data(uid="open-1")])  # open mode: a store appears with its first event
    assert get_json(f"{emu.url}/_emulator/stores")["stores"] == [{
        "id": store_id(lake(emu)), "arn": lake(emu).list_event_data_stores()[
            "EventDataStores"][0]["EventDataStoreArn"],
        "name": f"emulator-{ACCOUNT}-us-east-1", "region": "us-east-1", "account": ACCOUNT}]

    emu = make_emulator(channels={CHANNEL_ARN: None, other: None})
    listed = get_json(f"{emu.url}/_emulator/stores")["stores"]
    from_boto3 = [s for region in ("eu-west-1", "us-east-1")
                  for s in lake(emu, region).list_event_data_stores()["EventDataStores"]]
    assert [(s["arn"], s["name"]) for s in listed] == [
        (s["EventDataStoreArn"], s["Name"]) for s in from_boto3]
    assert [(s["region"], s["account"]) for s in listed] == [("eu-west-1", OTHER_ACCOUNT),
                                                              ("us-east-1", ACCOUNT)]
    for s in listed:  # the id is what FROM takes, in its own region
        assert s["arn"].endswith("/" + s["id"])
        _, rows = run(lake(emu, s["region"]), f"SELECT count(*) FROM {s['id']}")
        assert rows == [["0"]]


def test_open_mode_finds_channels_and_stores_from_stored_events(make_emulator):
    emu = make_emulator(channels=None)
    ct = lake(emu)
    assert ct.list_event_data_stores()["EventDataStores"] == []
    assert ct.list_channels()["Channels"] == []
    store(emu, [event_data(uid="open-1")])
    assert [c["ChannelArn"] for c in ct.list_channels()["Channels"]] == [CHANNEL_ARN]
    assert run(ct, f"SELECT eventData.UID FROM {store_id(ct)}")[1] == [["open-1"]]


def test_limits_keep_a_hostile_query_from_hurting_the_emulator(known):
    ct = lake(known)
    eds = store_id(ct)
    query_id = ct.start_query(QueryStatement=f"SELECT x FROM {eds} CROSS JOIN "
                                             f"UNNEST(sequence(1, 20000)) AS t(x)")["QueryId"]
    described = wait_ended(ct, query_id)  # 7 events x 20,000 = 140,000 rows
    assert described["QueryStatus"] == "FAILED"
    assert "more than 100000 rows" in described["ErrorMessage"]
    with known.lake.queries.hold():
        held = [ct.start_query(QueryStatement=f"SELECT eventID FROM {eds}")["QueryId"]
                for _ in range(10)]
        with pytest.raises(ClientError) as busy:
            ct.start_query(QueryStatement=f"SELECT eventID FROM {eds}")
        assert error_code(busy) == "MaxConcurrentQueriesException"
    assert {wait_ended(ct, query_id)["QueryStatus"] for query_id in held} == {"FINISHED"}
    assert len(run(ct, f"SELECT eventID FROM {eds}")[1]) == 7


def test_control_plane_calls_the_emulator_lacks_are_unknown_operations(known):
    with pytest.raises(ClientError) as unknown:
        lake(known).create_event_data_store(Name="mine")
    assert error_code(unknown) == "UnknownOperationException"


def test_signatures_are_verified_for_the_cloudtrail_service(make_emulator):
    emu = make_emulator(credentials=(KEY, SECRET))
    store(emu, [event_data(uid="signed-1")])
    ct = lake(emu)
    assert run(ct, f"SELECT eventData.UID FROM {store_id(ct)}")[1] == [["signed-1"]]
    forged = boto3.client("cloudtrail", endpoint_url=emu.url, region_name="us-east-1",
                          config=NO_RETRIES, aws_access_key_id=KEY,
                          aws_secret_access_key="not-the-secret")
    with pytest.raises(ClientError) as refused:
        forged.list_event_data_stores()
    assert error_code(refused) == "InvalidSignatureException"


def test_stop_ends_a_query_a_page_request_waits_for(make_emulator):
    emu = make_emulator()
    store(emu, [event_data(uid="s1")])
    eds = store_id(lake(emu))
    answers = []

    def request():
        try:
            answers.append(page_query(emu, json.dumps({"sql": HEAVY.format(eds=eds)}).encode()))
        except (OSError, http.client.HTTPException):
            answers.append(None)  # the connection was closed before the answer: also an end

    waiter = threading.Thread(target=request, name="page-request")
    waiter.start()
    deadline = time.monotonic() + 10
    while emu.lake.queries.active() == 0:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    started = time.monotonic()
    emu.stop()
    waiter.join(10)
    assert time.monotonic() - started < 5  # not the query's 30 s limit
    assert not waiter.is_alive()
    assert answers == [None] or answers[0][1]["status"] == "FAILED"
