"""One spooled record turned into one PutAuditEvents entry, or into a reason it can never be one.

- :func:`event_id` derives the service ``id`` (docs/spool.md, "The service's event id"): the
  record's valid ``id``, else a valid ``UID``, else ``"u" + sha256(UID)[:64]``, else
  ``"d" + sha256(canonical JSON of eventData)[:64]``. Never random: a re-sent event keeps its id.
- :func:`prepare` fills ``version`` ("1.0") and ``recipientAccountId`` (the channel's account)
  when absent, without changing anything else.
- :func:`build` runs the whole pre-send path for one record: shape check (``MalformedRecord``),
  ``prepare``, ``schema.check_event`` (the same checks as the emulator, so an event that can never
  succeed is dead-lettered before any API call), serialization (:func:`dumps`, orjson), the
  checksum (equal to ``schema.checksum`` of the text) and the entry's exact bytes in the request
  body (:func:`entry_wire`); its size is their length.
- :func:`request_body` joins prepared entries into the exact request body botocore's rest-json
  serializer would produce for them (``json.dumps`` of ``{"auditEvents": [...]}``, byte for
  byte), so the sender hands botocore these bytes instead of having it walk and serialize 100
  entries again, and the size budget the batcher counts is the length of what is sent.
"""

from __future__ import annotations

import binascii
import hashlib
import json
import re
from json.encoder import encode_basestring_ascii
from typing import Any

import orjson

from . import safejson, schema

ID_RE = re.compile(r"\A[-_A-Za-z0-9]{1,128}\Z")
DEFAULT_VERSION = "1.0"

# botocore's rest-json body is json.dumps(body) with the default separators (", ", ": ") and
# ASCII escaping: {"auditEvents": [E, E, ...]} with E = {"id": "..", "eventData": "..",
# "eventDataChecksum": ".."}.
REQUEST_OVERHEAD = len('{"auditEvents": []}')
ENTRY_SEPARATOR = len(", ")
_ENTRY_KEYS = len('{"id": , "eventData": , "eventDataChecksum": }')


def event_id(record: Any) -> str:
    """The service event id of a spool record (a map holding ``eventData``)."""
    if isinstance(record, dict):
        rid = record.get("id")
        if isinstance(rid, str) and ID_RE.match(rid):
            return rid
        data = record.get("eventData")
    else:
        data = None
    uid = data.get("UID") if isinstance(data, dict) else None
    if isinstance(uid, str):
        if ID_RE.match(uid):
            return uid
        return "u" + hashlib.sha256(uid.encode("utf-8", "surrogatepass")).hexdigest()[:64]
    try:
        canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                               default=repr)
    except (TypeError, ValueError, RecursionError):
        # Keys json cannot sort or carry (bytes, mixed types) or nesting too deep for it: the
        # safe JSON form is as stable (same data, same id) and never raises.
        canonical = json.dumps(safejson.jsonable(data)[0], sort_keys=True,
                               separators=(",", ":"), ensure_ascii=False)
    return "d" + hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).hexdigest()[:64]


def prepare(event_data: dict, account_id: str | None) -> dict:
    """Return ``event_data`` with ``version`` and ``recipientAccountId`` filled when absent."""
    if event_data.get("version") is None or (
            account_id and event_data.get("recipientAccountId") is None):
        event_data = dict(event_data)
        if event_data.get("version") is None:
            event_data["version"] = DEFAULT_VERSION
        if account_id and event_data.get("recipientAccountId") is None:
            event_data["recipientAccountId"] = account_id
    return event_data


def dumps(event_data: Any) -> bytes:
    """The UTF-8 JSON the sink sends as ``eventData``: compact, keys in their order.

    orjson, for speed (it is several times faster than the json module); ``schema.dumps``
    produces the same text for the same data except for float formatting. Values JSON cannot
    carry (binary strings, lone surrogates, integers beyond 64 bits) raise ``TypeError``;
    non-finite floats (NaN, Infinity) become ``null``, as orjson does; nesting deeper than
    ``schema.MAX_DEPTH`` raises ``ValueError``.
    """
    try:
        # Without OPT_NON_STR_KEYS first: the same bytes when every key is a str, 40% faster.
        return orjson.dumps(event_data)
    except TypeError:
        pass
    try:
        return orjson.dumps(event_data, option=orjson.OPT_NON_STR_KEYS)
    except orjson.JSONEncodeError as exc:
        if "ecursion" not in str(exc):
            raise
        # orjson stops at schema.MAX_DEPTH levels of nesting: the emulator refuses what is
        # deeper, and the service's JSON reader would not go much further either.
        raise ValueError(schema.TOO_DEEP) from None


def checksum(raw: bytes) -> str:
    """``eventDataChecksum`` of the UTF-8 bytes of ``eventData`` (== ``schema.checksum``)."""
    return binascii.b2a_base64(hashlib.sha256(raw).digest(), newline=False).decode()


def entry_wire(eid: str, text: str, check: str, raw: bytes | None = None) -> bytes:
    """The entry's bytes in botocore's request body: ``json.dumps`` of ``entry()``, exactly."""
    if raw is not None and raw.isascii() and b"\x7f" not in raw:
        # JSON text holds no raw control characters, so for ASCII text without DEL the only
        # characters json.dumps escapes are " and \, which orjson escapes the same way.
        data = orjson.dumps(text)
    else:
        data = encode_basestring_ascii(text).encode("ascii")
    # Ids are [-_A-Za-z0-9] only (event_id guarantees it) and checksums base64: never escaped.
    return b"".join((b'{"id": "', eid.encode("ascii"), b'", "eventData": ', data,
                     b', "eventDataChecksum": "', check.encode("ascii"), b'"}'))


_BODY_HEAD = b'{"auditEvents": ['
_BODY_SEP = b", "
_BODY_TAIL = b"]}"


def request_body(entries: list) -> bytes | None:
    """The request body for these entries (``Prepared.entry()`` results), or None when any of
    them is a plain dict without its wire bytes (then botocore serializes as usual)."""
    try:
        wires = [e.wire for e in entries]
    except AttributeError:
        return None
    return _BODY_HEAD + _BODY_SEP.join(wires) + _BODY_TAIL


def entry_size(eid: str, text: str, check: str, raw: bytes | None = None) -> int:
    """Bytes one entry takes in botocore's request body (without the separator)."""
    if raw is not None and raw.isascii():
        # JSON text holds no raw control characters, so botocore's ASCII escaping only adds a
        # backslash before " and \ and turns DEL into \u007f.
        escaped = len(raw) + 2 + raw.count(b'"') + raw.count(b"\\") + 5 * raw.count(b"\x7f")
    else:
        escaped = len(encode_basestring_ascii(text))
    # Ids are [-_A-Za-z0-9] only (event_id guarantees it): nothing in them is escaped.
    return _ENTRY_KEYS + len(eid) + 2 + escaped + len(check) + 2


def request_size(sizes: list[int]) -> int:
    """Bytes of the whole request body for entries of the given sizes."""
    if not sizes:
        return REQUEST_OVERHEAD
    return REQUEST_OVERHEAD + sum(sizes) + ENTRY_SEPARATOR * (len(sizes) - 1)


_SMALLEST_OBJECT_LIMIT = min(schema.OBJECT_LIMITS.values())


def _check(data: dict, raw: bytes, account_id: str | None) -> schema.Problem | None:
    """``schema.check_event`` on what is sent, without measuring objects when it cannot matter.

    Each object field's compact JSON is a substring of the whole event's, so when the whole is
    within the smallest object limit no object can exceed its own: the objects are then checked
    for type only (``object_bytes``), not serialized again.
    """
    if len(raw) <= _SMALLEST_OBJECT_LIMIT:
        return schema.check_event(data, account_id, object_bytes=len(raw))
    return schema.check_event(orjson.loads(raw), account_id)


class Entry(dict):
    """One PutAuditEvents entry: a plain dict to anyone (botocore serializes it as one), which
    also carries ``wire``, its exact bytes in the request body. Never modify one: a changed
    entry must be a plain dict, which botocore serializes itself."""

    __slots__ = ("wire",)


class Prepared:
    """A record ready to be sent: its id, wire text, checksum, entry bytes and their size."""

    __slots__ = ("id", "text", "checksum", "wire", "size", "offset")

    def __init__(self, id: str, text: str, checksum: str, wire: bytes):
        self.id = id
        self.text = text
        self.checksum = checksum
        self.wire = wire
        self.size = len(wire)
        self.offset = -1  # the record's byte offset in its segment (the ack journal's key)

    def entry(self) -> Entry:
        e = Entry(id=self.id, eventData=self.text, eventDataChecksum=self.checksum)
        e.wire = self.wire
        return e


class Rejected:
    """A record that can never be delivered: code, message (starting ``sink:``), its data."""

    __slots__ = ("id", "code", "message", "event_data")

    def __init__(self, id: str, code: str, message: str, event_data: Any):
        self.id = id
        self.code = code
        self.message = message
        self.event_data = event_data


def build(record: Any, account_id: str | None, max_entry_bytes: int | None = None
          ) -> Prepared | Rejected:
    """Run the pre-send path for one decoded spool record."""
    eid = event_id(record)
    data = record.get("eventData") if isinstance(record, dict) else None
    if not isinstance(data, dict):
        what = type(record).__name__ if not isinstance(record, dict) else "a map without an eventData map"
        return Rejected(eid, "MalformedRecord", f"sink: segment entry is {what}, not an event map",
                        data if isinstance(record, dict) else record)
    data = prepare(data, account_id)
    try:
        raw = dumps(data)
    except (TypeError, ValueError, RecursionError) as exc:  # JSONEncodeError is a TypeError
        if str(exc) == schema.TOO_DEEP:
            return Rejected(eid, "InvalidData", "sink: " + schema.TOO_DEEP, data)
        return Rejected(eid, "InvalidData", "sink: eventData holds a value JSON cannot carry "
                        f"({str(exc).split(':')[0][:80]})", data)
    try:
        problem = _check(data, raw, account_id)
    except (TypeError, ValueError, RecursionError) as exc:
        problem = schema.Problem("InvalidData", "eventData holds a value JSON cannot carry "
                                 f"({type(exc).__name__})")
    if problem is not None:
        return Rejected(eid, problem.code, "sink: " + problem.message, data)
    text = raw.decode("utf-8")
    check = checksum(raw)
    wire = entry_wire(eid, text, check, raw)
    size = len(wire)
    # request_size([size]), without a list per event
    if max_entry_bytes is not None and REQUEST_OVERHEAD + size > max_entry_bytes:
        return Rejected(eid, "FieldTooLong", f"sink: event takes {size} bytes on the wire; a "
                        f"request may carry at most {max_entry_bytes}", data)
    return Prepared(eid, text, check, wire)
