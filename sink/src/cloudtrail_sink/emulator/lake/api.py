"""The ``cloudtrail`` control plane's Lake operations (AWS JSON 1.1) and the page's query route.

``ControlPlane.handle(method, raw_path, headers, body)`` answers a ``POST /`` whose
``X-Amz-Target`` is ``com.amazonaws.cloudtrail.v20131101.CloudTrail_20131101.<Operation>``,
signed with SigV4 for service ``cloudtrail`` (checked by ``auth`` like PutAuditEvents, the
signing region scoping what is seen). Operations: StartQuery, DescribeQuery, GetQueryResults
(``MaxQueryResults`` 1-1000, default 1000, ``NextToken``), CancelQuery, ListEventDataStores,
GetEventDataStore, ListChannels, GetChannel; shapes as in botocore's service model. Errors are
status 400 (auth errors keep their own), ``x-amzn-ErrorType: <Code>`` and body
``{"__type": "<Code>", "message": "..."}``, as botocore parses them; an operation the emulator
does not have, or a target sent other than as ``POST /``, is ``UnknownOperationException``.

Before running, StartQuery checks the statement (``translate``) and binds it in DuckDB, so a
bad query is refused at once with ``InvalidQueryStatementException``; errors found while running
(a failed cast, too many rows) end the query ``FAILED`` with ``ErrorMessage``.

``page_query(body)`` answers the unsigned ``POST /_emulator/query`` with body ``{"sql": "..."}``
through the same checks and query store: ``{"queryId", "status": "FINISHED"|"FAILED",
"columns", "rows", "error": {"code", "message"} | null}``; all stores of all regions are visible.
``page_stores()`` answers ``GET /_emulator/stores`` with those stores, the ones
ListEventDataStores lists in each region: ``{"stores": [{"id", "arn", "name", "region",
"account"}, ...]}``, ordered by region and account (``FROM`` takes the id).
"""

from __future__ import annotations

import base64
import binascii
import datetime as _dt
import json
from typing import Callable, Mapping, NamedTuple

from .. import auth
from .catalog import Catalog, LakeError, channel_shape, store_shape
from .engine import Engine
from .queries import Query, QueryStore
from .translate import translate

TARGET_PREFIX = "com.amazonaws.cloudtrail.v20131101.CloudTrail_20131101."
SERVICE = "cloudtrail"
CONTENT_TYPE = "application/x-amz-json-1.1"
DEFAULT_PAGE = 1000
MAX_PAGE = 1000


class Answer(NamedTuple):
    status: int
    body: bytes
    content_type: str
    headers: dict


def _answer(obj, status: int = 200, content_type: str = CONTENT_TYPE, headers=None) -> Answer:
    return Answer(status, json.dumps(obj, separators=(",", ":")).encode(), content_type,
                  headers or {})


def _error(code: str, message: str, status: int = 400) -> Answer:
    return _answer({"__type": code, "message": message}, status,
                   headers={"x-amzn-ErrorType": code})


class ControlPlane:
    def __init__(self, catalog: Catalog, engine: Engine, queries: QueryStore,
                 credentials: tuple[str, str] | None, wall_clock: Callable[[], _dt.datetime],
                 created: float) -> None:
        self.catalog = catalog
        self.engine = engine
        self.queries = queries
        self.credentials = credentials
        self.wall_clock = wall_clock
        self.created = created
        self._operations = {
            "StartQuery": self._start_query, "DescribeQuery": self._describe_query,
            "GetQueryResults": self._get_query_results, "CancelQuery": self._cancel_query,
            "ListEventDataStores": self._list_stores, "GetEventDataStore": self._get_store,
            "ListChannels": self._list_channels, "GetChannel": self._get_channel,
        }

    # the JSON 1.1 endpoint -------------------------------------------------------------------
    def handle(self, method: str, raw_path: str, headers: Mapping[str, str],
               body: bytes) -> Answer:
        try:
            caller = auth.check_request(method, raw_path, headers, body, self.credentials,
                                        self.wall_clock, SERVICE)
        except auth.AuthError as exc:
            return _error(exc.code, exc.message, exc.status)
        target = headers.get("X-Amz-Target", "")
        operation = self._operations.get(target[len(TARGET_PREFIX):]) if target.startswith(
            TARGET_PREFIX) else None
        if method != "POST" or raw_path.split("?")[0] != "/":
            operation = None  # JSON 1.1 operations are POST /
        if operation is None:
            return _error("UnknownOperationException",
                          f"The emulator does not implement {target[:200]}.")
        try:
            params = json.loads(body or b"{}")
        except ValueError:
            return _error("SerializationException", "The request body is not JSON.")
        if not isinstance(params, dict):
            return _error("SerializationException", "The request body must be a JSON object.")
        try:
            return _answer(operation(params, caller.region))
        except LakeError as exc:
            return _error(exc.code, exc.message, exc.status)

    # the page's route ------------------------------------------------------------------------
    def page_query(self, body: bytes) -> Answer:
        def failed(code, message, status=200, query_id=None):
            return _answer({"queryId": query_id, "status": "FAILED", "columns": [], "rows": [],
                            "error": {"code": code, "message": message}}, status,
                           "application/json")

        try:
            params = json.loads(body or b"null")
        except ValueError:
            return failed("SerializationException", "The body must be JSON: {\"sql\": \"...\"}.",
                          400)
        if not isinstance(params, dict) or not isinstance(params.get("sql"), str):
            return failed("InvalidParameterException",
                          "The body must be a JSON object with a string member sql.", 400)
        try:
            query = self._start(params["sql"], None)
        except LakeError as exc:
            return failed(exc.code, exc.message)
        query = self.queries.wait(query, self.queries.timeout + 5.0)
        if query.status != "FINISHED":
            return failed(query.status, query.error or f"The query ended {query.status}.",
                          query_id=query.id)
        return _answer({"queryId": query.id, "status": "FINISHED", "columns": query.columns,
                        "rows": query.rows, "error": None}, content_type="application/json")

    def page_stores(self) -> Answer:
        stores = self.catalog.stores(self._seen(), None)
        return _answer({"stores": [{"id": s.id, "arn": s.arn, "name": s.name, "region": s.region,
                                    "account": s.account} for s in stores]},
                       content_type="application/json")

    # operations ------------------------------------------------------------------------------
    def _seen(self) -> list[str]:
        """Channels with stored events (open mode knows channels only from those)."""
        self.engine.refresh()
        return self.engine.seen_channels()

    def _start(self, statement, region: str | None) -> Query:
        if not isinstance(statement, str):
            raise LakeError("InvalidParameterException", "QueryStatement must be a string.")
        seen = self._seen()
        translated = translate(statement, lambda name: self.catalog.store(name, seen, region))
        for store in translated.stores:
            self.engine.ensure_view(store)
        self.engine.bind(translated.sql)
        return self.queries.submit(statement, translated, region)

    def _start_query(self, params: dict, region: str) -> dict:
        _refuse(params, "QueryAlias", "QueryParameters", "DeliveryS3Uri")
        if "QueryStatement" not in params:
            raise LakeError("InvalidParameterException", "QueryStatement is required.")
        query = self._start(params["QueryStatement"], region)
        return _with_owner({"QueryId": query.id}, params)

    def _query(self, params: dict, region: str) -> Query:
        _refuse(params, "QueryAlias", "RefreshId")
        if params.get("EventDataStore") is not None:
            self.catalog.store(params["EventDataStore"], self._seen(), region)
        if "QueryId" not in params:
            raise LakeError("InvalidParameterException", "QueryId is required.")
        return self.queries.get(params["QueryId"], region)

    def _describe_query(self, params: dict, region: str) -> dict:
        query = self._query(params, region)
        shape = {
            "QueryId": query.id,
            "QueryString": query.statement,
            "QueryStatus": query.status,
            "QueryStatistics": {
                "EventsMatched": len(query.rows),
                "EventsScanned": query.events_scanned,
                "BytesScanned": query.bytes_scanned,
                "ExecutionTimeInMillis": query.millis,
                "CreationTime": query.created,
            },
        }
        if query.error:
            shape["ErrorMessage"] = query.error
        return _with_owner(shape, params)

    def _get_query_results(self, params: dict, region: str) -> dict:
        query = self._query(params, region)
        size = params.get("MaxQueryResults", DEFAULT_PAGE)
        if not isinstance(size, int) or isinstance(size, bool) or not 1 <= size <= MAX_PAGE:
            raise LakeError("InvalidMaxResultsException",
                            f"MaxQueryResults must be an integer from 1 to {MAX_PAGE}.")
        shape: dict = {"QueryStatus": query.status}
        if query.error:
            shape["ErrorMessage"] = query.error
        if query.status != "FINISHED":
            shape["QueryResultRows"] = []
            shape["QueryStatistics"] = {"ResultsCount": 0, "TotalResultsCount": 0,
                                        "BytesScanned": query.bytes_scanned}
            return shape
        start = _offset(params.get("NextToken"), f"q:{query.id}", len(query.rows))
        page = query.rows[start:start + size]
        shape["QueryResultRows"] = [[{name: value} for name, value in zip(query.columns, row)]
                                    for row in page]
        shape["QueryStatistics"] = {"ResultsCount": len(page),
                                    "TotalResultsCount": len(query.rows),
                                    "BytesScanned": query.bytes_scanned}
        if start + size < len(query.rows):
            shape["NextToken"] = _token(f"q:{query.id}", start + size)
        return shape

    def _cancel_query(self, params: dict, region: str) -> dict:
        query = self._query(params, region)
        query = self.queries.cancel(query.id, region)
        return _with_owner({"QueryId": query.id, "QueryStatus": query.status}, params)

    def _list_stores(self, params: dict, region: str) -> dict:
        stores = self.catalog.stores(self._seen(), region)
        shapes = [{k: v for k, v in store_shape(s, self.created).items()
                   if k not in ("BillingMode",)} for s in stores]
        return _listed("EventDataStores", shapes, params, "stores")

    def _get_store(self, params: dict, region: str) -> dict:
        if "EventDataStore" not in params:
            raise LakeError("InvalidParameterException", "EventDataStore is required.")
        store = self.catalog.store(params["EventDataStore"], self._seen(), region)
        return store_shape(store, self.created)

    def _list_channels(self, params: dict, region: str) -> dict:
        channels = self.catalog.channels(self._seen(), region)
        return _listed("Channels", [{"ChannelArn": c.arn, "Name": c.name} for c in channels],
                       params, "channels")

    def _get_channel(self, params: dict, region: str) -> dict:
        if "Channel" not in params:
            raise LakeError("InvalidParameterException", "Channel is required.")
        channel = self.catalog.channel(params["Channel"], self._seen(), region)
        return channel_shape(channel, self.engine.latest(channel.arn))


def _refuse(params: dict, *names: str) -> None:
    for name in names:
        if params.get(name) is not None:
            raise LakeError("UnsupportedOperationException",
                            f"{name} is not supported by the emulator (no saved queries, "
                            "dashboards or S3 delivery); send the QueryStatement itself.")


def _with_owner(shape: dict, params: dict) -> dict:
    if isinstance(params.get("EventDataStoreOwnerAccountId"), str):
        shape["EventDataStoreOwnerAccountId"] = params["EventDataStoreOwnerAccountId"]
    return shape


def _listed(member: str, items: list, params: dict, kind: str) -> dict:
    size = params.get("MaxResults", MAX_PAGE)
    if not isinstance(size, int) or isinstance(size, bool) or not 1 <= size <= MAX_PAGE:
        raise LakeError("InvalidMaxResultsException",
                        f"MaxResults must be an integer from 1 to {MAX_PAGE}.")
    start = _offset(params.get("NextToken"), kind, len(items))
    shape = {member: items[start:start + size]}
    if start + size < len(items):
        shape["NextToken"] = _token(kind, start + size)
    return shape


def _token(kind: str, offset: int) -> str:
    return base64.urlsafe_b64encode(json.dumps([kind, offset]).encode()).decode()


def _offset(token, kind: str, total: int) -> int:
    """The offset a NextToken stands for (0 without one); another query's token is invalid."""
    if token is None:
        return 0
    try:
        found_kind, offset = json.loads(base64.urlsafe_b64decode(token.encode()))
        if found_kind == kind and isinstance(offset, int) and 0 <= offset <= total:
            return offset
    except (AttributeError, ValueError, TypeError, binascii.Error):
        pass
    raise LakeError("InvalidNextTokenException", "The NextToken is not valid for this request.")
