"""After a crash, a restarted sink sends again only what was in flight, and dead-letters
nothing twice (the sink's ack journal, ``acks/``)."""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import threading

from cloudtrail_sink.delivery.coordinator import Runner
from cloudtrail_sink.sender import RequestFailed, Result

from sinksupport import (drain_config, event, failed_lines, fill, run_drain, uids_in_segment,
                         wait_for)

IN_FLIGHT = 2
BATCH = 100


class CrashingService:
    """Stores each request on arrival, as the service does; answers the first ``answer``,
    then holds every later request unanswered until ``release`` (the sink "crashes" while
    they are in flight, so their answers are lost)."""

    def __init__(self, answer: int | None):
        self.answer = answer
        self.stored: list[str] = []
        self.held: list[str] = []
        self.requests = 0
        self.release = threading.Event()
        self.lock = threading.Lock()

    def send(self, entries):
        uids = [json.loads(e["eventData"])["UID"] for e in entries]
        with self.lock:
            self.stored += uids
            self.requests += 1
            hold = self.answer is not None and self.requests > self.answer
            if hold:
                self.held += uids
        if hold:
            self.release.wait(30)
            raise RequestFailed("retry", "Crashed", "the sink died before the answer came")
        return Result({e["id"] for e in entries}, [])


def test_a_restart_resends_only_what_was_in_flight_and_dead_letters_once(tmp_path):
    spool_dir = tmp_path / "spool"
    bad = event("bad", recipientAccountId="999999999999")  # refused before sending
    events = []
    for i in range(900):
        events.append(event(i))
        if i % 100 == 0:
            events.append({**bad, "UID": f"bad-{i}"})
    fill(spool_dir, events, max_events=303)
    first = CrashingService(answer=5)
    runner = Runner(drain_config(spool_dir, drain=False, max_in_flight=IN_FLIGHT,
                                 max_batch_events=BATCH, grace_seconds=0.2), sender=first)
    runner.start()
    try:
        wait_for(lambda: len(first.held) == IN_FLIGHT * BATCH)
    finally:
        runner.stop()  # the crash: nothing more is settled or deleted
        first.release.set()
        for t in runner._threads:
            t.join(10)
    assert os.listdir(spool_dir / "ready"), "the crash must leave work behind"

    second = CrashingService(answer=None)
    run_drain(drain_config(spool_dir, max_in_flight=IN_FLIGHT, max_batch_events=BATCH),
              sender=second)

    stored = collections.Counter(first.stored + second.stored)
    assert set(stored) == {f"evt-{i}" for i in range(900)}
    duplicates = sorted(uid for uid, n in stored.items() if n > 1)
    # Only the events whose answers the crash lost are sent twice: at most what was in flight.
    assert duplicates == sorted(first.held) and len(duplicates) <= IN_FLIGHT * BATCH
    dead = collections.Counter(line["id"] for line in failed_lines(spool_dir))
    assert dead == {f"bad-{i}": 1 for i in range(0, 900, 100)}
    assert os.listdir(spool_dir / "ready") == [] and os.listdir(spool_dir / "acks") == []

    # So `failed replay` puts each refused event back once.
    result = subprocess.run([sys.executable, "-m", "cloudtrail_sink", "failed", "replay",
                             "--spool-dir", str(spool_dir)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    replayed = [uid for name in os.listdir(spool_dir / "ready")
                for uid in uids_in_segment(spool_dir / "ready" / name)]
    assert sorted(replayed) == sorted(dead)
