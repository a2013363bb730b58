"""At-least-once under crashes: SIGKILL the sink at random moments while it delivers 50,000
events to an emulator that throttles requests, answers 5xx, fails single events with
``Throttling``/``InternalFailure`` and adds latency; then let one last sink drain the spool.

What a user relies on, checked here:
- zero lost: every UID written to the spool is stored by the emulator;
- nothing invented: the emulator stores no UID that was never written;
- one event in 100 more is refused for good (another account's recipient): each of those is in
  ``failed/`` (at least once) and never stored;
- nothing left behind: ``ready/`` is empty, and no retryable fault ended in ``failed/`` or
  ``quarantine/``;
- duplicates (events stored more than once because a kill hit them in flight) are allowed by
  at-least-once, but bounded: per kill at most what can be in flight (``max_in_flight`` x 100
  events), thanks to the ack journal; the figure is printed and published;
- each refused event is dead-lettered exactly once, kills or not.

Kill moments come from a seeded RNG (``SEED``), so a failing run can be replayed; part of the
events are written by a concurrent writer while the kills happen, so new segments also arrive
while sinks restart.
"""

from __future__ import annotations

import collections
import os
import random
import threading
import time

import pytest

import relsupport
from relsupport import CHANNEL_ARN

SEED = 20261127
N_EVENTS = 50_000
N_PREFILLED = 40_000            # the rest arrives from a concurrent writer during the kills
BAD_EVERY = 100                 # plus one permanently refused event per 100 good ones
KILLS = 14
EARLY_KILLS = 3                 # of which during start-up; the other 11 mid-delivery
SEGMENT_EVENTS = 500
EVENT_PAD = 200                 # ~500-byte events: realistic, and keeps the run within minutes
FAULTS = dict(throttle_rate=0.05, error_5xx_rate=0.03, event_throttling_rate=0.02,
              event_internal_failure_rate=0.02, latency_ms=5)
QUOTA_PER_SECOND = 100.0
DRAIN_TIMEOUT = 240
IN_FLIGHT_EVENTS = 4 * 100      # the default --max-in-flight x the events per request


def _uid(i: int) -> str:
    return f"rel-{SEED}-{i:06d}"


def _bad_uid(i: int) -> str:
    return f"bad-{SEED}-{i:06d}"


def _write_events(spool, first: int, last: int, pause: float = 0.0) -> None:
    from cloudtrail_sink.spool import SpoolWriter

    writer = SpoolWriter(spool, kind="cli", max_events=SEGMENT_EVENTS)
    try:
        for i in range(first, last):
            writer.write(relsupport.make_event(_uid(i), pad=EVENT_PAD), tag="reliability")
            if i % BAD_EVERY == 0:
                # Refused for good (another account): must end in failed/, kills or not.
                writer.write(relsupport.make_event(_bad_uid(i), pad=EVENT_PAD,
                                                   account=relsupport.OTHER_ACCOUNT))
            if pause and (i + 1) % SEGMENT_EVENTS == 0:
                time.sleep(pause)
    finally:
        writer.close()


@pytest.mark.slow
@pytest.mark.timeout(480)
def test_sigkill_at_random_moments_loses_nothing(tmp_path, procs, sink_env, capsys):
    from cloudtrail_sink.emulator import Emulator, Faults

    rng = random.Random(SEED)
    spool = tmp_path / "spool"
    _write_events(spool, 0, N_PREFILLED)

    emu = Emulator(db_path=tmp_path / "emulator.sqlite", host="127.0.0.1", port=0,
                   channels={CHANNEL_ARN: None}, quota_per_second=QUOTA_PER_SECOND,
                   faults=Faults(**FAULTS), seed=SEED)
    emu.start()
    writer_error: list[BaseException] = []

    def concurrent_writer():
        try:
            _write_events(spool, N_PREFILLED, N_EVENTS, pause=0.3)
        except BaseException as exc:  # reported by the main thread
            writer_error.append(exc)

    writer = threading.Thread(target=concurrent_writer, name="reliability-writer")
    try:
        cmd = relsupport.sink_cmd(spool, emu.url, CHANNEL_ARN, "--rescan-seconds", "2")
        writer.start()
        kill_log = []
        # A few kills land during start-up (reading the spool, before any request); the
        # others after this sink delivered something, at a random extra delay.
        early = set(rng.sample(range(KILLS), EARLY_KILLS))
        for n in range(KILLS):
            proc = procs.start(cmd, sink_env, name=f"sink-{n:02d}")
            if n in early:
                time.sleep(rng.uniform(0.05, 0.8))
            else:
                accepted_at_start = emu.stats()["accepted"]
                relsupport.wait_for(
                    lambda: proc.poll() is not None or emu.stats()["accepted"] > accepted_at_start,
                    timeout=60, what=f"sink #{n} to deliver")
                time.sleep(rng.uniform(0.0, 1.2))
            assert proc.poll() is None, (
                f"sink #{n} exited by itself with {proc.returncode}:\n{procs.tail(proc)}")
            procs.kill(proc)
            assert proc.returncode == -9, f"sink #{n} ended with {proc.returncode} before the kill"
            kill_log.append(emu.stats()["accepted"])
        writer.join(timeout=120)
        assert not writer.is_alive() and not writer_error, writer_error

        # The kills must have hit a sink with work left to do, or they prove nothing.
        remaining = relsupport.spool_files(spool, "ready")
        assert remaining, "the spool drained before the last kill: raise N_EVENTS or the faults"

        final = procs.start(cmd + ["--drain"], sink_env, name="sink-final")
        code = relsupport.wait_exit(final, DRAIN_TIMEOUT)
        assert code == 0, f"final --drain sink: exit {code}\n{procs.tail(final)}"

        stored = relsupport.stored_uids(emu)
        counts = collections.Counter(stored)
        expected = {_uid(i) for i in range(N_EVENTS)}
        lost = expected - counts.keys()
        invented = counts.keys() - expected
        duplicates = len(stored) - len(counts)
        stats = emu.stats()
        dead = collections.Counter(l["eventData"]["UID"] for l in relsupport.failed_lines(spool))
        with capsys.disabled():
            print(f"\n[reliability] {N_EVENTS} events, {KILLS} SIGKILLs ({EARLY_KILLS} during "
                  f"start-up, seed {SEED}): "
                  f"lost={len(lost)} duplicates={duplicates} ({duplicates / KILLS:.0f} per kill, "
                  f"bound {IN_FLIGHT_EVENTS}) "
                  f"dead letters={sum(dead.values())} for {len(dead)} refused events "
                  f"stored={len(stored)} requests={dict(stats.get('requests', {}))} "
                  f"per-event failures={dict(stats.get('failed', {}))} "
                  f"accepted at each kill={kill_log}")
        assert not lost, f"{len(lost)} events lost, e.g. {sorted(lost)[:5]}"
        assert not invented, f"stored UIDs never written: {sorted(invented)[:5]}"
        assert relsupport.spool_files(spool, "ready") == []
        # Dead letters: every refused event once, and nothing else (no retryable fault is
        # ever dead-lettered).
        bad = {_bad_uid(i) for i in range(0, N_EVENTS, BAD_EVERY)}
        assert set(dead) == bad, (sorted(bad - set(dead))[:5], sorted(set(dead) - bad)[:5])
        assert all(n == 1 for n in dead.values()), [u for u, n in dead.items() if n > 1][:5]
        # Only what was in flight at a kill is sent again (4 requests of 100 by default).
        assert duplicates <= KILLS * IN_FLIGHT_EVENTS, (duplicates, KILLS * IN_FLIGHT_EVENTS)
        assert {l["errorCode"] for l in relsupport.failed_lines(spool)} == {"InvalidRecipient"}
        assert relsupport.spool_files(spool, "quarantine") == []
        # The faults really happened (otherwise this is a plain delivery test).
        failed_codes = stats.get("failed", {})
        assert failed_codes.get("Throttling", 0) > 0 and failed_codes.get("InternalFailure", 0) > 0
    finally:
        procs.cleanup()
        writer.join(timeout=60)
        emu.stop()
