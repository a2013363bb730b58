"""Per-segment acknowledgement journal: what a restarted sink must not send again.

``acks/<segment name>.acks`` holds one line per settlement, appended with a single ``write``
(``O_APPEND``), each naming records by their byte offset in the segment and ending with a
check (CRC-32 of the segment's name and the line, 8 hex digits):

- ``a OFFSET... CHECK``: accepted by the service;
- ``d FILE OFFSET... CHECK``: dead-lettered into ``failed/FILE``; written just *before* that
  file is renamed into place;
- ``D FILE CHECK``: ``failed/FILE`` was renamed into place (written just after).

The ``d`` offsets count when ``D`` follows or ``failed/FILE`` exists: a crash between ``d`` and
the rename neither loses the events nor, after it, writes their dead letters twice, and neither
does ``failed replay`` taking the file away before the segment is finished.

:meth:`AckJournal.settled` is what a new read of the segment skips. Only lines whose check
holds count: a line cut short by a crash (no newline), two lines run together after it, a bit
flip, a stale block of another journal (a power loss) cost duplicates, never skip an event. The
journal is removed right after its segment is deleted (a journal without its segment is removed
at start-up).

File descriptors: at most :data:`OPEN_JOURNALS` journals are kept open, shared by all
segments, the least recently written closed first (plus one per sender thread writing at that
moment). Open segments are bounded by the pending limit, not by count: hundreds of small, partly
settled segments would otherwise each hold one. Opening and closing per line instead would cost
two more system calls per request, each letting other threads take the GIL: about 0.4 us of
CPU per event in the sink (docs/benchmarks.md).

fsync policy: the journal is never fsynced. A SIGKILL or a crash of the sink loses nothing that
was written (the page cache survives the process); only a power loss or kernel crash can lose
recent lines, and then those events are sent again (at least once still holds). An fsync per
request would cost more than the request itself on many disks. A journal that cannot be written
(full disk) is logged and costs only duplicates after a crash, never an event.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import zlib

log = logging.getLogger("cloudtrail_sink.journal")

SUFFIX = ".acks"
_APPEND_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
OPEN_JOURNALS = 16


class _Descriptors:
    """Open journal descriptors by path, at most ``cap`` kept, least recently used closed first.

    A writer takes its path's descriptor out while it writes, so no other thread closes it
    meanwhile; two threads writing one journal at once each use their own."""

    def __init__(self, cap: int):
        self.cap = cap
        self._open: collections.OrderedDict[str, int] = collections.OrderedDict()
        self._lock = threading.Lock()

    def append(self, path: str, line: bytes) -> None:
        with self._lock:
            fd = self._open.pop(path, None)
        if fd is None:
            fd = os.open(path, _APPEND_FLAGS, 0o640)
        try:
            # One write per line with O_APPEND: sender threads never interleave.
            os.write(fd, line)
        except BaseException:
            os.close(fd)
            raise
        with self._lock:
            close = [self._open.pop(path)] if path in self._open else []
            self._open[path] = fd
            while len(self._open) > self.cap:
                close.append(self._open.popitem(last=False)[1])
        for other in close:
            os.close(other)

    def forget(self, path: str) -> None:
        with self._lock:
            fd = self._open.pop(path, None)
        if fd is not None:
            os.close(fd)


_descriptors = _Descriptors(OPEN_JOURNALS)


class AckJournal:
    def __init__(self, folder: str, segment: str, failed_dir: str):
        self.path = os.path.join(folder, segment + SUFFIX)
        self._salt = segment.encode("utf-8", "surrogateescape") + b"\0"
        self.failed_dir = failed_dir
        self._warned = False

    def settled(self) -> set[int]:
        """Offsets of the records already accepted or dead-lettered (their file exists)."""
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return set()
        except OSError as exc:
            log.warning("cannot read an ack journal; its segment's events are sent again",
                        extra={"journal": self.path, "error": exc.strerror})
            return set()
        out: set[int] = set()
        intents: list[tuple[str, list[int]]] = []
        published: set[str] = set()
        for line in data.split(b"\n")[:-1]:  # the last piece has no newline: cut short
            body, _, check = line.rpartition(b" ")
            if check != self._check(body):
                continue  # a damaged or foreign line only costs duplicates
            parts = body.split()
            try:
                if parts[0] == b"a":
                    out.update(int(x) for x in parts[1:])
                elif parts[0] == b"d":
                    intents.append((os.path.basename(parts[1].decode("ascii")),
                                    [int(x) for x in parts[2:]]))
                elif parts[0] == b"D":
                    published.add(os.path.basename(parts[1].decode("ascii")))
            except (IndexError, ValueError, UnicodeDecodeError):
                continue
        for name, offsets in intents:
            if name in published or os.path.isfile(os.path.join(self.failed_dir, name)):
                out.update(offsets)
        return out

    def _check(self, body: bytes) -> bytes:
        return b"%08x" % zlib.crc32(self._salt + body)

    def accepted(self, offsets: list[int]) -> None:
        self._append(b"a " + " ".join(map(str, offsets)).encode())

    def dead_lettered(self, failed_file: str, offsets: list[int]) -> None:
        """Just before ``failed/failed_file`` is renamed into place."""
        self._append(b"d " + failed_file.encode("ascii") + b" "
                     + " ".join(map(str, offsets)).encode())

    def published(self, failed_file: str) -> None:
        """Just after ``failed/failed_file`` was renamed into place."""
        self._append(b"D " + failed_file.encode("ascii"))

    def _append(self, body: bytes) -> None:
        line = body + b" " + self._check(body) + b"\n"
        try:
            _descriptors.append(self.path, line)
        except OSError as exc:
            if not self._warned:
                self._warned = True
                log.warning("cannot write the ack journal; after a crash this segment's "
                            "settled events would be sent again",
                            extra={"journal": self.path, "error": exc.strerror})

    def remove(self) -> None:
        _descriptors.forget(self.path)
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("cannot remove an ack journal", extra={"journal": self.path,
                                                              "error": exc.strerror})


def remove_orphans(folder: str, ready: str) -> int:
    """Remove journals whose segment is gone from ``ready/``; returns how many."""
    removed = 0
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return 0
    for name in names:
        if name.endswith(SUFFIX) and not os.path.lexists(
                os.path.join(ready, name[:-len(SUFFIX)])):
            try:
                os.unlink(os.path.join(folder, name))
                removed += 1
            except OSError:
                pass
    return removed
