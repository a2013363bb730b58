"""Helpers for the Lake query tests: a boto3 ``cloudtrail`` client, storing events, running
queries the way code for the real service does (start, poll, page), the page's query route."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import boto3

from emusupport import CHANNEL_ARN, KEY, NO_RETRIES, SECRET, audit_event, client


def lake(emu, region: str = "us-east-1"):
    return boto3.client("cloudtrail", endpoint_url=emu.url, region_name=region,
                        config=NO_RETRIES, aws_access_key_id=KEY, aws_secret_access_key=SECRET)


def store(emu, events: list[dict], prefix: str = "k") -> list[str]:
    """Store events with PutAuditEvents; returns their eventIDs in order."""
    answer = client(emu).put_audit_events(
        channelArn=CHANNEL_ARN,
        auditEvents=[audit_event(f"{prefix}{i}", data=e) for i, e in enumerate(events)])
    assert answer["failed"] == []
    return [entry["eventID"] for entry in answer["successful"]]


def store_id(ct) -> str:
    stores = ct.list_event_data_stores()["EventDataStores"]
    assert len(stores) == 1
    return stores[0]["EventDataStoreArn"].rsplit("/", 1)[1]


def wait_ended(ct, query_id: str, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        described = ct.describe_query(QueryId=query_id)
        if described["QueryStatus"] not in ("QUEUED", "RUNNING"):
            return described
        assert time.monotonic() < deadline, f"query still {described['QueryStatus']}"
        time.sleep(0.02)


def run(ct, sql: str, page_size: int | None = None) -> tuple[list[str], list[list[str]]]:
    """Start, poll until FINISHED, page through all results: (columns, rows of values)."""
    query_id = ct.start_query(QueryStatement=sql)["QueryId"]
    described = wait_ended(ct, query_id)
    assert described["QueryStatus"] == "FINISHED", described.get("ErrorMessage")
    columns, rows, token = None, [], None
    while True:
        kwargs = {"QueryId": query_id}
        if page_size:
            kwargs["MaxQueryResults"] = page_size
        if token:
            kwargs["NextToken"] = token
        page = ct.get_query_results(**kwargs)
        for row in page["QueryResultRows"]:
            names = [next(iter(cell)) for cell in row]
            columns = columns or names
            assert names == columns
            rows.append([next(iter(cell.values())) for cell in row])
        token = page.get("NextToken")
        if not token:
            return columns or [], rows


def error_code(exc_info) -> str:
    return exc_info.value.response["Error"]["Code"]


def page_query(emu, body: bytes) -> tuple[int, dict]:
    req = urllib.request.Request(f"{emu.url}/_emulator/query", data=body, method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())
