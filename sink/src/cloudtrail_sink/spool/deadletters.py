"""Dead letters (``failed/``) and quarantined segment tails (``quarantine/``), per docs/spool.md.

- :meth:`DeadLetters.write` writes one ``failed/<sealed_us>-<writer>-<seq>.jsonl`` file for a list
  of finalized failures: JSON lines ``{"failedAt", "errorCode", "errorMessage", "segment", "tag",
  "time", "id", "eventData"[, "recordMsgpackBase64"]}``, written under ``tmp/``, fsynced, then
  renamed into place. Only after the rename may the caller finalize those events. Writing never
  fails on content (:func:`dump_line`): only the disk can make it fail (``OSError``).
- :meth:`DeadLetters.quarantine` copies the undecodable bytes of a segment from ``offset`` to the
  end into ``quarantine/<segment name>`` and writes the sidecar
  ``quarantine/<segment name>.reason.json`` (``{"segment", "offset", "size", "error",
  "quarantinedAt", "recordsBefore"}``), both via ``tmp/`` and rename.
The writer name is ``sink_<pid>_<random>``; the clock and random source are injected.
"""

from __future__ import annotations

import base64
import datetime as _dt
import json
import os
import random
import threading
import time
from typing import Any, BinaryIO, Callable

from .. import safejson, spool


def iso_utc(ts: float) -> str:
    return _dt.datetime.fromtimestamp(ts, _dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def failure_line(*, code: str, message: str, segment: str, tag: Any, time_: Any, id: str,
                 event_data: Any, failed_at: float, raw: bytes | None = None) -> dict:
    line = {"failedAt": iso_utc(failed_at), "errorCode": code, "errorMessage": message,
            "segment": segment, "tag": tag, "time": time_, "id": id, "eventData": event_data}
    if raw is not None:
        line[RAW_KEY] = raw  # only kept when the JSON form of the record is lossy
    return line


# The record's own msgpack bytes (base64), present only when its JSON form had to change it.
RAW_KEY = "recordMsgpackBase64"


def dump_line(line: dict) -> str:
    """One JSON line for a failure; never raises on content (see :mod:`safejson`): what JSON
    cannot hold as is is made safe, and then the record's bytes ride along, base64-encoded."""
    raw = line.pop(RAW_KEY, None)
    safe, lossy = safejson.jsonable(line)
    if lossy and raw is not None:
        safe[RAW_KEY] = base64.b64encode(raw).decode("ascii")
    # surrogatepass below keeps lone surrogates of str values as they were decoded.
    return json.dumps(safe, ensure_ascii=False)


class DeadLetters:
    def __init__(self, lay: spool.Layout, clock: Callable[[], float] = time.time,
                 rand: random.Random | None = None, fsync: bool = True):
        self.layout = lay
        self.clock = clock
        self.writer = spool.writer_name("sink", rand)
        self.fsync = fsync
        self._seq = 0
        self._lock = threading.Lock()

    def _next_seq(self) -> int:
        with self._lock:
            self._seq += 1
            return self._seq

    def _write_tmp(self, seq: int, data: bytes, suffix: str = ".dlq") -> str:
        path = os.path.join(self.layout.tmp, f"{self.writer}-{seq:010d}{suffix}")
        spool.write_new(path, data, self.fsync)
        return path

    def write(self, lines: list[dict], intent: Callable[[str], None] | None = None) -> str:
        """Publish failures into ``failed/``; returns the file's path. ``intent`` is called
        with the file's name just before it is renamed into place (the ack journal records
        it there, so a restart knows these events were dead-lettered if the file exists)."""
        data = "".join(dump_line(line) + "\n" for line in lines).encode("utf-8", "surrogatepass")
        seq = self._next_seq()
        tmp = self._write_tmp(seq, data)
        try:
            dest = os.path.join(self.layout.failed, spool.ready_name(
                int(self.clock() * 1_000_000), self.writer, seq, ".jsonl"))
            if intent is not None:
                intent(os.path.basename(dest))
            os.rename(tmp, dest)
        except BaseException:
            spool.unlink_quietly(tmp)
            raise
        if self.fsync:
            # The rename must be on disk before the segment's deletion can be (power loss).
            spool.fsync_dir(self.layout.failed)
        return dest

    def quarantine(self, f: BinaryIO, segment: str, offset: int, size: int, error: str,
                   records_before: int, end: int | None = None) -> str:
        """Copy the segment's bytes from ``offset`` to ``end`` (None: its end) into
        ``quarantine/``; returns its path. The name is the segment's for its tail, and
        ``<segment>.<offset>`` for a run with records after it: the same bytes always get the
        same name, so a crash and a second read never quarantine them twice."""
        seq = self._next_seq()
        tmp = os.path.join(self.layout.tmp, f"{self.writer}-{seq:010d}.quarantine")
        dest = os.path.join(self.layout.quarantine,
                            segment if end is None else f"{segment}.{offset:012d}")
        try:
            with open(tmp, "wb") as out:
                # pread: the caller's reader is still reading ``f``; its position stays.
                pos = offset
                while end is None or pos < end:
                    want = 1 << 20 if end is None else min(1 << 20, end - pos)
                    chunk = os.pread(f.fileno(), want, pos)
                    if not chunk:
                        break
                    out.write(chunk)
                    pos += len(chunk)
                out.flush()
                if self.fsync:
                    os.fsync(out.fileno())
            os.rename(tmp, dest)
        except BaseException:
            spool.unlink_quietly(tmp)
            raise
        reason = {"segment": segment, "offset": offset, "size": size, "error": error,
                  "quarantinedAt": iso_utc(self.clock()), "recordsBefore": records_before}
        if end is not None:
            reason["end"] = end
        seq = self._next_seq()
        tmp = self._write_tmp(seq, (json.dumps(reason) + "\n").encode(), ".quarantine")
        try:
            os.rename(tmp, dest + ".reason.json")
        except BaseException:
            spool.unlink_quietly(tmp)
            raise
        if self.fsync:
            spool.fsync_dir(self.layout.quarantine)
        return dest
