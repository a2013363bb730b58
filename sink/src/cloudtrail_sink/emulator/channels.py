"""Channel ARNs and which channels exist.

A channel ARN is ``arn:<partition>:cloudtrail:<region>:<12-digit account>:channel/<uuid>``.
Strict reading: the service model only requires ``^arn:.*$``, but CloudTrail channel ids are
UUIDs, so anything else is ``InvalidChannelARN`` (a typo is caught, not stored under a channel
nobody will query).

``Channels(None)`` is open mode: every well-formed ARN exists and needs no external id.
``Channels({arn: external_id_or_None})`` knows exactly those channels; an external id, when set,
must be sent as ``externalId`` (missing or different: ``ChannelInsufficientPermission``).
"""

from __future__ import annotations

import hmac
import re
from dataclasses import dataclass

ARN_RE = re.compile(
    r"\Aarn:(?P<partition>aws(?:-[a-z]+)*):cloudtrail:"
    r"(?P<region>[a-z]{2}(?:-[a-z]+)+-\d):(?P<account>\d{12}):channel/"
    r"(?P<id>[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12})\Z")
EXTERNAL_ID_RE = re.compile(r"\A[\w+=,.@:/-]{2,1224}\Z", re.ASCII)


@dataclass(frozen=True)
class ChannelArn:
    arn: str
    partition: str
    region: str
    account: str
    channel_id: str


def parse_arn(text: str) -> ChannelArn | None:
    match = ARN_RE.match(text) if isinstance(text, str) else None
    if match is None:
        return None
    return ChannelArn(text, match["partition"], match["region"], match["account"], match["id"])


class Channels:
    def __init__(self, channels: dict[str, str | None] | None) -> None:
        self.open = channels is None
        self._external: dict[str, str | None] = {}
        for arn, external_id in (channels or {}).items():
            if parse_arn(arn) is None:
                raise ValueError(f"channel {arn!r} is not a channel ARN "
                                 "(arn:aws:cloudtrail:REGION:ACCOUNT:channel/UUID)")
            if external_id is not None and not EXTERNAL_ID_RE.match(external_id):
                raise ValueError(f"external id for channel {arn} must be 2-1224 characters of "
                                 "letters, digits and +=,.@:/-_")
            self._external[arn] = external_id

    def exists(self, arn: str) -> bool:
        return self.open or arn in self._external

    def external_id_ok(self, arn: str, given: str | None) -> bool:
        """True when the channel needs no external id or ``given`` is the configured one."""
        wanted = None if self.open else self._external.get(arn)
        if wanted is None:
            return True
        return given is not None and hmac.compare_digest(given.encode(), wanted.encode())

    def configured(self) -> list[str]:
        """The configured channel ARNs (none in open mode)."""
        return list(self._external)

    def describe(self) -> list[str]:
        if self.open:
            return ["any well-formed channel ARN (open mode: no --channel given)"]
        return [f"{arn}{' (external id required)' if ext else ''}"
                for arn, ext in self._external.items()]
