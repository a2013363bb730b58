"""The ack journal (``acks/``) when it is damaged or outlived by its dead letters: a damaged
or foreign line costs duplicates, never an event; dead letters already written are not written
again after a restart, even when ``failed replay`` has since taken their file; many open
segments hold a bounded number of descriptors; a segment's completing acceptance is journalled
only when the segment stays on disk."""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import threading

from cloudtrail_sink.delivery import reader as segment_reader
from cloudtrail_sink.delivery.coordinator import Runner
from cloudtrail_sink.delivery.journal import OPEN_JOURNALS, AckJournal
from cloudtrail_sink.sender import Result

from sinksupport import drain_config, event, failed_lines, fill, run_drain, wait_for
from test_crash_acks import CrashingService


def offsets(path) -> list[int]:
    with open(path, "rb") as f:
        return [r.offset for r in segment_reader.read_segment(f)]


def sent_uids(service: CrashingService) -> collections.Counter:
    return collections.Counter(service.stored)


def test_a_damaged_or_foreign_journal_line_never_skips_an_event(tmp_path):
    spool_dir = tmp_path / "spool"
    [seg] = fill(spool_dir, [event(i) for i in range(10)])
    [other] = fill(spool_dir, [event(i) for i in range(100, 110)])
    ready, acks, failed = (str(spool_dir / d) for d in ("ready", "acks", "failed"))
    offs = offsets(os.path.join(ready, seg))
    os.makedirs(acks, exist_ok=True)
    AckJournal(acks, seg, failed).accepted([offs[0]])  # a true line: evt-0 was accepted
    AckJournal(acks, seg, failed).accepted([offs[1]])  # ...and a line a bit flip changes:
    path = os.path.join(acks, seg + ".acks")
    with open(path, "rb") as f:
        data = f.read()
    lines = data.split(b"\n")
    lines[1] = lines[1].replace(str(offs[1]).encode(), str(offs[5]).encode())
    # A stale block of another segment's journal (what a power loss can leave in a file).
    AckJournal(acks, other, failed).accepted([offs[7]])
    with open(os.path.join(acks, other + ".acks"), "rb") as f:
        foreign = f.read()
    os.unlink(os.path.join(acks, other + ".acks"))
    with open(path, "wb") as f:
        f.write(b"\n".join(lines) + foreign)

    service = CrashingService(answer=None)
    run_drain(drain_config(spool_dir), sender=service)
    sent = sent_uids(service)
    # evt-1's line is damaged: it is sent again (a duplicate at worst); nothing else is skipped.
    assert set(sent) == {f"evt-{i}" for i in range(1, 10)} | {f"evt-{i}" for i in range(100, 110)}
    assert os.listdir(ready) == [] and os.listdir(acks) == []


def test_dead_letters_are_not_written_again_after_failed_replay_took_their_file(tmp_path):
    spool_dir = tmp_path / "spool"
    bad = event("bad", recipientAccountId="999999999999")  # refused before sending
    fill(spool_dir, [{**bad, "UID": "bad-0"}] + [event(i) for i in range(600)], max_events=1000)
    first = CrashingService(answer=1)
    runner = Runner(drain_config(spool_dir, drain=False, max_in_flight=1, max_batch_events=100,
                                 grace_seconds=0.2), sender=first)
    runner.start()
    try:
        wait_for(lambda: len(first.held) == 100 and failed_lines(spool_dir))
        assert [line["id"] for line in failed_lines(spool_dir)] == ["bad-0"]
    finally:
        runner.stop()  # the crash: the segment stays, half settled
        first.release.set()
        for t in runner._threads:
            t.join(10)

    # The operator replays the dead letter before the sink comes back: its file is gone.
    result = subprocess.run([sys.executable, "-m", "cloudtrail_sink", "failed", "replay",
                             "--spool-dir", str(spool_dir)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert failed_lines(spool_dir) == [] and len(os.listdir(spool_dir / "ready")) == 2

    second = CrashingService(answer=None)
    run_drain(drain_config(spool_dir), sender=second)
    # The replayed copy is refused again (still the wrong account): one dead letter, not two.
    assert [line["id"] for line in failed_lines(spool_dir)] == ["bad-0"]
    assert os.listdir(spool_dir / "ready") == [] and os.listdir(spool_dir / "acks") == []


def test_journals_without_their_segment_are_removed_at_start_and_others_kept(tmp_path):
    spool_dir = tmp_path / "spool"
    [seg] = fill(spool_dir, [event(i) for i in range(5)])
    acks = spool_dir / "acks"
    acks.mkdir(exist_ok=True)
    (acks / "gone.seg.acks").write_bytes(b"a 0 00000000\n")
    offs = offsets(spool_dir / "ready" / seg)
    AckJournal(str(acks), seg, str(spool_dir / "failed")).accepted(offs[:2])
    runner = Runner(drain_config(spool_dir, drain=False, rescan_seconds=3600),
                    sender=CrashingService(answer=0))  # answers nothing: the journal stays
    runner.start()
    try:
        assert sorted(os.listdir(acks)) == [seg + ".acks"]
    finally:
        runner.sender.release.set()
        runner.stop()


def test_a_dry_run_shows_only_what_the_next_run_would_send(tmp_path):
    import io
    import json

    spool_dir = tmp_path / "spool"
    [seg] = fill(spool_dir, [event(i) for i in range(10)])
    acks = spool_dir / "acks"
    acks.mkdir(exist_ok=True)
    # A sink killed after evt-0..3 were accepted left this journal behind.
    AckJournal(str(acks), seg, str(spool_dir / "failed")).accepted(
        offsets(spool_dir / "ready" / seg)[:4])
    before = (acks / (seg + ".acks")).read_bytes()
    out = io.StringIO()
    run_drain(drain_config(spool_dir, dry_run=True), out=out)
    shown = [json.loads(e["eventData"])["UID"] for line in out.getvalue().splitlines()
             for e in json.loads(line)["auditEvents"]]
    assert shown == [f"evt-{i}" for i in range(4, 10)]
    # ...and it changed nothing: the journal and the segment are as they were.
    assert (acks / (seg + ".acks")).read_bytes() == before
    assert os.listdir(spool_dir / "ready") == [seg]


class AcceptEvenUids:
    """Accepts events whose UID number is even and fails the others with a retryable code, so
    every segment stays open, partly settled, its journal written."""

    def __init__(self):
        self.stored: list[str] = []
        self.lock = threading.Lock()

    def send(self, entries):
        uids = [json.loads(e["eventData"])["UID"] for e in entries]
        with self.lock:
            self.stored += uids
        return Result({e["id"] for e, u in zip(entries, uids) if int(u[4:]) % 2 == 0},
                      [(e["id"], "InternalFailure", "try again")
                       for e, u in zip(entries, uids) if int(u[4:]) % 2])


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_many_open_partly_settled_segments_hold_no_journal_descriptors(tmp_path):
    spool_dir = tmp_path / "spool"
    n = 1200
    fill(spool_dir, [event(i) for i in range(n)], max_events=2)  # 600 segments of 2 events
    acks = spool_dir / "acks"
    before = open_fds()
    first = AcceptEvenUids()
    runner = Runner(drain_config(spool_dir, drain=False, max_in_flight=2, max_batch_events=100,
                                 max_pending_events=n), sender=first)
    runner.start()
    try:
        # Every segment open, its even event accepted and journalled, the odd one retried.
        wait_for(lambda: os.path.isdir(acks) and len(os.listdir(acks)) == n // 2, timeout=60)
        assert len(runner.segments.open_segments) == n // 2
        # A descriptor per open journal would be 600 here: at most OPEN_JOURNALS are kept
        # (plus one per sender writing), and the spool lock and watcher are a handful.
        assert open_fds() - before < OPEN_JOURNALS + 14
    finally:
        runner.stop()  # a crash: the odd events are still unsettled
        for t in runner._threads:
            t.join(10)
    assert len(os.listdir(spool_dir / "ready")) == n // 2

    second = CrashingService(answer=None)
    run_drain(drain_config(spool_dir), sender=second)
    # Nothing lost, and what the first run had accepted is not sent again.
    assert sorted(second.stored) == sorted(f"evt-{i}" for i in range(1, n, 2))
    assert set(first.stored) | set(second.stored) == {f"evt-{i}" for i in range(n)}
    assert os.listdir(spool_dir / "ready") == [] and os.listdir(acks) == []
    assert open_fds() - before < 30


def test_a_segment_settled_by_one_request_writes_no_journal(tmp_path, monkeypatch):
    spool_dir = tmp_path / "spool"
    fill(spool_dir, [event(i) for i in range(50)], max_events=5)  # 10 segments, one request
    acks = str(spool_dir / "acks")
    real_open, opened = os.open, []

    def counting_open(path, *a, **kw):
        if os.path.dirname(os.fspath(path)) == acks:
            opened.append(path)
        return real_open(path, *a, **kw)

    monkeypatch.setattr(os, "open", counting_open)
    service = CrashingService(answer=None)
    run_drain(drain_config(spool_dir, max_batch_events=100, linger_ms=200), sender=service)
    assert sorted(service.stored) == sorted(f"evt-{i}" for i in range(50))
    # The acceptance that completes a segment is followed by its deletion: not journalled.
    assert opened == [] and os.listdir(spool_dir / "ready") == []


def test_a_completing_acceptance_is_journalled_when_the_segment_cannot_be_deleted(
        tmp_path, monkeypatch):
    from cloudtrail_sink.delivery.coordinator import EXIT_INCOMPLETE
    from test_failure_recovery import failing_deletes

    spool_dir = tmp_path / "spool"
    [name] = fill(spool_dir, [event(i) for i in range(5)])
    with monkeypatch.context() as m:
        failing_deletes(m, spool_dir / "ready", times=1000)
        first = CrashingService(answer=None)
        run_drain(drain_config(spool_dir), rc=EXIT_INCOMPLETE, sender=first)
    assert sorted(first.stored) == sorted(f"evt-{i}" for i in range(5))
    assert os.listdir(spool_dir / "ready") == [name]
    # The next sink finds the segment settled: it sends nothing again and deletes it.
    second = CrashingService(answer=None)
    run_drain(drain_config(spool_dir), sender=second)
    assert second.stored == []
    assert os.listdir(spool_dir / "ready") == [] and os.listdir(spool_dir / "acks") == []
