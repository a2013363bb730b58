"""Which event data stores and channels exist, and how the control plane describes them.

Contract:

- Every channel has one destination, the event data store of its partition, region and account
  (all channels of an account in a region deliver to one store, so one query sees them all).
- A store's id is a UUID derived from (partition, region, account): the same on every start, so
  saved queries keep working. Its ARN is ``arn:<partition>:cloudtrail:<region>:<account>:
  eventdatastore/<id>``; ``FROM`` takes the id.
- Channels are the configured ones plus those seen in stored events (in open mode, only the
  latter; a channel no longer configured keeps its stored events queryable).
- ``stores(region)``/``channels(region)`` list what a call signed for ``region`` sees (regional,
  as the service is); ``region=None`` (the emulator's own page) sees all.
- ``store(text)``/``channel(text)`` take an ARN or its id and raise ``LakeError`` with the
  service's codes: ``EventDataStoreARNInvalidException``/``EventDataStoreNotFoundException``,
  ``ChannelARNInvalidException``/``ChannelNotFoundException``.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from typing import Iterable

from ..channels import Channels, parse_arn

_NAMESPACE = uuid.UUID("6f1d2c1e-8a7b-4c55-9a51-2f1e0c9d3b7a")
UUID_RE = re.compile(r"\A[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-"
                     r"[0-9a-fA-F]{12}\Z")
STORE_ARN_RE = re.compile(r"\Aarn:(?P<partition>aws(?:-[a-z]+)*):cloudtrail:(?P<region>[a-z0-9-]+):"
                          r"(?P<account>\d{12}):eventdatastore/(?P<id>[0-9a-fA-F-]{36})\Z")


class LakeError(Exception):
    """A control-plane error: the service's exception name (``__type``) and a message."""

    def __init__(self, code: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.code, self.message, self.status = code, message, status


@dataclass(frozen=True)
class EventDataStore:
    partition: str
    region: str
    account: str

    @property
    def id(self) -> str:
        return str(uuid.uuid5(_NAMESPACE, f"{self.partition}:{self.region}:{self.account}"))

    @property
    def arn(self) -> str:
        return (f"arn:{self.partition}:cloudtrail:{self.region}:{self.account}:"
                f"eventdatastore/{self.id}")

    @property
    def name(self) -> str:
        return f"emulator-{self.account}-{self.region}"

    @property
    def view(self) -> str:
        """The DuckDB view holding this store's events: named as the store, so that engine
        messages name what the query named."""
        return self.id


@dataclass(frozen=True)
class ChannelInfo:
    arn: str
    channel_id: str
    store: EventDataStore

    @property
    def name(self) -> str:
        return f"emulator-{self.channel_id}"


class Catalog:
    def __init__(self, channels: Channels) -> None:
        self._configured = channels

    def _channels(self, seen: Iterable[str]) -> dict[str, ChannelInfo]:
        arns = list(self._configured.configured()) + sorted(seen)
        found: dict[str, ChannelInfo] = {}
        for text in arns:
            arn = parse_arn(text)
            if arn is not None and arn.arn not in found:
                found[arn.arn] = ChannelInfo(arn.arn, arn.channel_id.lower(), EventDataStore(
                    arn.partition, arn.region, arn.account))
        return found

    def channels(self, seen: Iterable[str], region: str | None) -> list[ChannelInfo]:
        return [c for c in self._channels(seen).values()
                if region is None or c.store.region == region]

    def stores(self, seen: Iterable[str], region: str | None) -> list[EventDataStore]:
        stores: dict[str, EventDataStore] = {}
        for channel in self.channels(seen, region):
            stores.setdefault(channel.store.id, channel.store)
        return sorted(stores.values(), key=lambda s: (s.region, s.account))

    def store(self, text, seen: Iterable[str], region: str | None) -> EventDataStore:
        if not isinstance(text, str):
            raise LakeError("EventDataStoreARNInvalidException",
                            "EventDataStore must be an event data store ARN or id.")
        match = STORE_ARN_RE.match(text)
        wanted = match["id"] if match else text
        if not UUID_RE.match(wanted):
            raise LakeError("EventDataStoreARNInvalidException",
                            f"The value for EventDataStore, {text[:300]}, is not a valid event "
                            "data store ARN or id.")
        for store in self.stores(seen, region):
            if store.id == wanted.lower() and (match is None or store.arn == text):
                return store
        raise LakeError("EventDataStoreNotFoundException",
                        f"The specified event data store {wanted} was not found"
                        + (f" in {region}." if region else "."))

    def channel(self, text, seen: Iterable[str], region: str | None) -> ChannelInfo:
        if not isinstance(text, str):
            raise LakeError("ChannelARNInvalidException", "Channel must be a channel ARN or id.")
        arn = parse_arn(text)
        if arn is None and not UUID_RE.match(text):
            raise LakeError("ChannelARNInvalidException",
                            f"The value for Channel, {text[:300]}, is not a valid channel ARN "
                            "or id.")
        for channel in self.channels(seen, region):
            if channel.arn == text or channel.channel_id == text.lower():
                return channel
        raise LakeError("ChannelNotFoundException",
                        "The specified channel was not found"
                        + (f" in {region}." if region else "."))


def store_shape(store: EventDataStore, created: float) -> dict:
    """GetEventDataStore's answer (ListEventDataStores lists the shared fields)."""
    return {
        "EventDataStoreArn": store.arn,
        "Name": store.name,
        "Status": "ENABLED",
        "AdvancedEventSelectors": [{
            "Name": "Integration events",
            "FieldSelectors": [{"Field": "eventCategory", "Equals": ["ActivityAuditLog"]}],
        }],
        "MultiRegionEnabled": False,
        "OrganizationEnabled": False,
        "RetentionPeriod": 366,
        "TerminationProtectionEnabled": True,
        "CreatedTimestamp": created,
        "UpdatedTimestamp": created,
        "BillingMode": "EXTENDABLE_RETENTION_PRICING",
    }


def channel_shape(channel: ChannelInfo, latest: tuple[float, str] | None) -> dict:
    """GetChannel's answer; ``latest`` is (ingestion time, eventID) of its newest stored event."""
    shape = {
        "ChannelArn": channel.arn,
        "Name": channel.name,
        "Source": "Custom",
        "SourceConfig": {"ApplyToAllRegions": False, "AdvancedEventSelectors": [{
            "Name": "Integration events",
            "FieldSelectors": [{"Field": "eventCategory", "Equals": ["ActivityAuditLog"]}],
        }]},
        "Destinations": [{"Type": "EVENT_DATA_STORE", "Location": channel.store.arn}],
        "IngestionStatus": {},
    }
    if latest is not None:
        shape["IngestionStatus"] = {"LatestIngestionSuccessTime": latest[0],
                                    "LatestIngestionSuccessEventID": latest[1],
                                    "LatestIngestionAttemptTime": latest[0],
                                    "LatestIngestionAttemptEventID": latest[1]}
    return shape
