"""The columns CloudTrail Lake gives integration events, as a DuckDB table, and how values print.

Contract:

- ``TABLE_DDL`` creates table ``events`` with one row per stored event and these columns (names
  are case-insensitive, struct fields are reached with dots, as in Lake):
  ``eventVersion``, ``eventCategory`` (``ActivityAuditLog``), ``eventType`` (``ActivityLog``),
  ``eventID``, ``eventTime`` (TIMESTAMP, UTC), ``awsRegion``, ``recipientAccountId``,
  ``metadata`` STRUCT(``ingestionTime`` TIMESTAMP, ``channelArn``), ``eventData`` STRUCT of the
  integration schema's fields (``version``, ``userIdentity`` STRUCT(``type``, ``principalId``,
  ``details``), ``userAgent``, ``eventSource``, ``eventName``, ``eventTime`` (text as sent),
  ``UID``, ``requestParameters``, ``responseElements``, ``errorCode``, ``errorMessage``,
  ``sourceIPAddress``, ``recipientAccountId``, ``additionalEventData``), plus the hidden
  ``_bytes`` (size of the stored JSON, for BytesScanned).
- The free-form objects (``userIdentity.details``, ``requestParameters``, ``responseElements``,
  ``additionalEventData``) are ``map<string,string>``, as Lake types ``requestParameters`` of
  CloudTrail events: ``eventData.requestParameters['key']``; a nested object or array value is
  its JSON text, a number its text.
- ``INSERT_SQL`` takes one parameter, a list of stored event bodies (JSON text), and appends them.
- ``render(value)`` prints a result value the way Lake's results carry it: a string (timestamps
  ``YYYY-MM-DD HH:MM:SS.mmm``, booleans ``true``/``false``), nested values as JSON text, and
  ``None`` for SQL NULL.
"""

from __future__ import annotations

import datetime as _dt
import json

PUBLIC_COLUMNS = ("eventVersion", "eventCategory", "eventType", "eventID", "eventTime",
                  "awsRegion", "recipientAccountId", "metadata", "eventData")

_MAP = "MAP(VARCHAR, VARCHAR)"
EVENT_DATA_TYPE = (
    'STRUCT("version" VARCHAR, "userIdentity" STRUCT("type" VARCHAR, "principalId" VARCHAR, '
    f'"details" {_MAP}), "userAgent" VARCHAR, "eventSource" VARCHAR, "eventName" VARCHAR, '
    f'"eventTime" VARCHAR, "UID" VARCHAR, "requestParameters" {_MAP}, '
    f'"responseElements" {_MAP}, "errorCode" VARCHAR, "errorMessage" VARCHAR, '
    f'"sourceIPAddress" VARCHAR, "recipientAccountId" VARCHAR, "additionalEventData" {_MAP})')

TABLE_DDL = f"""
CREATE TABLE events (
    "eventVersion" VARCHAR, "eventCategory" VARCHAR, "eventType" VARCHAR, "eventID" VARCHAR,
    "eventTime" TIMESTAMP, "awsRegion" VARCHAR, "recipientAccountId" VARCHAR,
    "metadata" STRUCT("ingestionTime" TIMESTAMP, "channelArn" VARCHAR),
    "eventData" {EVENT_DATA_TYPE},
    "_bytes" BIGINT
)"""

# json_transform's structure: the stored body's keys (the channel ARN is stored as channelARN).
_STRUCTURE = json.dumps({
    "eventVersion": "VARCHAR", "eventCategory": "VARCHAR", "eventType": "VARCHAR",
    "eventID": "VARCHAR", "eventTime": "TIMESTAMP", "awsRegion": "VARCHAR",
    "recipientAccountId": "VARCHAR",
    "metadata": {"ingestionTime": "TIMESTAMP", "channelARN": "VARCHAR"},
    "eventData": EVENT_DATA_TYPE,
})

INSERT_SQL = f"""
INSERT INTO events
SELECT e."eventVersion", e."eventCategory", e."eventType", e."eventID", e."eventTime",
       e."awsRegion", e."recipientAccountId",
       {{'ingestionTime': e.metadata."ingestionTime", 'channelArn': e.metadata."channelARN"}},
       e."eventData", n
FROM (SELECT json_transform(b, '{_STRUCTURE}') AS e, strlen(b) AS n
      FROM (SELECT unnest(?::VARCHAR[]) AS b))
"""


def store_view_sql(view: str, partition: str, region: str, account: str) -> str:
    """A view of one event data store: the events of its account and region."""
    columns = ", ".join(f'"{name}"' for name in PUBLIC_COLUMNS)
    return (f'CREATE OR REPLACE VIEW "{view}" AS SELECT {columns} FROM events '
            f"WHERE \"awsRegion\" = '{region}' AND \"recipientAccountId\" = '{account}' "
            f"AND starts_with(metadata.\"channelArn\", 'arn:{partition}:')")


def render(value) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, _dt.datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S.") + f"{value.microsecond // 1000:03d}"
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(_plain(value), separators=(",", ":"), ensure_ascii=False)
    return str(value)  # numbers, dates, times, intervals, UUIDs


def _plain(value):
    """A nested result value as plain JSON data (maps and structs come back as dicts)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return render(value)
