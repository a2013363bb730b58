"""PutAuditEvents, answered like the service (no HTTP here: the server passes the parts in).

Order of checks (the first failing one answers for the whole request):

1. body larger than 1,000,000 bytes -> 413 ``RequestEntityTooLargeException`` (server);
2. SigV4 (see ``auth``);
3. ``channelArn`` missing -> 400 ``ValidationException``; not a channel ARN -> 400
   ``InvalidChannelARN``; ``externalId`` given but not 2-1224 of ``[\\w+=,.@:/-]`` -> 400
   ``ValidationException``;
4. quota for (channel account, signing region) -> 400 ``ThrottlingException``;
5. injected request faults (``faults``);
6. the body's shape (``checker``): 400 ``SerializationException`` / ``ValidationException``;
7. channel unknown, or in another region than the one the call was signed for -> 400
   ``ChannelNotFound``; external id missing or wrong -> 400 ``ChannelInsufficientPermission``;
8. two entries with the same ``id`` -> 400 ``DuplicatedAuditEventId``;
9. per event, in request order: an injected event fault if one is drawn, else the
   ``schema.parse_event_text`` problem -> ``failed[]``; the rest are stored (one transaction)
   and listed in ``successful[]`` with their new ``eventID``. Every ``failed[]`` entry is also
   stored as a refusal (``storage.RefusalRow``, kind ``event``), with the event's text.

A whole-call error is raised as ``ApiError``; the server answers it and stores the refusal.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass
from typing import Callable
from urllib.parse import parse_qs

from .channels import EXTERNAL_ID_RE, Channels, parse_arn
from .checker import BodyError, CheckerPool
from .faults import FaultDice
from .quota import CallQuota
from .storage import EventRow, EventStore, RefusalRow


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
                 dice: FaultDice, checker: CheckerPool,
                 wall_clock: Callable[[], _dt.datetime] = lambda: _dt.datetime.now(
                     _dt.timezone.utc)) -> None:
        self.wall_clock = wall_clock
        self.store = store
        self.channels = channels
        self.quota = quota
        self.dice = dice
        self.checker = checker

    def __call__(self, query: str, body: bytes, region: str, request_id: str | None = None
                 ) -> Result:
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

        channel_error = None
        if not self.channels.exists(arn.arn) or arn.region != region:
            where = "" if arn.region == region else (
                f" (the channel is in {arn.region}, the call was signed for {region})")
            channel_error = ApiError(400, "ChannelNotFound",
                                     f"The channel could not be found{where}.")
        elif not self.channels.external_id_ok(arn.arn, external_id):
            channel_error = ApiError(400, "ChannelInsufficientPermission",
                                     "The externalId is missing or does not match the one the "
                                     "channel's resource policy requires.")
        # The body's shape is judged first (as the service's front end does); its events are
        # only checked when the channel will take them.
        now = time_text(self.wall_clock())
        checked = self.checker.check(body, arn.arn, arn.account, arn.region, now,
                                     channel_error is None)
        if isinstance(checked, BodyError):
            raise ApiError(*checked)
        if channel_error is not None:
            raise channel_error
        if checked.duplicate is not None:
            raise ApiError(400, "DuplicatedAuditEventId",
                           f"Two or more entries in the request have the same event ID "
                           f"({checked.duplicate}).")

        successful: list[dict] = []
        failed: list[dict] = []
        rows, refusals = [], []
        for event_id, outcome in zip(checked.ids, checked.outcomes):
            injected = self.dice.event_fault()
            if injected is not None or outcome[0] == "failed":
                code, message = injected if injected is not None else outcome[1:3]
                failed.append({"id": event_id, "errorCode": code, "errorMessage": message})
                if outcome[0] == "failed":
                    text, uid, source, name, principal = outcome[3:]
                else:  # an injected fault on a good event: the stored form is not kept
                    text, (uid, source, name, principal) = None, (outcome[2], *outcome[4:])
                refusals.append(RefusalRow(now, "event", arn.arn, request_id, event_id, code,
                                           message, uid, source, name, principal, text))
            else:
                _, service_id, uid, wrapped, source, name, principal = outcome
                rows.append(EventRow(service_id, arn.arn, uid, wrapped, source, name, principal,
                                     now))
                successful.append({"id": event_id, "eventID": service_id})
        self.store.add(rows)
        self.store.add_refusals(refusals)
        return Result(successful, failed)


def _single(params: dict[str, list[str]], name: str) -> str | None:
    values = params.get(name)
    if not values:
        return None
    if len(values) > 1:
        raise ApiError(400, "ValidationException", f"query parameter {name} given more than once")
    return values[0]


def time_text(now: _dt.datetime) -> str:
    """``metadata.ingestionTime``'s form: UTC, milliseconds, ``Z``."""
    now = now.astimezone(_dt.timezone.utc)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"
