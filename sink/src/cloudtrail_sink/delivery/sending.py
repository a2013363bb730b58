"""A sender worker's loop: take a batch, wait out a delivery pause, send it, settle the answer.

- :meth:`Sending.worker` is the body of each of the ``max_in_flight`` sender threads. It takes
  due batches from the batcher (which applies the linger and the pacing) until the batcher is
  closed or ``stop`` is set, and never takes or sends a batch while delivery is paused.
- Each request's answer, a ``Result`` or the ``RequestFailed`` the sender raised, goes to
  :meth:`settle.Settler.settle` exactly once (which tells the pacer, then settles every event).
- An unexpected exception while sending or settling is logged and the batch's unsettled events
  are retried after a backoff (:func:`settle.unsettled`): no event is lost or settled twice.
- ``last_success`` is the monotonic time of the last request the service answered with 200
  (readiness).
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable

from ..sender import RequestFailed
from .settle import unsettled

log = logging.getLogger("cloudtrail_sink.runner")


class Sending:
    def __init__(self, *, sender: Any, batcher, settler, pause, jitter, metrics,
                 stop: threading.Event, monotonic: Callable[[], float]):
        self.sender = sender
        self.batcher = batcher
        self.settler = settler
        self.pause = pause
        self.jitter = jitter
        self.metrics = metrics
        self._stop = stop
        self.monotonic = monotonic
        self.last_success: float | None = None

    def _wait_pause(self) -> bool:
        while True:
            remaining = self.pause.remaining()
            if remaining <= 0:
                return not self._stop.is_set()
            if self._stop.wait(remaining):
                return False

    def worker(self) -> None:
        while self._wait_pause():
            batch = self.batcher.take()
            if batch is None:
                return
            if not self._wait_pause():
                return
            settled: set = set()
            try:
                self._send(batch, settled)
            except Exception:
                rest = unsettled(batch, settled)
                log.exception("unexpected error handling a request; its unsettled events will be "
                              "re-sent", extra={"events": len(batch), "unsettled": len(rest)})
                if rest:
                    self.batcher.retry(rest, self.jitter.delay(3))

    def _send(self, batch: list, settled: set) -> None:
        entries = [it.p.entry() for it in batch]
        started = self.monotonic()
        try:
            outcome = self.sender.send(entries)
        except RequestFailed as exc:
            outcome = exc
        self.metrics.latency.observe(self.monotonic() - started)
        if not isinstance(outcome, RequestFailed):
            self.last_success = self.monotonic()
        self.settler.settle(batch, outcome, settled)
