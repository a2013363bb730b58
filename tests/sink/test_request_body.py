"""The request body the sink builds itself is botocore's, byte for byte, and is what gets sent.

The sender hands botocore prebuilt bodies (``events.request_body``) instead of letting it
serialize 100 entries again; these tests hold that to: the same bytes as botocore's own
rest-json serializer for any event text, the same bytes on the wire (``Content-Length``, SigV4
over the body, every retry), and a request size the batcher counts equal to the bytes sent.
"""

from __future__ import annotations

import datetime as dt
import http.server
import json
import threading

import boto3
import pytest
from hypothesis import given, settings, strategies as st

from cloudtrail_sink import events, sender
from cloudtrail_sink.emulator.auth import AuthError, check_request

from sinksupport import ACCOUNT, CHANNEL_ARN, event, stored_uids

KEY, SECRET = "AKIDBODYTEST", "bodyTestSecretKey/EXAMPLE"
TRICKY = ['q"\\\n\u2028é😀', 'ascii "quoted" \\ back\x7fdel\x01ctl', "plain", "tab\there",
          "\u0000nul", "</script>&'"]


def botocore_body(entries: list[dict]) -> bytes:
    """What botocore's own serializer puts in the body for these entries (plain dicts)."""
    client = boto3.client("cloudtrail-data", region_name="us-east-1",
                          aws_access_key_id="a", aws_secret_access_key="b")
    op = client.meta.service_model.operation_model("PutAuditEvents")
    req = client._serializer.serialize_to_request(
        {"auditEvents": [dict(e) for e in entries], "channelArn": CHANNEL_ARN}, op)
    return req["body"]


def built(n: int, **extra) -> list[events.Prepared]:
    out = [events.build({"eventData": event(i, pad=i * 7, eventName=TRICKY[i % len(TRICKY)],
                                            **extra)}, ACCOUNT) for i in range(n)]
    assert all(isinstance(p, events.Prepared) for p in out)
    return out


def test_prebuilt_body_is_botocores_byte_for_byte_and_its_size_is_counted_exactly():
    prepared = built(12)
    entries = [p.entry() for p in prepared]
    body = events.request_body(entries)
    assert body == botocore_body(entries)
    assert len(body) == events.request_size([p.size for p in prepared])
    for p in prepared:  # one entry alone, too: the size the batcher counts per event
        assert p.size == len(botocore_body([p.entry()])) - events.REQUEST_OVERHEAD


@settings(max_examples=60, deadline=None)
@given(st.lists(st.text(max_size=40), min_size=1, max_size=5))
def test_any_event_text_gives_botocores_bytes(names):
    prepared = [events.build({"eventData": event(i, eventName=name or "x",
                                                 additionalEventData={"k": name})}, ACCOUNT)
                for i, name in enumerate(names)]
    prepared = [p for p in prepared if isinstance(p, events.Prepared)]
    entries = [p.entry() for p in prepared]
    body = events.request_body(entries)
    assert body == botocore_body(entries)
    assert len(body) == events.request_size([p.size for p in prepared])


def test_plain_dict_entries_have_no_prebuilt_body():
    entries = [p.entry() for p in built(3)]
    assert events.request_body(entries[:2] + [dict(entries[2])]) is None


class Recorder:
    """A CloudTrail Data stand-in on 127.0.0.1 that checks SigV4 with the configured
    credentials (the emulator's own check), records what arrived, and answers with ``codes``
    in turn (200 = all events successful)."""

    def __init__(self, codes=(200,)):
        self.codes = list(codes)
        self.requests: list[dict] = []
        recorder = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                try:
                    check_request("POST", self.path, self.headers, body, (KEY, SECRET),
                                  lambda: dt.datetime.now(dt.timezone.utc))
                    signed = True
                except AuthError:
                    signed = False
                recorder.requests.append({"path": self.path, "body": body, "signed": signed,
                                          "length": int(self.headers["Content-Length"]),
                                          "type": self.headers.get("Content-Type")})
                code = recorder.codes.pop(0) if len(recorder.codes) > 1 else recorder.codes[0]
                if code == 200:
                    ids = [e["id"] for e in json.loads(body)["auditEvents"]]
                    out = {"successful": [{"id": i, "eventID": i} for i in ids], "failed": []}
                else:
                    out = {"message": "injected"}
                data = json.dumps(out).encode()
                self.send_response(code)
                if code != 200:
                    self.send_header("x-amzn-ErrorType", "InternalFailure")
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture
def recorder():
    made = []

    def make(codes=(200,)):
        made.append(Recorder(codes))
        return made[-1]

    try:
        yield make
    finally:
        for r in made:
            r.close()


def sink_client(url, **kw):
    session = boto3.Session(aws_access_key_id=KEY, aws_secret_access_key=SECRET,
                            region_name="us-east-1")
    return sender.make_client("us-east-1", url, session=session, **kw)


def test_the_bytes_sent_are_the_prebuilt_body_signed_and_measured(recorder):
    rec = recorder()
    prepared = built(20)
    client = sink_client(rec.url)
    serialized = []
    real = client._serializer.serialize_to_request
    client._serializer.serialize_to_request = lambda params, op: (
        serialized.append(sorted(params)) or real(params, op))
    result = sender.Sender(client, CHANNEL_ARN).send([p.entry() for p in prepared])
    assert serialized == [["channelArn"]]  # botocore did not serialize the entries again
    assert result.successful == {p.id for p in prepared} and result.failed == []
    [req] = rec.requests
    assert req["body"] == events.request_body([p.entry() for p in prepared])
    assert req["body"] == botocore_body([p.entry() for p in prepared])
    assert req["length"] == len(req["body"]) == events.request_size([p.size for p in prepared])
    assert req["signed"] and req["type"] == "application/json"
    assert req["path"].startswith("/PutAuditEvents?channelArn=arn%3Aaws%3Acloudtrail")


def test_every_retry_resends_the_same_signed_body(recorder):
    rec = recorder(codes=(500, 503, 200))
    prepared = built(5)
    client = sink_client(rec.url, retry_mode="standard", max_attempts=3)
    result = sender.Sender(client, CHANNEL_ARN).send([p.entry() for p in prepared])
    assert result.successful == {p.id for p in prepared}
    assert len(rec.requests) == 3
    expected = botocore_body([p.entry() for p in prepared])
    assert [r["body"] for r in rec.requests] == [expected] * 3
    assert all(r["signed"] and r["length"] == len(expected) for r in rec.requests)


def test_plain_dicts_and_validating_clients_still_go_through_botocore(recorder):
    rec = recorder()
    prepared = built(4)
    plain = [dict(p.entry()) for p in prepared]
    sender.Sender(sink_client(rec.url), CHANNEL_ARN).send(plain)
    session = boto3.Session(aws_access_key_id=KEY, aws_secret_access_key=SECRET,
                            region_name="us-east-1")
    validating = session.client("cloudtrail-data", endpoint_url=rec.url)
    assert sender.use_prebuilt_bodies(validating) is False  # it would refuse the lifted params
    sender.Sender(validating, CHANNEL_ARN).send([p.entry() for p in prepared])
    expected = botocore_body(plain)
    assert [r["body"] for r in rec.requests] == [expected, expected]
    assert all(r["signed"] for r in rec.requests)


def test_the_emulator_with_credentials_accepts_and_stores_prebuilt_requests(tmp_path, aws_env):
    from cloudtrail_sink.emulator import Emulator

    emu = Emulator(db_path=tmp_path / "emu.sqlite", host="127.0.0.1", port=0,
                   channels={CHANNEL_ARN: "ext-1"}, seed=1, credentials=(KEY, SECRET))
    emu.start()
    try:
        prepared = built(30)
        s = sender.Sender(sink_client(emu.url), CHANNEL_ARN, external_id="ext-1")
        result = s.send([p.entry() for p in prepared])
        assert result.failed == [] and result.successful == {p.id for p in prepared}
        assert sorted(stored_uids(emu)) == sorted(f"evt-{i}" for i in range(30))
        stored = {e["eventData"]["UID"]: e["eventData"] for e in emu.events()}
        for p in prepared:
            data = json.loads(p.text)
            assert stored[data["UID"]] == data
    finally:
        emu.stop()
