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

**In-flight requests grow with the latency, not by default.** Worker 0 always takes batches.
Worker ``k > 0`` takes one only while workers ``0 .. k-1`` each have a request outstanding for
at least :data:`HELP_AFTER` seconds (it waits until then, woken when the last of them starts a
request). Against a fast endpoint (a local emulator, a millisecond), where more threads only
take turns at the interpreter lock, one or two send. More requests at once would not deliver
more there, and each costs the sink CPU: threads waiting for the lock cost about 15 context
switches a request more (measured in ``docs/benchmarks.md``).

Against a slower one, each request a worker starts holds back the workers after it for
``HELP_AFTER``: with requests of ``L`` seconds about ``min(max_in_flight, 1 + L / HELP_AFTER)``
are outstanding (2 at 20 ms, 3 at 30 ms, 10 at 100 ms), so below ``max_in_flight / L`` the
sink starts about ``1 / HELP_AFTER`` requests a second: 100, the whole PutAuditEvents quota of
an account and region (a sink alone on it loses nothing the service would grant; an endpoint
without that quota, such as the emulator, gets no more). All ``max_in_flight`` at once need
requests slower than ``(max_in_flight - 1) * HELP_AFTER``, or held (a request that does not
return lets the next worker send after ``HELP_AFTER``). Measured in a model of this rule, not
a benchmark.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable

from ..sender import RequestFailed
from .settle import unsettled

log = logging.getLogger("cloudtrail_sink.runner")

HELP_AFTER = 0.01  # seconds a request is outstanding before the next worker may send too


class Sending:
    def __init__(self, *, sender: Any, batcher, settler, pause, jitter, metrics,
                 stop: threading.Event, monotonic: Callable[[], float], workers: int = 1,
                 help_after: float | None = None):
        self.sender = sender
        self.batcher = batcher
        self.settler = settler
        self.pause = pause
        self.jitter = jitter
        self.metrics = metrics
        self._stop = stop
        self.monotonic = monotonic
        self.last_success: float | None = None
        self.help_after = HELP_AFTER if help_after is None else help_after
        # When each worker's outstanding request started (None: none outstanding).
        self._busy: list[float | None] = [None] * workers
        # Worker k > 0 waits on _turns[k] for its turn (_wait_turn).
        self._turns = [threading.Condition() for _ in range(workers)]

    def close(self) -> None:
        """Wake every worker waiting for its turn, to see that ``stop`` is set."""
        for turn in self._turns:
            with turn:
                turn.notify_all()

    def _wait_pause(self) -> bool:
        while True:
            remaining = self.pause.remaining()
            if remaining <= 0:
                return not self._stop.is_set()
            if self._stop.wait(remaining):
                return False

    def _wait_turn(self, k: int) -> bool:
        """Worker ``k``: wait until workers ``0 .. k-1`` have each had a request outstanding
        for ``help_after`` seconds; False when stopping."""
        turn = self._turns[k]
        with turn:
            while not self._stop.is_set():
                starts = self._busy[:k]
                if None in starts:
                    turn.wait()  # woken by _started, or by close()
                    continue
                left = max(starts) + self.help_after - self.monotonic()
                if left <= 0:
                    return True
                turn.wait(left)
            return False

    def _started(self, k: int) -> None:
        """Worker ``k`` started a request: wake each later worker whose turn may now come (all
        workers before it are busy), and no other (a wake-up is a context switch)."""
        busy = self._busy
        for m in range(k + 1, len(busy)):
            if None in busy[:m]:
                return
            with self._turns[m]:
                self._turns[m].notify()

    def worker(self, k: int = 0) -> None:
        """The loop of sender worker ``k`` (``0 <= k < workers``)."""
        while self._wait_pause():
            if k and not self._wait_turn(k):
                return
            batch = self.batcher.take()
            if batch is None:
                return
            if not self._wait_pause():
                return
            settled: set = set()
            self._busy[k] = self.monotonic()
            self._started(k)
            try:
                self._send(batch, settled)
            except Exception:
                rest = unsettled(batch, settled)
                log.exception("unexpected error handling a request; its unsettled events will be "
                              "re-sent", extra={"events": len(batch), "unsettled": len(rest)})
                if rest:
                    self.batcher.retry(rest, self.jitter.delay(3))
            finally:
                self._busy[k] = None

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
