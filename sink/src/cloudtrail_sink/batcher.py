"""Groups prepared events from any number of segments into PutAuditEvents requests.

Contract of :meth:`Batcher.take` (called by each sender worker, blocks until it has a batch):

- A batch holds at most ``max_events`` events and its serialized request body
  (:func:`events.request_size`) is at most ``max_bytes``.
- No two events in a batch share an ``id``: an event whose id and ``eventData`` text equal one
  already in the batch rides along as an *alias* (sent once, settled together); an event with the
  same id but different data waits for a later batch.
- A batch is handed out when full, or when its oldest event waited the linger, or at once when
  ``flush()`` was requested (drain, shutdown). Events whose retry time came are taken first, in
  the order they came due.
- The linger is ``linger * (1 + linger_jitter * v)`` seconds, ``v`` uniform in ``[-1, 1]``, drawn
  again after each batch formed (``linger_jitter`` 0: exactly ``linger``). The sink draws it
  with pacing on (``pacing.linger_jitter``) so that the calls of a sink fed one segment a second
  do not keep the same phase: see "Why the linger is jittered" in ``pacing.py``.
- Re-formed batches (``requeue_batch``, used after a split) are handed out before anything else.
- With a ``pacer`` (:class:`~cloudtrail_sink.pacing.Pacer`), a batch that is due is handed out
  only once ``pacer.wait(now, full)`` is 0: a batch that is not full also waits for the pacing
  interval (how long it may linger), every batch for the call-rate ceiling; a full batch (or a
  flush, or a re-formed batch) never waits for the interval. ``pacer.on_call`` is told of each
  batch handed out.
- ``close()`` makes every waiting ``take`` return None.

Time is injected (``clock``); ``take`` waits on a condition, never polls.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import random
import threading
import time
from typing import Callable

from . import events


class Item:
    """One event on its way: where it came from, what to send, how often it was tried."""

    __slots__ = ("seg", "p", "tag", "time", "attempts", "aliases", "since")

    def __init__(self, seg, p: events.Prepared, tag, time_, since: float = 0.0):
        self.seg = seg
        self.p = p
        self.tag = tag
        self.time = time_
        self.attempts = 0
        self.aliases: list[Item] | None = None
        self.since = since

    def all(self) -> list["Item"]:
        return [self] + self.aliases if self.aliases else [self]


class Batcher:
    def __init__(self, max_events: int = 100, max_bytes: int = 999_000, linger: float = 0.2,
                 clock: Callable[[], float] = time.monotonic, pacer=None,
                 linger_jitter: float = 0.0, rand: random.Random | None = None):
        if not 0.0 <= linger_jitter <= 1.0:
            raise ValueError("linger_jitter must be within [0, 1]")
        self.max_events = max_events
        self.max_bytes = max_bytes
        self.linger = linger
        self.linger_jitter = linger_jitter
        self.rand = rand or random.Random()
        self.clock = clock
        self.pacer = pacer
        self._linger = self._draw_linger()  # this batch's linger
        self._longest_linger = linger * (1.0 + linger_jitter)
        self._pending: collections.deque[Item] = collections.deque()
        self._pending_bytes = 0
        self._retry: list[tuple[float, int, Item]] = []
        self._batches: collections.deque[list[Item]] = collections.deque()
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._closed = False
        self._flush = False

    # -- input ----------------------------------------------------------------------------------
    def add(self, item: Item) -> None:
        with self._cond:
            item.since = self.clock()
            was_empty = not self._pending
            self._pending.append(item)
            self._pending_bytes += item.p.size + events.ENTRY_SEPARATOR
            if was_empty or self._full_locked():
                self._cond.notify()

    def add_many(self, items: list[Item]) -> None:
        """``add`` for several events at once (one lock round-trip)."""
        if not items:
            return
        with self._cond:
            now = self.clock()
            was_empty = not self._pending
            size = 0
            for item in items:
                item.since = now
                size += item.p.size
            self._pending.extend(items)
            self._pending_bytes += size + events.ENTRY_SEPARATOR * len(items)
            if was_empty or self._full_locked():
                self._cond.notify()

    def retry(self, items: list[Item], delay: float) -> None:
        """Send these again, each after ``delay`` seconds."""
        with self._cond:
            due = self.clock() + delay
            for item in items:
                heapq.heappush(self._retry, (due, next(self._seq), item))
            self._cond.notify()

    def requeue_batch(self, items: list[Item]) -> None:
        with self._cond:
            self._batches.append(items)
            self._cond.notify()

    def flush(self, on: bool = True) -> None:
        """While on, hand out partial batches without waiting for the linger."""
        with self._cond:
            self._flush = on
            self._cond.notify_all()

    @property
    def flushing(self) -> bool:
        """Whether partial batches are being handed out at once (drain, shutdown)."""
        return self._flush

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def count(self) -> int:
        with self._cond:
            return len(self._pending) + len(self._retry) + sum(len(b) for b in self._batches)

    # -- output ---------------------------------------------------------------------------------
    def _full_locked(self) -> bool:
        return (len(self._pending) >= self.max_events
                or events.REQUEST_OVERHEAD + self._pending_bytes > self.max_bytes)

    def take(self, timeout: float | None = None) -> list[Item] | None:
        """Block until a batch is due and return it; None when closed (or on timeout)."""
        with self._cond:
            give_up = None if timeout is None else self.clock() + timeout
            while not self._closed:
                now = self.clock()
                due = []
                while self._retry and self._retry[0][0] <= now:
                    item = heapq.heappop(self._retry)[2]
                    # Due now, whatever linger a batch formed before it goes draws (a retry
                    # left over from a full batch must not wait for the next draw).
                    item.since = now - self._longest_linger
                    self._pending_bytes += item.p.size + events.ENTRY_SEPARATOR
                    due.append(item)
                if due:
                    self._pending.extendleft(reversed(due))  # first due, first sent
                held = None  # when the pacer lets the due batch go
                if self._batches:
                    wait = self._paced(now, True)
                    if wait <= 0.0:
                        return self._batches.popleft()
                    held = now + wait
                elif self._pending:
                    full = self._flush or self._full_locked()
                    if full or self._pending[0].since + self._linger <= now:
                        wait = self._paced(now, full)
                        if wait <= 0.0:
                            batch = self._form_locked()
                            self._linger = self._draw_linger()
                            if self._pending:
                                self._cond.notify()  # more may be due for another worker
                            return batch
                        held = now + wait
                wake = []
                if held is not None:
                    wake.append(held)
                elif self._pending:
                    wake.append(self._pending[0].since + self._linger)
                if self._retry:
                    wake.append(self._retry[0][0])
                if give_up is not None:
                    if now >= give_up:
                        return None
                    wake.append(give_up)
                self._cond.wait(max(0.0, min(wake) - now) if wake else None)
            return None

    def _draw_linger(self) -> float:
        if not self.linger_jitter:
            return self.linger
        return self.linger * (1.0 + self.linger_jitter * (2.0 * self.rand.random() - 1.0))

    def _paced(self, now: float, full: bool) -> float:
        """0 when a due batch may go now (the pacer, if any, is told of the call), else the
        seconds the pacer holds it."""
        pace = self.pacer
        if pace is None:
            return 0.0
        wait = pace.wait(now, full)
        if wait <= 0.0:
            pace.on_call(now)
            return 0.0
        return wait

    def _form_locked(self) -> list[Item]:
        batch: list[Item] = []
        by_id: dict[str, Item] = {}
        size = events.REQUEST_OVERHEAD
        held: list[Item] = []
        pending = self._pending
        while pending and len(batch) < self.max_events:
            item = pending.popleft()
            self._pending_bytes -= item.p.size + events.ENTRY_SEPARATOR
            first = by_id.get(item.p.id)
            if first is not None:
                if first.p.text == item.p.text:
                    if first.aliases is None:
                        first.aliases = []
                    first.aliases.append(item)
                    continue
                held.append(item)  # same id, different data: never in the same request
                continue
            add = item.p.size + (events.ENTRY_SEPARATOR if batch else 0)
            if batch and size + add > self.max_bytes:
                pending.appendleft(item)
                self._pending_bytes += item.p.size + events.ENTRY_SEPARATOR
                break
            batch.append(item)
            by_id[item.p.id] = item
            size += add
        for item in reversed(held):
            pending.appendleft(item)
            self._pending_bytes += item.p.size + events.ENTRY_SEPARATOR
        return batch
