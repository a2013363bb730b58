"""The reader thread: segments oldest first -> records -> pre-send check -> batcher.

- Segments come from the queue (``watcher.SegmentQueue``); each is opened safely
  (``spool.open_segment``), tracked (``tracker.SegmentTracker.open``, which also says which
  records a previous sink already settled: those are skipped) and read with
  ``reader.read_segment``.
- A :class:`reader.Junk` run goes to ``quarantine/`` with its bytes; the records after it are
  read on (unless it is the segment's tail).
- Each record goes through ``events.build``; whatever it raises is a refusal too, so no content
  can stop a segment. Prepared events go to the batcher in groups; refused ones are
  dead-lettered through the settler's single dead-letter path (no API call spent on them).
- Memory: the reader waits while ``pending_limit`` events are outstanding.
- A read that fails for any other reason (an I/O error) is logged and the tracker offers the
  segment again later; what was handed on still settles normally.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import logging
import os
import threading
from typing import Any

from .. import events, spool
from ..batcher import Item
from . import reader as segment_reader
from .dryrun import DRY_RUN_ACCOUNT
from .reader import Junk
from .settle import Dead

log = logging.getLogger("cloudtrail_sink.runner")

REJECTED_FLUSH = 500
HAND_ON_EVERY = 50


@dataclasses.dataclass(frozen=True)
class Refused:
    """A record the pre-send check refused, waiting to be dead-lettered with its bytes."""

    built: events.Rejected
    offset: int
    raw: bytes
    tag: Any
    time: Any


class SegmentReading:
    def __init__(self, *, cfg, layout, queue, tracker, batcher, settler, dead_letters, metrics,
                 jitter, stop: threading.Event, account_id: str | None):
        self.cfg = cfg
        self.layout = layout
        self.queue = queue
        self.tracker = tracker
        self.batcher = batcher
        self.settler = settler
        self.dead_letters = dead_letters
        self.metrics = metrics
        self.jitter = jitter
        self._stop = stop
        self.account_id = account_id
        self.reading: str | None = None
        self._state: tuple[Any, list] | None = None  # (segment, refused) being read

    def run(self) -> None:
        while not self._stop.is_set():
            name = self.queue.pop()
            if name is None:
                return
            self.reading = name
            try:
                self._read(name)
            except Exception:
                self._read_failed(name)
            finally:
                self.reading = None
                self._state = None

    def _read_failed(self, name: str) -> None:
        state, self._state = self._state, None
        seg, refused = state if state is not None and state[0].name == name else (None, [])
        failures, retry = self.tracker.read_failed(seg, name, len(refused))
        log.exception("reading a segment failed; it stays in ready/ and is read again later",
                      extra={"segment": name, "failures": failures, "retry_in_seconds": retry})

    def _read(self, name: str) -> None:
        if self.tracker.take_undeleted(name):
            return
        path = os.path.join(self.layout.ready, name)
        try:
            f = spool.open_segment(path)
        except FileNotFoundError:
            self.queue.done(name)
            return
        except spool.NotRegularFile as exc:
            # Swapped for a symlink/FIFO after it was listed: never opened, reported once.
            self.queue.ignore(name, exc.strerror or "not a regular file")
            return
        except OSError as exc:
            log.error("cannot open segment; will try again at the next rescan",
                      extra={"segment": name, "error": exc.strerror})
            self.queue.done(name)
            return
        seg, settled = self.tracker.open(name, path)
        refused: list[Refused] = []
        self._state = (seg, refused)
        ready: list[Item] = []
        records = 0
        limit = self.cfg.pending_limit
        account = self.account_id
        max_bytes = self.cfg.max_request_bytes
        tracker, batcher, build, Prepared = self.tracker, self.batcher, events.build, events.Prepared
        hand_on_every = HAND_ON_EVERY

        def hand_on() -> None:
            # Counted before the batcher sees them, so nothing can be settled before it is
            # counted; handed on in groups to spare a lock round-trip per event.
            tracker.add(seg, len(ready))
            batcher.add_many(ready)
            ready.clear()

        with f:
            for entry in segment_reader.read_segment(f):
                if entry.__class__ is Junk:
                    hand_on()
                    self._quarantine(f, name, entry, records)
                    if entry.end is None:
                        break
                    continue
                records += 1
                if settled and entry.offset in settled:
                    continue  # accepted or dead-lettered by a sink before this one
                record = entry.value
                queued = len(ready)
                if queued >= hand_on_every or tracker.pending + queued >= limit:
                    hand_on()
                    if tracker.pending >= limit and refused:
                        # Refused events count as pending and only this thread settles them:
                        # write them out before waiting for room nobody else could make.
                        self._reject(seg, refused)
                        refused.clear()
                    if (tracker.pending >= limit and not tracker.wait_for_room(
                            limit, self._stop.is_set)) or self._stop.is_set():
                        tracker.abandon(seg)
                        return
                raw = None  # read from the segment once, only for a record that is refused
                try:
                    built = build(record, account, max_bytes)
                    if built.__class__ is not Prepared and account is None:
                        built = self._build_for_unknown_account(record, built, max_bytes)
                except Exception as exc:  # noqa: BLE001 - no content may stop a segment
                    raw = entry.raw(f)
                    built = events.Rejected(
                        "r" + hashlib.sha256(raw).hexdigest()[:64], "InvalidData",
                        f"sink: record cannot be checked ({type(exc).__name__})",
                        record.get("eventData"))
                tag, when = record.get("tag"), record.get("time")
                if built.__class__ is Prepared:
                    built.offset = entry.offset
                    ready.append(Item(seg, built, tag, when))
                else:
                    tracker.add(seg)
                    if raw is None:
                        raw = entry.raw(f)
                    refused.append(Refused(built, entry.offset, raw, tag, when))
                    if len(refused) >= REJECTED_FLUSH:
                        self._reject(seg, refused)
                        refused.clear()
            else:
                hand_on()
        if refused:
            self._reject(seg, refused)
            refused.clear()
        tracker.read_done(seg)

    @staticmethod
    def _build_for_unknown_account(record: Any, built: Any, max_bytes: int) -> Any:
        """Dry run without a channel: the missing recipientAccountId the real run would fill
        in is not a problem; check the rest of the event with :data:`DRY_RUN_ACCOUNT`."""
        data = record.get("eventData")
        if data.__class__ is not dict or "recipientAccountId" in data:
            return built
        return events.build({**record, "eventData": {**data, "recipientAccountId": DRY_RUN_ACCOUNT}},
                            None, max_bytes)

    def _reject(self, seg, refused: list[Refused]) -> None:
        """Dead-letter events the pre-send check refused (no API call spent on them)."""
        units = [Dead(seg, r.offset, r.built.id, r.built.code, r.built.message,
                      r.built.event_data, r.raw, r.tag, r.time) for r in refused]
        while True:
            try:
                path = self.settler.dead_letter(units)
                break
            except OSError as exc:
                log.error("cannot write failed/ file; retrying", extra={"error": exc.strerror})
                if self._stop.wait(self.jitter.delay(5)):
                    self.tracker.abandon(seg)
                    raise
        log.info("events refused by the pre-send check went to failed/", extra={
            "segment": seg.name, "file": path and os.path.basename(path),
            "codes": dict(collections.Counter(u.code for u in units))})
        self.settler.finalize_dead(units)

    def _quarantine(self, f, name: str, junk: Junk, records: int) -> None:
        self.metrics.quarantined.inc()
        size = os.fstat(f.fileno()).st_size
        log.error("segment has bytes that hold no record; they go to quarantine/", extra={
            "segment": name, "offset": junk.offset, "end": junk.end, "size": size,
            "error": junk.error, "records_before": records})
        while True:
            try:
                self.dead_letters.quarantine(f, name, junk.offset, size, junk.error, records,
                                             junk.end)
                return
            except OSError as exc:
                # Deleting the segment without its quarantined bytes would lose them.
                log.error("cannot write to quarantine/; retrying", extra={"error": exc.strerror})
                if self._stop.wait(self.jitter.delay(5)):
                    raise
