"""A full disk must not keep the sink from taking its spool lock: the pid in the lock file is
only a hint for the "in use" message, the flock is what excludes a second sink."""

from __future__ import annotations

import errno
import os

import pytest

from cloudtrail_sink import spool
from cloudtrail_sink.spool import lock


def test_lock_is_taken_and_exclusive_when_the_pid_cannot_be_written(tmp_path, monkeypatch, caplog):
    lay = spool.ensure_layout(tmp_path)
    real_write = os.write

    def full_disk(fd, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(lock.os, "write", full_disk)
    fd = lock.acquire_lock(lay)
    monkeypatch.setattr(lock.os, "write", real_write)
    try:
        assert "could not record the pid" in caplog.text
        with pytest.raises(lock.LockHeld):
            lock.acquire_lock(lay)
    finally:
        os.close(fd)
    # Released with the descriptor: the next sink gets it.
    os.close(lock.acquire_lock(lay))
