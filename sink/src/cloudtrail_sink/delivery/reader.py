"""A segment's bytes as a sequence of :class:`Record` and :class:`Junk`, never an exception.

Contract of :func:`read_segment` (``f`` an open segment, read from its start):

- Every byte of the segment belongs to exactly one yielded item, in file order.
- :class:`Record`: one decoded msgpack **map** at ``[offset, end)``; whether it is a valid event
  is for the caller to decide (``events.build``).
- :class:`Junk`: bytes that hold no record. Consecutive values that are not maps (what a power
  loss's run of zero bytes decodes to: one integer per byte), and values msgpack cannot build
  (nested deeper than its stack, unhashable or otherwise impossible map keys), are merged into
  one run ``[offset, end)``: the records after it are still read. Bytes that are not msgpack at
  all are skipped up to the next record found after them (a map holding ``eventData`` that
  decodes whole). When no record follows, or for a record larger than ``spool.MAX_RECORD_BYTES``
  or a truncated last record, the run reaches the end of the file (``end`` is None).
- Time is linear in the segment's size: walking bytes to find a value's end or the next record
  (and reading bytes to do so, :data:`BYTES_PER_STEP`) costs at most :data:`SEARCH_STEPS_MIN`
  + :data:`SEARCH_STEPS_PER_BYTE` steps per byte of the segment in all (a :class:`Budget`);
  bytes that would take more (crafted to make every search walk far) end the read as a run to
  the end of the file, kept whole in quarantine.
- Memory is bounded by ``spool.MAX_RECORD_BYTES`` plus one read chunk.
"""

from __future__ import annotations

import collections
import os
from typing import Any, BinaryIO, Iterator

import msgpack

from .. import spool


class Record:
    """A decoded map at ``[offset, end)`` of the segment."""

    __slots__ = ("offset", "end", "value")

    def __init__(self, offset: int, end: int, value: Any):
        self.offset = offset
        self.end = end
        self.value = value

    def raw(self, f: BinaryIO) -> bytes:
        """The record's bytes, read again from the segment (only needed for dead letters)."""
        return os.pread(f.fileno(), self.end - self.offset, self.offset)


class Junk:
    """Bytes ``[offset, end)`` (``end`` None: to the end of the file) that hold no record."""

    __slots__ = ("offset", "end", "error", "values")

    def __init__(self, offset: int, end: int | None, error: str, values: int = 0):
        self.offset = offset
        self.end = end
        self.error = error
        self.values = values  # decodable values in the run (0 for bytes that are not msgpack)

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        return f"Junk({self.offset}, {self.end}, {self.error!r})"


SEARCH_STEPS_MIN = 1 << 22
SEARCH_STEPS_PER_BYTE = 32
# Reading bytes to search them is charged too (a step per this many bytes): a segment of many
# short bad stretches must not re-read up to 16 MiB for each.
BYTES_PER_STEP = 16


class OutOfBudget(Exception):
    pass


class Budget:
    """Steps a read may still spend searching: walking values (:func:`extent`) and reading
    bytes to walk (:data:`BYTES_PER_STEP`); ``used`` so far."""

    def __init__(self, steps: int):
        self.left = steps
        self.used = 0

    @classmethod
    def for_size(cls, size: int) -> "Budget":
        return cls(SEARCH_STEPS_MIN + SEARCH_STEPS_PER_BYTE * size)

    def charge(self, steps: int) -> None:
        if steps > self.left:
            self.used += self.left
            self.left = 0
            raise OutOfBudget()
        self.left -= steps
        self.used += steps


def _window(f: BinaryIO, offset: int, budget: Budget) -> bytes:
    data = os.pread(f.fileno(), spool.MAX_RECORD_BYTES, offset)
    budget.charge(len(data) // BYTES_PER_STEP)
    return data


def _unpacker() -> msgpack.Unpacker:
    return msgpack.Unpacker(raw=False, unicode_errors="replace",
                            max_buffer_size=spool.MAX_RECORD_BYTES, strict_map_key=False)


class _Run:
    """Adjacent bytes that hold no record, gathered into one :class:`Junk`."""

    def __init__(self) -> None:
        self.start: int | None = None
        self.end = 0
        self.kinds: collections.Counter = collections.Counter()
        self.values = 0

    def add(self, offset: int, end: int, kind: str) -> None:
        if self.start is None:
            self.start = offset
        self.end = end
        self.kinds[kind] += 1
        self.values += 1

    def take(self, to_eof_error: str | None = None) -> Junk | None:
        if self.start is None:
            return None
        what = ", ".join(f"{n} {kind}" for kind, n in self.kinds.most_common(4))
        junk = Junk(self.start, None if to_eof_error else self.end,
                    f"bytes that hold no record: {what}" if not to_eof_error
                    else f"{to_eof_error}; before it, bytes that hold no record: {what}",
                    self.values)
        self.start = None
        self.kinds.clear()
        self.values = 0
        return junk


def read_segment(f: BinaryIO, budget: Budget | None = None) -> Iterator[Record | Junk]:
    """Yield the segment's records and junk runs (see module docstring)."""
    if budget is None:
        budget = Budget.for_size(os.fstat(f.fileno()).st_size)
    unpacker = _unpacker()
    tell = unpacker.tell
    run = _Run()
    offset = 0  # file offset of the unpacker's position
    base = 0  # file offset the current unpacker started at
    size = 0  # bytes read from the file
    while True:
        chunk = f.read(spool.READ_CHUNK)
        if chunk:
            size += len(chunk)
            try:
                unpacker.feed(chunk)
            except msgpack.BufferFull:
                yield _tail(run, offset, f"record larger than {spool.MAX_RECORD_BYTES} bytes")
                return
        try:
            for obj in unpacker:
                end = base + tell()
                if obj.__class__ is dict:
                    if run.start is not None:
                        yield run.take()
                    yield Record(offset, end, obj)
                else:
                    run.add(offset, end, type(obj).__name__)
                offset = end
        except msgpack.BufferFull:
            yield _tail(run, offset, f"record larger than {spool.MAX_RECORD_BYTES} bytes")
            return
        except Exception as exc:  # StackError, FormatError, TypeError (unhashable key), ...
            try:
                extent = _extent_at(f, offset, budget)
                resume = None if extent is not None else _next_record(f, offset, budget)
            except OutOfBudget:
                yield _tail(run, offset, "bytes that would take too long to search for records "
                            f"(over {budget.used} steps)")
                return
            if extent is not None:
                # A well-formed value msgpack could not build: skip just it, read on after it.
                run.add(offset, offset + extent, "value(s) msgpack cannot build")
                resume = offset + extent
            else:
                if resume is None:
                    yield _tail(run, offset, f"bytes that are not msgpack ({type(exc).__name__}"
                                + (f": {exc})" if str(exc) else ")"))
                    return
                # Not msgpack here, but a record further on: skip to it.
                run.add(offset, resume, "stretch(es) not msgpack")
            offset = base = resume
            f.seek(offset)
            size = offset
            unpacker = _unpacker()
            tell = unpacker.tell
            continue
        if not chunk:
            break
    if offset < size:
        yield _tail(run, offset, "truncated record at end of segment")
    elif run.start is not None:
        junk = run.take()
        junk.end = None  # it reaches the end: the segment's tail, named as such
        yield junk


def _tail(run: _Run, offset: int, error: str) -> Junk:
    """The junk run (or a new one at ``offset``) extended to the end of the file."""
    if run.start is not None:
        return run.take(to_eof_error=error)
    return Junk(offset, None, error)


def _extent_at(f: BinaryIO, offset: int, budget: Budget) -> int | None:
    """Length of the well-formed msgpack value at ``offset``, or None when there is none
    within ``spool.MAX_RECORD_BYTES`` (bytes that are not msgpack, or a cut value)."""
    return extent(_window(f, offset, budget), 0, budget)


_KEY = b"\xa9eventData"  # the str "eventData" as every writer packs it
_HEADER_WINDOW = 4096  # how far before that key a record's map may start (tag, time, id first)


def _next_record(f: BinaryIO, offset: int, budget: Budget) -> int | None:
    """Offset of the first record after ``offset`` (a map holding ``eventData`` that msgpack
    decodes whole), found by looking for the packed key and trying the map headers shortly
    before it; None when there is none within ``spool.MAX_RECORD_BYTES``."""
    data = _window(f, offset + 1, budget)
    base = offset + 1
    tried: set[int] = set()
    at = data.find(_KEY)
    while at >= 0:
        for p in range(max(0, at - _HEADER_WINDOW), at):
            t = data[p]
            if p in tried or not (0x80 <= t <= 0x8f or t in (0xde, 0xdf)):
                continue
            tried.add(p)
            n = extent(data, p, budget)
            if n is None or p + n <= at:
                continue
            try:
                value = msgpack.unpackb(data[p:p + n], raw=False, unicode_errors="replace",
                                        strict_map_key=False)
            except Exception:  # noqa: BLE001 - not a record here: try the next header
                continue
            if value.__class__ is dict and "eventData" in value:
                return base + p
        at = data.find(_KEY, at + 1)
    return None


_FIXED = {0xc0: 1, 0xc2: 1, 0xc3: 1, 0xca: 5, 0xcb: 9, 0xcc: 2, 0xcd: 3, 0xce: 5, 0xcf: 9,
          0xd0: 2, 0xd1: 3, 0xd2: 5, 0xd3: 9, 0xd4: 3, 0xd5: 4, 0xd6: 6, 0xd7: 10, 0xd8: 18}
# type byte -> (bytes of the length field, bytes before the payload) for bin/str/ext
_SIZED = {0xc4: (1, 2), 0xc5: (2, 3), 0xc6: (4, 5), 0xd9: (1, 2), 0xda: (2, 3), 0xdb: (4, 5),
          0xc7: (1, 3), 0xc8: (2, 4), 0xc9: (4, 6)}


def extent(b: bytes, pos: int, budget: Budget | None = None) -> int | None:
    """Bytes taken by the msgpack value at ``b[pos:]`` (walked without recursion or building
    anything), or None when it is cut short or holds a byte msgpack never uses (0xc1). Each
    step is charged to ``budget``; :class:`OutOfBudget` when it runs out."""
    start = pos
    n = len(b)
    need = 1
    steps = 0
    limit = budget.left if budget is not None else -1
    while need:
        if pos >= n:
            break
        if steps == limit:
            budget.left = 0
            budget.used += steps
            raise OutOfBudget()
        steps += 1
        t = b[pos]
        need -= 1
        if t <= 0x7f or t >= 0xe0:
            pos += 1
        elif t <= 0x8f:
            pos += 1
            need += 2 * (t & 0x0f)
        elif t <= 0x9f:
            pos += 1
            need += t & 0x0f
        elif t <= 0xbf:
            pos += 1 + (t & 0x1f)
        elif t in _FIXED:
            pos += _FIXED[t]
        elif t in _SIZED:
            width, head = _SIZED[t]
            if pos + 1 + width > n:
                need = -1
                break
            pos += head + int.from_bytes(b[pos + 1:pos + 1 + width], "big")
        elif t in (0xdc, 0xdd, 0xde, 0xdf):
            width = 2 if t in (0xdc, 0xde) else 4
            if pos + 1 + width > n:
                need = -1
                break
            count = int.from_bytes(b[pos + 1:pos + 1 + width], "big")
            need += count * (2 if t >= 0xde else 1)
            pos += 1 + width
        else:  # 0xc1: never used
            need = -1
            break
    if budget is not None:
        budget.left -= steps
        budget.used += steps
    return pos - start if need == 0 and pos <= n else None
