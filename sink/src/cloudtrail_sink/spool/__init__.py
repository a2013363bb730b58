"""The spool on disk: layout, segment names, the segment writer and the safe segment reader.

This module is the Python side of ``docs/spool.md`` and follows it exactly:

- ``ensure_layout(root)`` creates ``tmp/ ready/ failed/ rejected/ quarantine/`` (mode 0750) when
  missing and returns a :class:`Layout` with their paths.
- Names: ``tmp/<writer>-<seq>.open`` while written, ``ready/<sealed_us:016d>-<writer>-<seq:010d>.seg``
  once sealed; ``writer`` is ``<kind>_<pid>_<6 random [a-z0-9]>``. Byte order of ready names is
  sealing order.
- :class:`SpoolWriter` appends msgpack maps ``{"eventData", "tag", "time"[, "id"]}`` to a ``tmp/``
  file, seals it (fsync, close, rename into ``ready/``) when it holds ``max_events`` events or
  reaches ``max_bytes``, and on ``seal()``/``close()``. With ``max_age`` it also seals a segment
  open for that long (before the next append, and on ``tick()``). The clock and the random source
  are injected so names are deterministic in tests.
- Every writer holds ``flock(LOCK_EX)`` on its ``tmp/`` file from creation until it was renamed
  into ``ready/``; :func:`lock_if_abandoned` is how the sink's stale-tmp backstop checks that
  nobody holds a file (a held file is never taken, however old its modification time).
- :func:`open_segment` opens with ``O_NOFOLLOW | O_NONBLOCK`` and refuses anything ``fstat`` does
  not call a regular file (:class:`NotRegularFile`), so a spool writer cannot make the sink read a
  file it links to; ``delivery/reader.py`` reads a segment's records from it, with bounded
  memory, never raising on its bytes.
- :func:`write_new` writes a whole file under ``tmp/`` (exclusive create, fsync) before its
  rename: dead letters, quarantine reasons, rewritten ``failed/`` and ``rejected/`` files.
- ``Layout.acks`` is the sink's own ``acks/`` folder (:func:`ensure_acks`), see ``docs/spool.md``.

The rest of the spool's code is in this package: ``lock.py`` (``sink.lock``),
``deadletters.py`` (writes ``failed/`` and ``quarantine/``), ``failed.py`` and ``rejected.py``
(read and rewrite ``failed/`` and ``rejected/``).
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import os
import random
import re
import stat
import time as _time
from typing import Any, BinaryIO, Callable

import msgpack

FOLDERS = ("tmp", "ready", "failed", "rejected", "quarantine")
LOCK_NAME = "sink.lock"
ACKS = "acks"  # the sink's ack journal (delivery/journal.py); not a spool folder writers know
DIR_MODE = 0o750

WRITER_RE = re.compile(r"\A[A-Za-z0-9_]{1,64}\Z")
READY_RE = re.compile(r"\A(\d{16})-([A-Za-z0-9_]{1,64})-(\d{10})\.seg\Z")
TMP_RE = re.compile(r"\A([A-Za-z0-9_]{1,64})-(\d{10})\.open\Z")
_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"

# A single record larger than this is treated as undecodable (it could never fit one request
# anyway); it bounds the reader's memory whatever a writer puts in a segment.
MAX_RECORD_BYTES = 16 << 20
READ_CHUNK = 256 << 10


@dataclasses.dataclass(frozen=True)
class Layout:
    root: str
    tmp: str
    ready: str
    failed: str
    rejected: str
    quarantine: str
    lock: str
    acks: str = ""


def layout(root: str | os.PathLike) -> Layout:
    root = os.fspath(root)
    return Layout(root, *(os.path.join(root, f) for f in FOLDERS), os.path.join(root, LOCK_NAME),
                  os.path.join(root, ACKS))


def ensure_layout(root: str | os.PathLike) -> Layout:
    """Create the spool folders that are missing (mode 0750) and return their paths."""
    lay = layout(root)
    os.makedirs(lay.root, mode=DIR_MODE, exist_ok=True)
    for folder in FOLDERS:
        os.makedirs(os.path.join(lay.root, folder), mode=DIR_MODE, exist_ok=True)
    return lay


def ensure_acks(lay: Layout) -> None:
    """The sink's own ``acks/`` folder (its ack journal), created when missing."""
    os.makedirs(lay.acks, mode=DIR_MODE, exist_ok=True)


def writer_name(kind: str, rand: random.Random | None = None, pid: int | None = None) -> str:
    rand = rand or random.Random()
    suffix = "".join(rand.choice(_ALPHABET) for _ in range(6))
    name = f"{kind}_{os.getpid() if pid is None else pid}_{suffix}"
    if not WRITER_RE.match(name):
        raise ValueError(f"invalid writer name {name!r}: kind must be [A-Za-z0-9_]")
    return name


def tmp_name(writer: str, seq: int) -> str:
    return f"{writer}-{seq:010d}.open"


def ready_name(sealed_us: int, writer: str, seq: int, suffix: str = ".seg") -> str:
    return f"{sealed_us:016d}-{writer}-{seq:010d}{suffix}"


def parse_ready_name(name: str) -> tuple[int, str, int] | None:
    """``(sealed_us, writer, seq)`` of a ``ready/`` segment name, or None if it is not one."""
    m = READY_RE.match(name)
    if not m:
        return None
    return int(m.group(1)), m.group(2), int(m.group(3))


def parse_tmp_name(name: str) -> tuple[str, int] | None:
    m = TMP_RE.match(name)
    if not m:
        return None
    return m.group(1), int(m.group(2))


def publish(lay: Layout, tmp_path: str, writer: str, seq: int, clock: Callable[[], float],
            folder: str | None = None, suffix: str = ".seg") -> str:
    """Rename a finished tmp file into ``ready/`` (or ``folder``) under a fresh sealing name."""
    sealed_us = int(clock() * 1_000_000)
    dest = os.path.join(folder or lay.ready, ready_name(sealed_us, writer, seq, suffix))
    os.rename(tmp_path, dest)
    return dest


def write_new(path: str, data: bytes, fsync: bool = True) -> None:
    """Create ``path`` (never an existing file or a symlink) holding ``data``, flushed and, with
    ``fsync``, on disk; the caller renames it into place. A failed write (full disk) leaves no
    partial file: every retry would leak one more, holding the very space the retry needs."""
    try:
        with open(path, "xb") as f:
            f.write(data)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
    except BaseException:
        unlink_quietly(path)
        raise


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def lock_if_abandoned(path: str) -> int | None:
    """An fd of ``path`` holding ``flock(LOCK_EX)``, or None when a live writer holds the file
    (or it vanished). Never follows symlinks; raises :class:`NotRegularFile` for anything else."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise NotRegularFile(exc.errno, "is a symbolic link", path) from None
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotRegularFile(0, "is not a regular file", path)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return None
        raise
    return fd


class SpoolWriter:
    """Writes events into sealed segments, exactly like the Lua writer (see module docstring)."""

    def __init__(self, root: str | os.PathLike, kind: str = "cli", max_events: int = 500,
                 max_bytes: int = 1 << 20, clock: Callable[[], float] = _time.time,
                 rand: random.Random | None = None, fsync: bool = True,
                 max_age: float | None = None):
        self.layout = ensure_layout(root)
        self.kind = kind
        self.max_events = max(1, int(max_events))
        self.max_bytes = max(1, int(max_bytes))
        self.clock = clock
        self.writer = writer_name(kind, rand if rand is not None else random.Random())
        self.fsync = fsync
        self.max_age = max_age
        self.seq = 0
        self.sealed: list[str] = []
        self.events_written = 0
        self.discarded = 0  # events written into segments dropped by discard()
        self._file: BinaryIO | None = None
        self._path: str | None = None
        self._count = 0
        self._bytes = 0
        self._opened_at = 0.0
        self._packer = msgpack.Packer(use_bin_type=True)

    def write(self, event_data: dict, tag: str = "cli", time: float | None = None,
              id: str | None = None) -> None:
        """Append one event; seals the segment when it reached a threshold."""
        if not isinstance(event_data, dict):
            raise TypeError("eventData must be a map")
        record: dict[str, Any] = {"eventData": event_data, "tag": str(tag),
                                  "time": float(self.clock() if time is None else time)}
        if id is not None:
            record["id"] = str(id)
        try:
            data = self._packer.pack(record)
        except BaseException:
            # A value msgpack cannot hold (integer beyond 64 bits, nesting beyond its limit)
            # may leave part of it in the packer's buffer: the next record must not carry it.
            self._packer.reset()
            raise
        if self._file is not None and self.max_age is not None:
            self.tick()
        if self._file is None:
            self.seq += 1
            self._path = os.path.join(self.layout.tmp, tmp_name(self.writer, self.seq))
            self._file = open(self._path, "xb")
            # Held until the rename into ready/: the sink's stale-tmp backstop never takes a
            # file a live writer holds, however long its input stays quiet.
            fcntl.flock(self._file.fileno(), fcntl.LOCK_EX)
            self._opened_at = self.clock()
            self._count = 0
            self._bytes = 0
        try:
            self._file.write(data)
        except OSError:
            self.discard()
            raise
        self._count += 1
        self._bytes += len(data)
        self.events_written += 1
        if self._count >= self.max_events or self._bytes >= self.max_bytes:
            self.seal()

    def tick(self) -> str | None:
        """Seal the open segment if it is ``max_age`` old (or the clock stepped back)."""
        if self._file is None or self.max_age is None:
            return None
        age = self.clock() - self._opened_at
        if age >= self.max_age or age < 0:
            return self.seal()
        return None

    def seconds_to_seal(self) -> float | None:
        """How long until ``tick()`` seals the open segment (None: nothing to seal by age)."""
        if self._file is None or self.max_age is None:
            return None
        age = self.clock() - self._opened_at
        if age < 0:
            return 0.0  # the clock stepped back: tick() seals now, so nobody should wait
        return max(0.0, self.max_age - age)

    def seal(self) -> str | None:
        """Publish the open segment into ``ready/``; returns its path (None when nothing open)."""
        if self._file is None:
            return None
        f, path = self._file, self._path
        self._file = self._path = None
        try:
            try:
                f.flush()
                if self.fsync:
                    os.fsync(f.fileno())
                # Renamed while the lock is still held; closing releases it.
                dest = publish(self.layout, path, self.writer, self.seq, self.clock)
            finally:
                f.close()
        except OSError:
            unlink_quietly(path)  # a full disk must not leave a partial segment behind
            self.discarded += self._count
            raise
        self.sealed.append(dest)
        return dest

    @property
    def open_events(self) -> int:
        """Events written into the segment not yet sealed (lost if it is discarded)."""
        return self._count if self._file is not None else 0

    def discard(self) -> None:
        """Drop the open segment and its ``tmp/`` file (after a write failed); its events are
        added to ``discarded``."""
        f, path = self._file, self._path
        self._file = self._path = None
        if f is None:
            return
        self.discarded += self._count
        try:
            f.close()
        except OSError:
            pass  # its buffered bytes could not be written either: they go with the file
        unlink_quietly(path)

    def close(self) -> None:
        """Seal the open segment; with ``fsync``, also make the renames durable (once)."""
        self.seal()
        if self.fsync and self.sealed:
            fsync_dir(self.layout.ready)

    def __enter__(self) -> "SpoolWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def unlink_quietly(path: str | None) -> None:
    try:
        if path:
            os.unlink(path)
    except OSError:
        pass


def regular_files(folder: str, suffix: str) -> list[str]:
    """Names in ``folder`` ending in ``suffix`` that are regular files (no symlinks), sorted
    (sealing order); none when the folder is missing."""
    try:
        names = sorted(os.listdir(folder))
    except FileNotFoundError:
        return []
    out = []
    for name in names:
        path = os.path.join(folder, name)
        if name.endswith(suffix) and os.path.isfile(path) and not os.path.islink(path):
            out.append(name)
    return out


class NotRegularFile(OSError):
    """The path is a symlink, FIFO, device or folder: it is never read."""


def open_segment(path: str) -> BinaryIO:
    """Open a segment for reading without following symlinks; only regular files pass."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        if exc.errno == getattr(__import__("errno"), "ELOOP"):
            raise NotRegularFile(exc.errno, "is a symbolic link", path) from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFile(0, "is not a regular file", path)
        # Reads must block normally on a regular file; O_NONBLOCK only protected the open of a FIFO.
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb", buffering=0)
    except BaseException:
        os.close(fd)
        raise

