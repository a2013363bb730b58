"""The CloudTrail Lake integration-event schema, checked the strict way.

One implementation serves both sides: the emulator uses it to answer like the service, and the
sink uses it to dead-letter an event that can never succeed before wasting an API call on it.

Contract (``check_event_text`` applies the steps in this order and reports the first problem):

1. ``eventDataChecksum`` when given must equal base64(sha256(UTF-8 bytes of eventData)):
   otherwise ``InvalidChecksum``.
2. ``eventData`` must be JSON text (no NaN/Infinity) holding an object: otherwise ``InvalidData``.
3. Every required field must be present and not null: otherwise ``FieldNotFound``
   (``version``, ``userIdentity``, ``userIdentity.type``, ``userIdentity.principalId``,
   ``eventSource``, ``eventName``, ``eventTime``, ``UID``, ``recipientAccountId``).
4. Types: strings must be strings, objects objects; unknown top-level fields are refused
   (strict reading): otherwise ``InvalidData``.
5. Limits, measured in UTF-8 **bytes** (strict reading of "length"): string fields per
   ``STRING_LIMITS``; ``requestParameters`` and ``responseElements`` at most 100,000 bytes and
   ``additionalEventData`` at most 28,000 bytes of compact JSON (strict reading of "kB"):
   otherwise ``FieldTooLong``.
6. ``eventTime`` must be ``YYYY-MM-DDTHH:MM:SSZ`` naming a real UTC instant; ``sourceIPAddress``
   an IPv4 or IPv6 address: otherwise ``InvalidData``.
7. ``recipientAccountId`` must equal the channel's account: otherwise ``InvalidRecipient``.

Messages name the field and the limit, never the value: they end up in logs.
"""

from __future__ import annotations

import base64
import datetime as _dt
import hashlib
import ipaddress
import json
import re
from dataclasses import dataclass
from typing import Any

REQUIRED_TOP = ("version", "userIdentity", "eventSource", "eventName", "eventTime", "UID",
                "recipientAccountId")
REQUIRED_IDENTITY = ("type", "principalId")

STRING_LIMITS = {
    "version": 256,
    "userAgent": 1024,
    "eventSource": 1024,
    "eventName": 1024,
    "UID": 1024,
    "errorCode": 256,
    "errorMessage": 256,
    "recipientAccountId": 12,
    "eventTime": 20,
    "sourceIPAddress": 45,
}
IDENTITY_STRING_LIMITS = {"type": 128, "principalId": 1024}
OBJECT_LIMITS = {
    "requestParameters": 100_000,
    "responseElements": 100_000,
    "additionalEventData": 28_000,
}
# How much larger ``dumps`` can make a JSON value than its source text: strings never grow
# (dumps escapes only what JSON requires escaped, writes other characters raw), whitespace and
# repeated keys only shrink it; numbers grow at most 4.5x ("1e15" -> "1000000000000000.0").
OBJECT_SIZE_GROWTH = 5
KNOWN_TOP = frozenset(STRING_LIMITS) | frozenset(OBJECT_LIMITS) | {"userIdentity"}
KNOWN_IDENTITY = frozenset(IDENTITY_STRING_LIMITS) | {"details"}

EVENT_TIME_RE = re.compile(r"\A\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z\Z")
ACCOUNT_RE = re.compile(r"\A\d{12}\Z")


@dataclass(frozen=True)
class Problem:
    """Why an event cannot be accepted: a per-event error code of the service and a message."""

    code: str
    message: str


def checksum(event_data_text: str) -> str:
    """``eventDataChecksum`` for an ``eventData`` string: base64 of its raw SHA-256 digest."""
    return base64.b64encode(hashlib.sha256(event_data_text.encode("utf-8")).digest()).decode()


def dumps(event_data: Any) -> str:
    """The compact JSON text the sink sends as ``eventData`` (and measures sizes with)."""
    return json.dumps(event_data, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    # 1e400 is valid JSON but no double: it would become inf and break every size measurement.
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError("number out of range")
    return value


# One decoder for every call: json.loads with hooks would build a new one per event.
_DECODER = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite_float)


def check_event_text(text: Any, account_id: str | None, event_checksum: str | None = None
                     ) -> Problem | None:
    """Check ``eventData`` as sent on the wire (a string) the way the service does."""
    return parse_event_text(text, account_id, event_checksum)[1]


def parse_event_text(text: Any, account_id: str | None, event_checksum: str | None = None
                     ) -> tuple[Any, Problem | None]:
    """``check_event_text`` that also returns the decoded object (None when undecodable)."""
    if not isinstance(text, str):
        return None, Problem("InvalidData", "eventData must be a string holding a JSON object")
    if not _encodable(text):
        return None, Problem("InvalidData", "eventData holds a lone UTF-16 surrogate")
    if event_checksum is not None and event_checksum != checksum(text):
        return None, Problem("InvalidChecksum",
                             "eventDataChecksum does not match the SHA-256 of eventData")
    try:
        data = _DECODER.decode(text)
    except (ValueError, RecursionError):
        return None, Problem("InvalidData", "eventData is not valid JSON")
    # A \uD800-style escape decodes to a lone surrogate, which no UTF-8 store can hold.
    if "\\u" in text and not _encodable(dumps(data)):
        return None, Problem("InvalidData", "eventData holds a lone UTF-16 surrogate")
    return data, check_event(data, account_id, text_bytes=len(text.encode("utf-8")))


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_event(data: Any, account_id: str | None, *, text_bytes: int | None = None
                ) -> Problem | None:
    """Check a decoded ``eventData`` object; ``account_id`` None skips the recipient check.

    ``text_bytes``, the UTF-8 size of the JSON text ``data`` was decoded from, lets small events
    skip re-serialising their objects to measure them (see ``OBJECT_SIZE_GROWTH``).
    """
    if not isinstance(data, dict):
        return Problem("InvalidData", "eventData must be a JSON object")
    for name in REQUIRED_TOP:
        if data.get(name) is None:
            return Problem("FieldNotFound", f"required field {name} is missing")
    identity = data["userIdentity"]
    if not isinstance(identity, dict):
        return Problem("InvalidData", "userIdentity must be an object")
    for name in REQUIRED_IDENTITY:
        if identity.get(name) is None:
            return Problem("FieldNotFound", f"required field userIdentity.{name} is missing")

    for name in data:
        if name not in KNOWN_TOP:
            return Problem("InvalidData", f"unknown field {name!r} (not in the integration schema)")
    for name in identity:
        if name not in KNOWN_IDENTITY:
            return Problem("InvalidData", f"unknown field 'userIdentity.{name}'")

    problem = _check_strings(data, STRING_LIMITS, "")
    if problem is None:
        problem = _check_strings(identity, IDENTITY_STRING_LIMITS, "userIdentity.")
    if problem is not None:
        return problem
    details = identity.get("details")
    if details is not None and not isinstance(details, dict):
        return Problem("InvalidData", "userIdentity.details must be an object")

    for name, limit in OBJECT_LIMITS.items():
        value = data.get(name)
        if value is None:
            continue
        if not isinstance(value, dict):
            return Problem("InvalidData", f"{name} must be an object")
        if text_bytes is not None and text_bytes * OBJECT_SIZE_GROWTH <= limit:
            continue  # cannot be over the limit, whatever it holds
        size = len(dumps(value).encode("utf-8"))
        if size > limit:
            return Problem("FieldTooLong", f"{name} is {size} bytes; the limit is {limit}")

    if not valid_event_time(data["eventTime"]):
        return Problem("InvalidData", "eventTime must be YYYY-MM-DDTHH:MM:SSZ (UTC)")
    source_ip = data.get("sourceIPAddress")
    if source_ip is not None and not valid_ip(source_ip):
        return Problem("InvalidData", "sourceIPAddress must be an IPv4 or IPv6 address")
    if not ACCOUNT_RE.match(data["recipientAccountId"]):
        return Problem("InvalidRecipient", "recipientAccountId must be a 12-digit account id")
    if account_id is not None and data["recipientAccountId"] != account_id:
        return Problem("InvalidRecipient",
                       "recipientAccountId is not the account that owns the channel")
    return None


def _check_strings(obj: dict, limits: dict[str, int], prefix: str) -> Problem | None:
    for name, limit in limits.items():
        value = obj.get(name)
        if value is None:
            continue
        if not isinstance(value, str):
            return Problem("InvalidData", f"{prefix}{name} must be a string")
        if name in ("eventTime", "sourceIPAddress", "recipientAccountId"):
            continue  # format-checked below; a length message would only confuse
        size = len(value.encode("utf-8", "surrogatepass"))
        if size > limit:
            return Problem("FieldTooLong", f"{prefix}{name} is {size} bytes; the limit is {limit}")
    return None


def valid_event_time(value: Any) -> bool:
    if not isinstance(value, str) or not EVENT_TIME_RE.match(value):
        return False
    try:
        # The datetime constructor checks the same ranges as strptime, at a tenth of its cost
        # (this runs once per event in the sink).
        _dt.datetime(int(value[0:4]), int(value[5:7]), int(value[8:10]), int(value[11:13]),
                     int(value[14:16]), int(value[17:19]))
    except ValueError:
        return False
    return True


_IPV4_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
# Exactly what ipaddress.IPv4Address accepts (no leading zeros), checked without its overhead.
_IPV4_RE = re.compile(rf"\A{_IPV4_OCTET}(?:\.{_IPV4_OCTET}){{3}}\Z")


def valid_ip(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    if _IPV4_RE.match(value):
        return True
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True
