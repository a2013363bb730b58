"""Delivery through the emulator (and a scripted service where the emulator cannot fail on cue):
nothing lost, only failures re-sent, permanent failures dead-lettered and replayable, limits
kept, corrupt segments quarantined, configuration errors pause without deleting."""

from __future__ import annotations

import collections
import json
import os
import threading
import urllib.error
import urllib.request

import msgpack
import pytest

from cloudtrail_sink.config import SinkConfig
from cloudtrail_sink.emulator import Faults
from cloudtrail_sink.delivery.coordinator import Runner
from cloudtrail_sink.sender import RequestFailed, Result

from sinksupport import (CHANNEL_ARN, MISSING_CHANNEL_ARN, drain_config as config, event,
                         failed_lines, fill, run_drain, stored_uids, uids_in_segment, wait_for)


def metric(runner, name, labels=None):
    return runner.metrics.registry.get_sample_value("cloudtrail_sink_" + name, labels or {})


def test_delivers_every_event_once_and_deletes_segments(tmp_path, emulator):
    spool_dir = tmp_path / "spool"
    fill(spool_dir, [event(i, pad=300) for i in range(1050)], max_events=170)
    # A long linger: batches go out full; the drain flushes the last partial one.
    runner = run_drain(config(spool_dir, emulator.url, linger_ms=10_000))
    stored = collections.Counter(stored_uids(emulator))
    assert stored == collections.Counter(f"evt-{i}" for i in range(1050))
    assert os.listdir(spool_dir / "ready") == [] and os.listdir(spool_dir / "failed") == []
    assert metric(runner, "events_delivered_total") == 1050
    assert metric(runner, "segments_deleted_total") == 7
    # Full batches: 1050 events in 11 calls (10 x 100 + 50), never more than 100 per call.
    assert emulator.stats()["requests"] == {"ok": 11}
    assert metric(runner, "batch_events_bucket", {"le": "99.0"}) == 1


def test_only_failed_events_are_resent(tmp_path, emulator):
    emulator.set_faults(Faults(event_throttling_rate=0.3, event_internal_failure_rate=0.1))
    spool_dir = tmp_path / "spool"
    fill(spool_dir, [event(i) for i in range(600)])
    runner = run_drain(config(spool_dir, emulator.url))
    stored = collections.Counter(stored_uids(emulator))
    # Every event exactly once: a whole-batch re-send would have stored the accepted ones twice.
    assert stored == collections.Counter(f"evt-{i}" for i in range(600))
    retried = (metric(runner, "events_retried_total", {"code": "Throttling"})
               + metric(runner, "events_retried_total", {"code": "InternalFailure"}))
    assert retried == sum(emulator.stats()["failed"].values()) > 100
    assert os.listdir(spool_dir / "ready") == []


def test_request_level_throttling_and_5xx_are_retried_without_loss(tmp_path, emulator):
    emulator.set_faults(Faults(throttle_rate=0.4, error_5xx_rate=0.2))
    spool_dir = tmp_path / "spool"
    fill(spool_dir, [event(i) for i in range(500)])
    runner = run_drain(config(spool_dir, emulator.url, retry_mode="standard", max_attempts=1))
    assert set(stored_uids(emulator)) == {f"evt-{i}" for i in range(500)}
    assert metric(runner, "requests_total", {"outcome": "retry"}) >= 1
    assert os.listdir(spool_dir / "ready") == []


class ScriptedService:
    """A PutAuditEvents stand-in: refuses chosen ids with chosen codes, records every request."""

    def __init__(self, per_event=None, poison=None):
        self.per_event = per_event or {}
        self.poison = poison
        self.requests: list[list[dict]] = []
        self.lock = threading.Lock()

    def send(self, entries):
        with self.lock:
            self.requests.append(entries)
        if self.poison and any(e["id"] == self.poison for e in entries):
            raise RequestFailed("split", "ValidationException", "1 validation error", 400)
        failed = [(e["id"], *self.per_event[e["id"]]) for e in entries if e["id"] in self.per_event]
        return Result({e["id"] for e in entries} - {f[0] for f in failed}, failed)


def test_permanent_failures_land_in_failed_and_can_be_replayed(tmp_path, emulator, capsys):
    spool_dir = tmp_path / "spool"
    segs = fill(spool_dir, [event(i) for i in range(20)] + [
        event("badtime", eventTime="yesterday")])
    service = ScriptedService({"evt-3": ("AccountNotSubscribed", "the account is not subscribed"),
                               "evt-7": ("InvalidEventSource", "not allowed")})
    runner = run_drain(config(spool_dir), sender=service)
    lines = {line["id"]: line for line in failed_lines(spool_dir)}
    assert set(lines) == {"evt-3", "evt-7", "evt-badtime"}
    assert lines["evt-3"]["errorCode"] == "AccountNotSubscribed"
    assert lines["evt-3"]["errorMessage"] == "the account is not subscribed"
    assert lines["evt-3"]["segment"] == segs[0] and lines["evt-3"]["tag"] == "test"
    assert lines["evt-3"]["eventData"]["UID"] == "evt-3"
    assert lines["evt-badtime"]["errorCode"] == "InvalidData"
    assert lines["evt-badtime"]["errorMessage"].startswith("sink: eventTime")
    # The pre-send check spent no API call on the bad event.
    assert all(e["id"] != "evt-badtime" for req in service.requests for e in req)
    assert sum(len(r) for r in service.requests) == 20
    assert os.listdir(spool_dir / "ready") == []
    assert metric(runner, "events_failed_total", {"code": "AccountNotSubscribed"}) == 1

    # The cause is fixed (here: the real endpoint accepts them): replay only those two codes.
    from cloudtrail_sink.cli import main

    assert main(["failed", "list", "--spool-dir", str(spool_dir)]) == 0
    listed = capsys.readouterr()
    assert "AccountNotSubscribed\tevt-3" in listed.out and "failed events: 3" in listed.err
    assert "Login" not in listed.out  # no payloads in the listing
    assert main(["failed", "replay", "--spool-dir", str(spool_dir), "--code",
                 "AccountNotSubscribed", "--code", "InvalidEventSource"]) == 0
    assert {line["id"] for line in failed_lines(spool_dir)} == {"evt-badtime"}
    [replayed] = os.listdir(spool_dir / "ready")
    assert "-replay_" in replayed
    run_drain(config(spool_dir, emulator.url))
    assert sorted(stored_uids(emulator)) == ["evt-3", "evt-7"]


def test_a_request_refused_as_invalid_is_split_down_to_the_culprit(tmp_path):
    spool_dir = tmp_path / "spool"
    fill(spool_dir, [event(i) for i in range(40)])
    service = ScriptedService(poison="evt-13")
    run_drain(config(spool_dir), sender=service)
    [line] = failed_lines(spool_dir)
    assert line["id"] == "evt-13" and line["errorCode"] == "ValidationException"
    delivered = {e["id"] for req in service.requests for e in req} - {"evt-13"}
    assert delivered == {f"evt-{i}" for i in range(40)} - {"evt-13"}
    assert os.listdir(spool_dir / "ready") == []


def test_limits_hold_and_duplicate_ids_never_share_a_request(tmp_path):
    spool_dir = tmp_path / "spool"
    records = [event(i, pad=20_000) for i in range(150)]
    records += [event("dup"), event("dup"), event("dup", eventName="Other"), event("dup")]
    records += [event(i) for i in range(150, 400)]
    fill(spool_dir, records, max_events=64)
    service = ScriptedService()
    cfg = config(spool_dir, max_request_bytes=200_000)
    run_drain(cfg, sender=service)
    from cloudtrail_sink import events

    for req in service.requests:
        ids = [e["id"] for e in req]
        assert len(ids) <= 100 and len(ids) == len(set(ids))
        body = json.dumps({"auditEvents": req})  # what botocore puts on the wire
        assert len(body.encode()) <= 200_000
        assert events.request_size([events.entry_size(e["id"], e["eventData"],
                                                      e["eventDataChecksum"]) for e in req]) \
            == len(body.encode())
    sent = collections.Counter(e["id"] for req in service.requests for e in req)
    assert sent["evt-dup"] == 2  # the identical copies once, the different one separately
    assert len(sent) == 401
    assert os.listdir(spool_dir / "ready") == []


def test_corrupt_and_truncated_segments_are_quarantined_and_the_rest_flows(tmp_path, emulator):
    spool_dir = tmp_path / "spool"
    [corrupt] = fill(spool_dir, [event(i) for i in range(5)])
    [truncated] = fill(spool_dir, [event(i) for i in range(5, 10)])
    fill(spool_dir, [event(i) for i in range(10, 15)])
    ready = spool_dir / "ready"
    good = (ready / corrupt).read_bytes()
    corrupted = good + b"\xc1garbage" + msgpack.packb({"eventData": event(99)})
    (ready / corrupt).write_bytes(corrupted)
    cut = (ready / truncated).read_bytes()
    (ready / truncated).write_bytes(cut[:-10])
    run_drain(config(spool_dir, emulator.url))
    # The record after the garbage is found again and delivered: the garbage blocks nothing.
    assert sorted(stored_uids(emulator)) == sorted(f"evt-{i}" for i in [*range(15), 99] if i != 9)
    assert os.listdir(ready) == []
    q = spool_dir / "quarantine"
    entry = f"{corrupt}.{len(good):012d}"
    assert (q / entry).read_bytes() == b"\xc1garbage"
    reason = json.loads((q / f"{entry}.reason.json").read_text())
    assert reason["offset"] == len(good) and reason["recordsBefore"] == 5
    assert reason["end"] == len(good) + len(b"\xc1garbage")
    assert reason["segment"] == corrupt and reason["size"] == len(corrupted)
    treason = json.loads((q / f"{truncated}.reason.json").read_text())
    assert "truncated" in treason["error"] and treason["recordsBefore"] == 4


def test_missing_channel_pauses_delivery_and_deletes_nothing(tmp_path, emulator):
    spool_dir = tmp_path / "spool"
    names = fill(spool_dir, [event(i) for i in range(30)], max_events=10)
    before = {n: (spool_dir / "ready" / n).read_bytes() for n in names}
    runner = Runner(config(spool_dir, emulator.url, channel_arn=MISSING_CHANNEL_ARN, drain=False,
                           listen="127.0.0.1:0"))
    runner.start()
    try:
        wait_for(lambda: metric(runner, "delivery_paused") == 1)
        base = f"http://{runner.http.host}:{runner.http.port}"
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(base + "/readyz", timeout=5)
        assert err.value.code == 503 and "ChannelNotFound" in err.value.read().decode()
        with urllib.request.urlopen(base + "/healthz", timeout=5) as resp:
            assert resp.status == 200  # paused is not dead: a restart would not help
        with urllib.request.urlopen(base + "/metrics", timeout=5) as resp:
            text = resp.read().decode()
        assert 'cloudtrail_sink_requests_total{outcome="pause"}' in text
        assert "cloudtrail_sink_backlog_segments 3.0" in text
    finally:
        runner.stop()
    after = {n: (spool_dir / "ready" / n).read_bytes() for n in os.listdir(spool_dir / "ready")}
    assert after == before
    assert os.listdir(spool_dir / "failed") == [] and stored_uids(emulator) == []
    run_drain(config(spool_dir, emulator.url))  # the right channel: everything goes
    assert len(stored_uids(emulator)) == 30


def test_a_symlinked_segment_is_never_shipped(tmp_path, emulator):
    spool_dir = tmp_path / "spool"
    fill(spool_dir, [event(1)])
    secret = tmp_path / "shadow"
    secret.write_bytes(msgpack.packb({"eventData": event("secret")}))
    link = spool_dir / "ready" / "0000000000000001-evil_1_x-0000000001.seg"
    link.symlink_to(secret)
    (spool_dir / "ready" / "notes.txt").write_text("not a segment")
    runner = run_drain(config(spool_dir, emulator.url))
    assert stored_uids(emulator) == ["evt-1"]
    assert sorted(os.listdir(spool_dir / "ready")) == sorted([link.name, "notes.txt"])
    assert metric(runner, "ignored_files_total") == 2


def test_stale_tmp_files_of_a_vanished_writer_are_published(tmp_path, emulator):
    spool_dir = tmp_path / "spool"
    fill(spool_dir, [])
    stale = spool_dir / "tmp" / "fb_1_abcdef-0000000007.open"
    stale.write_bytes(msgpack.packb({"eventData": event("stale"), "tag": "t", "time": 1.0}))
    os.utime(stale, (1, 1))
    fresh = spool_dir / "tmp" / "fb_2_abcdef-0000000001.open"
    fresh.write_bytes(b"")
    run_drain(config(spool_dir, emulator.url))
    assert stored_uids(emulator) == ["evt-stale"]
    assert os.listdir(spool_dir / "tmp") == [fresh.name]  # a live writer's file is left alone


def test_dry_run_prints_requests_and_changes_nothing(tmp_path, capsys):
    spool_dir = tmp_path / "spool"
    names = fill(spool_dir, [event(i) for i in range(150)] + [event("bad", eventTime="x")])
    import io

    out = io.StringIO()
    run_drain(config(spool_dir, dry_run=True), out=out)
    requests = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [len(r["auditEvents"]) for r in requests] == [100, 50]
    assert requests[0]["channelArn"] == CHANNEL_ARN
    assert json.loads(requests[0]["auditEvents"][0]["eventData"])["UID"] == "evt-0"
    assert sorted(os.listdir(spool_dir / "ready")) == sorted(names)
    assert os.listdir(spool_dir / "failed") == []
    assert '"wouldFail": "InvalidData"' in capsys.readouterr().err


def test_memory_stays_bounded_by_the_pending_limit(tmp_path):
    spool_dir = tmp_path / "spool"
    fill(spool_dir, [event(i) for i in range(3000)])
    peak = 0

    class Slow(ScriptedService):
        def send(self, entries):
            nonlocal peak
            peak = max(peak, runner.segments.pending)
            return super().send(entries)

    runner = Runner(config(spool_dir, max_pending_events=250, max_in_flight=2, linger_ms=10_000),
                    sender=Slow())
    runner.run()
    assert os.listdir(spool_dir / "ready") == []
    assert 100 <= peak <= 250


def test_requests_near_the_size_limit_are_accepted_by_the_emulator(tmp_path, emulator):
    spool_dir = tmp_path / "spool"
    big = {"blob": 'q"' * 33_000}  # escaped twice on the wire: 4 bytes per 2 characters
    fill(spool_dir, [event(i, requestParameters=big, responseElements=big) for i in range(12)])
    runner = run_drain(config(spool_dir, emulator.url, linger_ms=10_000))
    assert sorted(stored_uids(emulator)) == sorted(f"evt-{i}" for i in range(12))
    assert emulator.stats()["requests"] == {"ok": 4}  # 3 per request fit in 999,000 bytes
    assert metric(runner, "requests_total", {"outcome": "split"}) == 0


def test_healthz_fails_when_events_are_stuck_and_not_while_paused(tmp_path):
    now = [1000.0]
    runner = Runner(config(tmp_path / "spool", stuck_seconds=60), sender=ScriptedService(),
                    monotonic=lambda: now[0])
    seg, _ = runner.segments.open("s", "/nonexistent")
    runner.segments.add(seg, 5)
    assert runner.health()[0]
    now[0] += 61
    ok, info = runner.health()
    assert not ok and info["pending_events"] == 5 and info["seconds_since_progress"] == 61
    runner.pause.fail("ChannelNotFound: x")
    assert runner.health()[0]  # paused for a configuration error: not a reason to restart
    assert not runner.ready()[0]
    runner.pause.succeed()
    runner.segments.accepted(seg, [0, 1, 2, 3, 4])
    assert runner.health()[0] and runner.ready()[0]


def test_a_symlink_appearing_while_running_is_ignored_and_does_not_block_the_drain(tmp_path,
                                                                                 emulator):
    spool_dir = tmp_path / "spool"
    fill(spool_dir, [])
    secret = tmp_path / "shadow"
    secret.write_bytes(msgpack.packb({"eventData": event("secret")}))
    runner = Runner(config(spool_dir, emulator.url, drain=False))
    runner.start()
    try:
        link = spool_dir / "ready" / "0000000000000001-evil_1_x-0000000001.seg"
        link.symlink_to(secret)  # seen through inotify, not by the start-up scan
        fill(spool_dir, [event(1)])
        wait_for(lambda: metric(runner, "ignored_files_total") == 1)
        wait_for(lambda: stored_uids(emulator) == ["evt-1"])
        wait_for(runner.drained)
    finally:
        runner.stop()
    assert link.is_symlink() and stored_uids(emulator) == ["evt-1"]


def test_without_inotify_the_sink_falls_back_to_polling(tmp_path, emulator, monkeypatch):
    from cloudtrail_sink import watcher

    def no_inotify(self):
        raise OSError(28, "inotify watch limit reached")

    monkeypatch.setattr(watcher.Watcher, "_start_observer", no_inotify)
    spool_dir = tmp_path / "spool"
    fill(spool_dir, [])
    runner = Runner(config(spool_dir, emulator.url, drain=False, poll_seconds=0.1))
    runner.start()
    try:
        assert runner.watcher.poll
        fill(spool_dir, [event("late")])
        wait_for(lambda: stored_uids(emulator) == ["evt-late"])
    finally:
        runner.stop()
