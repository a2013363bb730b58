"""DuckDB over the stored events: loading, store views, binding and bounded execution.

Contract:

- One in-memory DuckDB database holds table ``events`` (see ``columns``). ``refresh()`` appends
  the events the SQLite store got since the last call (oldest first, in batches), so a query
  sees every event stored before it started. Loading is serialised; queries run concurrently on
  their own cursors.
- DuckDB runs with external access off (no file, extension or network access from a query),
  extension autoloading off, the configuration locked, time zone UTC, integer division of
  integers (as Trino), ``threads`` threads and
  ``memory_limit`` of memory (no spilling to disk): a query that needs more fails with DuckDB's
  out-of-memory error; events that no longer fit (about 20,000 events of 1 KB take 25 MB) make
  ``refresh()`` raise ``LakeError("InternalFailure", status 500)``.
- ``ensure_view(store)`` creates the store's view (its account's and region's events).
- ``bind(sql)`` plans without running and returns the result's column names, or raises
  ``LakeError("InvalidQueryStatementException")`` with DuckDB's message (unknown column or
  function, type errors).
- ``run(cursor, sql, max_rows)`` executes and returns (columns, rows of rendered strings, their
  size in bytes); more than ``max_rows`` rows or ``MAX_RESULT_BYTES`` of values raises
  ``TooManyRows``. ``cursor.interrupt()`` from another thread ends
  it with ``duckdb.InterruptException``.
"""

from __future__ import annotations

import datetime as _dt
import logging
import threading

import duckdb

from ..storage import EventStore
from .catalog import EventDataStore, LakeError
from .columns import INSERT_SQL, TABLE_DDL, render, store_view_sql

LOAD_BATCH = 5_000
FETCH_BATCH = 1_000
MAX_RESULT_BYTES = 64 * 1024 * 1024  # of rendered values, per query
log = logging.getLogger("cloudtrail_sink.emulator")


class TooManyRows(Exception):
    pass


class Engine:
    def __init__(self, store: EventStore, memory_limit: str = "512MB", threads: int = 2) -> None:
        self._store = store
        self._db = duckdb.connect(":memory:", config={
            "threads": threads,
            "memory_limit": memory_limit,
            "temp_directory": "",  # no spilling to files: over the limit is an error
            "integer_division": True,  # as Trino: 7 / 2 = 3 (sqlglot does not rewrite it)
            "autoinstall_known_extensions": False,
            "autoload_known_extensions": False,
        })
        self._db.execute("SET TimeZone = 'UTC'")
        self._db.execute(TABLE_DDL)
        # Set last: with external access off nothing can be read but what is loaded here.
        self._db.execute("SET enable_external_access = false")
        self._db.execute("SET lock_configuration = true")
        self._load_lock = threading.Lock()  # one loader at a time
        self._conn_lock = threading.Lock()  # the shared connection: new cursors, DDL, close
        self._loaded = 0
        self._views: set[str] = set()

    def refresh(self) -> None:
        with self._load_lock:
            loader = self.cursor()
            try:
                while True:
                    bodies, cursor = self._store.page(LOAD_BATCH, self._loaded)
                    if not bodies:
                        return
                    loader.execute(INSERT_SQL, [bodies])
                    self._loaded = cursor
            except duckdb.Error as exc:
                log.warning("query engine cannot load the stored events: %s", self.message(exc))
                raise LakeError("InternalFailure", "The emulator's query engine cannot load the "
                                f"stored events: {self.message(exc)}", 500)
            finally:
                loader.close()

    def cursor(self) -> duckdb.DuckDBPyConnection:
        with self._conn_lock:
            return self._db.cursor()

    def _fetch(self, sql: str, params=None) -> list[tuple]:
        cur = self.cursor()
        try:
            return cur.execute(sql, params).fetchall()
        finally:
            cur.close()

    def seen_channels(self) -> list[str]:
        return [row[0] for row in self._fetch(
            'SELECT DISTINCT metadata."channelArn" FROM events') if row[0]]

    def latest(self, channel_arn: str) -> tuple[float, str] | None:
        """(ingestion time as epoch seconds, eventID) of the channel's newest stored event."""
        # rowid is the order of storing: ingestion times of one call are equal
        row = self._fetch('SELECT max(metadata."ingestionTime"), arg_max("eventID", rowid) '
                          'FROM events WHERE metadata."channelArn" = ?', [channel_arn])[0]
        if row[0] is None:
            return None
        return row[0].replace(tzinfo=_dt.timezone.utc).timestamp(), row[1]

    def size(self, stores: tuple[EventDataStore, ...]) -> tuple[int, int]:
        """(events, bytes of stored JSON) in these stores: what a query over them scans."""
        events = size = 0
        for store in stores:
            count, total = self._fetch(
                "SELECT count(*), coalesce(sum(_bytes), 0) FROM events WHERE \"awsRegion\" = ? "
                "AND \"recipientAccountId\" = ? AND starts_with(metadata.\"channelArn\", ?)",
                [store.region, store.account, f"arn:{store.partition}:"])[0]
            events, size = events + count, size + int(total)
        return events, size

    def ensure_view(self, store: EventDataStore) -> None:
        with self._conn_lock:
            if store.view not in self._views:
                self._db.execute(store_view_sql(store.view, store.partition, store.region,
                                                store.account))
                self._views.add(store.view)

    def bind(self, sql: str) -> list[str]:
        cur = self.cursor()
        try:
            return [row[0] for row in cur.execute("DESCRIBE " + sql).fetchall()]
        except duckdb.Error as exc:
            raise LakeError("InvalidQueryStatementException", self.message(exc))
        finally:
            cur.close()

    def run(self, cursor: duckdb.DuckDBPyConnection, sql: str, max_rows: int
            ) -> tuple[list[str], list[list[str | None]], int]:
        cursor.execute(sql)
        columns = [d[0] for d in cursor.description or ()]
        rows: list[list[str | None]] = []
        size = 0
        while batch := cursor.fetchmany(FETCH_BATCH):
            for row in batch:
                rendered = [render(value) for value in row]
                size += sum(len(v) for v in rendered if v is not None) + 8 * len(rendered)
                rows.append(rendered)
            if len(rows) > max_rows:
                raise TooManyRows(f"The query returned more than {max_rows} rows; add LIMIT or "
                                  "narrow it down.")
            if size > MAX_RESULT_BYTES:
                raise TooManyRows(f"The query's result is larger than "
                                  f"{MAX_RESULT_BYTES // 2**20} MB; select fewer columns or "
                                  "rows.")
        return columns, rows, size

    def message(self, exc: Exception) -> str:
        """DuckDB's message, its first lines only (views are named as their stores)."""
        text = " ".join(str(exc).split("\n")[:3]).strip()
        return text[:900] or type(exc).__name__

    def close(self) -> None:
        with self._load_lock, self._conn_lock:
            self._db.close()
