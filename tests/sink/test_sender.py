"""What each kind of service answer makes the sink do, and where credentials come from."""

from __future__ import annotations

import datetime as dt
import http.server
import threading

import botocore.exceptions as be
import pytest

from cloudtrail_sink import sender
from cloudtrail_sink.config import SinkConfig

from sinksupport import CHANNEL_ARN, event, fill, stored_uids


def client_error(code, status):
    return be.ClientError({"Error": {"Code": code, "Message": "m"},
                           "ResponseMetadata": {"HTTPStatusCode": status}}, "PutAuditEvents")


@pytest.mark.parametrize("exc,kind", [
    (client_error("ThrottlingException", 400), "retry"),
    (client_error("SomethingNew", 429), "retry"),
    (client_error("InternalFailure", 500), "retry"),
    (client_error("ServiceUnavailable", 503), "retry"),
    (be.EndpointConnectionError(endpoint_url="http://x"), "retry"),
    (be.ReadTimeoutError(endpoint_url="http://x"), "retry"),
    (client_error("ChannelNotFound", 400), "pause"),
    (client_error("InvalidChannelARN", 400), "pause"),
    (client_error("ChannelInsufficientPermission", 400), "pause"),
    (client_error("AccessDeniedException", 403), "pause"),
    (client_error("ExpiredTokenException", 400), "pause"),
    (client_error("UnrecognizedClientException", 403), "pause"),
    (client_error("NeverHeardOf", 400), "pause"),  # unexplained 4xx: hold, never drop
    (be.NoCredentialsError(), "pause"),
    (client_error("ValidationException", 400), "split"),
    (client_error("DuplicatedAuditEventId", 400), "split"),
    (client_error("Whatever", 413), "split"),
])
def test_request_errors_are_classified(exc, kind):
    assert sender.classify_exception(exc).kind == kind


ASSUME_ROLE_XML = """<AssumeRoleResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">
<AssumeRoleResult><Credentials><AccessKeyId>ASIAROLEKEYEXAMPLE</AccessKeyId>
<SecretAccessKey>roleSecretKeyExample</SecretAccessKey><SessionToken>token</SessionToken>
<Expiration>{exp}</Expiration></Credentials>
<AssumedRoleUser><AssumedRoleId>AROA:x</AssumedRoleId><Arn>arn:aws:sts::123456789012:assumed-role/r/x</Arn></AssumedRoleUser>
</AssumeRoleResult><ResponseMetadata><RequestId>1</RequestId></ResponseMetadata></AssumeRoleResponse>"""


@pytest.fixture
def fake_sts():
    calls = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"])).decode()
            calls.append(body)
            exp = (dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=1)).strftime(
                "%Y-%m-%dT%H:%M:%SZ")
            out = ASSUME_ROLE_XML.format(exp=exp).encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/xml")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, name="sink-test-sts", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", calls
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_role_arn_assumes_the_role_once_not_per_request(tmp_path, aws_env, monkeypatch, fake_sts):
    from cloudtrail_sink.emulator import Emulator
    from cloudtrail_sink.delivery.coordinator import Runner

    sts_url, calls = fake_sts
    monkeypatch.setenv("AWS_ENDPOINT_URL_STS", sts_url)
    # The emulator verifies signatures against the assumed role's key: the base keys would fail.
    emu = Emulator(db_path=tmp_path / "e.sqlite", channels={CHANNEL_ARN: None},
                   credentials=("ASIAROLEKEYEXAMPLE", "roleSecretKeyExample"))
    emu.start()
    try:
        spool_dir = tmp_path / "spool"
        fill(spool_dir, [event(i) for i in range(250)])
        cfg = SinkConfig(spool_dir=str(spool_dir), channel_arn=CHANNEL_ARN, endpoint_url=emu.url,
                         role_arn="arn:aws:iam::123456789012:role/shipper", listen="",
                         drain=True, max_batch_events=50).validate()
        assert Runner(cfg).run() == 0
        assert len(stored_uids(emu)) == 250
        assert emu.stats()["requests"]["ok"] == 5
        assert len(calls) == 1 and "RoleArn=arn%3Aaws%3Aiam%3A%3A123456789012%3Arole%2Fshipper" in calls[0]
    finally:
        emu.stop()
