"""The ack journal (``acks/``) when it is damaged or outlived by its dead letters: a damaged
or foreign line costs duplicates, never an event; dead letters already written are not written
again after a restart, even when ``failed replay`` has since taken their file; one journal per
sink, carried over and compacted at start, rotated and removed as its segments go; a segment's
completing acceptance is journalled only when the segment stays on disk."""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import threading
import zlib

from hypothesis import HealthCheck, given, settings, strategies as st

from cloudtrail_sink.delivery import journal as journal_mod
from cloudtrail_sink.delivery import reader as segment_reader
from cloudtrail_sink.delivery.coordinator import Runner
from cloudtrail_sink.delivery.journal import Journal
from cloudtrail_sink.sender import Result

from sinksupport import drain_config, event, failed_lines, fill, run_drain, wait_for
from test_crash_acks import CrashingService


def offsets(path) -> list[int]:
    with open(path, "rb") as f:
        return [r.offset for r in segment_reader.read_segment(f)]


def sent_uids(service: CrashingService) -> collections.Counter:
    return collections.Counter(service.stored)


def journal_of(spool_dir, writable: bool = True) -> Journal:
    """The journal a sink on ``spool_dir`` would use, loaded (as a sink starting there)."""
    acks = spool_dir / "acks"
    acks.mkdir(exist_ok=True)
    j = Journal(str(acks), str(spool_dir / "ready"), str(spool_dir / "failed"),
                writable=writable)
    j.load()
    return j


def crash(j: Journal) -> None:
    """What a SIGKILL leaves: the file as written, never closed or removed."""
    os.close(j._fd)


def test_a_damaged_or_foreign_journal_line_never_skips_an_event(tmp_path):
    spool_dir = tmp_path / "spool"
    [seg] = fill(spool_dir, [event(i) for i in range(10)])
    offs = offsets(spool_dir / "ready" / seg)
    j = journal_of(spool_dir)
    j.accepted(seg, [offs[0]])  # a true line: evt-0 was accepted
    j.accepted(seg, [offs[1]])  # ...and a line a bit flip changes:
    crash(j)
    [path] = [spool_dir / "acks" / n for n in os.listdir(spool_dir / "acks")]
    lines = path.read_bytes().split(b"\n")
    lines[1] = lines[1].replace(str(offs[1]).encode(), str(offs[5]).encode())
    # A stale block of another journal file naming this segment (what a power loss can leave
    # in a file): its checks are salted with the other file's name.
    other = Journal(str(tmp_path), str(spool_dir / "ready"), str(spool_dir / "failed"))
    other.load()
    other.accepted(seg, [offs[7]])
    crash(other)
    [foreign] = [p for p in tmp_path.iterdir() if p.name.endswith(".journal")]
    path.write_bytes(b"\n".join(lines) + foreign.read_bytes())

    service = CrashingService(answer=None)
    run_drain(drain_config(spool_dir), sender=service)
    sent = sent_uids(service)
    # evt-1's line is damaged: it is sent again (a duplicate at worst); nothing else is skipped.
    assert set(sent) == {f"evt-{i}" for i in range(1, 10)}
    assert os.listdir(spool_dir / "ready") == [] and os.listdir(spool_dir / "acks") == []


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


def test_at_start_the_journal_keeps_only_what_segments_still_there_need(tmp_path):
    spool_dir = tmp_path / "spool"
    [seg, other] = fill(spool_dir, [event(i) for i in range(10)], max_events=5)
    acks = spool_dir / "acks"
    offs = offsets(spool_dir / "ready" / seg)
    first = journal_of(spool_dir)
    first.accepted(seg, offs[:2])
    first.accepted("gone.seg", [0, 10])  # a segment deleted since (its deletion not noted)
    crash(first)
    # A per-segment journal of an earlier version names two more of seg's events.
    body = b"a %d %d" % (offs[2], offs[3])
    (acks / (seg + ".acks")).write_bytes(body + b" %08x\n" % zlib.crc32(seg.encode() + b"\0"
                                                                       + body))
    (acks / "gone.seg.acks").write_bytes(b"a 0 00000000\n")
    before = set(os.listdir(acks))

    runner = Runner(drain_config(spool_dir, drain=False, rescan_seconds=3600),
                    sender=CrashingService(answer=0))  # answers nothing: the journal stays
    runner.start()
    try:
        # One new file carries what the segments still there need; the files read are gone.
        [now] = os.listdir(acks)
        assert now not in before and now.endswith(".journal")
        text = (acks / now).read_bytes().decode()
        assert "gone.seg" not in text and other not in text
        reread = Journal(str(acks), str(spool_dir / "ready"), str(spool_dir / "failed"),
                         writable=False)
        reread.load()
        assert reread.settled(seg) == set(offs[:4]) and reread.settled(other) == set()
    finally:
        runner.sender.release.set()
        runner.stop()


def test_the_journal_rotates_and_removes_a_file_once_its_segments_are_gone(tmp_path,
                                                                          monkeypatch):
    monkeypatch.setattr(journal_mod, "ROTATE_BYTES", 200)
    spool_dir = tmp_path / "spool"
    segs = fill(spool_dir, [event(i) for i in range(40)], max_events=10)
    acks = spool_dir / "acks"
    j = journal_of(spool_dir)
    for i, seg in enumerate(segs):
        for k in range(3):
            j.accepted(seg, [1000 * i + k] * 4)
    assert len(os.listdir(acks)) >= 3  # rotated
    # A file no longer written goes when the last segment it names was deleted, not before.
    for seg in segs[:-1]:
        j.forget(seg)
    current = os.path.basename(j._current.path)
    kept = [n for n in os.listdir(acks) if n != current]
    assert kept and all(segs[-1] in (acks / n).read_text() for n in kept)
    assert all(segs[0] not in (acks / n).read_text() for n in kept)
    crash(j)
    # A restart still finds the last segment's settled offsets, wherever they were written.
    again = journal_of(spool_dir)
    assert again.settled(segs[-1]) == {3000, 3001, 3002}
    again.forget(segs[-1])
    again.close()
    assert os.listdir(acks) == []


names = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=30).filter(
    lambda n: "/" not in n and "\0" not in n and n not in (".", ".."))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(entries=st.dictionaries(names, st.sets(st.integers(0, 2**40), min_size=1, max_size=8),
                               min_size=1, max_size=5),
       noise=st.binary(max_size=300))
def test_any_segment_name_round_trips_and_noise_never_counts(tmp_path_factory, entries, noise):
    spool_dir = tmp_path_factory.mktemp("spool")
    (spool_dir / "ready").mkdir()
    for name in entries:
        (spool_dir / "ready" / name).write_bytes(b"")
    j = journal_of(spool_dir)
    for name, offs in entries.items():
        j.accepted(name, sorted(offs))
    crash(j)
    [path] = list((spool_dir / "acks").iterdir())
    with open(path, "ab") as f:
        f.write(noise)  # bytes after a crash: a cut line, garbage, a stale block
    again = journal_of(spool_dir, writable=False)
    assert {name: again.settled(name) for name in entries} == entries


def test_a_dry_run_shows_only_what_the_next_run_would_send(tmp_path):
    import io
    import json

    spool_dir = tmp_path / "spool"
    [seg] = fill(spool_dir, [event(i) for i in range(10)])
    acks = spool_dir / "acks"
    acks.mkdir(exist_ok=True)
    # A sink killed after evt-0..3 were accepted left this journal behind.
    j = journal_of(spool_dir)
    j.accepted(seg, offsets(spool_dir / "ready" / seg)[:4])
    crash(j)
    before = {n: (acks / n).read_bytes() for n in os.listdir(acks)}
    out = io.StringIO()
    run_drain(drain_config(spool_dir, dry_run=True), out=out)
    shown = [json.loads(e["eventData"])["UID"] for line in out.getvalue().splitlines()
             for e in json.loads(line)["auditEvents"]]
    assert shown == [f"evt-{i}" for i in range(4, 10)]
    # ...and it changed nothing: the journal and the segment are as they were.
    assert {n: (acks / n).read_bytes() for n in os.listdir(acks)} == before
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


def test_many_open_partly_settled_segments_share_one_journal_file(tmp_path):
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
        wait_for(lambda: sum(len(seg.journal.journal._current.segments) for seg in [
            next(iter(runner.segments.open_segments.values()), None)] if seg) == n // 2,
            timeout=60)
        assert len(runner.segments.open_segments) == n // 2
        # One file and one descriptor for all 600 segments (the spool lock and the watcher
        # are a handful more).
        assert len(os.listdir(acks)) == 1
        assert open_fds() - before < 14
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


def test_a_segment_settled_by_one_request_writes_no_journal_line(tmp_path, monkeypatch):
    spool_dir = tmp_path / "spool"
    fill(spool_dir, [event(i) for i in range(50)], max_events=5)  # 10 segments, one request
    written = []
    real = Journal._append_locked
    monkeypatch.setattr(Journal, "_append_locked",
                        lambda self, body, seg: (written.append(body), real(self, body, seg)))
    service = CrashingService(answer=None)
    run_drain(drain_config(spool_dir, max_batch_events=100, linger_ms=200), sender=service)
    assert sorted(service.stored) == sorted(f"evt-{i}" for i in range(50))
    # The acceptance that completes a segment is followed by its deletion: not journalled.
    assert written == [] and os.listdir(spool_dir / "ready") == []
    assert os.listdir(spool_dir / "acks") == []


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
