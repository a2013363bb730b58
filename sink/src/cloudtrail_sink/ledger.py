"""Which events of which segment are still outstanding; a segment is done when all are final.

Contract:

- The reader calls :meth:`Ledger.open` for a segment, :meth:`Ledger.add` once per record it hands
  on (to the batcher or to the dead-letter writer) and :meth:`Ledger.read_done` when the segment
  was read to its end (or to its quarantined tail).
- Whoever settles an event calls :meth:`Ledger.finalize`: after a ``successful[]`` entry, or after
  the event's dead-letter file was renamed into ``failed/``. Nothing else finalizes.
- When a segment has been read completely and its outstanding count is zero, ``on_complete`` is
  called exactly once with it (the runner deletes the segment file there). Until then the file
  stays, so a crash at any moment re-sends at most, never loses.
- ``pending`` counts every event added and not finalized, over all segments: the reader waits in
  :meth:`wait_for_room` while it is at the limit, which bounds memory whatever the backlog.
"""

from __future__ import annotations

import threading
import time
from typing import Callable


class Segment:
    __slots__ = ("name", "path", "outstanding", "records", "read_complete", "done", "journal")

    def __init__(self, name: str, path: str, journal=None):
        self.name = name
        self.path = path
        self.journal = journal  # delivery.journal.AckJournal, or None (dry run)
        self.outstanding = 0
        self.records = 0
        self.read_complete = False
        self.done = False

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        return f"Segment({self.name!r}, outstanding={self.outstanding}, read={self.read_complete})"


class Ledger:
    def __init__(self, on_complete: Callable[[Segment], None], clock: Callable[[], float] = time.monotonic):
        self.on_complete = on_complete
        self.clock = clock
        self.pending = 0
        self.open_segments: dict[str, Segment] = {}
        self.last_progress = clock()
        self._cond = threading.Condition()

    def open(self, name: str, path: str, journal=None) -> Segment:
        seg = Segment(name, path, journal)
        with self._cond:
            self.open_segments[name] = seg
        return seg

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

    def finalize(self, seg: Segment, n: int = 1) -> None:
        complete = False
        with self._cond:
            if seg.outstanding < n:
                raise AssertionError(f"segment {seg.name}: finalizing more events than outstanding")
            seg.outstanding -= n
            self.pending -= n
            self.last_progress = self.clock()
            complete = self._check(seg)
            self._cond.notify_all()
        if complete:
            self.on_complete(seg)

    def read_done(self, seg: Segment) -> None:
        with self._cond:
            seg.read_complete = True
            complete = self._check(seg)
        if complete:
            self.on_complete(seg)

    def forget(self, seg: Segment, unsettled: int) -> None:
        """The read of ``seg`` failed: ``unsettled`` of its added events will never be
        finalized (they are read again later), so they leave ``pending``; the segment is never
        completed through this object (events already handed on still finalize into it)."""
        with self._cond:
            unsettled = min(unsettled, seg.outstanding)
            seg.outstanding -= unsettled
            self.pending -= unsettled
            seg.done = True
            self.open_segments.pop(seg.name, None)
            self._cond.notify_all()

    def abandon(self, seg: Segment) -> None:
        """Forget a segment without completing it (shutdown mid-read): its file stays."""
        with self._cond:
            self.open_segments.pop(seg.name, None)

    def _check(self, seg: Segment) -> bool:
        if seg.read_complete and seg.outstanding == 0 and not seg.done:
            seg.done = True
            self.open_segments.pop(seg.name, None)
            return True
        return False

    def idle(self) -> bool:
        with self._cond:
            return self.pending == 0 and not self.open_segments
