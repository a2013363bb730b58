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

``eventData`` text nested deeper than :data:`MAX_DEPTH` objects/arrays is ``InvalidData`` (checked
with step 2): the sink's serializer cannot write it, so the sink refuses it before sending and the
emulator refuses it on the wire, the same way.

Messages name the field and the limit, never the value: they end up in logs.
"""

from __future__ import annotations

import base64
import binascii
import datetime as _dt
import functools
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
# The service documents no limit for userIdentity.details, but a whole event must fit one
# request (the sink's budget, --max-request-bytes, 999,000 bytes by default): the Lua mapper
# bounds details like requestParameters, so an event with every field at its limit is about
# 331,000 bytes of JSON, at most twice that escaped into a request (docs/mappings.md).
DETAILS_LIMIT = 100_000
# How much larger ``dumps`` can make a JSON value than its source text: strings never grow
# (dumps escapes only what JSON requires escaped, writes other characters raw), whitespace and
# repeated keys only shrink it; numbers grow at most 4.5x ("1e15" -> "1000000000000000.0").
OBJECT_SIZE_GROWTH = 5
KNOWN_TOP = frozenset(STRING_LIMITS) | frozenset(OBJECT_LIMITS) | {"userIdentity"}
KNOWN_IDENTITY = frozenset(IDENTITY_STRING_LIMITS) | {"details"}

# Objects and arrays nested inside each other, eventData itself counting as one: orjson (what the
# sink serializes with) writes at most this many, and Python's json reader fails not far above.
MAX_DEPTH = 254
TOO_DEEP = f"eventData is nested deeper than {MAX_DEPTH} levels"

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
    try:
        raw = text.encode("utf-8")  # encoded once: for the checksum and the size
    except UnicodeEncodeError:
        return None, Problem("InvalidData", "eventData holds a lone UTF-16 surrogate")
    if event_checksum is not None and event_checksum != binascii.b2a_base64(
            hashlib.sha256(raw).digest(), newline=False).decode():
        return None, Problem("InvalidChecksum",
                             "eventDataChecksum does not match the SHA-256 of eventData")
    try:
        data = _DECODER.decode(text)
    except ValueError:
        return None, Problem("InvalidData", "eventData is not valid JSON")
    except RecursionError:
        return None, Problem("InvalidData", TOO_DEEP)
    # Counting brackets first keeps the walk off every ordinary event.
    if text.count("{") + text.count("[") > MAX_DEPTH and deeper_than(data, MAX_DEPTH):
        return None, Problem("InvalidData", TOO_DEEP)
    # A \uD800-style escape decodes to a lone surrogate, which no UTF-8 store can hold.
    if "\\u" in text and not _encodable(dumps(data)):
        return None, Problem("InvalidData", "eventData holds a lone UTF-16 surrogate")
    return data, check_event(data, account_id, text_bytes=len(raw))


def deeper_than(value: Any, limit: int) -> bool:
    """True when ``value`` nests more than ``limit`` dicts/lists (itself counting as one);
    iterative, so any depth is measured without recursion."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, (list, tuple)):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children
                     if isinstance(child, (dict, list, tuple)))
    return False


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_event(data: Any, account_id: str | None, *, text_bytes: int | None = None,
                object_bytes: int | None = None) -> Problem | None:
    """Check a decoded ``eventData`` object; ``account_id`` None skips the recipient check.

    ``text_bytes``, the UTF-8 size of the JSON text ``data`` was decoded from, lets small events
    skip re-serialising their objects to measure them (see ``OBJECT_SIZE_GROWTH``);
    ``object_bytes``, a bound the caller knows for the compact JSON size of each object field,
    does the same (an object is measured only when its bound exceeds its limit).

    The answer is always :func:`first_problem`'s: a quick test that an event is plainly valid
    (the usual case) answers None at a fraction of the cost; anything else (a problem, a null, a
    str subclass, a long string) is left to ``first_problem``, which names the first problem.
    """
    if data.__class__ is dict:
        try:
            if _plainly_valid(data, account_id, text_bytes, object_bytes):
                return None
        except Exception:  # first_problem raises the same, or answers what it found first
            pass
    return first_problem(data, account_id, text_bytes=text_bytes, object_bytes=object_bytes)


_REQUIRED_TOP_KEYS = frozenset(REQUIRED_TOP)
_REQUIRED_IDENTITY_KEYS = frozenset(REQUIRED_IDENTITY)
# Per top-level field, what _plainly_valid checks: a length limit (str of at most this many UTF-8
# bytes), 0 (a str whose format is checked after), -1 (an object), -2 (userIdentity).
_FIELD_KIND = {**{name: (0 if name in ("eventTime", "sourceIPAddress", "recipientAccountId")
                         else limit) for name, limit in STRING_LIMITS.items()},
               **{name: -1 for name in OBJECT_LIMITS}, "userIdentity": -2}
_SMALLEST_OBJECT_LIMIT = min(OBJECT_LIMITS.values())


def _plainly_valid(data: dict, account_id: str | None, text_bytes: int | None,
                   object_bytes: int | None) -> bool:
    """True only when ``first_problem`` finds nothing; False when unsure (no null allowed).

    A str of n code points takes at most 4n UTF-8 bytes (3n for a surrogate with
    surrogatepass), so strings of at most a quarter of their limit are not encoded to be measured.
    """
    keys = data.keys()
    if not _REQUIRED_TOP_KEYS <= keys <= KNOWN_TOP:
        return False
    for name, value in data.items():
        kind = _FIELD_KIND[name]
        if kind > 0:
            if value.__class__ is not str or (
                    len(value) << 2 > kind
                    and len(value.encode("utf-8", "surrogatepass")) > kind):
                return False
        elif kind == 0:
            if value.__class__ is not str:
                return False
        elif kind == -1:
            if value.__class__ is not dict:
                return False
        else:
            if value.__class__ is not dict or not (
                    _REQUIRED_IDENTITY_KEYS <= value.keys() <= KNOWN_IDENTITY):
                return False
            for key, item in value.items():
                if key == "details":
                    if item.__class__ is not dict:
                        return False
                elif item.__class__ is not str or (
                        len(item) << 2 > IDENTITY_STRING_LIMITS[key]
                        and len(item.encode("utf-8", "surrogatepass"))
                        > IDENTITY_STRING_LIMITS[key]):
                    return False
    # The format checks are cached (bursts of events share times, addresses, the account); only
    # values of a valid length are looked up, so the caches hold small strings only.
    event_time = data["eventTime"]
    if len(event_time) != 20 or not _valid_event_time_cached(event_time):
        return False
    source_ip = data.get("sourceIPAddress")
    if source_ip is not None and (len(source_ip) > 45 or not _valid_ip_cached(source_ip)):
        return False
    recipient = data["recipientAccountId"]
    if (account_id is not None and recipient != account_id) or len(recipient) != 12 or (
            not _valid_account(recipient)):
        return False
    bound = object_bytes
    if text_bytes is not None and (bound is None or text_bytes * OBJECT_SIZE_GROWTH < bound):
        bound = text_bytes * OBJECT_SIZE_GROWTH
    if bound is None or bound > _SMALLEST_OBJECT_LIMIT:
        for name, limit in OBJECT_LIMITS.items():
            value = data.get(name)
            if value is not None and (bound is None or bound > limit) and (
                    len(dumps(value).encode("utf-8")) > limit):
                return False
    return True


def first_problem(data: Any, account_id: str | None, *, text_bytes: int | None = None,
                  object_bytes: int | None = None) -> Problem | None:
    """The reference check: every step in the contract's order, the first problem found."""
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
        if object_bytes is not None and object_bytes <= limit:
            continue
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


@functools.lru_cache(maxsize=4096)
def _valid_event_time_cached(value: str) -> bool:
    # Events come in bursts from the same seconds: most times were checked a moment ago.
    return valid_event_time(value)


@functools.lru_cache(maxsize=4096)
def _valid_ip_cached(value: str) -> bool:
    return valid_ip(value)


@functools.lru_cache(maxsize=256)
def _valid_account(value: str) -> bool:
    return ACCOUNT_RE.match(value) is not None


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
