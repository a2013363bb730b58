"""How the server routes Lake calls before the Lake code sees them.

- A signed ``X-Amz-Target`` call answers whatever ``Host`` it names when the emulator checks
  signatures against its credentials; without credentials any key signs, so a DNS-rebinding
  page could read stored events: then it answers only an allowed Host, as the page's
  ``POST /_emulator/query`` always does.
- Both have a body cap (``LAKE_MAX_BODY``); a larger body is refused unread with 413.
- An error the server answers before the Lake handler (body too large, chunked, a bad
  ``Content-Length``) has the JSON 1.1 shape, so boto3's ``cloudtrail`` client reads its code as
  the service's, not as a bare HTTP status.
"""

from __future__ import annotations

import http.client
import json

import boto3
import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from botocore.parsers import create_parser

from cloudtrail_sink.emulator.server import LAKE_MAX_BODY, SMALL_BODY
from emusupport import KEY, SECRET, event_data
from lakesupport import store

TARGET = "com.amazonaws.cloudtrail.v20131101.CloudTrail_20131101."


def _send(emu, method: str, path: str, headers: dict, body: bytes = b"",
          send_body: bool = True) -> dict:
    """One raw request to the emulator with exactly these headers; the answer as botocore's
    parsers take it."""
    conn = http.client.HTTPConnection("127.0.0.1", emu.port, timeout=10)
    try:
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        for name, value in headers.items():
            conn.putheader(name, value)
        conn.endheaders(body if send_body and body else None)
        resp = conn.getresponse()
        return {"status_code": resp.status, "headers": dict(resp.getheaders()),
                "body": resp.read()}
    finally:
        conn.close()


def _signed_lake_headers(emu, operation: str, body: bytes, host: str, path: str = "/") -> dict:
    """Headers of a cloudtrail call signed (as botocore signs it) for ``host``."""
    req = AWSRequest(method="POST", url=f"http://{host}{path}", data=body,
                     headers={"X-Amz-Target": TARGET + operation,
                              "Content-Type": "application/x-amz-json-1.1"})
    SigV4Auth(Credentials(KEY, SECRET), "cloudtrail", "us-east-1").add_auth(req)
    return {"Host": host, **req.prepare().headers}


def _parsed_error(answer: dict, operation: str) -> dict:
    """The error as boto3's cloudtrail client parses it."""
    model = boto3.client("cloudtrail", region_name="us-east-1", aws_access_key_id=KEY,
                         aws_secret_access_key=SECRET).meta.service_model
    parsed = create_parser(model.protocol).parse(
        answer, model.operation_model(operation).output_shape)
    return parsed["Error"]


@pytest.fixture
def emu(make_emulator):
    emu = make_emulator(credentials=(KEY, SECRET))
    store(emu, [event_data(uid="u1")])
    return emu


def test_signed_lake_calls_answer_any_host_when_signatures_are_checked(emu):
    for host in ("evil.example", f"127.0.0.1:{emu.port}"):
        headers = _signed_lake_headers(emu, "ListEventDataStores", b"{}", host)
        answer = _send(emu, "POST", "/", headers, b"{}")
        assert answer["status_code"] == 200, (host, answer)
        assert len(json.loads(answer["body"])["EventDataStores"]) == 1


def test_without_credentials_lake_calls_answer_only_an_allowed_host(make_emulator):
    # Any key signs then: a page on evil.example rebound to 127.0.0.1 could sign its own call.
    emu = make_emulator()
    store(emu, [event_data(uid="u1")])
    parser = create_parser("json")
    for host, status in (("evil.example", 403), (f"evil.example:{emu.port}", 403),
                         (f"localhost:{emu.port}", 200), (f"127.0.0.1:{emu.port}", 200)):
        headers = _signed_lake_headers(emu, "ListEventDataStores", b"{}", host)
        answer = _send(emu, "POST", "/", headers, b"{}")
        assert answer["status_code"] == status, (host, answer)
        if status == 403:  # in the shape boto3's cloudtrail client reads
            parsed = parser.parse(answer, None)
            assert parsed["Error"]["Code"] == "AccessDeniedException", parsed


def test_the_page_query_route_needs_an_allowed_host(emu):
    body = json.dumps({"sql": "SELECT 1"}).encode()
    for host, status in (("evil.example", 403), (f"evil.example:{emu.port}", 403),
                         (f"localhost:{emu.port}", 200), ("127.0.0.1", 200)):
        answer = _send(emu, "POST", "/_emulator/query",
                       {"Host": host, "Content-Type": "application/json",
                        "Content-Length": str(len(body))}, body)
        assert answer["status_code"] == status, host


def test_the_page_stores_route_needs_an_allowed_host_and_caps_its_body(emu):
    for host, status in (("evil.example", 403), (f"evil.example:{emu.port}", 403),
                         (f"localhost:{emu.port}", 200), ("127.0.0.1", 200)):
        answer = _send(emu, "GET", "/_emulator/stores", {"Host": host})
        assert answer["status_code"] == status, host
        if status == 200:
            assert len(json.loads(answer["body"])["stores"]) == 1
    answer = _send(emu, "GET", "/_emulator/stores",
                   {"Host": "localhost", "Content-Length": str(SMALL_BODY + 1)}, send_body=False)
    assert answer["status_code"] == 413


def test_the_page_query_route_is_not_reached_through_a_target_header(emu):
    """A target header does not turn a page route into one that skips the Host check."""
    body = json.dumps({"sql": "SELECT 1"}).encode()
    headers = _signed_lake_headers(emu, "StartQuery", body, "evil.example", "/_emulator/query")
    answer = _send(emu, "POST", "/_emulator/query", headers, body)
    assert answer["status_code"] == 400
    assert _parsed_error(answer, "StartQuery")["Code"] == "UnknownOperationException"


@pytest.mark.parametrize("route", ["lake", "page"])
def test_bodies_over_the_lake_cap_are_refused_unread(emu, route):
    body = json.dumps({"QueryStatement": "x" * LAKE_MAX_BODY}).encode()
    if route == "lake":
        path, headers = "/", _signed_lake_headers(emu, "StartQuery", body, "localhost")
    else:
        path, headers = "/_emulator/query", {"Host": "localhost",
                                             "Content-Length": str(len(body))}
    answer = _send(emu, "POST", path, headers, body, send_body=False)  # it is not waited for
    assert answer["status_code"] == 413
    assert answer["headers"]["Connection"] == "close"
    assert answer["headers"]["x-amzn-ErrorType"] == "RequestEntityTooLargeException"
    # A body just under the cap is read and answered by the Lake code.
    small = json.dumps({"QueryStatement": "SELECT"}).encode()
    headers = _signed_lake_headers(emu, "StartQuery", small, "localhost")
    answer = _send(emu, "POST", "/", headers, small)
    assert _parsed_error(answer, "StartQuery")["Code"] == "InvalidQueryStatementException"


@pytest.mark.parametrize("change, status, code", [
    ({"Content-Length": str(LAKE_MAX_BODY + 1)}, 413, "RequestEntityTooLargeException"),
    ({"Content-Length": "1_0"}, 400, "BadRequest"),
    ({"Content-Length": None, "Transfer-Encoding": "chunked"}, 411, "LengthRequiredException"),
])
def test_errors_before_the_lake_handler_parse_as_the_service_code(emu, change, status, code):
    body = b'{"QueryStatement": "SELECT 1"}'
    headers = _signed_lake_headers(emu, "StartQuery", body, "localhost")
    for name, value in change.items():
        headers.pop(name, None)
        if value is not None:
            headers[name] = value
    answer = _send(emu, "POST", "/", headers, body, send_body=False)
    assert answer["status_code"] == status
    error = _parsed_error(answer, "StartQuery")
    assert error["Code"] == code and error["Message"]
