"""SigV4 checks of the ``Authorization`` header, the way the AWS front door answers.

Every request must carry ``Authorization: AWS4-HMAC-SHA256 Credential=KEY/DATE/REGION/SERVICE/
aws4_request, SignedHeaders=..., Signature=...`` and ``X-Amz-Date``:

- no ``Authorization`` header -> 403 ``MissingAuthenticationTokenException``;
- not of that form, ``X-Amz-Date`` missing or malformed, scope date not the date of
  ``X-Amz-Date``, ``host`` or ``x-amz-date`` not signed -> 400 ``IncompleteSignatureException``;
- scope service not ``cloudtrail-data`` (``cloudtrail`` for the Lake control plane) -> 403
  ``InvalidSignatureException``;
- ``X-Amz-Date`` more than 15 minutes from the emulator's wall clock -> 403
  ``InvalidSignatureException`` ("Signature expired");
- with credentials configured: another access key -> 403 ``UnrecognizedClientException``;
  a signature that botocore's own ``SigV4Auth`` does not reproduce over the received method,
  path, query, signed headers and body -> 403 ``InvalidSignatureException``.

Without configured credentials the signature itself is not checked (any key is accepted), but
the form and scope are. The region of the scope is returned: it is the region the call was made
to, which the channel's region must match.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import hmac
import re
from dataclasses import dataclass
from typing import Callable, Mapping

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

SERVICE = "cloudtrail-data"
MAX_SKEW = _dt.timedelta(minutes=15)
AUTH_RE = re.compile(
    r"\AAWS4-HMAC-SHA256 +Credential=(?P<key>[^/,\s]+)/(?P<date>\d{8})/(?P<region>[a-z0-9-]+)/"
    r"(?P<service>[a-z0-9-]+)/aws4_request *, *SignedHeaders=(?P<signed>[a-z0-9;_.-]+) *, *"
    r"Signature=(?P<signature>[0-9a-f]{64})\Z")
AMZ_DATE_RE = re.compile(r"\A\d{8}T\d{6}Z\Z")


class AuthError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


@dataclass(frozen=True)
class Caller:
    access_key: str
    region: str


def check_request(method: str, raw_path: str, headers: Mapping[str, str], body: bytes,
                  credentials: tuple[str, str] | None,
                  now: Callable[[], _dt.datetime], service: str = SERVICE) -> Caller:
    """Return who called and in which region, or raise ``AuthError``."""
    header = headers.get("Authorization")
    if header is None:
        raise AuthError(403, "MissingAuthenticationTokenException", "Missing Authentication Token")
    match = AUTH_RE.match(header.strip())
    if match is None:
        raise AuthError(400, "IncompleteSignatureException",
                        "Authorization header must be AWS4-HMAC-SHA256 with Credential, "
                        "SignedHeaders and Signature")
    amz_date = headers.get("X-Amz-Date")
    if amz_date is None or not AMZ_DATE_RE.match(amz_date):
        raise AuthError(400, "IncompleteSignatureException",
                        "X-Amz-Date header missing or not YYYYMMDDTHHMMSSZ")
    signed = match["signed"].split(";")
    if "host" not in signed or "x-amz-date" not in signed:
        raise AuthError(400, "IncompleteSignatureException",
                        "SignedHeaders must include host and x-amz-date")
    if match["service"] != service:
        raise AuthError(403, "InvalidSignatureException",
                        f"Credential should be scoped to correct service: '{service}'.")
    if match["date"] != amz_date[:8]:
        raise AuthError(400, "IncompleteSignatureException",
                        "Credential scope date does not match X-Amz-Date")
    try:
        signed_at = _dt.datetime.strptime(amz_date, "%Y%m%dT%H%M%SZ").replace(
            tzinfo=_dt.timezone.utc)
    except ValueError:
        raise AuthError(400, "IncompleteSignatureException", "X-Amz-Date is not a real date")
    if abs(now() - signed_at) > MAX_SKEW:
        raise AuthError(403, "InvalidSignatureException",
                        "Signature expired: X-Amz-Date is more than 15 minutes from the "
                        "emulator's clock")
    if credentials is not None:
        key, secret = credentials
        if not hmac.compare_digest(match["key"].encode(), key.encode()):
            raise AuthError(403, "UnrecognizedClientException",
                            "The security token included in the request is invalid.")
        expected = _signature(method, raw_path, headers, body, signed, amz_date,
                              match["region"], key, secret, service)
        if expected is None or not hmac.compare_digest(expected, match["signature"]):
            raise AuthError(403, "InvalidSignatureException",
                            "The request signature we calculated does not match the signature "
                            "you provided. Check your AWS Secret Access Key and signing method.")
    return Caller(match["key"], match["region"])


def _signature(method: str, raw_path: str, headers: Mapping[str, str], body: bytes,
               signed: list[str], amz_date: str, region: str, key: str, secret: str,
               service: str) -> str | None:
    """The signature botocore would compute for this request, or None if it cannot be rebuilt."""
    values = {}
    for name in signed:
        value = headers.get(name)
        if value is None:
            return None  # a header said to be signed was not sent
        values[name] = value
    content_sha = values.get("x-amz-content-sha256")
    if content_sha is not None and content_sha != hashlib.sha256(body).hexdigest():
        return None
    request = AWSRequest(method=method, url=f"http://{values['host']}{raw_path}", data=body,
                         headers=values)
    request.context["timestamp"] = amz_date
    signer = SigV4Auth(Credentials(key, secret), service, region)
    canonical = signer.canonical_request(request)
    return signer.signature(signer.string_to_sign(request, canonical), request)
