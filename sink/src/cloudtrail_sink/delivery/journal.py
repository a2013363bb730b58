"""The sink's acknowledgement journal: what a restarted sink must not send again.

One journal per sink, appended by every sender thread: ``acks/<STAMP>-<NONCE>.journal``
(``STAMP``: nanoseconds since the epoch at its creation, 20 digits, so names sort by age;
``NONCE``: 8 random hex digits). One line per settlement, appended with a single ``write``
(``O_APPEND``), naming records by their byte offset in their segment and ending with a check
(CRC-32 of the file's name, a NUL and the line, 8 hex digits):

- ``a SEG OFFSET... CHECK``: accepted by the service;
- ``d SEG FILE OFFSET... CHECK``: dead-lettered into ``failed/FILE``; written just *before* that
  file is renamed into place;
- ``D FILE CHECK``: ``failed/FILE`` was renamed into place (written just after); its file is
  kept as long as any segment dead-lettered into ``FILE`` (a rotation may come between ``d``
  and ``D``);
- ``s SEG OFFSET... CHECK``: settled before this journal was started (carried over at start).

``s`` and ``d`` lines hold at most :data:`LINE_OFFSETS` offsets each (more make more lines).

``SEG`` is the segment's file name, percent-encoded (RFC 3986 unreserved characters stay as
they are, which is every character of the names writers give), so any name is one token.

The ``d`` offsets count when ``D`` follows (in any journal file) or ``failed/FILE`` exists: a
crash between ``d`` and the rename neither loses the events nor, after it, writes their dead
letters twice, and neither does ``failed replay`` taking the file away before the segment is
finished. Only lines whose check holds count: a line cut short by a crash (no newline), two
lines run together after it, a bit flip, a stale block of another file (a power loss) cost
duplicates, never skip an event. After a write that failed (a full disk may store part of a
line) the next line starts with a newline of its own, so it still counts.

Life of the files:

- **Start** (:meth:`Journal.load`, by the sink holding the spool lock): every journal file is
  read (and every ``<segment>.acks`` file of the per-segment journals of earlier versions, whose
  checks are salted with the segment's name); the offsets settled per segment still in
  ``ready/`` are kept in memory, for :meth:`Journal.settled`. A new journal file is started with
  ``s`` lines per such segment, then the files read are removed: the journal on disk never
  holds more than the settled offsets of the segments still there, plus this run's lines. A
  kill at any step of this leaves the old files or the new one complete, or both. Reading is
  bounded: a file is read in pieces, up to :data:`READ_LIMIT` bytes, a line longer than
  :data:`MAX_LINE` is skipped; a name that is not a regular file (a FIFO, a folder, a symlink)
  or cannot be read is logged and left alone (never removed: what it says is not lost).
- **Run**: a journal file that has grown past :data:`ROTATE_BYTES` is followed by a new one;
  a file that is no longer written is removed once every segment it names was deleted
  (:meth:`Journal.forget`, called right after a segment's deletion).
- **Stop** (:meth:`Journal.close`): when no segment named in any journal file is left, the
  files are removed (a drained spool keeps an empty ``acks/``).
- A dry run loads the journal without writing or removing anything (``writable=False``).
- A segment read again in this run (its read failed) skips what was carried over at start
  plus what this run journalled (the files are read again).

Costs, and why one journal per sink: the per-segment journals of earlier versions cost a file
created and removed per segment, which ext4 charges about 0.3 ms of system time each (about
0.7 us per event at 500 events a segment, 5 % of the sink's CPU in
``bench/sink_throughput.py``). Here a settlement costs one ``write`` of a line; files are
created and removed per :data:`ROTATE_BYTES` of lines.

fsync policy: the journal is never fsynced. A SIGKILL or a crash of the sink loses nothing that
was written (the page cache survives the process); only a power loss or kernel crash can lose
recent lines, and then those events are sent again (at least once still holds). An fsync per
request would cost more than the request itself on many disks. A journal that cannot be written
(full disk) is logged once and costs only duplicates after a crash, never an event.
"""

from __future__ import annotations

import functools
import logging
import os
import secrets
import stat
import threading
import time
import zlib
from typing import Callable, Iterable, Iterator
from urllib.parse import quote, unquote_to_bytes

log = logging.getLogger("cloudtrail_sink.journal")

SUFFIX = ".journal"
OLD_SUFFIX = ".acks"  # per-segment journals of earlier versions: <segment name>.acks
ROTATE_BYTES = 4 << 20
# Offsets per ``s`` or ``d`` line: a line stays a few kilobytes, however many records settle.
LINE_OFFSETS = 1000
# Reading bounds: a line longer than MAX_LINE is skipped (ours are far shorter) and a file is
# read up to READ_LIMIT bytes (ours stay near ROTATE_BYTES), so a garbage file in acks/ costs
# duplicates at worst, never the sink's memory or a start that does not end.
MAX_LINE = 1 << 20
READ_LIMIT = 16 * ROTATE_BYTES
_APPEND_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
_READ_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW


@functools.lru_cache(maxsize=256)  # asked per request; a few segments are open at a time
def _seg_token(name: str) -> bytes:
    return quote(name.encode("utf-8", "surrogateescape"), safe="").encode("ascii")


def _seg_name(token: bytes) -> str:
    return unquote_to_bytes(token).decode("utf-8", "surrogateescape")


def _check(salt: bytes, body: bytes) -> bytes:
    return b"%08x" % zlib.crc32(salt + body)


def _chunks(offsets: Iterable[int]) -> Iterator[bytes]:
    """``offsets`` as space-separated runs of at most :data:`LINE_OFFSETS`, one per line."""
    items = list(offsets)
    for i in range(0, len(items), LINE_OFFSETS):
        yield " ".join(map(str, items[i:i + LINE_OFFSETS])).encode()


def _read_lines(fd: int, limit: int) -> Iterator[bytes]:
    """The complete lines (newline stripped) in the first ``limit`` bytes of ``fd``; a line
    longer than :data:`MAX_LINE` is dropped whole, and so is the last piece without newline."""
    tail, skipping, left = b"", False, limit
    while left > 0:
        chunk = os.read(fd, min(1 << 20, left))
        if not chunk:
            return
        left -= len(chunk)
        start = 0
        while True:
            nl = chunk.find(b"\n", start)
            if nl < 0:
                break
            if not skipping:
                yield tail + chunk[start:nl]
            tail, skipping, start = b"", False, nl + 1
        if not skipping:
            tail += chunk[start:]
            if len(tail) > MAX_LINE:
                tail, skipping = b"", True


class _Lines:
    """What journal files say, gathered: offsets per segment, dead-letter intents, publications."""

    def __init__(self) -> None:
        self.offsets: dict[str, set[int]] = {}
        self.intents: list[tuple[str, str, list[int]]] = []  # (segment, failed file, offsets)
        self.published: set[str] = set()

    def read(self, lines: Iterable[bytes], salt: bytes, segment: str | None = None,
             wanted: Callable[[str], bool] = lambda name: True) -> None:
        """Lines of one file; ``segment``: an old per-segment journal (no ``SEG`` token)."""
        for line in lines:
            body, _, check = line.rpartition(b" ")
            if check != _check(salt, body):
                continue  # a damaged or foreign line only costs duplicates
            parts = body.split()
            try:
                kind = parts[0]
                if kind == b"D":
                    self.published.add(os.path.basename(parts[1].decode("ascii")))
                    continue
                if segment is None:
                    name, rest = _seg_name(parts[1]), parts[2:]
                else:
                    name, rest = segment, parts[1:]
                if not wanted(name):
                    continue
                if kind in (b"a", b"s"):
                    self.offsets.setdefault(name, set()).update(int(x) for x in rest)
                elif kind == b"d":
                    self.intents.append((name, os.path.basename(rest[0].decode("ascii")),
                                         [int(x) for x in rest[1:]]))
            except (IndexError, ValueError, UnicodeDecodeError):
                continue

    def settled(self, failed_dir: str) -> dict[str, set[int]]:
        out = self.offsets
        for name, failed_file, offsets in self.intents:
            if failed_file in self.published or os.path.isfile(
                    os.path.join(failed_dir, failed_file)):
                out.setdefault(name, set()).update(offsets)
        return out


class _File:
    """One journal file: its path, its check salt, the segments its lines need kept."""

    __slots__ = ("path", "salt", "segments", "size", "torn")

    def __init__(self, path: str):
        self.path = path
        self.salt = os.path.basename(path).encode("ascii") + b"\0"
        self.segments: set[str] = set()
        self.size = 0
        self.torn = False  # a write failed: it may have left a line without its newline


class Journal:
    """The sink-wide ack journal in ``folder`` (see the module docstring). Thread-safe."""

    def __init__(self, folder: str, ready: str, failed_dir: str, *, writable: bool = True,
                 clock: Callable[[], float] = time.time, token: Callable[[], str] | None = None):
        self.folder = folder
        self.ready = ready
        self.failed_dir = failed_dir
        self.writable = writable
        self.clock = clock
        self.token = token or (lambda: secrets.token_hex(4))
        self._lock = threading.Lock()
        # From before this run, per segment still in ready/, until the segment is forgotten:
        # a re-read also needs them when they could not be carried into a file (dry run, full
        # disk).
        self._settled: dict[str, set[int]] = {}
        self._opened: set[str] = set()  # segments opened in this run (a re-read scans files)
        self._current: _File | None = None
        self._fd: int | None = None
        self._files: list[_File] = []  # files no longer written, each until its segments go
        self._warned = False

    # -- start and stop -------------------------------------------------------------------------
    def load(self) -> None:
        """Read what earlier sinks journalled; when writable, carry it into a new file and
        remove the files read."""
        found = self._journal_files()
        in_ready = set(self._listdir(self.ready))
        read: list[str] = []
        lines = self._read(found, in_ready.__contains__, read)
        self._settled = {k: v for k, v in lines.settled(self.failed_dir).items() if v}
        if not self.writable:
            return
        try:
            with self._lock:
                self._start_file()
                for name, offsets in self._settled.items():
                    token = _seg_token(name)
                    for run in _chunks(sorted(offsets)):
                        self._append_locked(b"s " + token + b" " + run, (name,))
        except OSError as exc:
            self._cannot_write(exc)
            return  # the files read stay: nothing they say is lost
        for path in read:  # a file that could not be read stays, for the next start
            self._unlink(path)

    def close(self) -> None:
        """Stop writing; remove the files when no segment they name is left."""
        with self._lock:
            files = self._files + ([self._current] if self._current is not None else [])
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            self._current = None
            self._files = [f for f in files if f.segments]
            if not self.writable or self._files:
                return
        for f in files:
            self._unlink(f.path)

    # -- what the tracker asks and tells -----------------------------------------------------------
    def settled(self, segment: str) -> set[int]:
        """Offsets of ``segment``'s records already accepted or dead-lettered."""
        with self._lock:
            before = set(self._settled.get(segment, ()))
            if segment not in self._opened:
                self._opened.add(segment)
                return before
            paths = [f.path for f in self._files] + (
                [self._current.path] if self._current is not None else [])
        # Read again in this run (its first read failed): what this run journalled counts too.
        return before | self._read(paths, segment.__eq__).settled(self.failed_dir).get(
            segment, set())

    def accepted(self, segment: str, offsets: Iterable[int]) -> None:
        self._append([b"a " + _seg_token(segment) + b" "
                      + " ".join(map(str, offsets)).encode()], (segment,))

    def dead_lettered(self, segment: str, failed_file: str, offsets: Iterable[int]) -> None:
        """Just before ``failed/failed_file`` is renamed into place."""
        head = b"d " + _seg_token(segment) + b" " + failed_file.encode("ascii") + b" "
        self._append([head + run for run in _chunks(offsets)], (segment,))

    def published(self, failed_file: str, segments: Iterable[str] = ()) -> None:
        """Just after ``failed/failed_file`` was renamed into place; ``segments``: those whose
        ``d`` lines name it. The line's file is kept as long as theirs may be (a rotation
        between the two may put them in different files)."""
        self._append([b"D " + failed_file.encode("ascii")], tuple(segments))

    def forget(self, segment: str) -> None:
        """``segment`` was deleted: files that name only deleted segments are removed."""
        gone = []
        with self._lock:
            self._opened.discard(segment)
            self._settled.pop(segment, None)
            if self._current is not None:
                self._current.segments.discard(segment)
            keep = []
            for f in self._files:
                f.segments.discard(segment)
                (keep if f.segments else gone).append(f)
            self._files = keep
        for f in gone:
            self._unlink(f.path)

    # -- files ----------------------------------------------------------------------------------
    def _append(self, bodies: list[bytes], segments: tuple[str, ...]) -> None:
        if not self.writable:
            return
        try:
            with self._lock:
                for body in bodies:
                    self._append_locked(body, segments)
        except OSError as exc:
            self._cannot_write(exc)

    def _append_locked(self, body: bytes, segments: tuple[str, ...]) -> None:
        f = self._current
        if f is None:
            return  # the journal could not be started: duplicates after a crash, nothing else
        line = body + b" " + _check(f.salt, body) + b"\n"
        if f.torn:
            line = b"\n" + line  # after a piece of a line: this one still starts a line
        # Under the lock: a rotation never closes the descriptor while a thread writes to it.
        view = memoryview(line)
        f.segments.update(segments)  # before writing: a piece of a line keeps the file too
        try:
            while view:  # a short write (a full disk) is retried until it raises
                n = os.write(self._fd, view)
                f.size += n
                view = view[n:]
        except OSError:
            f.torn = True
            raise
        f.torn = False
        if f.size >= ROTATE_BYTES:
            self._rotate_locked()

    def _rotate_locked(self) -> None:
        old, fd = self._current, self._fd
        self._start_file()
        os.close(fd)
        if old.segments:
            self._files.append(old)
        else:
            self._unlink(old.path)

    def _start_file(self) -> None:
        name = f"{int(self.clock() * 1e9):020d}-{self.token()}{SUFFIX}"
        path = os.path.join(self.folder, name)
        self._fd = os.open(path, _APPEND_FLAGS, 0o640)
        self._current = _File(path)

    def _journal_files(self) -> list[str]:
        names = sorted(n for n in self._listdir(self.folder)
                       if n.endswith(SUFFIX) or n.endswith(OLD_SUFFIX))
        return [os.path.join(self.folder, n) for n in names]

    def _read(self, paths: list[str], wanted: Callable[[str], bool],
              read: list[str] | None = None) -> _Lines:
        """What ``paths`` say about the segments ``wanted``; each path read to its end (or
        gone) is appended to ``read``, the others are logged and left alone."""
        lines = _Lines()
        for path in paths:
            name = os.path.basename(path)
            if name.endswith(OLD_SUFFIX):
                segment: str | None = name[:-len(OLD_SUFFIX)]
                salt = segment.encode("utf-8", "surrogateescape") + b"\0"
            else:
                segment, salt = None, name.encode("utf-8", "surrogateescape") + b"\0"
            try:
                fd = os.open(path, _READ_FLAGS)
            except FileNotFoundError:
                if read is not None:
                    read.append(path)
                continue
            except OSError as exc:
                log.warning("cannot read an ack journal file; the events it lists may be sent "
                            "again", extra={"journal": path, "error": exc.strerror})
                continue
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):  # a FIFO would block the start
                    log.warning("ignoring a journal name in acks/ that is not a regular file",
                                extra={"journal": path})
                    continue
                lines.read(_read_lines(fd, READ_LIMIT), salt, segment, wanted)
                if st.st_size > READ_LIMIT:
                    log.warning("an ack journal file is larger than any the sink writes; only "
                                "its first bytes were read", extra={"journal": path,
                                                                   "bytes_read": READ_LIMIT})
            except OSError as exc:
                log.warning("cannot read an ack journal file; the events it lists may be sent "
                            "again", extra={"journal": path, "error": exc.strerror})
                continue
            finally:
                os.close(fd)
            if read is not None:
                read.append(path)
        return lines

    @staticmethod
    def _listdir(path: str) -> list[str]:
        try:
            return os.listdir(path)
        except FileNotFoundError:
            return []

    @staticmethod
    def _unlink(path: str) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("cannot remove an ack journal file", extra={"journal": path,
                                                                   "error": exc.strerror})

    def _cannot_write(self, exc: OSError) -> None:
        if not self._warned:
            self._warned = True
            log.warning("cannot write the ack journal; after a crash, settled events of "
                        "unfinished segments would be sent again",
                        extra={"journal": self.folder, "error": exc.strerror})


class SegmentJournal:
    """The journal as one segment's settlements see it."""

    __slots__ = ("journal", "segment")

    def __init__(self, journal: Journal, segment: str):
        self.journal = journal
        self.segment = segment

    def accepted(self, offsets: Iterable[int]) -> None:
        self.journal.accepted(self.segment, offsets)

    def dead_lettered(self, failed_file: str, offsets: Iterable[int]) -> None:
        self.journal.dead_lettered(self.segment, failed_file, offsets)

    def published(self, failed_file: str, segments: Iterable[str] = ()) -> None:
        """One line for the whole ``failed/`` file; ``segments``: every segment with events in
        it (this one included or not)."""
        self.journal.published(failed_file, (self.segment, *segments))

    def forget(self) -> None:
        """The segment was deleted: the journal drops what it kept for it."""
        self.journal.forget(self.segment)
