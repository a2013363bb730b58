"""Finds sealed segments in ``ready/`` and hands them out oldest first.

Contract:

- :class:`SegmentQueue` holds the names known to be waiting or in progress. ``offer(name)`` adds a
  name once (a heap keyed by the name, whose byte order is sealing order); ``pop()`` returns the
  oldest waiting one; ``done(name)`` forgets it after the segment was deleted (or skipped).
  Memory is one short string per segment, whatever the events inside.
- :meth:`SegmentQueue.scan` lists ``ready/`` once: ``*.seg`` regular files are offered, anything
  else (other names, symlinks, FIFOs, folders) is reported once through ``on_ignored`` and never
  opened. It also publishes ``tmp/*.open`` files older than ``stale_tmp_seconds`` (a writer that
  never came back) under a fresh ``ready/`` name, as docs/spool.md says, but only a file it can
  ``flock(LOCK_EX | LOCK_NB)``: a live writer holds its file locked, however old its mtime.
  ``scan(publish_stale=False)`` (dry run) only lists.
- ``release(name, retry_after)`` forgets a segment whose read or deletion failed and keeps it out
  of scans for ``retry_after`` seconds (then a scan offers it again); ``held()`` counts those.
- Names reported through ``on_ignored`` are remembered (at most ``MAX_IGNORED``, then the
  memory starts over and a name may be reported again) so each is reported once.
- :class:`Watcher` runs a full scan at start, a watchdog (inotify) observer on ``ready/`` so new
  segments are seen at once without polling (creations and renames only: the sink's own opens,
  closes and deletions there wake nothing), and a rescan every ``rescan_seconds`` as a backstop
  (watchdog drops inotify queue overflows silently). With ``poll=True`` there is no observer and
  the scan runs every ``poll_seconds`` instead (also when inotify cannot be started). Idle, it
  costs one wake-up per rescan interval.
"""

from __future__ import annotations

import heapq
import logging
import os
import stat
import threading
import time
from typing import Callable

from . import spool

log = logging.getLogger("cloudtrail_sink.watcher")

MAX_IGNORED = 10_000


class SegmentQueue:
    def __init__(self, lay: spool.Layout, on_ignored: Callable[[str, str], None] | None = None,
                 stale_tmp_seconds: float = 300.0, clock: Callable[[], float] = time.time):
        self.layout = lay
        self.on_ignored = on_ignored or (lambda name, why: None)
        self.stale_tmp_seconds = stale_tmp_seconds
        self.clock = clock
        self._heap: list[str] = []
        self._known: dict[str, int] = {}   # name -> size in bytes
        self._ignored: set[str] = set()
        self._held: dict[str, float] = {}  # name -> clock() when a scan may offer it again
        self._cond = threading.Condition()
        self._closed = False
        self.bytes = 0
        self.scans = 0

    # -- hand-out -------------------------------------------------------------------------------
    def offer(self, name: str, size: int | None = None) -> bool:
        if not name.endswith(".seg") or spool.parse_ready_name(name) is None:
            return False
        if size is None:  # from inotify: not listed by scan(), so check what it is here
            try:
                st = os.lstat(os.path.join(self.layout.ready, name))
            except OSError:
                return False
            if not stat.S_ISREG(st.st_mode):
                self.ignore(name, "not a regular file")
                return False
            size = st.st_size
        with self._cond:
            if name in self._known or name in self._ignored:
                return False
            if name in self._held:
                if self._held[name] > self.clock():
                    return False
                del self._held[name]
            self._known[name] = size
            self.bytes += size
            heapq.heappush(self._heap, name)
            self._cond.notify()
            return True

    def pop(self, timeout: float | None = None) -> str | None:
        with self._cond:
            deadline = None if timeout is None else time.monotonic() + timeout
            while not self._heap and not self._closed:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return None
                self._cond.wait(remaining)
            if self._closed or not self._heap:
                return None
            return heapq.heappop(self._heap)

    def done(self, name: str) -> None:
        with self._cond:
            size = self._known.pop(name, None)
            if size is not None:
                self.bytes -= size
            self._cond.notify_all()

    def release(self, name: str, retry_after: float) -> None:
        """Forget ``name`` (its read or deletion failed); scans offer it again after
        ``retry_after`` seconds. Its file is left as it is."""
        with self._cond:
            size = self._known.pop(name, None)
            if size is not None:
                self.bytes -= size
            self._held[name] = self.clock() + retry_after
            self._cond.notify_all()

    def held(self) -> list[str]:
        """Names released after a failure and not offered again yet."""
        with self._cond:
            return sorted(self._held)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    # -- state ----------------------------------------------------------------------------------
    def waiting(self) -> int:
        with self._cond:
            return len(self._heap)

    def known(self) -> int:
        with self._cond:
            return len(self._known)

    def oldest_sealed_us(self) -> int | None:
        with self._cond:
            if not self._known:
                return None
            oldest = min(self._known)
        parsed = spool.parse_ready_name(oldest)
        return parsed[0] if parsed else None

    # -- scanning -------------------------------------------------------------------------------
    def scan(self, publish_stale: bool = True) -> int:
        """List ready/ (and stale tmp/ files); returns how many new segments were offered."""
        if publish_stale:
            self.publish_stale_tmp()
        new = 0
        seen: set[str] = set()
        try:
            it = os.scandir(self.layout.ready)
        except FileNotFoundError:
            return 0
        with it:
            for entry in it:
                name = entry.name
                seen.add(name)
                if name in self._known or name in self._ignored:
                    continue
                try:
                    regular = entry.is_file(follow_symlinks=False)
                except OSError:
                    continue
                if not name.endswith(".seg") or spool.parse_ready_name(name) is None:
                    self.ignore(name, "name does not follow the segment naming")
                    continue
                if not regular:
                    self.ignore(name, "not a regular file")
                    continue
                try:
                    size = entry.stat(follow_symlinks=False).st_size
                except OSError:
                    continue
                if self.offer(name, size):
                    new += 1
        with self._cond:  # forget held names whose file is gone (deleted by hand)
            for name in [n for n in self._held if n not in seen]:
                del self._held[name]
        self.scans += 1
        return new

    def ignore(self, name: str, why: str) -> None:
        """Never hand ``name`` out again (reported once): not a segment, or not a regular file."""
        with self._cond:
            size = self._known.pop(name, None)
            if size is not None:
                self.bytes -= size
            if name in self._ignored:
                return
            if len(self._ignored) >= MAX_IGNORED:
                self._ignored.clear()  # bounded: a name may be reported once more
            self._ignored.add(name)
            self._cond.notify_all()
        if not name.startswith("."):
            self.on_ignored(name, why)

    def publish_stale_tmp(self) -> int:
        now = self.clock()
        published = 0
        try:
            it = os.scandir(self.layout.tmp)
        except FileNotFoundError:
            return 0
        with it:
            for entry in it:
                parsed = spool.parse_tmp_name(entry.name)
                try:
                    if not entry.is_file(follow_symlinks=False):
                        continue
                    age = now - entry.stat(follow_symlinks=False).st_mtime
                except OSError:
                    continue
                if age < self.stale_tmp_seconds:
                    continue
                if parsed is None:
                    # The sink's own unfinished dead-letter/quarantine files: their events were
                    # never finalized, so they will be written again; the leftovers can go.
                    if entry.name.startswith("sink_") and entry.name.endswith((".dlq", ".quarantine")):
                        try:
                            os.unlink(entry.path)
                        except OSError:
                            pass
                    continue
                writer, seq = parsed
                try:
                    fd = spool.lock_if_abandoned(entry.path)
                except OSError as exc:
                    log.warning("could not check a stale tmp file", extra={
                        "file": entry.name, "error": exc.strerror})
                    continue
                if fd is None:
                    continue  # a live writer holds it (quiet input): it seals it itself
                try:
                    dest = spool.publish(self.layout, entry.path, writer, seq, self.clock)
                except OSError as exc:
                    log.warning("could not publish stale tmp file", extra={
                        "file": entry.name, "error": exc.strerror})
                    continue
                finally:
                    os.close(fd)
                published += 1
                log.warning("published a stale tmp file left by a writer that is gone", extra={
                    "file": entry.name, "segment": os.path.basename(dest),
                    "age_seconds": round(age, 1)})
        return published


class Watcher:
    """Keeps a :class:`SegmentQueue` filled: inotify (or polling) plus periodic full rescans."""

    def __init__(self, queue: SegmentQueue, poll: bool = False, poll_seconds: float = 1.0,
                 rescan_seconds: float = 30.0):
        self.queue = queue
        self.poll = poll
        self.poll_seconds = poll_seconds
        self.interval = poll_seconds if poll else rescan_seconds
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._observer = None

    def start(self) -> None:
        if not self.poll:
            try:
                self._start_observer()
            except OSError as exc:  # no inotify here, or the watch limit is reached
                log.warning("inotify unavailable; polling ready/ instead", extra={
                    "error": exc.strerror or str(exc), "poll_seconds": self.poll_seconds})
                self.poll = True
                self.interval = self.poll_seconds
        self.queue.scan()
        self._thread = threading.Thread(target=self._loop, name="sink-rescan", daemon=True)
        self._thread.start()

    def _start_observer(self) -> None:
        from watchdog.events import FileCreatedEvent, FileMovedEvent, FileSystemEventHandler
        from watchdog.observers import Observer

        queue = self.queue

        class Handler(FileSystemEventHandler):
            def on_created(self, event):  # rename from tmp/ (unwatched) arrives as created
                if not event.is_directory:
                    queue.offer(os.path.basename(event.src_path))

            def on_moved(self, event):
                if not event.is_directory:
                    queue.offer(os.path.basename(event.dest_path))

        observer = Observer()
        # Only creations and renames: the inotify mask then leaves out the opens, closes and
        # deletions of the sink's own reading (watchdog builds the mask from event_filter), each
        # of which would otherwise wake the observer's threads for nothing.
        observer.schedule(Handler(), self.queue.layout.ready, recursive=False,
                          event_filter=[FileCreatedEvent, FileMovedEvent])
        observer.daemon = True
        observer.start()
        self._observer = observer

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.queue.scan()
            except Exception:  # a failing scan must not end the backstop
                log.exception("rescan of ready/ failed")

    def stop(self) -> None:
        self._stop.set()
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(5)
            self._observer = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
