"""The ack journal against a model of what it must remember: after any interleaving of
acceptances, dead letters (renamed or not, ``failed replay`` taking them), deletions, rotations,
full disks, unwritable or dry-run starts and kills (at any step, the start included), a loaded
journal reports for each segment still in ``ready/`` exactly the offsets whose settlement was
written, never one that was not settled; and whatever lies in ``acks/`` never breaks a start."""

from __future__ import annotations

import errno
import logging
import os
import tempfile
import threading
import time
import zlib

import pytest
from hypothesis import given, settings, strategies as st

from cloudtrail_sink import spool
from cloudtrail_sink.delivery import journal as journal_mod
from cloudtrail_sink.delivery.journal import Journal, SegmentJournal
from cloudtrail_sink.delivery.settle import Dead, Settler
from cloudtrail_sink.delivery.tracker import Segment
from cloudtrail_sink.metrics import Metrics
from cloudtrail_sink.spool.deadletters import DeadLetters

# Names a writer never gives, but the journal must carry whatever ready/ holds.
SEGMENTS = ["0001764237600000000-fb_1_abc-0000000001.seg", "with space.seg", "new\nline.seg",
            os.fsdecode(b"bad\xff\xfe.seg"), "x.journal", "y.acks", "%41%.seg"]


class Killed(BaseException):
    """A SIGKILL at this step: nothing after it runs."""


class FaultyOs:
    """``os`` as the journal sees it, with faults: a write that stores part of its line and
    then fails (a full disk), a kill after some writes or unlinks, journal files that cannot be
    created."""

    def __init__(self):
        self.tear_next = False
        self.kill_after: dict[str, int] = {}
        self.no_create = False

    def __getattr__(self, name):
        return getattr(os, name)

    def _tick(self, what: str) -> None:
        if what in self.kill_after:
            self.kill_after[what] -= 1
            if self.kill_after[what] < 0:
                raise Killed(what)

    def write(self, fd, data):
        self._tick("write")
        if self.tear_next:
            self.tear_next = False
            os.write(fd, bytes(data[:max(1, len(data) // 2)]))
            raise OSError(errno.ENOSPC, "No space left on device")
        return os.write(fd, data)

    def unlink(self, path):
        self._tick("unlink")
        return os.unlink(path)

    def open(self, path, flags, *args):
        if self.no_create and flags & os.O_CREAT:
            raise OSError(errno.EACCES, "Permission denied")
        return os.open(path, flags, *args)


class Spool:
    def __init__(self, root: str, fos: FaultyOs):
        self.root = root
        self.fos = fos
        self.ready, self.failed, self.acks = (os.path.join(root, d)
                                              for d in ("ready", "failed", "acks"))
        for d in (self.ready, self.failed, self.acks):
            os.mkdir(d)
        for name in SEGMENTS:
            open(os.path.join(self.ready, name), "wb").close()
        self.expected: dict[str, set[int]] = {name: set() for name in SEGMENTS}
        self.recording = True  # False: the running journal writes nothing (dry run, no file)
        self.seq = 0
        self.journal = self.start()

    def present(self) -> list[str]:
        return [name for name in SEGMENTS if name in self.expected]

    def start(self, writable: bool = True) -> Journal:
        j = Journal(self.acks, self.ready, self.failed, writable=writable)
        j.load()
        self.recording = writable and j._current is not None
        # What each segment's first read skips: exactly what was settled.
        for name in self.present():
            assert j.settled(name) == self.expected[name], name
        return j

    def kill(self) -> None:
        if self.journal._fd is not None:
            os.close(self.journal._fd)  # what a SIGKILL leaves: the file as written

    def restart(self, writable: bool = True) -> None:
        self.kill()
        self.journal = self.start(writable)

    def accept(self, i: int, offs: list[int], tear: bool) -> None:
        name = self.present()[i % len(self.present())]
        self.fos.tear_next = tear
        self.journal.accepted(name, offs)
        self.fos.tear_next = False
        if self.recording and not tear:
            self.expected[name] |= set(offs)

    def dead_letter(self, picks: list[int], offs: list[int], fate: str) -> None:
        present = self.present()
        segs = sorted({present[i % len(present)] for i in picks})
        self.seq += 1
        failed_file = f"{self.seq:016d}-sink_t-{self.seq:010d}.jsonl"
        for name in segs:
            self.journal.dead_lettered(name, failed_file, offs)
        if fate in ("intent, then a kill", "the rename fails"):
            if fate == "intent, then a kill":
                self.restart()
            return  # not in failed/: sent again, dead-lettered again
        open(os.path.join(self.failed, failed_file), "wb").close()
        if self.recording:
            for name in segs:
                self.expected[name] |= set(offs)
        if fate == "renamed, then a kill":
            self.restart()
        else:
            SegmentJournal(self.journal, segs[0]).published(failed_file, segs)

    def replay(self, k: int) -> None:
        files = sorted(os.listdir(self.failed))
        if files:
            os.unlink(os.path.join(self.failed, files[k % len(files)]))

    def delete(self, i: int) -> None:
        present = self.present()
        if len(present) > 1:
            name = present[i % len(present)]
            os.unlink(os.path.join(self.ready, name))
            del self.expected[name]
            self.journal.forget(name)

    def reread(self, i: int) -> None:
        name = self.present()[i % len(self.present())]
        assert self.journal.settled(name) == self.expected[name]

    def killed_while_starting(self, what: str, after: int) -> None:
        self.kill()
        self.fos.kill_after = {what: after}
        half = Journal(self.acks, self.ready, self.failed)
        try:
            half.load()
        except Killed:
            pass
        finally:
            self.fos.kill_after = {}
            if half._fd is not None:
                os.close(half._fd)
        self.journal = self.start()

    def unwritable_start(self) -> None:
        self.kill()
        self.fos.no_create = True
        try:
            self.journal = self.start()
        finally:
            self.fos.no_create = False

    def dry_run(self) -> None:
        self.kill()
        before = snapshot(self.acks)
        dry = self.start(writable=False)
        for name in self.present():
            assert dry.settled(name) == self.expected[name]  # a re-read in the dry run
        dry.close()
        assert snapshot(self.acks) == before  # a dry run writes and removes nothing
        self.journal = self.start()

    def stop(self) -> None:
        self.journal.close()
        self.journal = self.start()


def snapshot(folder: str) -> dict[str, bytes]:
    out = {}
    for name in os.listdir(folder):
        with open(os.path.join(folder, name), "rb") as f:
            out[name] = f.read()
    return out


offsets = st.lists(st.integers(0, 10**12), min_size=1, max_size=7)
steps = st.one_of(
    st.tuples(st.just("accept"), st.integers(0, 20), offsets, st.booleans()),
    st.tuples(st.just("dead_letter"), st.lists(st.integers(0, 20), min_size=1, max_size=3),
              offsets, st.sampled_from(["renamed and published", "renamed, then a kill",
                                        "intent, then a kill", "the rename fails"])),
    st.tuples(st.just("replay"), st.integers(0, 20)),
    st.tuples(st.just("delete"), st.integers(0, 20)),
    st.tuples(st.just("reread"), st.integers(0, 20)),
    st.tuples(st.just("restart")),
    st.tuples(st.just("stop")),
    st.tuples(st.just("killed_while_starting"), st.sampled_from(["write", "unlink"]),
              st.integers(0, 4)),
    st.tuples(st.just("unwritable_start")),
    st.tuples(st.just("dry_run")),
)


@settings(max_examples=300, deadline=None)
@given(ops=st.lists(steps, max_size=40), rotate=st.sampled_from([90, 300, 4 << 20]),
       per_line=st.sampled_from([2, 1000]))
def test_a_loaded_journal_reports_exactly_what_was_settled(ops, rotate, per_line):
    fos = FaultyOs()
    with pytest.MonkeyPatch.context() as m, tempfile.TemporaryDirectory() as root:
        m.setattr(journal_mod, "ROTATE_BYTES", rotate)
        m.setattr(journal_mod, "LINE_OFFSETS", per_line)
        m.setattr(journal_mod, "os", fos)
        logging.getLogger("cloudtrail_sink.journal").disabled = True  # full disks, on purpose
        try:
            spool = Spool(root, fos)
            for op, *args in ops:
                getattr(spool, op)(*args)
            spool.restart()
            for name in spool.present():
                spool.journal.forget(name)
                os.unlink(os.path.join(spool.ready, name))
            spool.journal.close()
            # Nothing left to settle: a stop leaves acks/ empty.
            assert os.listdir(spool.acks) == []
        finally:
            logging.getLogger("cloudtrail_sink.journal").disabled = False


def test_a_dead_letter_line_outlives_a_rotation_failed_replay_and_a_kill(tmp_path, monkeypatch):
    # d X F, then a rotation, then D F in the next file with another segment's lines; that
    # segment goes, its file rotates away; failed replay takes F; a kill. X's dead-lettered
    # events must still count (the D line was kept as long as X's d line).
    monkeypatch.setattr(journal_mod, "ROTATE_BYTES", 150)
    for d in ("ready", "failed", "acks"):
        (tmp_path / d).mkdir()
    (tmp_path / "ready" / "x.seg").write_bytes(b"")
    (tmp_path / "ready" / "y.seg").write_bytes(b"")
    j = Journal(str(tmp_path / "acks"), str(tmp_path / "ready"), str(tmp_path / "failed"))
    j.load()
    j.dead_lettered("x.seg", "f.jsonl", [7, 8])
    while len(os.listdir(tmp_path / "acks")) < 2:
        j.accepted("x.seg", [1])
    (tmp_path / "failed" / "f.jsonl").write_bytes(b"")
    SegmentJournal(j, "x.seg").published("f.jsonl", ["x.seg"])
    files = len(os.listdir(tmp_path / "acks"))
    while len(os.listdir(tmp_path / "acks")) == files:
        j.accepted("y.seg", [2])
    (tmp_path / "ready" / "y.seg").unlink()
    j.forget("y.seg")
    while len(os.listdir(tmp_path / "acks")) <= files:
        j.accepted("z.seg", [3])  # rotates the D line's file out, with no segment left in it
    (tmp_path / "failed" / "f.jsonl").unlink()  # failed replay
    os.close(j._fd)  # a kill
    again = Journal(str(tmp_path / "acks"), str(tmp_path / "ready"), str(tmp_path / "failed"))
    again.load()
    assert again.settled("x.seg") == {1, 7, 8}


def test_sender_threads_appending_through_rotations_and_deletions_lose_no_line(tmp_path,
                                                                              monkeypatch):
    monkeypatch.setattr(journal_mod, "ROTATE_BYTES", 2000)
    for d in ("ready", "failed", "acks"):
        (tmp_path / d).mkdir()
    kept = [f"k{t}.seg" for t in range(4)]
    for name in kept:
        (tmp_path / "ready" / name).write_bytes(b"")
    j = Journal(str(tmp_path / "acks"), str(tmp_path / "ready"), str(tmp_path / "failed"))
    j.load()
    fds = len(os.listdir("/proc/self/fd"))

    def sender(t: int) -> None:
        for i in range(300):
            j.accepted(kept[t], [i])
            gone = f"g{t}-{i}.seg"  # a segment settled and deleted meanwhile
            j.accepted(gone, [i])
            j.forget(gone)

    threads = [threading.Thread(target=sender, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(os.listdir("/proc/self/fd")) == fds  # each rotation closed its descriptor
    # Files that only named deleted segments are gone; the rest hold the kept segments' lines.
    assert len(os.listdir(tmp_path / "acks")) <= 1 + len(j._files)
    os.close(j._fd)  # a kill
    again = Journal(str(tmp_path / "acks"), str(tmp_path / "ready"), str(tmp_path / "failed"))
    again.load()
    assert {name: again.settled(name) for name in kept} == {n: set(range(300)) for n in kept}
    for name in kept:
        again.forget(name)
    again.close()
    assert os.listdir(tmp_path / "acks") == []


def test_whatever_lies_in_acks_never_breaks_a_start(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(journal_mod, "MAX_LINE", 1000)
    monkeypatch.setattr(journal_mod, "READ_LIMIT", 50_000)
    for d in ("ready", "failed", "acks"):
        (tmp_path / d).mkdir()
    acks = tmp_path / "acks"
    seg = "evil\n name.seg"
    (tmp_path / "ready" / seg).write_bytes(b"")
    first = Journal(str(acks), str(tmp_path / "ready"), str(tmp_path / "failed"))
    first.load()
    first.accepted(seg, [1])
    os.close(first._fd)
    [good] = os.listdir(acks)
    line = (acks / good).read_bytes()
    # A line longer than any the sink writes, then a true one: the true one still counts.
    (acks / good).write_bytes(b"x" * 5000 + b"\n" + line)
    os.mkfifo(acks / "fifo.journal")  # reading it would block the start forever
    (acks / "dir.journal").mkdir()
    os.symlink(acks / good, acks / "link.journal")
    (acks / os.fsdecode(b"\xff\n .journal")).write_bytes(os.urandom(3000))
    # A file larger than any the sink writes: read up to READ_LIMIT, never all of it.
    with open(acks / "huge.journal", "wb") as f:
        f.truncate(1 << 30)
    # An earlier version's per-segment journal of this hostile name.
    body = b"a 2"
    (acks / (seg + ".acks")).write_bytes(
        body + b" %08x\n" % zlib.crc32(seg.encode() + b"\0" + body))
    caplog.set_level(logging.WARNING, "cloudtrail_sink.journal")
    j = Journal(str(acks), str(tmp_path / "ready"), str(tmp_path / "failed"))
    j.load()
    assert j.settled(seg) == {1, 2}
    # What could not be read stays and is reported; what was read is gone.
    left = set(os.listdir(acks)) - {os.path.basename(j._current.path)}
    assert left == {"fifo.journal", "dir.journal", "link.journal"}
    assert "not a regular file" in caplog.text and "larger than any" in caplog.text
    j.close()


def test_a_dead_letter_file_of_two_segments_keeps_its_published_line_for_both(tmp_path,
                                                                              monkeypatch):
    # The settler writes d lines for x and y, renames the failed/ file, writes one D line
    # (rotated into a new file). x is finished and deleted; y is not. The file holding D must
    # stay while y's d line may still be needed, through a rotation, failed replay and a kill.
    lay = spool.ensure_layout(tmp_path / "spool")
    spool.ensure_acks(lay)
    for name in ("x.seg", "y.seg"):
        open(os.path.join(lay.ready, name), "wb").close()
    j = Journal(lay.acks, lay.ready, lay.failed)
    j.load()
    segs = {name: Segment(name, os.path.join(lay.ready, name), SegmentJournal(j, name))
            for name in ("x.seg", "y.seg")}
    settler = Settler(tracker=None, batcher=None, dead_letters=DeadLetters(lay, fsync=False),
                      metrics=Metrics(), jitter=None, pause=None, clock=time.time,
                      channel_arn=None)
    monkeypatch.setattr(journal_mod, "ROTATE_BYTES", 1)  # every line ends its file
    path = settler.dead_letter([Dead(segs[name], off, f"id-{off}", "InvalidData", "no",
                                     {"k": off}, None, "t", 0.0)
                                for name, off in (("x.seg", 7), ("y.seg", 8))])
    os.unlink(segs["x.seg"].path)  # x finished: deleted and forgotten
    j.forget("x.seg")
    os.unlink(path)  # failed replay took the file
    os.close(j._fd)  # a kill
    again = Journal(lay.acks, lay.ready, lay.failed)
    again.load()
    assert again.settled("y.seg") == {8}  # y's dead letter is not written twice
