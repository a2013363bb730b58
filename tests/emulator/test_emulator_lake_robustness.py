"""Arbitrary SQL text never crashes the emulator: every answer is a result or the service's error.

The text goes through boto3's ``cloudtrail`` StartQuery (then DescribeQuery until it ends) and
through the page's ``POST /_emulator/query``; neither may answer 500 or hang, and the emulator
keeps answering afterwards.
"""

from __future__ import annotations

import json
import time

import pytest
from botocore.exceptions import ClientError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from emusupport import event_data
from lakesupport import lake, page_query, run, store, store_id

SERVICE_CODES = {"InvalidQueryStatementException", "EventDataStoreNotFoundException",
                 "InvalidParameterException", "MaxConcurrentQueriesException"}
ENDED = {"FINISHED", "FAILED", "TIMED_OUT", "CANCELLED"}
FRAGMENTS = [
    "SELECT", "*", "eventID", "eventData.UID", "eventData.userIdentity.principalId", "count(*)",
    "FROM", "{eds}", "\"{eds}\"", "WHERE", "GROUP BY", "HAVING", "ORDER BY", "LIMIT", "1", "0",
    "-1", "'x'", "','", ",", "(", ")", "=", "AND", "OR", "NOT", "UNION", "ALL", "JOIN", "ON",
    "NULL", "eventTime", ">", "'2024-01-01 00:00:00'", "CAST(", "AS", "VARCHAR", "BIGINT",
    "DELETE", "INSERT", "DROP", "SET", ";", "--", "/*", "*/", "\"", "'", "sequence(1, 5)",
    "UNNEST", "element_at(", "eventData.requestParameters", "metadata.channelArn", "WITH", "x",
    "DISTINCT", "OVER", "PARTITION BY", "row_number()", "read_csv('/etc/passwd')", "1e400",
    "from_iso8601_timestamp('x')", "json_extract_scalar(", "'$.a'", "CASE WHEN", "THEN", "END",
    "INTERVAL '1' DAY", "11111111-2222-3333-4444-555555555555", "\\", "\u00e9", "\x00",
]
# Queries of the right shape, so that many run (and some fail while running).
PROJECTIONS = [
    "*", "eventID", "eventData.UID", "count(*)", "eventData.requestParameters['a']",
    "CAST(eventData.requestParameters['a'] AS BIGINT) / 0", "metadata", "eventData", "eventTime",
    "from_iso8601_timestamp(eventData.eventTime)", "CAST(eventData.UID AS BIGINT)",
    "json_extract_scalar(eventData.UID, '$.a')", "regexp_like(eventData.UID, 'r[0-9]')",
    "date_diff('day', eventTime, metadata.ingestionTime)", "approx_distinct(eventData.UID)",
    "element_at(eventData.requestParameters, 'missing')", "eventData.userIdentity",
]
CONDITIONS = [
    "eventTime > '2021-01-01 00:00:00'", "eventData.UID LIKE 'r%'", "1 = 1",
    "eventData.requestParameters['a'] = '1'", "eventTime > 'not a time'",
    "eventData.UID IN ('r1', 'r2')", "metadata.ingestionTime < now()",
]
SHAPED = st.builds(
    lambda projections, condition, limit: (
        f"SELECT {', '.join(projections)} FROM {{eds}}"
        + (f" WHERE {condition}" if condition else "")
        + (f" LIMIT {limit}" if limit is not None else "")),
    st.lists(st.sampled_from(PROJECTIONS), min_size=1, max_size=3),
    st.one_of(st.none(), st.sampled_from(CONDITIONS)),
    st.one_of(st.none(), st.integers(-1, 5)),
)
SQL = st.one_of(
    SHAPED,
    st.text(min_size=1, max_size=300),
    st.lists(st.sampled_from(FRAGMENTS), min_size=1, max_size=30).map(" ".join),
    st.lists(st.sampled_from(FRAGMENTS), min_size=1, max_size=30).map(
        lambda parts: "SELECT " + " ".join(parts)),
)


@pytest.fixture
def lake_emulator(make_emulator):
    emu = make_emulator(query_timeout=1.0)
    store(emu, [event_data(uid=f"r{i}", requestParameters={"a": i}) for i in range(5)])
    return emu


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(template=SQL)
def test_arbitrary_sql_gets_a_result_or_the_service_error(lake_emulator, template):
    ct = lake(lake_emulator)
    eds = store_id(ct)
    sql = template.replace("{eds}", eds)
    try:
        query_id = ct.start_query(QueryStatement=sql)["QueryId"]
    except ClientError as exc:
        assert exc.response["Error"]["Code"] in SERVICE_CODES, exc.response["Error"]
        assert exc.response["ResponseMetadata"]["HTTPStatusCode"] == 400
        assert exc.response["Error"]["Message"]
    else:
        deadline = time.monotonic() + 15
        while (status := ct.describe_query(QueryId=query_id)["QueryStatus"]) not in ENDED:
            assert time.monotonic() < deadline, "query did not end"
            time.sleep(0.02)
        answer = ct.get_query_results(QueryId=query_id)
        assert answer["QueryStatus"] == status
        if status == "FAILED":
            assert answer["ErrorMessage"]

    code, answer = page_query(lake_emulator, json.dumps({"sql": sql}).encode())
    assert code == 200
    assert set(answer) == {"queryId", "status", "columns", "rows", "error"}
    assert answer["status"] in ("FINISHED", "FAILED")
    assert (answer["error"] is None) == (answer["status"] == "FINISHED")
    # Still answering, with its events intact.
    assert len(run(ct, f"SELECT eventID FROM {eds}")[1]) == 5
