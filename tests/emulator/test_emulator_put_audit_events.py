"""PutAuditEvents happy path through boto3: response shape, storage as CloudTrail Lake wraps it."""

from __future__ import annotations

import json
import re
import uuid

from emusupport import ACCOUNT, CHANNEL_ARN, audit_event, batch, client, event_data

from cloudtrail_sink import schema


def test_accepted_events_are_acknowledged_and_stored_wrapped(make_emulator):
    emu = make_emulator()
    entries = batch(3)
    response = client(emu).put_audit_events(channelArn=CHANNEL_ARN, auditEvents=entries)

    assert response["failed"] == []
    assert [s["id"] for s in response["successful"]] == ["e0", "e1", "e2"]
    assert re.match(r"^[0-9a-f-]{36}$", response["successful"][0]["eventID"])
    assert response["ResponseMetadata"]["HTTPStatusCode"] == 200
    assert response["ResponseMetadata"]["RequestId"]

    stored = emu.events()
    assert [e["eventID"] for e in stored] == [s["eventID"] for s in response["successful"]]
    first = stored[0]
    assert first["eventCategory"] == "ActivityAuditLog"
    assert first["eventType"] == "ActivityLog"
    assert first["awsRegion"] == "us-east-1"
    assert first["recipientAccountId"] == ACCOUNT
    assert first["metadata"]["channelARN"] == CHANNEL_ARN
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$", first["metadata"]["ingestionTime"])
    assert first["eventData"] == json.loads(entries[0]["eventData"])


def test_both_lists_are_present_even_when_empty(make_emulator):
    emu = make_emulator()
    ok = client(emu).put_audit_events(channelArn=CHANNEL_ARN, auditEvents=batch(1))
    bad = client(emu).put_audit_events(channelArn=CHANNEL_ARN,
                                       auditEvents=[audit_event("x", data="[]")])
    assert ok["failed"] == [] and len(ok["successful"]) == 1
    assert bad["successful"] == [] and len(bad["failed"]) == 1


def test_checksum_is_optional(make_emulator):
    emu = make_emulator()
    response = client(emu).put_audit_events(
        channelArn=CHANNEL_ARN, auditEvents=[audit_event("n", with_checksum=False)])
    assert len(response["successful"]) == 1


def test_resent_events_are_stored_again_with_new_event_ids(make_emulator):
    emu = make_emulator()
    c = client(emu)
    first = c.put_audit_events(channelArn=CHANNEL_ARN, auditEvents=batch(2))
    second = c.put_audit_events(channelArn=CHANNEL_ARN, auditEvents=batch(2))
    stored = emu.events()
    assert [e["eventData"]["UID"] for e in stored] == ["uid-e0", "uid-e1"] * 2
    ids = {s["eventID"] for s in first["successful"] + second["successful"]}
    assert len(ids) == 4


def test_hundred_events_in_one_call(make_emulator):
    emu = make_emulator()
    response = client(emu).put_audit_events(channelArn=CHANNEL_ARN, auditEvents=batch(100))
    assert len(response["successful"]) == 100
    assert len(emu.events()) == 100


def test_mixed_batch_keeps_order_and_stores_only_the_good(make_emulator):
    emu = make_emulator()
    entries = [audit_event("a"), audit_event("b", data="not json"), audit_event("c")]
    response = client(emu).put_audit_events(channelArn=CHANNEL_ARN, auditEvents=entries)
    assert [s["id"] for s in response["successful"]] == ["a", "c"]
    assert response["failed"] == [{"id": "b", "errorCode": "InvalidData",
                                   "errorMessage": "eventData is not valid JSON"}]
    assert [e["eventData"]["UID"] for e in emu.events()] == ["uid-a", "uid-c"]


def test_stored_event_data_is_the_exact_text_sent(make_emulator):
    emu = make_emulator()
    # Non-ASCII, escapes and key order survive unchanged (eventData is stored as sent).
    data = event_data(uid="ü-1", additionalEventData={"z": 1, "a": "line\nbreak \u00e9"})
    text = json.dumps(data, ensure_ascii=True)
    client(emu).put_audit_events(channelArn=CHANNEL_ARN, auditEvents=[
        {"id": "u", "eventData": text, "eventDataChecksum": schema.checksum(text)}])
    stored = emu.events()[0]
    assert stored["eventData"] == data
    assert list(stored["eventData"]["additionalEventData"]) == ["z", "a"]


def test_open_mode_accepts_any_well_formed_channel(make_emulator):
    emu = make_emulator(channels=None)
    arn = f"arn:aws:cloudtrail:us-east-1:{ACCOUNT}:channel/{uuid.uuid4()}"
    response = client(emu).put_audit_events(channelArn=arn, auditEvents=batch(1))
    assert len(response["successful"]) == 1
    assert emu.events()[0]["metadata"]["channelARN"] == arn


def test_store_survives_restart_on_the_same_file(make_emulator, tmp_path):
    db = tmp_path / "kept.sqlite"
    emu = make_emulator(db_path=db)
    client(emu).put_audit_events(channelArn=CHANNEL_ARN, auditEvents=batch(2, "r"))
    emu.stop()
    again = make_emulator(db_path=db)
    client(again).put_audit_events(channelArn=CHANNEL_ARN, auditEvents=batch(1, "s"))
    assert [e["eventData"]["UID"] for e in again.events()] == ["uid-r0", "uid-r1", "uid-s0"]
