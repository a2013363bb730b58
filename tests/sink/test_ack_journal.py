"""The ack journal (``acks/``) when it is damaged or outlived by its dead letters: a damaged
or foreign line costs duplicates, never an event; dead letters already written are not written
again after a restart, even when ``failed replay`` has since taken their file."""

from __future__ import annotations

import collections
import os
import subprocess
import sys

from cloudtrail_sink.delivery import reader as segment_reader
from cloudtrail_sink.delivery.coordinator import Runner
from cloudtrail_sink.delivery.journal import AckJournal

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
