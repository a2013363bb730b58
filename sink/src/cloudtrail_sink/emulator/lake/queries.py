"""Queries and their states, run by a small pool of threads with a time limit each.

Contract:

- ``submit(statement, translated, region)`` records a query ``QUEUED`` and returns it; it runs
  when a worker is free (``RUNNING``), then ends ``FINISHED`` (rows kept), ``FAILED`` (message
  kept), ``TIMED_OUT`` (ran longer than ``timeout`` seconds) or ``CANCELLED``. More than
  ``max_active`` queries queued or running raises ``MaxConcurrentQueriesException``.
- ``cancel(id)`` ends a queued or running query as ``CANCELLED`` (a running one is interrupted,
  and its end awaited up to ``CANCEL_WAIT`` seconds); a query that already ended raises
  ``InactiveQueryException``.
- ``get(id, region)`` raises ``QueryIdNotFoundException`` for an unknown id, an id started in
  another region, or one forgotten: only the newest ``keep`` ended queries are kept, and only
  while their results take at most ``MAX_KEPT_BYTES`` together (the newest always stays).
- ``wait(query, timeout)`` blocks until the query ended (or the timeout passed).
- ``hold()`` (a context manager, for tests) keeps submitted queries ``QUEUED`` until it exits.
- ``close()`` cancels what is queued or running and joins every thread it started (again:
  nothing).
A watchdog thread interrupts queries past their deadline and repeats interrupts until they end
(an interrupt that lands between statements is otherwise lost).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import logging
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

import duckdb

from .catalog import EventDataStore, LakeError
from .engine import Engine, TooManyRows
from .translate import Translated

log = logging.getLogger("cloudtrail_sink.emulator")
ENDED = ("FINISHED", "FAILED", "TIMED_OUT", "CANCELLED")
WATCH_INTERVAL = 0.05
CANCEL_WAIT = 2.0
MAX_KEPT_BYTES = 256 * 1024 * 1024  # results of ended queries, all together


@dataclass
class Query:
    id: str
    statement: str
    sql: str
    stores: tuple[EventDataStore, ...]
    region: str | None
    created: float                      # wall clock, epoch seconds
    status: str = "QUEUED"
    columns: list[str] = field(default_factory=list)
    rows: list[list[str | None]] = field(default_factory=list)
    error: str | None = None
    result_bytes: int = 0
    events_scanned: int = 0
    bytes_scanned: int = 0
    started: float | None = None        # monotonic
    ended: float | None = None          # monotonic
    deadline: float | None = None       # monotonic
    cursor: duckdb.DuckDBPyConnection | None = None
    cancel_requested: bool = False

    @property
    def millis(self) -> int:
        if self.started is None:
            return 0
        return int(((self.ended or time.monotonic()) - self.started) * 1000)


class QueryStore:
    def __init__(self, engine: Engine, timeout: float = 30.0, max_rows: int = 100_000,
                 workers: int = 2, max_active: int = 10, keep: int = 200,
                 wall_clock: Callable[[], _dt.datetime] | None = None) -> None:
        self.engine = engine
        self.timeout = timeout
        self.max_rows = max_rows
        self.max_active = max_active
        self.keep = keep
        self._wall = wall_clock or (lambda: _dt.datetime.now(_dt.timezone.utc))
        self._queries: OrderedDict[str, Query] = OrderedDict()
        self._queue: list[str] = []
        self._cond = threading.Condition()
        self._held = 0
        self._closed = False
        self._threads = [threading.Thread(target=self._work, name=f"emulator-query-{i}",
                                          daemon=True) for i in range(workers)]
        self._threads.append(threading.Thread(target=self._watch, name="emulator-query-watch",
                                              daemon=True))
        for thread in self._threads:
            thread.start()

    # API -------------------------------------------------------------------------------------
    def submit(self, statement: str, translated: Translated, region: str | None) -> Query:
        with self._cond:
            if self._closed:
                raise LakeError("InternalFailure", "The emulator is stopping.", 500)
            active = self.active()
            if active >= self.max_active:
                raise LakeError("MaxConcurrentQueriesException",
                                f"You are already running {active} queries; the emulator runs "
                                f"at most {self.max_active} at once.")
            query = Query(str(uuid.uuid4()), statement, translated.sql, translated.stores,
                          region, self._wall().timestamp())
            self._queries[query.id] = query
            self._queue.append(query.id)
            self._forget_old()
            self._cond.notify_all()
            return query

    def active(self) -> int:
        """How many queries are queued or running."""
        with self._cond:
            return sum(1 for q in self._queries.values() if q.status not in ENDED)

    def get(self, query_id, region: str | None) -> Query:
        with self._cond:
            query = self._queries.get(query_id) if isinstance(query_id, str) else None
        if query is None or (region is not None and query.region not in (None, region)):
            raise LakeError("QueryIdNotFoundException",
                            f"The query ID {str(query_id)[:100]} does not exist or is no longer "
                            "kept.")
        return query

    def cancel(self, query_id, region: str | None) -> Query:
        query = self.get(query_id, region)
        with self._cond:
            if query.status in ENDED:
                raise LakeError("InactiveQueryException",
                                f"The query cannot be cancelled: it is {query.status}.")
            query.cancel_requested = True
            if query.status == "QUEUED":
                self._end(query, "CANCELLED")
            else:
                _interrupt(query)
            self._cond.notify_all()
            # The service answers RUNNING or CANCELLED; an interrupted statement ends quickly.
            self._cond.wait_for(lambda: query.status in ENDED, CANCEL_WAIT)
        return query

    def wait(self, query: Query, timeout: float) -> Query:
        with self._cond:
            self._cond.wait_for(lambda: query.status in ENDED or self._closed, timeout)
            return query

    @contextlib.contextmanager
    def hold(self):
        with self._cond:
            self._held += 1
        try:
            yield
        finally:
            with self._cond:
                self._held -= 1
                self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            for query in self._queries.values():
                if query.status == "QUEUED":
                    self._end(query, "CANCELLED")
                elif query.status == "RUNNING":
                    query.cancel_requested = True
                    _interrupt(query)
            self._cond.notify_all()
        for thread in self._threads:
            thread.join()

    # threads ---------------------------------------------------------------------------------
    def _next(self) -> Query | None:
        with self._cond:
            while True:
                if self._closed:
                    return None
                if not self._held:
                    while self._queue:
                        query = self._queries.get(self._queue.pop(0))
                        if query is not None and query.status == "QUEUED":
                            query.status = "RUNNING"
                            query.started = time.monotonic()
                            query.deadline = query.started + self.timeout
                            query.cursor = self.engine.cursor()
                            self._cond.notify_all()  # the watchdog learns the deadline
                            return query
                self._cond.wait()

    def _work(self) -> None:
        while True:
            query = self._next()
            if query is None:
                return
            status, error, columns, rows, size = "FINISHED", None, [], [], 0
            try:
                query.events_scanned, query.bytes_scanned = self.engine.size(query.stores)
                columns, rows, size = self.engine.run(query.cursor, query.sql, self.max_rows)
            except duckdb.InterruptException:
                status = "CANCELLED" if query.cancel_requested else "TIMED_OUT"
                error = (None if status == "CANCELLED" else
                         f"The query ran longer than the emulator's limit of {self.timeout:g} s.")
            except TooManyRows as exc:
                status, error = "FAILED", str(exc)
            except duckdb.Error as exc:
                if query.cancel_requested:
                    status = "CANCELLED"
                else:
                    status, error = "FAILED", self.engine.message(exc)
            except Exception:  # a bug must not leave the query RUNNING or end a worker
                log.exception("Lake query %s failed unexpectedly", query.id)
                status, error = "FAILED", "The emulator hit an unexpected error running the query."
            finally:
                with self._cond:  # the watchdog must not interrupt a closed cursor
                    cursor, query.cursor = query.cursor, None
                cursor.close()
            with self._cond:
                if status == "FINISHED" and query.cancel_requested:
                    status = "CANCELLED"  # asked to stop: the caller was told CANCELLED
                query.columns, query.rows, query.error = columns, rows, error
                query.result_bytes = size
                self._end(query, status)
                self._forget_old()
                self._cond.notify_all()

    def _watch(self) -> None:
        with self._cond:
            while not self._closed:
                now = time.monotonic()
                wait = None
                for query in self._queries.values():
                    if query.status != "RUNNING" or query.cursor is None:
                        continue
                    if query.cancel_requested or query.deadline <= now:
                        _interrupt(query)
                        wait = WATCH_INTERVAL
                    else:
                        left = query.deadline - now
                        wait = left if wait is None else min(wait, left)
                self._cond.wait(wait)

    def _end(self, query: Query, status: str) -> None:
        query.status = status
        query.ended = time.monotonic()

    def _forget_old(self) -> None:
        """Forget the oldest ended queries beyond ``keep`` or ``MAX_KEPT_BYTES`` of results."""
        ended = [q for q in self._queries.values() if q.status in ENDED]
        kept = sum(q.result_bytes for q in ended)
        for index, query in enumerate(ended):
            if len(ended) - index <= self.keep and kept <= MAX_KEPT_BYTES:
                break
            kept -= query.result_bytes
            del self._queries[query.id]


def _interrupt(query: Query) -> None:
    """Interrupt a running query's statement (called with the store's lock held)."""
    if query.cursor is not None:
        try:
            query.cursor.interrupt()
        except duckdb.Error:
            pass
