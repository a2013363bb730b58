"""Helpers for the emulator conformance tests: boto3 clients, valid events, raw signed calls."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import boto3
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials

from cloudtrail_sink import schema

ACCOUNT = "123456789012"
OTHER_ACCOUNT = "210987654321"
CHANNEL_ARN = f"arn:aws:cloudtrail:us-east-1:{ACCOUNT}:channel/0b9a1c0e-5d33-4a5f-9f55-3c7a1a2b3c4d"
KEY, SECRET = "AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"

NO_RETRIES = Config(retries={"mode": "standard", "total_max_attempts": 1})
# botocore checks some lengths itself (min items, id length); other SDKs and raw callers do not,
# so the server-side checks are tested with the client's own validation off.
NO_CLIENT_VALIDATION = Config(retries={"mode": "standard", "total_max_attempts": 1},
                              parameter_validation=False)


def client(emu, region: str = "us-east-1", config: Config = NO_RETRIES, **kwargs):
    """A boto3 cloudtrail-data client pointed at the emulator (no retries unless configured)."""
    kwargs.setdefault("aws_access_key_id", KEY)
    kwargs.setdefault("aws_secret_access_key", SECRET)
    return boto3.client("cloudtrail-data", endpoint_url=emu.url, region_name=region,
                        config=config, **kwargs)


def event_data(uid: str = "uid-1", **overrides) -> dict:
    data = {
        "version": "1.0",
        "UID": uid,
        "userIdentity": {"type": "CustomUserIdentity", "principalId": "alice"},
        "eventTime": "2021-10-27T12:13:14Z",
        "eventName": "Login",
        "eventSource": "myapp.example.com",
        "sourceIPAddress": "203.0.113.7",
        "recipientAccountId": ACCOUNT,
    }
    for name, value in overrides.items():
        if value is None:
            data.pop(name, None)
        else:
            data[name] = value
    return data


def audit_event(id_: str = "e1", data=None, with_checksum: bool = True, **overrides) -> dict:
    text = data if isinstance(data, str) else schema.dumps(
        data if data is not None else event_data(uid=f"uid-{id_}", **overrides))
    entry = {"id": id_, "eventData": text}
    if with_checksum:
        entry["eventDataChecksum"] = schema.checksum(text)
    return entry


def batch(n: int, prefix: str = "e") -> list[dict]:
    return [audit_event(f"{prefix}{i}") for i in range(n)]


def signed_request(emu, body: bytes, query: str | None = None, *, service="cloudtrail-data",
                   region="us-east-1", key=KEY, secret=SECRET, method="POST",
                   path="/PutAuditEvents", headers=None, sign=True):
    """Send a raw request signed with botocore's SigV4Auth; returns (status, headers, json)."""
    if query is None:
        query = "channelArn=" + urllib.request.quote(CHANNEL_ARN, safe="")
    url = f"{emu.url}{path}" + (f"?{query}" if query else "")
    req = AWSRequest(method=method, url=url, data=body,
                     headers={"Content-Type": "application/json", **(headers or {})})
    if sign:
        SigV4Auth(Credentials(key, secret), service, region).add_auth(req)
    prepared = req.prepare()
    raw = urllib.request.Request(prepared.url, data=prepared.body, method=method,
                                 headers=dict(prepared.headers))
    try:
        with urllib.request.urlopen(raw, timeout=30) as resp:
            return resp.status, resp.headers, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as err:
        return err.code, err.headers, json.loads(err.read() or b"null")


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=30) as resp:
        return json.loads(resp.read())


def put_json(url: str, obj):
    req = urllib.request.Request(url, data=json.dumps(obj).encode(), method="PUT",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"null")
