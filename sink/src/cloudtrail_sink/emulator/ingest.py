"""PutAuditEvents, answered like the service (no HTTP here: the server passes the parts in).

Order of checks (the first failing one answers for the whole request):

1. body larger than 1,000,000 bytes -> 413 ``RequestEntityTooLargeException`` (server);
2. SigV4 (see ``auth``);
3. ``channelArn`` missing -> 400 ``ValidationException``; not a channel ARN -> 400
   ``InvalidChannelARN``; ``externalId`` given but not 2-1224 of ``[\\w+=,.@:/-]`` -> 400
   ``ValidationException``;
4. quota for (channel account, signing region) -> 400 ``ThrottlingException``;
5. injected request faults (``faults``);
6. body not JSON -> 400 ``SerializationException``; members of the wrong JSON type -> 400
   ``SerializationException``; ``auditEvents`` missing or not 1-100 entries, an ``id`` missing,
   longer than 128 or outside ``^[-_A-Za-z0-9]+$``, ``eventData`` missing -> 400
   ``ValidationException`` listing every violation;
7. channel unknown, or in another region than the one the call was signed for -> 400
   ``ChannelNotFound``; external id missing or wrong -> 400 ``ChannelInsufficientPermission``;
8. two entries with the same ``id`` -> 400 ``DuplicatedAuditEventId``;
9. per event, in request order: injected event faults, then ``schema.parse_event_text`` ->
   ``failed[]`` entries; the rest are stored and listed in ``successful[]`` with a fresh
   ``eventID``.
"""

from __future__ import annotations

import datetime as _dt
import json
import re
import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

from .. import schema
from .channels import EXTERNAL_ID_RE, Channels, parse_arn
from .faults import FaultDice
from .quota import CallQuota
from .storage import EventStore

MAX_EVENTS = 100
ID_RE = re.compile(r"\A[-_A-Za-z0-9]{1,128}\Z")
EVENT_VERSION = "1.0"


class ApiError(Exception):
    """A whole-request error: HTTP status, ``x-amzn-ErrorType`` code and message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


@dataclass
class Result:
    successful: list[dict]
    failed: list[dict]

    def body(self) -> dict:
        return {"successful": self.successful, "failed": self.failed}


class PutAuditEvents:
    def __init__(self, store: EventStore, channels: Channels, quota: CallQuota,
                 dice: FaultDice) -> None:
        self.store = store
        self.channels = channels
        self.quota = quota
        self.dice = dice

    def __call__(self, query: str, body: bytes, region: str) -> Result:
        params = parse_qs(query, keep_blank_values=True)
        arn_text = _single(params, "channelArn")
        external_id = _single(params, "externalId")
        if arn_text is None:
            raise ApiError(400, "ValidationException", "1 validation error detected: Value null "
                           "at 'channelArn' failed to satisfy constraint: Member must not be null")
        arn = parse_arn(arn_text)
        if arn is None:
            raise ApiError(400, "InvalidChannelARN",
                           "The specified channel ARN is not a valid channel ARN "
                           "(arn:aws:cloudtrail:REGION:ACCOUNT:channel/UUID).")
        if external_id is not None and not EXTERNAL_ID_RE.match(external_id):
            raise ApiError(400, "ValidationException",
                           "1 validation error detected: Value at 'externalId' failed to "
                           "satisfy constraint: Member must have length between 2 and 1224 and "
                           "satisfy regular expression pattern: ^[\\w+=,.@:\\/-]*$")
        if not self.quota.take(arn.account, region):
            raise ApiError(400, "ThrottlingException", "Rate exceeded")
        fault = self.dice.request_fault()
        if fault is not None:
            raise ApiError(*fault)

        entries = _parse_body(body)
        if not self.channels.exists(arn.arn) or arn.region != region:
            where = "" if arn.region == region else (
                f" (the channel is in {arn.region}, the call was signed for {region})")
            raise ApiError(400, "ChannelNotFound", f"The channel could not be found{where}.")
        if not self.channels.external_id_ok(arn.arn, external_id):
            raise ApiError(400, "ChannelInsufficientPermission",
                           "The externalId is missing or does not match the one the channel's "
                           "resource policy requires.")
        seen: set[str] = set()
        for entry in entries:
            if entry["id"] in seen:
                raise ApiError(400, "DuplicatedAuditEventId",
                               f"Two or more entries in the request have the same event ID "
                               f"({entry['id']}).")
            seen.add(entry["id"])

        successful: list[dict] = []
        failed: list[dict] = []
        rows = []
        ingestion_time = _now_text()
        for entry in entries:
            injected = self.dice.event_fault()
            if injected is not None:
                failed.append({"id": entry["id"], "errorCode": injected[0],
                               "errorMessage": injected[1]})
                continue
            text = entry["eventData"]
            data, problem = schema.parse_event_text(text, arn.account,
                                                    entry.get("eventDataChecksum"))
            if problem is not None:
                failed.append({"id": entry["id"], "errorCode": problem.code,
                               "errorMessage": problem.message})
                continue
            event_id = str(uuid.uuid4())
            rows.append((event_id, arn.arn, data["UID"],
                         _wrap(event_id, arn.arn, arn.region, arn.account, data["eventTime"],
                               ingestion_time, text)))
            successful.append({"id": entry["id"], "eventID": event_id})
        self.store.add(rows)
        return Result(successful, failed)


def _single(params: dict[str, list[str]], name: str) -> str | None:
    values = params.get(name)
    if not values:
        return None
    if len(values) > 1:
        raise ApiError(400, "ValidationException", f"query parameter {name} given more than once")
    return values[0]


def _parse_body(body: bytes) -> list[dict]:
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        raise ApiError(400, "SerializationException", "The request body is not valid JSON.")
    if not isinstance(doc, dict):
        raise ApiError(400, "SerializationException", "The request body must be a JSON object.")
    events = doc.get("auditEvents")
    if events is None:
        raise ApiError(400, "ValidationException", "1 validation error detected: Value null at "
                       "'auditEvents' failed to satisfy constraint: Member must not be null")
    if not isinstance(events, list):
        raise ApiError(400, "SerializationException", "auditEvents must be a JSON array.")
    errors = []
    if not 1 <= len(events) <= MAX_EVENTS:
        errors.append(f"Value at 'auditEvents' failed to satisfy constraint: Member must have "
                      f"length between 1 and {MAX_EVENTS} (it has {len(events)})")
    for index, entry in enumerate(events, start=1):
        where = f"'auditEvents.{index}.member"
        if not isinstance(entry, dict):
            raise ApiError(400, "SerializationException",
                           f"auditEvents entry {index} must be a JSON object.")
        for name in ("id", "eventData", "eventDataChecksum"):
            value = entry.get(name)
            if value is not None and not isinstance(value, str):
                raise ApiError(400, "SerializationException",
                               f"auditEvents entry {index}: {name} must be a string.")
        event_id = entry.get("id")
        if event_id is None:
            errors.append(f"Value null at {where}.id' failed to satisfy constraint: Member must "
                          "not be null")
        elif not ID_RE.match(event_id):
            errors.append(f"Value at {where}.id' failed to satisfy constraint: Member must have "
                          "length between 1 and 128 and satisfy regular expression pattern: "
                          "^[-_A-Za-z0-9]+$")
        if entry.get("eventData") is None:
            errors.append(f"Value null at {where}.eventData' failed to satisfy constraint: "
                          "Member must not be null")
    if errors:
        shown = errors[:10]
        raise ApiError(400, "ValidationException",
                       f"{len(errors)} validation error{'s' if len(errors) > 1 else ''} "
                       f"detected: {'; '.join(shown)}")
    return events


def _now_text() -> str:
    now = _dt.datetime.now(_dt.timezone.utc)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"


def _wrap(event_id: str, arn: str, region: str, account: str, event_time: str,
          ingestion_time: str, event_data_text: str) -> str:
    # eventData was just parsed as a JSON object, so its text can be spliced in as is: no
    # re-serialisation on the hot path, and what is stored is exactly what was sent.
    head = json.dumps({
        "eventVersion": EVENT_VERSION,
        "eventCategory": "ActivityAuditLog",
        "eventType": "ActivityLog",
        "eventID": event_id,
        "eventTime": event_time,
        "awsRegion": region,
        "recipientAccountId": account,
        "metadata": {"ingestionTime": ingestion_time, "channelARN": arn},
    }, separators=(",", ":"))
    return f'{head[:-1]},"eventData":{event_data_text}}}'
