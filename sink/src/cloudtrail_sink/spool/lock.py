"""``sink.lock``: one sink per spool.

:func:`acquire_lock` takes ``flock(LOCK_EX | LOCK_NB)`` on ``<spool>/sink.lock`` and writes the
holder's pid into it; while another process holds it, :class:`LockHeld` names that pid. The
lock lasts as long as the returned fd is open (a killed sink releases it with its process).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os

log = logging.getLogger("cloudtrail_sink.spool")


class LockHeld(RuntimeError):
    pass


def acquire_lock(lay) -> int:
    fd = os.open(lay.lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o640)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            os.close(fd)
            raise
        try:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
        finally:
            os.close(fd)
        raise LockHeld(f"spool {lay.root} is in use by another sink (pid {holder}); "
                       f"one sink per spool") from None
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
    except OSError as exc:
        # The pid is only a hint for the "in use" message; the flock is the lock. A full disk
        # must not keep the sink from starting and draining the very spool that fills it.
        log.warning("could not record the pid in the spool lock file",
                    extra={"lock": str(lay.lock), "error": exc.strerror})
    return fd
