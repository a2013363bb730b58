"""How many requests the sink keeps in flight: up to ``--max-in-flight`` when requests wait on
the network, one when the endpoint answers at once (more threads would only take turns at the
interpreter lock, at a CPU cost per event; ``delivery/sending.py``)."""

from __future__ import annotations

import json
import threading

from cloudtrail_sink.delivery import sending
from cloudtrail_sink.sender import Result

from sinksupport import drain_config, event, fill, run_drain, wait_for


class Recorder:
    """Answers every event as accepted after ``hold`` (an Event to wait for, or None), noting
    which sender thread sent each request and the most requests outstanding at once."""

    def __init__(self, hold: threading.Event | None = None, slow_first: float = 0.0):
        self.hold = hold
        self.slow_first = slow_first
        self.lock = threading.Lock()
        self.threads: list[str] = []
        self.uids: list[str] = []
        self.outstanding = 0
        self.peak = 0

    def send(self, entries):
        with self.lock:
            self.threads.append(threading.current_thread().name)
            self.uids += [json.loads(e["eventData"])["UID"] for e in entries]
            self.outstanding += 1
            self.peak = max(self.peak, self.outstanding)
            first = len(self.threads) == 1
        try:
            if self.hold is not None:
                self.hold.wait(30)
            elif first and self.slow_first:
                threading.Event().wait(self.slow_first)
            return Result({e["id"] for e in entries}, [])
        finally:
            with self.lock:
                self.outstanding -= 1


def test_requests_waiting_on_the_network_fill_every_in_flight_slot(tmp_path):
    spool_dir = tmp_path / "spool"
    fill(spool_dir, [event(i) for i in range(1000)])
    release = threading.Event()
    service = Recorder(hold=release)
    done = threading.Thread(target=run_drain, args=(drain_config(
        spool_dir, max_in_flight=4, max_batch_events=100),), kwargs={"sender": service})
    done.start()
    try:
        # Each request stays outstanding: after HELP_AFTER the next worker sends too.
        wait_for(lambda: service.outstanding == 4)
        assert sorted(set(service.threads)) == [f"sink-sender-{k}" for k in range(4)]
    finally:
        release.set()
        done.join(60)
    assert sorted(service.uids) == sorted(f"evt-{i}" for i in range(1000))
    assert service.peak == 4


def test_an_endpoint_that_answers_at_once_gets_one_request_at_a_time(tmp_path, monkeypatch):
    # HELP_AFTER far above what a request takes here, so a busy test machine cannot make a
    # request look slow.
    monkeypatch.setattr(sending, "HELP_AFTER", 600.0)
    spool_dir = tmp_path / "spool"
    fill(spool_dir, [event(i) for i in range(2000)])
    service = Recorder()
    runner = run_drain(drain_config(spool_dir, max_in_flight=4, max_batch_events=100,
                                    grace_seconds=600), sender=service)
    assert sorted(service.uids) == sorted(f"evt-{i}" for i in range(2000))
    assert set(service.threads) == {"sink-sender-0"} and service.peak == 1
    # The workers that waited for a turn that never came were woken by the stop: none is
    # left waiting (the drain would otherwise have waited out the grace period).
    assert runner._threads == []


def test_one_slow_request_lets_the_next_worker_send_meanwhile(tmp_path, monkeypatch):
    monkeypatch.setattr(sending, "HELP_AFTER", 0.05)
    spool_dir = tmp_path / "spool"
    fill(spool_dir, [event(i) for i in range(1000)])
    service = Recorder(slow_first=3.0)  # worker 0's first request takes 3 s
    run_drain(drain_config(spool_dir, max_in_flight=4, max_batch_events=100), sender=service)
    assert sorted(service.uids) == sorted(f"evt-{i}" for i in range(1000))
    # The other requests went while the first was outstanding, through worker 1 (worker 2
    # waits for workers 0 and 1 both to be slow, which worker 1 is only on a busy machine).
    assert service.threads[0] == "sink-sender-0"
    assert "sink-sender-1" in service.threads[1:]
    assert service.peak >= 2
