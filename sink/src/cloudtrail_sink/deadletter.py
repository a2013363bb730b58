"""Dead letters (``failed/``) and quarantined segment tails (``quarantine/``), per docs/spool.md.

- :meth:`DeadLetters.write` writes one ``failed/<sealed_us>-<writer>-<seq>.jsonl`` file for a list
  of finalized failures: JSON lines ``{"failedAt", "errorCode", "errorMessage", "segment", "tag",
  "time", "id", "eventData"}``, written under ``tmp/``, fsynced, then renamed into place. Only
  after the rename may the caller finalize those events.
- :meth:`DeadLetters.quarantine` copies the undecodable bytes of a segment from ``offset`` to the
  end into ``quarantine/<segment name>`` and writes the sidecar
  ``quarantine/<segment name>.reason.json`` (``{"segment", "offset", "size", "error",
  "quarantinedAt", "recordsBefore"}``), both via ``tmp/`` and rename.
The writer name is ``sink_<pid>_<random>``; the clock and random source are injected.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import random
import shutil
import threading
import time
from typing import Any, BinaryIO, Callable

from . import spool


def iso_utc(ts: float) -> str:
    return _dt.datetime.fromtimestamp(ts, _dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def failure_line(*, code: str, message: str, segment: str, tag: Any, time_: Any, id: str,
                 event_data: Any, failed_at: float) -> dict:
    return {"failedAt": iso_utc(failed_at), "errorCode": code, "errorMessage": message,
            "segment": segment, "tag": tag, "time": time_, "id": id, "eventData": event_data}


def _json_default(value: Any) -> Any:
    # msgpack bin values and other non-JSON leaves must not stop a dead letter from being written.
    if isinstance(value, (bytes, bytearray)):
        return value.decode("utf-8", "replace")
    return repr(value)


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
        try:
            with open(path, "xb") as f:
                f.write(data)
                f.flush()
                if self.fsync:
                    os.fsync(f.fileno())
        except BaseException:
            # A failed attempt (full disk) must not leave its partial file: every retry would
            # leak one more, holding the very space the retry needs.
            _unlink_quietly(path)
            raise
        return path

    def write(self, lines: list[dict]) -> str:
        """Publish failures into ``failed/``; returns the file's path."""
        data = "".join(json.dumps(line, ensure_ascii=False, default=_json_default)
                       + "\n" for line in lines).encode("utf-8", "surrogatepass")
        seq = self._next_seq()
        tmp = self._write_tmp(seq, data)
        try:
            dest = spool.publish(self.layout, tmp, self.writer, seq, self.clock,
                                 folder=self.layout.failed, suffix=".jsonl")
        except BaseException:
            _unlink_quietly(tmp)
            raise
        if self.fsync:
            # The rename must be on disk before the segment's deletion can be (power loss).
            spool.fsync_dir(self.layout.failed)
        return dest

    def quarantine(self, f: BinaryIO, segment: str, offset: int, size: int, error: str,
                   records_before: int) -> str:
        """Copy the segment's bytes from ``offset`` on into ``quarantine/``; returns its path."""
        seq = self._next_seq()
        tmp = os.path.join(self.layout.tmp, f"{self.writer}-{seq:010d}.quarantine")
        dest = os.path.join(self.layout.quarantine, segment)
        try:
            f.seek(offset)
            with open(tmp, "wb") as out:
                shutil.copyfileobj(f, out, 1 << 20)
                out.flush()
                if self.fsync:
                    os.fsync(out.fileno())
            os.rename(tmp, dest)
        except BaseException:
            _unlink_quietly(tmp)
            raise
        reason = {"segment": segment, "offset": offset, "size": size, "error": error,
                  "quarantinedAt": iso_utc(self.clock()), "recordsBefore": records_before}
        seq = self._next_seq()
        tmp = self._write_tmp(seq, (json.dumps(reason) + "\n").encode(), ".quarantine")
        try:
            os.rename(tmp, dest + ".reason.json")
        except BaseException:
            _unlink_quietly(tmp)
            raise
        if self.fsync:
            spool.fsync_dir(self.layout.quarantine)
        return dest


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
