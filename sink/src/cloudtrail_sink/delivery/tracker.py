"""The segment tracker: the one owner of every segment's life, from its read to its deletion.

Contract:

- The reader calls :meth:`SegmentTracker.open` for a segment (it comes with its view of the
  sink's ack journal and the offsets a previous sink already settled, which the reader skips),
  :meth:`add` once per record it hands on (to the batcher or to the dead-letter writer) and
  :meth:`read_done` when the segment was read to its end (or to its quarantined tail).
- Whoever settles an event calls :meth:`accepted` (after a ``successful[]`` entry: its offset
  goes to the journal first) or :meth:`dead_lettered` (after its ``failed/`` file was renamed
  into place). Nothing else finalizes. The acceptance that completes a segment is not
  journalled, since the segment is deleted right after it (a one-request segment never gets a
  journal line); if the deletion then does not happen (it fails, or deleting was stopped), the
  line is written before the segment is left.
- When a segment was read completely and nothing of it is outstanding, it is deleted exactly
  once, then the journal forgets it (``Journal.forget``), then the queue forgets it. A
  deletion that fails is logged and retried: the segment is released to the queue and the
  next time it is popped only its deletion is done (:meth:`take_undeleted`). Until deleted,
  the file stays: a crash at any moment re-sends at most what was in flight, never loses.
- A read that fails (:meth:`read_failed`) releases what the read held (so ``pending`` and a
  drain are right) and offers the segment again after :func:`read_retry_seconds`, doubling per
  failure of the same segment; the journal makes the new read skip what was settled.
- ``pending`` counts every event added and not finalized, over all segments: the reader waits in
  :meth:`wait_for_room` while it is at the limit, which bounds memory whatever the backlog.
- :meth:`stop_deleting` (at shutdown, before the spool lock is released) makes every later
  completion delete nothing: the next sink on this spool settles those segments again.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Callable

from .journal import Journal, SegmentJournal

log = logging.getLogger("cloudtrail_sink.tracker")

RETRY_FAILED_SEGMENT_SECONDS = 30.0
# A read that keeps failing costs a re-read each time: back off (doubling per failure of the
# same segment) so a bad sector is not read in a loop.
MAX_RETRY_FAILED_SEGMENT_SECONDS = 3600.0


def read_retry_seconds(failures: int) -> float:
    """Delay before a segment whose read failed ``failures`` times is offered again."""
    return min(RETRY_FAILED_SEGMENT_SECONDS * 2.0 ** (failures - 1),
               MAX_RETRY_FAILED_SEGMENT_SECONDS)


class Segment:
    __slots__ = ("name", "path", "outstanding", "records", "read_complete", "done", "journal",
                 "unjournalled")

    def __init__(self, name: str, path: str, journal: SegmentJournal | None = None):
        self.name = name
        self.path = path
        self.journal = journal  # None: a dry run, which writes nothing
        self.outstanding = 0
        self.records = 0
        self.read_complete = False
        self.done = False
        self.unjournalled: list[int] | None = None  # the completing acceptance's offsets

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        return f"Segment({self.name!r}, outstanding={self.outstanding}, read={self.read_complete})"


class SegmentTracker:
    def __init__(self, queue, journal: Journal | None, *, delete: bool = True,
                 on_deleted: Callable[[Segment], None] = lambda seg: None,
                 on_error: Callable[[str], None] = lambda stage: None,
                 clock: Callable[[], float] = time.monotonic,
                 before_delete: Callable[[Segment], None] = lambda seg: None):
        self.queue = queue
        # Told once per settled segment, before its first deletion attempt (not in a dry run):
        # e.g. how long the segment waited (its mtime).
        self.before_delete = before_delete
        # None: no journal; a dry run (delete False) is given one that reads and never writes.
        self.journal = journal
        self.delete = delete  # False: a dry run deletes nothing
        self.on_deleted = on_deleted
        self.on_error = on_error
        self.clock = clock
        self.pending = 0
        self.open_segments: dict[str, Segment] = {}
        self.last_progress = clock()
        self._cond = threading.Condition()
        self._undeleted: dict[str, str] = {}  # settled segments whose deletion failed
        self._read_failures: dict[str, int] = {}  # segment name -> failed reads so far
        # Held around each deletion; stop_deleting() takes it, so a sender thread outliving
        # the grace period deletes nothing once the spool lock may be someone else's.
        self._delete_lock = threading.Lock()
        self._no_deletes = False

    # -- reading --------------------------------------------------------------------------------
    def open(self, name: str, path: str) -> tuple[Segment, set[int]]:
        """Start tracking a segment; returns it and the offsets already settled before (a dry
        run reads them too, so it shows what the next run would send, and writes nothing)."""
        journal = self.journal
        seg = Segment(name, path, self._segment_journal(name))
        with self._cond:
            self.open_segments[name] = seg
        return seg, (journal.settled(name) if journal is not None else set())

    def take_undeleted(self, name: str) -> bool:
        """True (and the deletion retried) when ``name`` was settled before and only its
        deletion is left to do."""
        path = self._undeleted.pop(name, None)
        if path is None:
            return False
        self._complete(Segment(name, path, self._segment_journal(name)), retried=True)
        return True

    def _segment_journal(self, name: str) -> SegmentJournal | None:
        """The segment's view of the journal; None in a dry run, which writes nothing."""
        if self.journal is None or not self.delete:
            return None
        return SegmentJournal(self.journal, name)

    def add(self, seg: Segment, n: int = 1) -> None:
        with self._cond:
            if self.pending == 0:
                self.last_progress = self.clock()  # "stuck" counts from when work appeared
            seg.outstanding += n
            seg.records += n
            self.pending += n

    def wait_for_room(self, limit: int, stopping: Callable[[], bool], timeout: float = 1.0) -> bool:
        """Block while ``pending >= limit``; False if ``stopping()`` became true meanwhile."""
        with self._cond:
            while self.pending >= limit:
                if stopping():
                    return False
                self._cond.wait(timeout)
            return not stopping()

    def read_done(self, seg: Segment) -> None:
        with self._cond:
            seg.read_complete = True
            complete = self._check(seg)
        if complete:
            self._complete(seg)

    def read_failed(self, seg: Segment | None, name: str, unsettled: int) -> tuple[int, float]:
        """The read of ``name`` failed: ``unsettled`` of its added events will never be
        finalized (they are read again later), so they leave ``pending``; the segment is
        never completed through this read (events already handed on still settle into it).
        Returns (failures so far, seconds until it is offered again)."""
        if seg is not None:
            with self._cond:
                unsettled = min(unsettled, seg.outstanding)
                seg.outstanding -= unsettled
                self.pending -= unsettled
                seg.done = True
                self.open_segments.pop(seg.name, None)
                self._cond.notify_all()
        failures = self._read_failures.get(name, 0) + 1
        self._read_failures[name] = failures
        retry = read_retry_seconds(failures)
        self.queue.release(name, retry)
        self.on_error("read")
        return failures, retry

    def abandon(self, seg: Segment) -> None:
        """Forget a segment without completing it (shutdown mid-read): its file stays."""
        with self._cond:
            self.open_segments.pop(seg.name, None)

    # -- settling -------------------------------------------------------------------------------
    def accepted(self, seg: Segment, offsets: list[int]) -> None:
        """These events of ``seg`` were accepted by the service."""
        if seg.journal is not None:
            with self._cond:
                # Only these offsets are outstanding and no more will be added: this completes
                # the segment, which _complete deletes (or journals them if it cannot).
                completes = seg.read_complete and seg.outstanding == len(offsets)
            if completes:
                seg.unjournalled = offsets
            else:
                seg.journal.accepted(offsets)
        self._finalize(seg, len(offsets))

    def dead_lettered(self, seg: Segment, n: int) -> None:
        """``n`` events of ``seg`` are in a ``failed/`` file (the journal was told before)."""
        self._finalize(seg, n)

    def _finalize(self, seg: Segment, n: int) -> None:
        with self._cond:
            if seg.outstanding < n:
                raise AssertionError(f"segment {seg.name}: finalizing more events than outstanding")
            seg.outstanding -= n
            self.pending -= n
            self.last_progress = self.clock()
            complete = self._check(seg)
            self._cond.notify_all()
        if complete:
            self._complete(seg)

    def _check(self, seg: Segment) -> bool:
        if seg.read_complete and seg.outstanding == 0 and not seg.done:
            seg.done = True
            self.open_segments.pop(seg.name, None)
            return True
        return False

    def _complete(self, seg: Segment, retried: bool = False) -> None:
        if self.delete:
            try:
                with self._delete_lock:
                    if self._no_deletes:
                        self._journal_unjournalled(seg)
                        return  # stopped: the next sink on this spool settles it again
                    if not retried:  # once per segment, not per deletion attempt
                        self.before_delete(seg)
                    os.unlink(seg.path)
            except FileNotFoundError:
                pass
            except OSError as exc:
                # Settled, but still on disk: a later pop only retries the deletion.
                self._journal_unjournalled(seg)
                self._undeleted[seg.name] = seg.path
                self.queue.release(seg.name, RETRY_FAILED_SEGMENT_SECONDS)
                self.on_error("delete")
                log.error("cannot delete a delivered segment; will try again", extra={
                    "segment": seg.name, "error": exc.strerror,
                    "retry_in_seconds": RETRY_FAILED_SEGMENT_SECONDS})
                return
            if seg.journal is not None:
                seg.journal.forget()
            self._read_failures.pop(seg.name, None)
            self.on_deleted(seg)
        self.queue.done(seg.name)

    @staticmethod
    def _journal_unjournalled(seg: Segment) -> None:
        """The segment stays on disk after all: journal the acceptance that completed it, so
        the next read skips those events."""
        if seg.journal is not None and seg.unjournalled:
            seg.journal.accepted(seg.unjournalled)
            seg.unjournalled = None

    # -- state ----------------------------------------------------------------------------------
    def stop_deleting(self) -> None:
        with self._delete_lock:
            self._no_deletes = True

    def idle(self) -> bool:
        with self._cond:
            return self.pending == 0 and not self.open_segments
