"""Accepted events in SQLite, wrapped the way CloudTrail Lake stores them.

Table ``events``: ``seq`` (increasing integer, the paging cursor), ``event_id`` (the service's
``eventID``), ``channel_arn``, ``uid`` (``eventData.UID``, for queries), ``body`` (the wrapped
event as JSON text) and ``event_data`` (a virtual column: ``eventData`` alone as JSON text, for
ad-hoc SQL). Re-sent events are stored again, as the service does.

The database runs in WAL mode with ``synchronous=NORMAL``: one writer connection (a lock
serialises writers; each request's events go in one transaction) and one reader connection, so
paging readers never block ingestion. ``wait_for_after`` lets a reader (the live page) block
until an event newer than its cursor exists.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from typing import Iterable

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
"""
MAX_PAGE = 10_000


class EventStore:
    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        self._write = self._connect()
        self._write.executescript(SCHEMA)
        self._read = self._connect()
        self._write_lock = threading.Lock()
        self._read_lock = threading.Lock()
        self._changed = threading.Condition()
        self._closed = False
        self._released = False
        row = self._write.execute("SELECT COALESCE(MAX(seq), 0) FROM events").fetchone()
        self._last_seq = row[0]

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None,
                               timeout=30)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=OFF")
        return conn

    @property
    def last_seq(self) -> int:
        return self._last_seq

    def add(self, rows: Iterable[tuple[str, str, str | None, str]]) -> None:
        """Store (event_id, channel_arn, uid, body) rows in one transaction."""
        rows = list(rows)
        if not rows:
            return
        with self._write_lock:
            if self._closed:
                raise RuntimeError("event store is closed")
            conn = self._write
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany(
                    "INSERT INTO events (event_id, channel_arn, uid, body) VALUES (?, ?, ?, ?)",
                    rows)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            last = conn.execute("SELECT last_insert_rowid()").fetchone()[0]
        with self._changed:
            self._last_seq = max(self._last_seq, last)
            self._changed.notify_all()

    def page(self, limit: int | None, after: int | None) -> tuple[list[str], int]:
        """Bodies of events with seq > after, oldest first, and the cursor to pass next."""
        after = after or 0
        with self._read_lock:
            if self._closed:
                raise RuntimeError("event store is closed")
            if limit is None:
                cur = self._read.execute(
                    "SELECT seq, body FROM events WHERE seq > ? ORDER BY seq", (after,))
            else:
                cur = self._read.execute(
                    "SELECT seq, body FROM events WHERE seq > ? ORDER BY seq LIMIT ?",
                    (after, limit))
            rows = cur.fetchall()
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
        with self._read_lock:
            return self._read.execute("SELECT COUNT(*) FROM events").fetchone()[0]

    def wait_for_after(self, after: int, timeout: float) -> None:
        """Block until an event with seq > after is stored, waiters are released, or timeout."""
        with self._changed:
            self._changed.wait_for(lambda: self._released or self._last_seq > after, timeout)

    def release_waiters(self) -> None:
        """End every current and future ``wait_for_after`` at once (the server is stopping)."""
        with self._changed:
            self._released = True
            self._changed.notify_all()

    def close(self) -> None:
        self.release_waiters()
        with self._write_lock, self._read_lock:
            self._closed = True
            self._read.close()
            self._write.close()


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
