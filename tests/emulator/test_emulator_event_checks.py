"""Per-event checks: each problem is reported in ``failed[]`` with the service's error code,
the request still succeeds (HTTP 200), the other events in it are stored."""

from __future__ import annotations

import json

import pytest
from emusupport import ACCOUNT, CHANNEL_ARN, OTHER_ACCOUNT, audit_event, client, event_data

from cloudtrail_sink import schema


def _identity(**fields):
    base = {"type": "CustomUserIdentity", "principalId": "alice"}
    base.update(fields)
    return {k: v for k, v in base.items() if v is not None}


CASES = [
    # (name, eventData text, expected errorCode, a word the message must contain)
    ("not-json", "{not json", "InvalidData", "JSON"),
    ("json-array", "[1, 2]", "InvalidData", "object"),
    ("json-string", '"text"', "InvalidData", "object"),
    ("nan", schema.dumps(event_data())[:-1] + ',"x":NaN}', "InvalidData", "JSON"),
    ("number-beyond-double", schema.dumps(event_data())[:-1] + ',"additionalEventData":{"n":1e400}}',
     "InvalidData", "JSON"),
    ("missing-version", schema.dumps(event_data(version=None)), "FieldNotFound", "version"),
    ("missing-uid", schema.dumps(event_data(UID=None)), "FieldNotFound", "UID"),
    ("missing-eventTime", schema.dumps(event_data(eventTime=None)), "FieldNotFound", "eventTime"),
    ("missing-recipient", schema.dumps(event_data(recipientAccountId=None)), "FieldNotFound",
     "recipientAccountId"),
    ("missing-principal", schema.dumps(event_data(userIdentity=_identity(principalId=None))),
     "FieldNotFound", "userIdentity.principalId"),
    ("null-eventSource", schema.dumps({**event_data(), "eventSource": None}), "FieldNotFound",
     "eventSource"),
    ("uid-too-long", schema.dumps(event_data(UID="u" * 1025)), "FieldTooLong", "UID"),
    ("uid-too-long-in-bytes", schema.dumps(event_data(UID="é" * 513)), "FieldTooLong", "UID"),
    ("errorMessage-too-long", schema.dumps(event_data(errorMessage="m" * 257)), "FieldTooLong",
     "errorMessage"),
    ("identity-type-too-long", schema.dumps(event_data(userIdentity=_identity(type="t" * 129))),
     "FieldTooLong", "userIdentity.type"),
    ("additionalEventData-over-28000", schema.dumps(
        event_data(additionalEventData={"k": "v" * 28_000})), "FieldTooLong",
     "additionalEventData"),
    # 7.5 kB as sent, 28.5 kB once measured as compact JSON (each 1e15 becomes 18 characters):
    # the limit applies to the measured size.
    ("additionalEventData-grows-past-28000", schema.dumps(event_data())[:-1]
     + ',"additionalEventData":{"n":[' + ",".join(["1e15"] * 1500) + "]}}",
     "FieldTooLong", "additionalEventData"),
    ("requestParameters-over-100000", schema.dumps(
        event_data(requestParameters={"k": "v" * 100_000})), "FieldTooLong", "requestParameters"),
    ("eventTime-with-fraction", schema.dumps(event_data(eventTime="2021-10-27T12:13:14.5Z")),
     "InvalidData", "eventTime"),
    ("eventTime-with-offset", schema.dumps(event_data(eventTime="2021-10-27T12:13:14+00:00")),
     "InvalidData", "eventTime"),
    ("eventTime-not-a-date", schema.dumps(event_data(eventTime="2021-02-30T12:13:14Z")),
     "InvalidData", "eventTime"),
    ("sourceIP-hostname", schema.dumps(event_data(sourceIPAddress="example.com")),
     "InvalidData", "sourceIPAddress"),
    ("sourceIP-v4-out-of-range", schema.dumps(event_data(sourceIPAddress="300.1.2.3")),
     "InvalidData", "sourceIPAddress"),
    ("unknown-field", schema.dumps({**event_data(), "extra": 1}), "InvalidData", "extra"),
    ("wrong-type", schema.dumps(event_data(eventName=42)), "InvalidData", "eventName"),
    ("lone-surrogate", schema.dumps(event_data())[:-1] + ',"errorCode":"\\ud800"}',
     "InvalidData", "surrogate"),
    ("other-recipient", schema.dumps(event_data(recipientAccountId=OTHER_ACCOUNT)),
     "InvalidRecipient", "recipientAccountId"),
]


@pytest.fixture(scope="module")
def answers(tmp_path_factory):
    """Send every case once (in one request, one entry per case) and index the answers."""
    from cloudtrail_sink.emulator import Emulator

    emu = Emulator(tmp_path_factory.mktemp("events") / "e.sqlite",
                   channels={CHANNEL_ARN: None})
    emu.start()
    try:
        entries = [audit_event(f"case{i}", data=text) for i, (_, text, _, _) in enumerate(CASES)]
        entries.append(audit_event("good"))
        response = client(emu).put_audit_events(channelArn=CHANNEL_ARN, auditEvents=entries)
        stored = emu.events()
        stats = emu.stats()
    finally:
        emu.stop()
    return {f["id"]: f for f in response["failed"]}, response["successful"], stored, stats


@pytest.mark.parametrize("index, case", list(enumerate(CASES)), ids=[c[0] for c in CASES])
def test_bad_event_is_reported_with_the_service_code(answers, index, case):
    failed, _, _, _ = answers
    _, _, code, word = case
    entry = failed[f"case{index}"]
    assert entry["errorCode"] == code
    assert word in entry["errorMessage"]


def test_only_the_good_event_is_stored_and_counted(answers):
    failed, successful, stored, stats = answers
    assert [s["id"] for s in successful] == ["good"]
    assert [e["eventData"]["UID"] for e in stored] == ["uid-good"]
    assert len(failed) == len(CASES)
    assert stats["accepted"] == 1
    assert sum(stats["failed"].values()) == len(CASES)
    assert stats["requests"] == {"partial": 1}


def test_checksum_mismatch_is_invalid_checksum(make_emulator):
    emu = make_emulator()
    text = schema.dumps(event_data())
    entries = [{"id": "c1", "eventData": text, "eventDataChecksum": schema.checksum(text + " ")},
               {"id": "c2", "eventData": text, "eventDataChecksum": "not base64"}]
    response = client(emu).put_audit_events(channelArn=CHANNEL_ARN, auditEvents=entries)
    assert [(f["id"], f["errorCode"]) for f in response["failed"]] == [
        ("c1", "InvalidChecksum"), ("c2", "InvalidChecksum")]
    assert emu.events() == []


def test_checksum_covers_the_exact_utf8_bytes(make_emulator):
    emu = make_emulator()
    text = json.dumps(event_data(eventName="Überweisung"), ensure_ascii=False)
    entry = {"id": "u8", "eventData": text, "eventDataChecksum": schema.checksum(text)}
    response = client(emu).put_audit_events(channelArn=CHANNEL_ARN, auditEvents=[entry])
    assert [s["id"] for s in response["successful"]] == ["u8"]


def test_limits_are_inclusive(make_emulator):
    emu = make_emulator()
    data = event_data(UID="u" * 1024, errorMessage="m" * 256,
                      additionalEventData={"k": "v" * (28_000 - len('{"k":""}'))})
    response = client(emu).put_audit_events(channelArn=CHANNEL_ARN,
                                            auditEvents=[audit_event("edge", data=data)])
    assert response["failed"] == []


def test_ipv6_source_address_and_optional_fields_are_accepted(make_emulator):
    emu = make_emulator()
    data = event_data(sourceIPAddress="2001:db8::1", userAgent="agent/1.0",
                      userIdentity=_identity(details={"k": "v"}), errorCode="Denied",
                      requestParameters={"a": 1}, responseElements={"b": [1, 2]})
    response = client(emu).put_audit_events(channelArn=CHANNEL_ARN,
                                            auditEvents=[audit_event("v6", data=data)])
    assert response["failed"] == []
    assert emu.events()[0]["eventData"]["sourceIPAddress"] == "2001:db8::1"


def test_recipient_must_be_the_channel_account(make_emulator):
    emu = make_emulator()
    response = client(emu).put_audit_events(channelArn=CHANNEL_ARN, auditEvents=[
        audit_event("r", data=event_data(recipientAccountId=ACCOUNT)),
        audit_event("s", data=event_data(recipientAccountId=OTHER_ACCOUNT))])
    assert [s["id"] for s in response["successful"]] == ["r"]
    assert response["failed"][0]["errorCode"] == "InvalidRecipient"
