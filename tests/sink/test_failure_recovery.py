"""What the sink does when something goes wrong inside it: a small pending limit with refused
events, a failed read, a failed deletion, a channel ARN that can never work, a drain that cannot
finish, a dry run (which must touch nothing), a stop whose grace period runs out."""

from __future__ import annotations

import errno
import json
import os
import threading
import time

import pytest

from cloudtrail_sink import spool, watcher
from cloudtrail_sink.delivery import reader as segment_reader
from cloudtrail_sink.config import SinkConfig
from cloudtrail_sink.delivery.coordinator import EXIT_INCOMPLETE, Runner
from cloudtrail_sink.delivery.tracker import read_retry_seconds
from cloudtrail_sink.spool.lock import acquire_lock
from cloudtrail_sink.sender import Result

from sinksupport import MISSING_CHANNEL_ARN, event, failed_lines, fill, wait_for
from sinksupport import drain_config as config


def run_in_thread(runner: Runner, timeout: float = 30) -> int:
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("rc", runner.run()), name="test-runner",
                         daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        runner.request_stop()
        t.join(10)
        raise AssertionError(f"sink did not finish within {timeout} s")
    return result["rc"]


class Service:
    """Accepts everything; records each request."""

    def __init__(self):
        self.requests: list[list[dict]] = []
        self.lock = threading.Lock()

    def send(self, entries):
        with self.lock:
            self.requests.append(entries)
        return Result({e["id"] for e in entries}, [])

    def sent(self) -> list[str]:
        with self.lock:
            return sorted(json.loads(e["eventData"])["UID"] for r in self.requests for e in r)


class WallClock:
    """time.time() plus an offset the test moves forward."""

    def __init__(self):
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


def segment_errors(runner, stage) -> float:
    return runner.metrics.registry.get_sample_value("cloudtrail_sink_segment_errors_total",
                                                    {"stage": stage}) or 0.0


BAD = [{"UID": f"bad-{i}", "eventName": "x"} for i in range(30)]  # required fields missing


def test_a_pending_limit_below_the_refused_flush_size_does_not_hang(tmp_path):
    spool_dir = tmp_path / "spool"
    fill(spool_dir, BAD + [event(i) for i in range(5)])
    service = Service()
    runner = Runner(config(spool_dir, max_pending_events=10), sender=service)
    assert run_in_thread(runner) == 0
    assert service.sent() == [f"evt-{i}" for i in range(5)]
    assert sorted(line["id"] for line in failed_lines(spool_dir)) == sorted(
        b["UID"] for b in BAD)
    assert os.listdir(spool_dir / "ready") == [] and runner.segments.pending == 0


def failing_reads(monkeypatch, times: int, after: int = 4):
    """The first ``times`` segment reads fail with EIO after ``after`` records."""
    real = segment_reader.read_segment
    left = {"n": times}

    def read_segment(f):
        fail = left["n"] > 0
        left["n"] -= 1
        for i, entry in enumerate(real(f)):
            if fail and i == after:
                raise OSError(errno.EIO, "Input/output error")
            yield entry

    monkeypatch.setattr(segment_reader, "read_segment", read_segment)


def test_a_failed_read_is_released_and_read_again_later(tmp_path, monkeypatch):
    spool_dir = tmp_path / "spool"
    [name] = fill(spool_dir, BAD[:2] + [event(i) for i in range(8)])
    failing_reads(monkeypatch, times=1)
    clock = WallClock()
    service = Service()
    runner = Runner(config(spool_dir, drain=False, rescan_seconds=3600), sender=service,
                    clock=clock)
    runner.start()
    try:
        wait_for(lambda: segment_errors(runner, "read") == 1)
        # The two refused events read before the failure no longer count as pending.
        wait_for(lambda: runner.segments.pending == 0 and runner.segments.idle())
        assert runner.queue.known() == 0 and runner.queue.held() == [name]
        assert os.listdir(spool_dir / "ready") == [name] and failed_lines(spool_dir) == []
        runner.queue.scan()
        assert runner.queue.known() == 0  # held back until the retry time
        clock.offset += 31
        runner.queue.scan()
        wait_for(lambda: os.listdir(spool_dir / "ready") == [])
    finally:
        runner.stop()
    assert service.sent() == [f"evt-{i}" for i in range(8)]
    assert sorted(line["id"] for line in failed_lines(spool_dir)) == ["bad-0", "bad-1"]
    assert runner.queue.held() == []


def test_a_segment_whose_reads_keep_failing_is_retried_less_and_less_often(tmp_path, monkeypatch):
    """Each failed read re-sends the events before the failure point: the delay doubles per
    failure of the same segment (capped), so a bad sector does not bill them forever."""
    spool_dir = tmp_path / "spool"
    [name] = fill(spool_dir, [event(i) for i in range(8)])
    failing_reads(monkeypatch, times=2)
    clock = WallClock()
    runner = Runner(config(spool_dir, drain=False, rescan_seconds=3600), sender=Service(),
                    clock=clock)
    runner.start()
    try:
        wait_for(lambda: segment_errors(runner, "read") == 1)
        wait_for(lambda: runner.segments.idle())
        clock.offset += 31
        runner.queue.scan()
        wait_for(lambda: segment_errors(runner, "read") == 2)
        wait_for(lambda: runner.segments.idle())
        clock.offset += 31  # the first delay again: too early now
        runner.queue.scan()
        assert runner.queue.known() == 0 and runner.queue.held() == [name]
        clock.offset += 30  # 61 s after the second failure, past its 60 s delay
        runner.queue.scan()
        wait_for(lambda: os.listdir(spool_dir / "ready") == [])
    finally:
        runner.stop()
    assert [read_retry_seconds(n) for n in (1, 2, 3, 20)] == [30.0, 60.0, 120.0, 3600.0]


def test_drain_ends_with_exit_4_when_a_segment_cannot_be_read(tmp_path, monkeypatch):
    spool_dir = tmp_path / "spool"
    [broken] = fill(spool_dir, [event(i) for i in range(10)])
    fill(spool_dir, [event(i) for i in range(10, 15)])
    failing_reads(monkeypatch, times=1)
    service = Service()
    assert run_in_thread(Runner(config(spool_dir), sender=service)) == EXIT_INCOMPLETE
    assert os.listdir(spool_dir / "ready") == [broken]  # kept, not deleted early
    assert set(service.sent()) == {f"evt-{i}" for i in range(10, 15)}


def failing_deletes(monkeypatch, folder, times: int):
    real = os.unlink
    left = {"n": times}

    def unlink(path, *a, **kw):
        if os.path.dirname(os.fspath(path)) == str(folder) and left["n"] > 0:
            left["n"] -= 1
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return real(path, *a, **kw)

    monkeypatch.setattr(os, "unlink", unlink)


def test_a_settled_segment_whose_deletion_failed_is_deleted_later_without_resending(
        tmp_path, monkeypatch):
    spool_dir = tmp_path / "spool"
    [name] = fill(spool_dir, [event(i) for i in range(5)])
    failing_deletes(monkeypatch, spool_dir / "ready", times=1)
    clock = WallClock()
    service = Service()
    runner = Runner(config(spool_dir, drain=False, rescan_seconds=3600), sender=service,
                    clock=clock)
    runner.start()
    try:
        wait_for(lambda: segment_errors(runner, "delete") == 1)
        assert runner.queue.known() == 0 and runner.queue.held() == [name]
        assert os.listdir(spool_dir / "ready") == [name]
        clock.offset += 31
        runner.queue.scan()
        wait_for(lambda: os.listdir(spool_dir / "ready") == [])
        wait_for(lambda: runner.queue.known() == 0)
    finally:
        runner.stop()
    assert service.sent() == [f"evt-{i}" for i in range(5)]  # once: only the deletion retried
    assert runner.metrics.registry.get_sample_value(
        "cloudtrail_sink_segments_deleted_total") == 1
    # Its wait in the spool is one observation, not one per deletion attempt.
    assert runner.metrics.registry.get_sample_value(
        "cloudtrail_sink_spool_wait_seconds_count") == 1


def test_drain_ends_with_exit_4_when_a_segment_cannot_be_deleted(tmp_path, monkeypatch):
    spool_dir = tmp_path / "spool"
    [name] = fill(spool_dir, [event(i) for i in range(5)])
    failing_deletes(monkeypatch, spool_dir / "ready", times=1000)
    assert run_in_thread(Runner(config(spool_dir), sender=Service())) == EXIT_INCOMPLETE
    assert os.listdir(spool_dir / "ready") == [name]


@pytest.mark.parametrize("arn", [
    "arn:aws:cloudtrail:us-east-1:123456789012:channel/demo",
    "arn:aws:cloudtrail:us-east-1:123456789012:channel/0b9a1c0e-5d33-4a5f-9f55-3c7a1a2b3c4",
    "arn:aws:cloudtrail:us-east-1:123456789012:channel/0b9a1c0e/5d33-4a5f-9f55-3c7a1a2b3c4d",
])
def test_a_channel_arn_the_service_would_refuse_is_refused_at_start(tmp_path, capsys, arn):
    from cloudtrail_sink.cli import main

    assert main(["run", "--spool-dir", str(tmp_path / "spool"), "--channel-arn", arn,
                 "--listen", ""]) == 2
    err = capsys.readouterr().err
    assert arn in err and "channel/UUID" in err
    assert not (tmp_path / "spool").exists()


def test_drain_timeout_ends_a_paused_drain_with_exit_4_and_deletes_nothing(tmp_path, emulator):
    spool_dir = tmp_path / "spool"
    names = fill(spool_dir, [event(i) for i in range(20)], max_events=10)
    before = {n: (spool_dir / "ready" / n).read_bytes() for n in names}
    runner = Runner(config(spool_dir, emulator.url, channel_arn=MISSING_CHANNEL_ARN,
                           drain_timeout=1.0))
    assert run_in_thread(runner) == EXIT_INCOMPLETE
    assert runner.pause.failures >= 1  # it was paused, not just slow
    after = {n: (spool_dir / "ready" / n).read_bytes() for n in os.listdir(spool_dir / "ready")}
    assert after == before and os.listdir(spool_dir / "failed") == []


def test_negative_drain_timeout_is_refused(tmp_path):
    from cloudtrail_sink.config import ConfigError

    with pytest.raises(ConfigError, match="--drain-timeout"):
        config(tmp_path, drain_timeout=-1)


def test_dry_run_touches_nothing_on_disk(tmp_path, capsys):
    import io

    spool_dir = tmp_path / "spool"
    names = fill(spool_dir, [event(i) for i in range(3)])
    tmp = spool_dir / "tmp"
    stale = tmp / "fb_1_abcdef-0000000007.open"
    stale.write_bytes(open(spool_dir / "ready" / names[0], "rb").read())
    leftover = tmp / "sink_1_abcdef-0000000001.dlq"
    leftover.write_text("{}\n")
    for p in (stale, leftover):
        os.utime(p, (1, 1))
    listing = {d: sorted(os.listdir(spool_dir / d)) for d in spool.FOLDERS}
    out = io.StringIO()
    assert run_in_thread(Runner(config(spool_dir, dry_run=True), out=out)) == 0
    assert {d: sorted(os.listdir(spool_dir / d)) for d in spool.FOLDERS} == listing
    assert not (spool_dir / "sink.lock").exists()
    assert sum(len(json.loads(line)["auditEvents"]) for line in out.getvalue().splitlines()) == 3

    missing = tmp_path / "nothing-here"
    assert run_in_thread(Runner(config(missing, dry_run=True), out=io.StringIO())) == 0
    assert not missing.exists()


def test_dry_run_without_channel_arn_reports_only_real_problems(tmp_path, capsys):
    import io

    spool_dir = tmp_path / "spool"
    fill(spool_dir, [event(i) for i in range(3)] + [event("late", eventTime="yesterday")])
    out = io.StringIO()
    cfg = SinkConfig(spool_dir=str(spool_dir), listen="", dry_run=True).validate()
    assert run_in_thread(Runner(cfg, out=out)) == 0
    [request] = [json.loads(line) for line in out.getvalue().splitlines()]
    assert request["channelArn"] is None
    assert [json.loads(e["eventData"])["UID"] for e in request["auditEvents"]] == [
        "evt-0", "evt-1", "evt-2"]
    err = capsys.readouterr().err
    [would_fail] = [json.loads(line) for line in err.splitlines() if '"wouldFail"' in line]
    assert would_fail["id"] == "evt-late" and "eventTime" in would_fail["errorMessage"]
    assert "recipientAccountId" not in would_fail["errorMessage"]


class BlockingClient:
    """A boto3-like client whose calls wait until released; records close()."""

    def __init__(self):
        self.entered = threading.Event()
        self.release = threading.Event()
        self.closed = False

    def put_audit_events(self, auditEvents, channelArn, **kw):
        self.entered.set()
        self.release.wait(30)
        return {"successful": [{"id": e["id"]} for e in auditEvents], "failed": []}

    def close(self):
        self.closed = True


def test_a_request_outliving_the_grace_period_deletes_nothing_after_stop(tmp_path, monkeypatch):
    from cloudtrail_sink.delivery import coordinator as runner_mod

    spool_dir = tmp_path / "spool"
    [name] = fill(spool_dir, [event(i) for i in range(5)])
    client = BlockingClient()
    monkeypatch.setattr(runner_mod, "make_client", lambda *a, **kw: client)
    runner = Runner(config(spool_dir, drain=False, grace_seconds=0.2, max_in_flight=1))
    runner.start()
    try:
        assert client.entered.wait(20)
        runner.stop()  # the request is still in flight when the grace period ends
        assert client.closed
        fd = acquire_lock(spool.layout(spool_dir))  # the lock is free for the next sink
        os.close(fd)
    finally:
        client.release.set()
    for t in list(runner._threads):
        t.join(10)
    # Acknowledged after the stop: the segment stays for the next sink (at least once).
    assert os.listdir(spool_dir / "ready") == [name]


def test_ignored_names_are_remembered_within_a_bound(tmp_path, monkeypatch):
    monkeypatch.setattr(watcher, "MAX_IGNORED", 5)
    lay = spool.ensure_layout(tmp_path)
    reported = []
    q = watcher.SegmentQueue(lay, on_ignored=lambda name, why: reported.append(name))
    for i in range(12):
        q.ignore(f"junk-{i}", "test")
        q.ignore(f"junk-{i}", "test")  # reported once while remembered
        assert len(q._ignored) <= 5
    assert reported == [f"junk-{i}" for i in range(12)]


class FlakyCounter:
    """Stands in for a metric whose first ``inc`` raises: an unexpected error after the sink
    settled the request's events."""

    def __init__(self, real):
        self.real = real
        self.raised = 0

    def inc(self, *a):
        if not self.raised:
            self.raised += 1
            raise RuntimeError("unexpected")
        return self.real.inc(*a)


def test_an_unexpected_error_after_settling_retries_only_unsettled_events(tmp_path):
    spool_dir = tmp_path / "spool"
    fill(spool_dir, [event(i) for i in range(6)] + [event("dup"), event("dup")])

    class Throttling(Service):
        def send(self, entries):
            super().send(entries)
            throttled = {e["id"] for e in entries
                         if json.loads(e["eventData"])["UID"] == "evt-5"} if len(self.requests) == 1 else set()
            return Result({e["id"] for e in entries} - throttled,
                          [(i, "Throttling", "slow down") for i in throttled])

    service = Throttling()
    runner = Runner(config(spool_dir, max_batch_events=100, linger_ms=10_000), sender=service)
    runner.metrics.delivered = FlakyCounter(runner.metrics.delivered)
    assert run_in_thread(runner) == 0
    assert runner.metrics.delivered.raised == 1
    # The first request's accepted events were finalized before the error: never re-sent (a
    # second finalization could have deleted a segment early); the throttled one went back once.
    sent = service.sent()
    assert sent.count("evt-5") == 2 and sent.count("evt-dup") == 1
    assert sorted(set(sent)) == sorted([f"evt-{i}" for i in range(6)] + ["evt-dup"])
    assert len(sent) == 8
    assert os.listdir(spool_dir / "ready") == [] and runner.segments.pending == 0


def test_unsettled_regroups_the_copies_left_of_an_item():
    from cloudtrail_sink.batcher import Item
    from cloudtrail_sink.delivery.settle import unsettled

    a, a2, a3, b = (Item(None, None, None, None) for _ in range(4))
    a.aliases = [a2, a3]
    assert unsettled([a, b], set()) == [a, b] and a.aliases == [a2, a3]
    assert unsettled([a, b], {a, a2, a3}) == [b]
    [head] = unsettled([a, b], {a, b})
    assert head is a2 and a2.aliases == [a3]
