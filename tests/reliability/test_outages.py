"""Outages longer than the backoff cap, and a full disk when writing ``failed/``: nothing is
deleted while the sink cannot finalize, and delivery resumes by itself (no restart, no operator
action) once the cause is gone.

Outages are made on the emulator side, as they happen to users: the endpoint is down
(connection refused), the channel does not exist yet (``ChannelNotFound``), or the channel's
policy refuses this caller (``ChannelInsufficientPermission``: an external id is required). The
emulator is then restarted on the same port with a working configuration and the same database.
The sink runs with small caps (``--max-backoff-seconds 1 --max-pause-seconds 2``) and the outage
lasts several times longer than both.

The full disk is a small tmpfs holding the whole spool (the spool must be one filesystem),
filled to ENOSPC after the segment was written; the test needs root and skips without it
outside CI.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import os
import socket
import subprocess
import time

import pytest

import relsupport
from relsupport import CHANNEL_ARN, OTHER_ACCOUNT

CAPS = ["--max-backoff-seconds", "1", "--max-pause-seconds", "2", "--rescan-seconds", "1"]
OUTAGE_SECONDS = 8.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _emulator(tmp_path, port, channels):
    from cloudtrail_sink.emulator import Emulator

    emu = Emulator(db_path=tmp_path / "emulator.sqlite", host="127.0.0.1", port=port,
                   channels=channels, seed=9)
    emu.start()
    return emu


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("outage", ["endpoint-down", "channel-not-found", "permission-denied"])
def test_outage_longer_than_backoff_cap_resumes_by_itself(tmp_path, procs, sink_env, outage):
    from cloudtrail_sink.spool import SpoolWriter

    spool = tmp_path / "spool"
    uids = [f"out-{outage}-{i:04d}" for i in range(1000)]
    with SpoolWriter(spool, max_events=100) as writer:
        for uid in uids:
            writer.write(relsupport.make_event(uid))
    segments_before = relsupport.spool_files(spool, "ready")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"

    broken = None
    if outage == "channel-not-found":
        other = CHANNEL_ARN.replace("0b9a1c0e", "ffffffff")
        broken = _emulator(tmp_path, port, {other: None})
    elif outage == "permission-denied":
        broken = _emulator(tmp_path, port, {CHANNEL_ARN: "required-external-id"})
    emu = None
    sink = procs.start(relsupport.sink_cmd(spool, url, CHANNEL_ARN, *CAPS), sink_env,
                       name=f"sink-{outage}")
    try:
        time.sleep(OUTAGE_SECONDS)
        assert sink.poll() is None, f"the sink gave up during the outage:\n{procs.tail(sink)}"
        # Nothing finalized, nothing deleted, nothing dead-lettered during the outage.
        assert relsupport.spool_files(spool, "ready") == segments_before
        assert relsupport.failed_lines(spool) == []
        if broken is not None:
            assert broken.stats()["accepted"] == 0
            broken.stop()
            broken = None

        emu = _emulator(tmp_path, port, {CHANNEL_ARN: None})
        relsupport.wait_for(lambda: not relsupport.spool_files(spool, "ready"), timeout=60,
                            what="delivery to resume after the outage")
        stored = collections.Counter(relsupport.stored_uids(emu))
        assert set(stored) == set(uids)
        assert relsupport.failed_lines(spool) == []
        assert sink.poll() is None, "the sink should keep running"
    finally:
        procs.cleanup()
        for e in (broken, emu):
            if e is not None:
                e.stop()


def _mount_tmpfs(path, size: str) -> bool:
    os.makedirs(path, exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs",
                             str(path)], capture_output=True, text=True)
    return result.returncode == 0


def _fill(path) -> None:
    """Fill the filesystem holding ``path`` until ENOSPC."""
    chunk = b"\0" * 65536
    with open(path, "wb", buffering=0) as f:
        while True:
            try:
                f.write(chunk)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                if len(chunk) == 1:
                    return
                chunk = chunk[: len(chunk) // 2]


@contextlib.contextmanager
def _small_filesystem(path, size="4m"):
    if os.geteuid() != 0 or not _mount_tmpfs(path, size):
        if os.environ.get("CI") == "true":
            pytest.fail("cannot mount a tmpfs (needs root): the full-disk test cannot run")
        pytest.skip("cannot mount a tmpfs (needs root)")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_full_disk_when_writing_failed_keeps_the_segment_until_space_returns(tmp_path, procs,
                                                                              sink_env):
    from cloudtrail_sink.spool import SpoolWriter

    with _small_filesystem(tmp_path / "fs") as fs:
        spool = fs / "spool"
        good = [f"disk-good-{i:03d}" for i in range(200)]
        bad = [f"disk-bad-{i:03d}" for i in range(200)]
        with SpoolWriter(spool, max_events=1000) as writer:
            for g, b in zip(good, bad):
                writer.write(relsupport.make_event(g, pad=100))
                # Permanently refused (wrong recipient): must be written to failed/.
                writer.write(relsupport.make_event(b, pad=100, account=OTHER_ACCOUNT))
        # Held back from ready/ until the sink runs and the disk is full (a rename needs no
        # free blocks): the sink must meet the full disk while finalizing, not while starting.
        staging = fs / "staging"
        staging.mkdir()
        (segment,) = relsupport.spool_files(spool, "ready")
        os.rename(spool / "ready" / segment, staging / segment)

        emu = _emulator(tmp_path, 0, {CHANNEL_ARN: None})
        try:
            sink = procs.start(relsupport.sink_cmd(spool, emu.url, CHANNEL_ARN, *CAPS),
                               sink_env, name="sink-full-disk")
            lock = spool / "sink.lock"
            relsupport.wait_for(lambda: lock.exists() and lock.stat().st_size > 0, timeout=30,
                                what="the sink to take the spool lock")
            filler = fs / "filler"
            _fill(filler)
            os.rename(staging / segment, spool / "ready" / segment)
            # The good events go through, but the segment must stay: its bad events could not
            # be written to failed/.
            relsupport.wait_for(lambda: len(set(relsupport.stored_uids(emu))) >= len(good),
                                timeout=60, what="the deliverable events")
            time.sleep(OUTAGE_SECONDS)
            assert sink.poll() is None, f"the sink died on ENOSPC:\n{procs.tail(sink)}"
            assert relsupport.spool_files(spool, "ready") == [segment]
            assert relsupport.failed_lines(spool) == []
            with open(spool / "ready" / segment, "rb") as f:
                assert len(f.read()) > 0

            os.unlink(filler)  # space returns; no restart, no signal
            relsupport.wait_for(lambda: not relsupport.spool_files(spool, "ready"), timeout=60,
                                what="the segment to be finalized once space returned")
            lines = relsupport.failed_lines(spool)
            assert sorted(l["eventData"]["UID"] for l in lines) == bad
            assert {l["errorCode"] for l in lines} == {"InvalidRecipient"}
            assert all(l["errorMessage"] for l in lines)
            stored = set(relsupport.stored_uids(emu))
            assert stored == set(good), "a refused event was stored, or a good one lost"
            # A failed attempt must not leave its partial file behind: on a full disk every retry
            # would leak one more, and together they hold the space the retry needs.
            leftovers = relsupport.spool_files(spool, "tmp")
            assert not leftovers, f"{len(leftovers)} tmp/ leftovers, e.g. {leftovers[:3]}"
        finally:
            procs.cleanup()
            emu.stop()
