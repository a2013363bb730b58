"""Settling: the one place where the outcome of a request is interpreted, and the one way an
event becomes a dead letter.

:meth:`Settler.settle` takes a batch and what :meth:`Sender.send` gave for it (a
:class:`Result` or the :class:`RequestFailed` it raised) and settles every event of the batch,
aliases included, exactly once, as one of:

- **finalize**: accepted (``successful[]``): the tracker journals and counts it;
- **retry after a delay**: per-event ``Throttling``/``InternalFailure``, an event the answer does
  not mention, a request-level ``retry`` (throttling, 5xx, network) or a ``pause`` (channel or
  credentials: the whole of delivery waits, capped and doubling): handed back to the batcher;
  after a *throttled* answer (``pacing.is_throttled``) with a pacer, the delay is at least the
  pacer's wait for a not-full call (``Pacer.wait(now, False)``, taken after the pacer heard the
  answer), so a throttled batch comes back on its sink's pacing interval even when it is full
  (not while the batcher flushes for a drain or shutdown, which never waits for the interval);
- **split**: a request refused as a whole as invalid is halved until the event at fault is alone;
- **dead-letter**: a permanent per-event code, or a lone event refused as invalid.

:meth:`Settler.dead_letter` is the single dead-letter path (the reader's pre-send refusals use it
too): one ``failed/`` file per call, the sink's ack journal told just before the file appears
and just after (``delivery/journal.py``), then the tracker finalizes them. It cannot
fail on content (``spool.deadletters.dump_line``); a disk that refuses it raises ``OSError`` and
the caller retries.

Each event is added to ``settled`` just before it is handed on, so after an unexpected
exception only the others are retried (a second finalization could complete a segment early).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import time
from typing import Any

from ..batcher import Item
from ..pacing import is_throttled
from ..spool.deadletters import failure_line
from ..sender import RETRYABLE_EVENT_CODES, RequestFailed, Result

log = logging.getLogger("cloudtrail_sink.settle")


@dataclasses.dataclass(frozen=True)
class Dead:
    """One event on its way to ``failed/``: where it came from and why."""

    seg: Any  # tracker.Segment
    offset: int
    id: str
    code: str
    message: str
    event_data: Any
    raw: bytes | None  # the record's bytes, kept when its JSON form is lossy
    tag: Any
    time: Any


def every_copy(items: list) -> list:
    """The items with their aliases (same id and data, from other segments): what is settled
    when the items are handed back, so none of them is settled twice."""
    return [x for it in items for x in it.all()]


def unsettled(batch: list[Item], settled: set) -> list[Item]:
    """The items of ``batch`` to retry after an unexpected error: every event (an item or one
    of its aliases) not in ``settled``, regrouped under its first unsettled copy."""
    out = []
    for it in batch:
        units = [x for x in it.all() if x not in settled]
        if not units:
            continue
        head = units[0]
        if head is not it or len(units) != len(it.all()):
            head.aliases = units[1:] or None
        out.append(head)
    return out


def _event_data(text: str) -> Any:
    """The sent ``eventData`` text as a value for its dead letter (the text if unreadable)."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return text


class Settler:
    def __init__(self, *, tracker, batcher, dead_letters, metrics, jitter, pause, clock,
                 channel_arn: str | None, pacer=None, monotonic=time.monotonic):
        self.tracker = tracker
        self.batcher = batcher
        self.dead_letters = dead_letters  # spool.deadletters.DeadLetters, or the dry run's printer
        self.metrics = metrics
        self.jitter = jitter
        self.pause = pause
        self.clock = clock
        self.channel_arn = channel_arn
        self.pacer = pacer  # pacing.Pacer: hears every answer, throttled or not
        self.monotonic = monotonic

    # -- the outcome of a request ---------------------------------------------------------------
    def settle(self, batch: list[Item], outcome: Result | RequestFailed, settled: set) -> None:
        """Settle every event of ``batch`` after ``outcome`` (see module docstring)."""
        floor = 0.0  # a throttled answer's retries wait at least this long (the pacing)
        if self.pacer is not None:
            now = self.monotonic()
            self.pacer.on_result(outcome, now)
            if is_throttled(outcome) and not self.batcher.flushing:
                floor = self.pacer.wait(now, False)
        if isinstance(outcome, RequestFailed):
            self._request_failed(batch, outcome, settled, floor)
            return
        self.metrics.batch.observe(len(batch))
        if self.pause.paused:
            log.warning("delivery resumed", extra={"after": self.pause.reason})
            self.pause.succeed()
        failed = {fid: (code, msg) for fid, code, msg in outcome.failed}
        self.metrics.requests.labels("partial" if failed else "success").inc()
        delivered: dict = {}
        n_delivered = 0
        dead: list[tuple[Item, str, str]] = []
        successful = outcome.successful
        for it in batch:
            problem = failed.get(it.p.id) if failed else None
            if problem is None and it.p.id in successful:
                if it.aliases:
                    for x in it.aliases:
                        delivered.setdefault(x.seg, []).append(x)
                    n_delivered += len(it.aliases)
                units = delivered.get(it.seg)  # the hot path: no list per event
                if units is None:
                    delivered[it.seg] = [it]
                else:
                    units.append(it)
                n_delivered += 1
            elif problem is None or problem[0] in RETRYABLE_EVENT_CODES:
                code = problem[0] if problem else "NotAcknowledged"
                it.attempts += 1
                self.metrics.retried.labels(code).inc()
                settled.update(it.all())
                self.batcher.retry([it], max(floor, self.jitter.delay(it.attempts - 1)))
            else:
                dead.append((it, problem[0], problem[1]))
        if dead:
            self._refused(dead, settled)
        for seg, units in delivered.items():
            settled.update(units)
            self.tracker.accepted(seg, [u.p.offset for u in units])
        if n_delivered:
            self.metrics.delivered.inc(n_delivered)

    def _request_failed(self, batch: list[Item], exc: RequestFailed, settled: set,
                        floor: float = 0.0) -> None:
        self.metrics.requests.labels(exc.kind).inc()
        if exc.kind == "retry":
            attempt = max(it.attempts for it in batch)
            for it in batch:
                it.attempts += 1
            delay = max(floor, self.jitter.delay(attempt))
            log.log(logging.INFO if attempt < 3 else logging.WARNING,
                    "request failed; retrying", extra={"code": exc.code, "status": exc.status,
                                                       "events": len(batch), "attempt": attempt + 1,
                                                       "retry_in_seconds": round(delay, 3)})
            settled.update(every_copy(batch))
            self.batcher.retry(batch, delay)
        elif exc.kind == "split" and len(batch) > 1:
            half = len(batch) // 2
            log.warning("request refused as invalid; splitting it to find the event at fault",
                        extra={"code": exc.code, "events": len(batch)})
            settled.update(every_copy(batch[:half]))
            self.batcher.requeue_batch(batch[:half])
            settled.update(every_copy(batch[half:]))
            self.batcher.requeue_batch(batch[half:])
        elif exc.kind == "split":
            self._refused([(batch[0], exc.code, exc.message)], settled)
        else:
            length = self.pause.fail(f"{exc.code}: {exc.message}")
            if length is None:  # a pause is already running: wait for it with the others
                length = self.pause.remaining()
            else:
                log.error("DELIVERY PAUSED: the service refused the channel or the credentials; "
                          "nothing is deleted, retrying later", extra={
                              "code": exc.code, "status": exc.status, "error": exc.message,
                              "channel": self.channel_arn, "pause_seconds": round(length, 1),
                              "consecutive_failures": self.pause.failures})
            settled.update(every_copy(batch))
            self.batcher.retry(batch, length)

    def _refused(self, dead: list[tuple[Item, str, str]], settled: set) -> None:
        """Events the service refused for good: dead letters, or back to the batcher while
        ``failed/`` cannot be written."""
        units = [Dead(x.seg, x.p.offset, x.p.id, code, msg, _event_data(x.p.text), None, x.tag,
                      x.time) for it, code, msg in dead for x in it.all()]
        try:
            path = self.dead_letter(units)
        except OSError as exc:
            log.error("cannot write failed/ file; those events will be sent again",
                      extra={"error": exc.strerror})
            for it, _, _ in dead:
                it.attempts += 1
                settled.update(it.all())
                self.batcher.retry([it], self.jitter.delay(it.attempts))
            return
        log.warning("events rejected by the service went to failed/", extra={
            "file": path and os.path.basename(path),
            "codes": dict(collections.Counter(u.code for u in units))})
        for it, _, _ in dead:
            settled.update(it.all())
        self.finalize_dead(units)

    # -- dead letters ---------------------------------------------------------------------------
    def dead_letter(self, units: list[Dead]) -> str | None:
        """Write ``units`` as one ``failed/`` file (the journal told first); returns its path.
        Raises only ``OSError``. The caller then calls :meth:`finalize_dead`."""
        now = self.clock()
        lines = [failure_line(code=u.code, message=u.message, segment=u.seg.name, tag=u.tag,
                              time_=u.time, id=u.id, event_data=u.event_data, failed_at=now,
                              raw=u.raw) for u in units]

        per_seg: dict = {}
        for u in units:
            if u.seg.journal is not None:
                per_seg.setdefault(u.seg, []).append(u.offset)

        def intent(name: str) -> None:
            for seg, offsets in per_seg.items():
                seg.journal.dead_lettered(name, offsets)

        path = self.dead_letters.write(lines, intent=intent)
        if path is not None and per_seg:
            # One sink journal: one line, kept as long as any of these segments' intents.
            next(iter(per_seg)).journal.published(os.path.basename(path),
                                                  [seg.name for seg in per_seg])
        for code, n in collections.Counter(u.code for u in units).items():
            self.metrics.failed.labels(code).inc(n)
        return path

    def finalize_dead(self, units: list[Dead]) -> None:
        per_seg: collections.Counter = collections.Counter(u.seg for u in units)
        for seg, n in per_seg.items():
            self.tracker.dead_lettered(seg, n)
