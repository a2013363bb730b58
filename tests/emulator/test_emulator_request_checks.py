"""Whole-request errors, each with the exception class a boto3 client raises against AWS.

Modeled errors (ChannelNotFound, InvalidChannelARN, ChannelInsufficientPermission,
DuplicatedAuditEventId) come out as ``client.exceptions.<Code>``; the rest as plain
``botocore.exceptions.ClientError`` with ``Error.Code`` set, exactly as botocore builds them from
``x-amzn-ErrorType``.
"""

from __future__ import annotations

import json
import urllib.parse

import pytest
from botocore.exceptions import ClientError
from emusupport import (ACCOUNT, CHANNEL_ARN, NO_CLIENT_VALIDATION, audit_event, batch, client,
                        signed_request)

OTHER_CHANNEL = CHANNEL_ARN.replace("0b9a1c0e", "ffffffff")


def error_of(excinfo):
    err = excinfo.value.response
    return err["Error"]["Code"], err["ResponseMetadata"]["HTTPStatusCode"]


def test_unknown_channel_is_channel_not_found(make_emulator):
    c = client(make_emulator())
    with pytest.raises(c.exceptions.ChannelNotFound) as excinfo:
        c.put_audit_events(channelArn=OTHER_CHANNEL, auditEvents=batch(1))
    assert error_of(excinfo) == ("ChannelNotFound", 400)
    assert excinfo.value.response["ResponseMetadata"]["RequestId"]


@pytest.mark.parametrize("arn", [
    "not-an-arn",
    "arn:aws:cloudtrail:us-east-1:12345:channel/0b9a1c0e-5d33-4a5f-9f55-3c7a1a2b3c4d",
    "arn:aws:s3:us-east-1:123456789012:channel/0b9a1c0e-5d33-4a5f-9f55-3c7a1a2b3c4d",
    "arn:aws:cloudtrail:us-east-1:123456789012:eventdatastore/0b9a1c0e-5d33-4a5f-9f55-3c7a1a2b3c4d",
    "arn:aws:cloudtrail:us-east-1:123456789012:channel/not-a-uuid",
    "0b9a1c0e-5d33-4a5f-9f55-3c7a1a2b3c4d",
])
def test_malformed_arn_is_invalid_channel_arn(make_emulator, arn):
    c = client(make_emulator(channels=None))
    with pytest.raises(c.exceptions.InvalidChannelARN) as excinfo:
        c.put_audit_events(channelArn=arn, auditEvents=batch(1))
    assert error_of(excinfo) == ("InvalidChannelARN", 400)


def test_channel_in_another_region_than_the_call_is_not_found(make_emulator):
    emu = make_emulator(channels=None)
    c = client(emu, region="eu-west-1")
    with pytest.raises(c.exceptions.ChannelNotFound) as excinfo:
        c.put_audit_events(channelArn=CHANNEL_ARN, auditEvents=batch(1))
    assert "eu-west-1" in excinfo.value.response["Error"]["Message"]


@pytest.mark.parametrize("given", [None, "wrong-id"])
def test_missing_or_wrong_external_id_is_refused(make_emulator, given):
    emu = make_emulator(channels={CHANNEL_ARN: "secret-ext-id"})
    c = client(emu)
    kwargs = {} if given is None else {"externalId": given}
    with pytest.raises(c.exceptions.ChannelInsufficientPermission) as excinfo:
        c.put_audit_events(channelArn=CHANNEL_ARN, auditEvents=batch(1), **kwargs)
    assert error_of(excinfo) == ("ChannelInsufficientPermission", 400)
    assert emu.events() == []


def test_right_external_id_is_accepted(make_emulator):
    emu = make_emulator(channels={CHANNEL_ARN: "secret-ext-id"})
    response = client(emu).put_audit_events(channelArn=CHANNEL_ARN, externalId="secret-ext-id",
                                            auditEvents=batch(1))
    assert len(response["successful"]) == 1


def test_malformed_external_id_is_a_validation_error(make_emulator):
    c = client(make_emulator(), config=NO_CLIENT_VALIDATION)
    with pytest.raises(ClientError) as excinfo:
        c.put_audit_events(channelArn=CHANNEL_ARN, externalId="x", auditEvents=batch(1))
    assert type(excinfo.value) is ClientError
    assert error_of(excinfo) == ("ValidationException", 400)


def test_duplicate_ids_fail_the_whole_request(make_emulator):
    emu = make_emulator()
    c = client(emu)
    entries = [audit_event("same"), audit_event("other"), audit_event("same")]
    with pytest.raises(c.exceptions.DuplicatedAuditEventId) as excinfo:
        c.put_audit_events(channelArn=CHANNEL_ARN, auditEvents=entries)
    assert error_of(excinfo) == ("DuplicatedAuditEventId", 400)
    assert emu.events() == []


@pytest.mark.parametrize("entries, field", [
    ([], "auditEvents"),
    (batch(101), "auditEvents"),
    ([audit_event("a.b")], "auditEvents.1.member.id"),
    ([audit_event("ok"), audit_event("x" * 129)], "auditEvents.2.member.id"),
    ([audit_event("a:b")], "auditEvents.1.member.id"),
], ids=["zero-events", "101-events", "id-with-dot", "id-129-chars", "id-with-colon"])
def test_request_shape_violations_are_validation_exceptions(make_emulator, entries, field):
    emu = make_emulator()
    c = client(emu, config=NO_CLIENT_VALIDATION)
    with pytest.raises(ClientError) as excinfo:
        c.put_audit_events(channelArn=CHANNEL_ARN, auditEvents=entries)
    assert type(excinfo.value) is ClientError
    assert error_of(excinfo) == ("ValidationException", 400)
    assert f"'{field}'" in excinfo.value.response["Error"]["Message"]
    assert emu.events() == []


def test_id_of_128_chars_is_accepted(make_emulator):
    c = client(make_emulator())
    response = c.put_audit_events(channelArn=CHANNEL_ARN, auditEvents=[audit_event("i" * 128)])
    assert len(response["successful"]) == 1


def test_request_over_one_megabyte_is_refused(make_emulator):
    emu = make_emulator()
    c = client(emu)
    big = "x" * 11_000
    entries = [audit_event(f"b{i}", additionalEventData={"pad": big}) for i in range(95)]
    assert len(json.dumps({"auditEvents": entries})) > 1_000_000
    with pytest.raises(ClientError) as excinfo:
        c.put_audit_events(channelArn=CHANNEL_ARN, auditEvents=entries)
    assert error_of(excinfo) == ("RequestEntityTooLargeException", 413)
    # The connection stays usable afterwards.
    assert len(c.put_audit_events(channelArn=CHANNEL_ARN, auditEvents=batch(1))["successful"]) == 1


def test_missing_channel_arn_and_bad_bodies(make_emulator):
    emu = make_emulator()
    body = json.dumps({"auditEvents": batch(1)}).encode()
    status, headers, payload = signed_request(emu, body, query="")
    assert (status, headers["x-amzn-ErrorType"]) == (400, "ValidationException")
    assert "channelArn" in payload["message"]
    for bad, code in [(b"{", "SerializationException"), (b"[]", "SerializationException"),
                      (b'{"auditEvents": {}}', "SerializationException"),
                      (b'{"auditEvents": [{"id": 1, "eventData": "{}"}]}',
                       "SerializationException"),
                      (b'{"other": []}', "ValidationException"),
                      (b'{"auditEvents": [{"id": "a"}]}', "ValidationException")]:
        status, headers, payload = signed_request(emu, bad)
        assert (status, headers["x-amzn-ErrorType"]) == (400, code), bad
        assert payload["message"]
        assert headers["x-amzn-RequestId"]


# --- SigV4 -------------------------------------------------------------------------------------

def test_unsigned_request_is_refused(make_emulator):
    from botocore import UNSIGNED
    from botocore.config import Config

    emu = make_emulator()
    c = client(emu, config=Config(signature_version=UNSIGNED,
                                   retries={"total_max_attempts": 1}))
    with pytest.raises(ClientError) as excinfo:
        c.put_audit_events(channelArn=CHANNEL_ARN, auditEvents=batch(1))
    assert error_of(excinfo) == ("MissingAuthenticationTokenException", 403)


def test_signature_for_another_service_is_refused(make_emulator):
    emu = make_emulator()
    body = json.dumps({"auditEvents": batch(1)}).encode()
    status, headers, payload = signed_request(emu, body, service="cloudtrail")
    assert (status, headers["x-amzn-ErrorType"]) == (403, "InvalidSignatureException")
    assert "cloudtrail-data" in payload["message"]


def test_malformed_authorization_header_is_incomplete_signature(make_emulator):
    emu = make_emulator()
    body = json.dumps({"auditEvents": batch(1)}).encode()
    status, headers, _ = signed_request(emu, body, sign=False,
                                        headers={"Authorization": "Bearer abc"})
    assert (status, headers["x-amzn-ErrorType"]) == (400, "IncompleteSignatureException")


def test_with_credentials_wrong_key_and_wrong_secret_are_refused(make_emulator):
    emu = make_emulator(credentials=("AKIDRIGHT", "right-secret"))
    good = client(emu, aws_access_key_id="AKIDRIGHT", aws_secret_access_key="right-secret")
    assert len(good.put_audit_events(channelArn=CHANNEL_ARN,
                                     auditEvents=batch(1))["successful"]) == 1
    # Signed with a session token too (X-Amz-Security-Token is then a signed header).
    session = client(emu, aws_access_key_id="AKIDRIGHT", aws_secret_access_key="right-secret",
                     aws_session_token="token")
    assert len(session.put_audit_events(channelArn=CHANNEL_ARN,
                                        auditEvents=batch(1, "t"))["successful"]) == 1

    wrong_key = client(emu, aws_access_key_id="AKIDWRONG", aws_secret_access_key="right-secret")
    with pytest.raises(ClientError) as excinfo:
        wrong_key.put_audit_events(channelArn=CHANNEL_ARN, auditEvents=batch(1))
    assert error_of(excinfo) == ("UnrecognizedClientException", 403)

    wrong_secret = client(emu, aws_access_key_id="AKIDRIGHT", aws_secret_access_key="nope")
    with pytest.raises(ClientError) as excinfo:
        wrong_secret.put_audit_events(channelArn=CHANNEL_ARN, auditEvents=batch(1))
    assert error_of(excinfo) == ("InvalidSignatureException", 403)
    assert len(emu.events()) == 2


def test_signature_over_percent_encoded_query_values_verifies(make_emulator):
    odd = "a+b=c,d.e@f:g/h-i_j"  # every character class externalId allows
    emu = make_emulator(channels={CHANNEL_ARN: odd}, credentials=("AKIDRIGHT", "right-secret"))
    c = client(emu, aws_access_key_id="AKIDRIGHT", aws_secret_access_key="right-secret")
    response = c.put_audit_events(channelArn=CHANNEL_ARN, externalId=odd, auditEvents=batch(1))
    assert len(response["successful"]) == 1


def test_tampered_body_fails_signature_check(make_emulator):
    emu = make_emulator(credentials=("AKIDRIGHT", "right-secret"))
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials
    import urllib.error
    import urllib.request

    query = "channelArn=" + urllib.parse.quote(CHANNEL_ARN, safe="")
    req = AWSRequest(method="POST", url=f"{emu.url}/PutAuditEvents?{query}",
                     data=json.dumps({"auditEvents": batch(1)}).encode(),
                     headers={"Content-Type": "application/json"})
    SigV4Auth(Credentials("AKIDRIGHT", "right-secret"), "cloudtrail-data", "us-east-1").add_auth(req)
    prepared = req.prepare()
    tampered = prepared.body.replace(b"alice", b"mallory")
    raw = urllib.request.Request(prepared.url, data=tampered, method="POST",
                                 headers=dict(prepared.headers))
    with pytest.raises(urllib.error.HTTPError) as excinfo:
        urllib.request.urlopen(raw, timeout=30)
    assert excinfo.value.code == 403
    assert excinfo.value.headers["x-amzn-ErrorType"] == "InvalidSignatureException"
    assert emu.events() == []


def test_stale_signature_is_expired(make_emulator):
    import datetime as dt

    emu = make_emulator()
    emu.wall_clock = lambda: dt.datetime.now(dt.timezone.utc) + dt.timedelta(minutes=20)
    c = client(emu)
    with pytest.raises(ClientError) as excinfo:
        c.put_audit_events(channelArn=CHANNEL_ARN, auditEvents=batch(1))
    assert error_of(excinfo) == ("InvalidSignatureException", 403)
    assert "expired" in excinfo.value.response["Error"]["Message"]


def test_unknown_path_is_unknown_operation(make_emulator):
    emu = make_emulator()
    status, headers, _ = signed_request(emu, b"{}", path="/PutEvents")
    assert (status, headers["x-amzn-ErrorType"]) == (404, "UnknownOperationException")


def test_account_in_arn_is_used_for_recipient_check(make_emulator):
    other = f"arn:aws:cloudtrail:us-east-1:{'9' * 12}:channel/0b9a1c0e-5d33-4a5f-9f55-3c7a1a2b3c4d"
    emu = make_emulator(channels=None)
    response = client(emu).put_audit_events(channelArn=other, auditEvents=batch(1))
    assert response["failed"][0]["errorCode"] == "InvalidRecipient"
    assert ACCOUNT not in response["failed"][0]["errorMessage"]


def test_order_shape_then_channel_then_duplicates(make_emulator):
    # The documented order: a malformed body is refused before the channel is looked up, and
    # an unknown channel before duplicate ids are looked at.
    c = client(make_emulator(), config=NO_CLIENT_VALIDATION)
    with pytest.raises(ClientError) as excinfo:
        c.put_audit_events(channelArn=OTHER_CHANNEL, auditEvents=batch(101))
    assert error_of(excinfo) == ("ValidationException", 400)
    with pytest.raises(c.exceptions.ChannelNotFound):
        c.put_audit_events(channelArn=OTHER_CHANNEL,
                           auditEvents=[audit_event("d"), audit_event("d")])
