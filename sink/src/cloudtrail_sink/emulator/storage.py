"""Accepted events and refusals in SQLite; accepted events wrapped the way CloudTrail Lake stores them.

Table ``events``: ``seq`` (increasing integer, the paging cursor), ``event_id`` (the service's
``eventID``), ``channel_arn``, ``uid`` (``eventData.UID``, for queries), ``body`` (the wrapped
event as JSON text), ``event_data`` (a virtual column: ``eventData`` alone as JSON text, for
ad-hoc SQL), and for the console's filters ``event_source``, ``event_name``, ``principal``
(``eventData.userIdentity.principalId``) and ``ingested`` (``metadata.ingestionTime``), and
``bucket`` (``seq >> BUCKET_BITS``). Re-sent events are stored again, as the service does. A
database written before those columns existed gets them, filled from ``body`` and ``seq``, when
it is opened.

Table ``refusals``: what the emulator refused, one row per refused event (``failed[]`` entries,
with the event's text and, as far as it gives them, its UID, source, name and principal) or per
refused call (``kind`` ``request``: the error answered to a whole PutAuditEvents call). Both
tables are indexed for the console: filtered pages, newest first, cost an index range scan
(the free-text filter alone scans, stopping once a page is full). ``event_id`` and ``uid`` are
random keys: a plain index on them costs a B-tree page rewrite per stored event (it doubled the
storing cost), so they are indexed behind ``bucket`` (``(bucket, event_id)``, ``(bucket, uid)``):
new keys land in the newest bucket's few pages, and a lookup probes every bucket (``BUCKETS``,
one index seek per 4,096 stored events).

The database runs in WAL mode with ``synchronous=OFF`` and pages of ``PAGE_SIZE`` bytes: one
writer connection (a lock serialises writers; each request's rows go in one transaction) and one
reader connection, so paging readers never block ingestion. ``wait_for_after`` and
``wait_for_change`` let a reader (the live page) block until something newer than its cursors
is stored.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from dataclasses import dataclass
from typing import Iterable, NamedTuple

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id TEXT NOT NULL,
    channel_arn TEXT NOT NULL,
    uid TEXT,
    body TEXT NOT NULL,
    -- computed on read, not stored: eventData alone, for ad-hoc SQL (sqlite3 FILE)
    event_data TEXT GENERATED ALWAYS AS (json_extract(body, '$.eventData')) VIRTUAL
);
CREATE TABLE IF NOT EXISTS refusals (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    time TEXT NOT NULL,
    kind TEXT NOT NULL,            -- 'event' (an entry of failed[]) or 'request' (a whole call)
    channel_arn TEXT,
    request_id TEXT,
    entry_id TEXT,                 -- the caller's auditEvents[].id
    error_code TEXT NOT NULL,
    error_message TEXT NOT NULL,
    uid TEXT,
    event_source TEXT,
    event_name TEXT,
    principal TEXT,
    event_data TEXT                -- the refused eventData text, as sent
);
"""
# Added to events after the first release: filled from body when an older database is opened.
FILTER_COLUMNS = {
    "event_source": "$.eventData.eventSource",
    "event_name": "$.eventData.eventName",
    "principal": "$.eventData.userIdentity.principalId",
    "ingested": "$.metadata.ingestionTime",
}
BUCKET_BITS = 12
# Replaced by the bucketed indexes: dropped from databases written with them.
OLD_INDEXES = ("events_event_id", "events_uid")
INDEXES = """
CREATE INDEX IF NOT EXISTS events_bucket_event_id ON events(bucket, event_id);
CREATE INDEX IF NOT EXISTS events_bucket_uid ON events(bucket, uid);
CREATE INDEX IF NOT EXISTS events_source ON events(event_source);
CREATE INDEX IF NOT EXISTS events_name ON events(event_name);
CREATE INDEX IF NOT EXISTS events_principal ON events(principal);
CREATE INDEX IF NOT EXISTS events_ingested ON events(ingested);
CREATE INDEX IF NOT EXISTS refusals_time ON refusals(time);
CREATE INDEX IF NOT EXISTS refusals_uid ON refusals(uid);
CREATE INDEX IF NOT EXISTS refusals_source ON refusals(event_source);
CREATE INDEX IF NOT EXISTS refusals_name ON refusals(event_name);
CREATE INDEX IF NOT EXISTS refusals_principal ON refusals(principal);
CREATE INDEX IF NOT EXISTS refusals_code ON refusals(error_code);
"""
# Every bucket number in use, for "bucket IN buckets" in front of an event_id or uid lookup.
BUCKETS = (f"WITH RECURSIVE buckets(b) AS (SELECT 0 UNION ALL SELECT b + 1 FROM buckets "
           f"WHERE b < (SELECT COALESCE(MAX(seq), 0) FROM events) >> {BUCKET_BITS}) ")
MAX_PAGE = 10_000
PAGE_SIZE = 16384
MAX_CURSOR = 2**63 - 1  # SQLite's largest integer


class EventRow(NamedTuple):
    event_id: str
    channel_arn: str
    uid: str | None
    body: str
    event_source: str | None
    event_name: str | None
    principal: str | None
    ingested: str


class RefusalRow(NamedTuple):
    time: str
    kind: str
    channel_arn: str | None
    request_id: str | None
    entry_id: str | None
    error_code: str
    error_message: str
    uid: str | None = None
    event_source: str | None = None
    event_name: str | None = None
    principal: str | None = None
    event_data: str | None = None


@dataclass(frozen=True)
class Filters:
    """The console's filters: exact eventSource, eventName, principalId, UID, error code, and a
    case-insensitive substring of the stored text (``text``). Empty means no filter."""

    source: str = ""
    name: str = ""
    principal: str = ""
    uid: str = ""
    code: str = ""
    text: str = ""


EVENT_LIST_COLUMNS = ("seq", "eventID", "ingestionTime", "eventTime", "eventSource", "eventName",
                      "principal", "UID", "channelARN")
REFUSAL_COLUMNS = ("seq", "time", "kind", "channelARN", "requestId", "entryId", "errorCode",
                   "errorMessage", "UID", "eventSource", "eventName", "principal", "eventData")


class EventStore:
    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        self._write = self._connect()
        self._write.executescript(SCHEMA)
        self._migrate()
        self._write.executescript(INDEXES)
        self._read = self._connect()
        self._write_lock = threading.Lock()
        self._read_lock = threading.Lock()
        self._changed = threading.Condition()
        self._closed = False
        self._released = False
        self._last_seq = self._write.execute(
            "SELECT COALESCE(MAX(seq), 0) FROM events").fetchone()[0]
        self._last_refusal = self._write.execute(
            "SELECT COALESCE(MAX(seq), 0) FROM refusals").fetchone()[0]

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None,
                               timeout=30)
        # Takes effect on a new database only (an existing one keeps its size). An event of
        # ~1.5 KB takes over a third of a 4 KB page: larger pages cut the page writes and splits
        # per stored event (-20% storing CPU with bench/emulator_throughput.py's events).
        conn.execute(f"PRAGMA page_size={PAGE_SIZE}")
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=OFF")
        return conn

    def _migrate(self) -> None:
        have = {row[1] for row in self._write.execute("PRAGMA table_xinfo(events)")}
        missing = [name for name in FILTER_COLUMNS if name not in have]
        if not missing and "bucket" in have:
            return
        conn = self._write
        conn.execute("BEGIN IMMEDIATE")
        try:
            for name in missing:
                conn.execute(f"ALTER TABLE events ADD COLUMN {name} TEXT")
            sets = [f"{name} = json_extract(body, '{FILTER_COLUMNS[name]}')" for name in missing]
            if "bucket" not in have:
                conn.execute("ALTER TABLE events ADD COLUMN bucket INTEGER")
                sets.append(f"bucket = seq >> {BUCKET_BITS}")
            conn.execute(f"UPDATE events SET {', '.join(sets)}")
            for name in OLD_INDEXES:
                conn.execute(f"DROP INDEX IF EXISTS {name}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    @property
    def last_seq(self) -> int:
        return self._last_seq

    @property
    def last_refusal(self) -> int:
        return self._last_refusal

    # writing ---------------------------------------------------------------------------------
    def add(self, rows: Iterable[EventRow]) -> None:
        """Store accepted events in one transaction."""

        def with_buckets(conn: sqlite3.Connection, rows: list[tuple]) -> list[tuple]:
            # The seqs these rows get (the write transaction is held): AUTOINCREMENT counts on
            # from sqlite_sequence.
            base = conn.execute("SELECT COALESCE((SELECT seq FROM sqlite_sequence "
                                "WHERE name = 'events'), 0)").fetchone()[0]
            return [(*row, (base + 1 + i) >> BUCKET_BITS) for i, row in enumerate(rows)]

        last = self._insert("INSERT INTO events (event_id, channel_arn, uid, body, event_source, "
                            "event_name, principal, ingested, bucket) "
                            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows, with_buckets)
        if last is not None:
            with self._changed:
                self._last_seq = max(self._last_seq, last)
                self._changed.notify_all()

    def add_refusals(self, rows: Iterable[RefusalRow]) -> None:
        """Store refusals in one transaction."""
        last = self._insert(f"INSERT INTO refusals ({', '.join(RefusalRow._fields)}) "
                            f"VALUES ({', '.join('?' * len(RefusalRow._fields))})", rows)
        if last is not None:
            with self._changed:
                self._last_refusal = max(self._last_refusal, last)
                self._changed.notify_all()

    def _insert(self, sql: str, rows: Iterable[tuple], complete=None) -> int | None:
        rows = list(rows)
        if not rows:
            return None
        with self._write_lock:
            if self._closed:
                raise RuntimeError("event store is closed")
            conn = self._write
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany(sql, complete(conn, rows) if complete else rows)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            return conn.execute("SELECT last_insert_rowid()").fetchone()[0]

    # reading ---------------------------------------------------------------------------------
    def _query(self, sql: str, params: tuple = ()) -> list[tuple]:
        with self._read_lock:
            if self._closed:
                raise RuntimeError("event store is closed")
            return self._read.execute(sql, params).fetchall()

    def page(self, limit: int | None, after: int | None) -> tuple[list[str], int]:
        """Bodies of events with seq > after, oldest first, and the cursor to pass next."""
        after = after or 0
        if limit is None:
            rows = self._query("SELECT seq, body FROM events WHERE seq > ? ORDER BY seq",
                               (after,))
        else:
            rows = self._query("SELECT seq, body FROM events WHERE seq > ? ORDER BY seq LIMIT ?",
                               (after, limit))
        return [body for _, body in rows], (rows[-1][0] if rows else after)

    def tail(self, count: int) -> tuple[list[str], int]:
        """The newest ``count`` bodies, oldest first, and the cursor to pass next."""
        with self._read_lock:
            rows = self._read.execute(
                "SELECT seq, body FROM events ORDER BY seq DESC LIMIT ?", (count,)).fetchall()
            last = self._read.execute("SELECT COALESCE(MAX(seq), 0) FROM events").fetchone()[0]
        rows.reverse()
        return [body for _, body in rows], last

    def count(self) -> int:
        return self._query("SELECT COUNT(*) FROM events")[0][0]

    def search_events(self, filters: Filters, before: int | None, limit: int
                      ) -> tuple[list[dict], int | None]:
        """One page of events matching ``filters``, newest first, each as its list columns,
        and the ``before`` cursor of the next page (None: this was the last)."""
        where, params = _where(filters, before, {
            "source": "event_source", "name": "event_name", "principal": "principal",
            "uid": "uid"}, text_columns=("body",))
        if filters.code:
            return [], None  # accepted events have no error code
        if filters.uid:
            where += " AND bucket IN buckets"
        rows = self._query(
            (BUCKETS if filters.uid else "")
            + "SELECT seq, event_id, ingested, json_extract(body, '$.eventTime'), event_source, "
            f"event_name, principal, uid, channel_arn FROM events {where} "
            "ORDER BY seq DESC LIMIT ?", params + (limit + 1,))
        return _paged([dict(zip(EVENT_LIST_COLUMNS, row)) for row in rows], limit)

    def search_refusals(self, filters: Filters, before: int | None, limit: int
                        ) -> tuple[list[dict], int | None]:
        """Like ``search_events`` for refusals (every column but the refused text)."""
        where, params = _where(filters, before, {
            "source": "event_source", "name": "event_name", "principal": "principal",
            "uid": "uid", "code": "error_code"},
            text_columns=("error_code", "error_message", "uid", "entry_id", "event_data"))
        rows = self._query(
            f"SELECT {', '.join(('seq',) + RefusalRow._fields[:-1])} FROM refusals {where} "
            "ORDER BY seq DESC LIMIT ?", params + (limit + 1,))
        return _paged([dict(zip(REFUSAL_COLUMNS, row)) for row in rows], limit)

    def event(self, event_id: str) -> tuple[int, str] | None:
        """(seq, wrapped body) of the event with this eventID, or None."""
        rows = self._query(BUCKETS + "SELECT seq, body FROM events "
                           "WHERE bucket IN buckets AND event_id = ? LIMIT 1", (event_id,))
        return rows[0] if rows else None

    def refusal(self, seq: int) -> dict | None:
        rows = self._query(f"SELECT {', '.join(('seq',) + RefusalRow._fields)} FROM refusals "
                           "WHERE seq = ?", (seq,))
        return dict(zip(REFUSAL_COLUMNS, rows[0])) if rows else None

    def stored_counts(self) -> dict:
        """What is stored: events, and refusals by error code."""
        with self._read_lock:
            if self._closed:
                raise RuntimeError("event store is closed")
            events = self._read.execute("SELECT COUNT(*) FROM events").fetchone()[0]
            by_code = self._read.execute(
                "SELECT error_code, COUNT(*) FROM refusals GROUP BY error_code").fetchall()
        return {"events": events, "refusals": dict(by_code)}

    def rates(self, since: str) -> dict[str, list[list]]:
        """Events and refusals stored per second since the ISO time ``since`` (same format as
        ``metadata.ingestionTime``), as [["YYYY-MM-DDTHH:MM:SS", count], ...] in time order."""
        with self._read_lock:
            if self._closed:
                raise RuntimeError("event store is closed")
            events = self._read.execute(
                "SELECT substr(ingested, 1, 19) AS s, COUNT(*) FROM events WHERE ingested >= ? "
                "GROUP BY s ORDER BY s", (since,)).fetchall()
            refusals = self._read.execute(
                "SELECT substr(time, 1, 19) AS s, COUNT(*) FROM refusals WHERE time >= ? "
                "GROUP BY s ORDER BY s", (since,)).fetchall()
        return {"events": [list(r) for r in events], "refusals": [list(r) for r in refusals]}

    # waiting ---------------------------------------------------------------------------------
    def wait_for_after(self, after: int, timeout: float) -> None:
        """Block until an event with seq > after is stored, waiters are released, or timeout."""
        with self._changed:
            self._changed.wait_for(lambda: self._released or self._last_seq > after, timeout)

    def wait_for_change(self, events_after: int, refusals_after: int, timeout: float) -> None:
        """Block until an event or a refusal newer than the cursors is stored (or released)."""
        with self._changed:
            self._changed.wait_for(lambda: self._released or self._last_seq > events_after
                                   or self._last_refusal > refusals_after, timeout)

    def release_waiters(self) -> None:
        """End every current and future wait at once (the server is stopping)."""
        with self._changed:
            self._released = True
            self._changed.notify_all()

    def close(self) -> None:
        self.release_waiters()
        with self._write_lock, self._read_lock:
            self._closed = True
            self._read.close()
            self._write.close()


def _where(filters: Filters, before: int | None, columns: dict[str, str],
           text_columns: tuple[str, ...]) -> tuple[str, tuple]:
    clauses, params = [], []
    if before is not None:
        clauses.append("seq < ?")
        params.append(before)
    for field, column in columns.items():
        value = getattr(filters, field)
        if value:
            clauses.append(f"{column} = ?")
            params.append(value)
    if filters.text:
        pattern = "%" + filters.text.replace("\\", "\\\\").replace("%", "\\%").replace(
            "_", "\\_") + "%"
        clauses.append("(" + " OR ".join(f"{c} LIKE ? ESCAPE '\\'" for c in text_columns) + ")")
        params.extend([pattern] * len(text_columns))
    return ("WHERE " + " AND ".join(clauses)) if clauses else "", tuple(params)


def _paged(items: list[dict], limit: int) -> tuple[list[dict], int | None]:
    if len(items) > limit:
        return items[:limit], items[limit - 1]["seq"]
    return items, None


def read_page(path: str | os.PathLike, limit: int | None, after: int | None) -> list[str]:
    """``EventStore.page`` bodies from a database no emulator has open (read-only)."""
    if not os.path.exists(path):
        return []
    conn = sqlite3.connect(f"file:{os.fspath(path)}?mode=ro", uri=True, timeout=30)
    try:
        sql = "SELECT body FROM events WHERE seq > ? ORDER BY seq"
        params: tuple = (after or 0,)
        if limit is not None:
            sql += " LIMIT ?"
            params += (limit,)
        return [row[0] for row in conn.execute(sql, params)]
    finally:
        conn.close()
