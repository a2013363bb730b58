"""Throttle-aware pacing of PutAuditEvents calls: fewer, fuller calls while the service throttles.

One :class:`Pacer` per sink decides when the :class:`~cloudtrail_sink.batcher.Batcher` may hand
out the next batch. It knows nothing of other sinks: many sinks sharing one account's quota
(100 calls/s per account and region) converge on their own, from what the service answers.

State: the *pacing interval* ``I`` in seconds, ``0 <= I <= max_delay`` (``0``: not paced).

The gate (:meth:`Pacer.wait`), for the call about to be formed at time ``now``:

- a **full** batch (``max_events`` events or ``max_bytes``; also a flush for drain/shutdown and
  a batch re-formed after a split) waits only for the ceiling (below), never for ``I``;
- a batch that is **not full** waits until ``last_call + I * j``, where ``last_call`` is when
  the previous call was handed out and ``j`` is drawn uniformly from ``[1 - JITTER, 1 + JITTER]``
  once per call (so sinks do not fall into step); when ``I * (1 + JITTER)`` exceeds
  ``max_delay``, the wait is ``max_delay * (1 - JITTER * u)`` instead, with ``u`` uniform in
  ``[0, 1]`` (drawn with ``j``): spread over the top half of the maximum, never clipped to it.
  A clipped wait sent half of the sinks throttled in the same second back exactly ``max_delay``
  later, together, with full batches (a second wave); a wait scaled down to fit the maximum
  made sinks at the maximum call a third more often than it allows (more throttles in the
  seeded simulation, ``docs/benchmarks.md``);
- with a **ceiling** ``max_calls_per_second = M > 0``, every call (full or not) waits until
  ``last_call + 1/M``: at most ``M`` calls per second, always.

So pacing adds at most ``max_delay`` seconds to an event (plus ``1/M`` with a ceiling, and at
most ``LINGER_JITTER_MAX`` from the linger drawn per batch, below), and a batch that is full is
never held for the interval: under load the sink sends full calls at once.

**Retries after a throttle** (``delivery/settle.py``): the events of a throttled answer go back
to the Batcher due no earlier than ``wait(now, full=False)`` at the answer (the gate above,
with ``I`` already increased), or after their backoff if later, full or not: a sink whose
backlog makes full batches retries them once per interval instead of on the backoff alone
(0.1 s, doubling), which let throttled full batches feed each other. Not while the Batcher
flushes (drain, shutdown): those never wait for ``I``.

The control law (:meth:`Pacer.on_response`, one signal per answer: a request-level
``ThrottlingException`` or a 200 whose ``failed[]`` holds per-event ``Throttling`` is
*throttled*; any other answer is not):

- **Multiplicative increase of the interval on throttling**:
  ``I <- min(max_delay, max(INCREASE * I, INCREASE * gap, MIN_START))`` (3x, at least 8 s),
  where ``gap`` is a moving average of the time between this sink's recent calls: the sink's
  actual call rate drops to a third or less, even when it was calling less often than ``I``
  allowed. Throttled answers within ``HOLD`` seconds (or ``I / 2`` when larger) of an increase
  are calls formed before it took effect: they do not increase it again (the metrics still
  count them). Throttled attempts botocore
  retries inside one call count too (:func:`hear_retried_throttles`).
- **Gradual return when throttling stops**: between throttles the allowed call rate ``r = 1/I``
  grows as ``dr/dt = ADDITIVE + PROPORTIONAL * r``, multiplied by ``2 ** ((quiet - QUIET) /
  QUIET_DOUBLING)`` once the sink has gone ``quiet > QUIET`` seconds without a throttle (probing
  faster when it is probably alone). ``I`` below ``FREE_BELOW`` becomes 0 (not paced).
  Bound: with no throttling, ``I`` falls from ``max_delay`` to 0 within
  :func:`recovery_seconds` (171 s from the default 10 s; 187 s for any maximum up to an
  hour). A sink never throttled is never paced. The growth is slow on purpose: a sink at the
  maximum can slow down no further when throttled, so a growth faster than the throttles can
  take back keeps the quota overrun (twice this growth gave a sixth more throttled calls in
  the per-node benchmark, ``docs/benchmarks.md``).

Why it shares a quota fairly with no coordinator: the service throttles calls, so a sink that
calls more often is throttled more often and its interval grows more; the additive part of the
increase is the same for every sink, so the shares of sinks that see the same congestion close
in on each other (Chiu and Jain, 1989: AIMD on the rate). The slow increase near a recent
throttle keeps the share of throttled calls small (one throttle per sink and increase cycle).

Why the linger is jittered (``LINGER_JITTER``, applied by the Batcher while pacing is on): the
fairness above needs throttles to fall on the sinks that call most. A sink fed one segment a
second (the Lua filter's age seal) with a fixed linger calls at the same instant of every
second; a token bucket quota (the emulator's; AWS documents token buckets for other APIs' rate
limits, e.g. EC2's, not for this one) then holds a token for that instant every second and
refuses the calls that arrive out of step, which are the paced sinks' (their waits are drawn),
again and again, while the unpaced sinks keep the quota and learn of it late or never (the
seeded simulation of the benchmark's case, 100 seeds: three quarters of the throttles after the
start-up hit sinks throttled before). A linger drawn again for every batch, ``linger * U(1 - J,
1 + J)`` with ``J = linger_jitter(linger, max_delay)`` (``LINGER_JITTER``, but a batch moves by
``LINGER_JITTER_MAX`` at most, so that a long linger a user set keeps its meaning), moves each
sink's calls within the second, so the throttles fall on the sinks in proportion to how often
they call: in the same simulation (seeds 0-99) the throttles after the first 5 s fell by 41 %
(75 % of those after 15 s), the mean throttled share from 7.9 % to 7.1 % and the worst seed's
from 12.6 % to 8.9 %. A lone sink's events wait at most ``LINGER_JITTER_MAX`` longer, and a
little longer on average (a longer draw holds more events): p50 139 ms and p99 300 ms against
107 and 207 ms in the latency benchmark, far within its 1.5 s. With pacing off the linger is
exact.

What it cannot avoid: a sink learns of the quota only from its own throttled calls, so when
``n`` unpaced sinks start at once against ``Q`` calls/s, about ``n - Q`` of them are throttled in
the first seconds, and the sinks not throttled then keep calling unpaced until their own first
throttle. In the benchmark's case (40 sinks, 10 calls/s, 60 s) that start-up is one to two
throttled calls per sink, most of the run's throttled share (other first reactions, holds,
returns and jitters tried against it: ``docs/benchmarks.md``).

Time (``clock``) and randomness (``rand``) are injected; methods take ``now`` so the Batcher and
the settler pass the time they already read. Thread-safe.
"""

from __future__ import annotations

import math
import random
import threading
import time
from typing import Callable

JITTER = 0.5  # each not-full call waits I * U(1 - JITTER, 1 + JITTER), within the maximum
LINGER_JITTER = 0.5  # with pacing on, each batch lingers linger * U(1 - LJ, 1 + LJ) (batcher.py)...
LINGER_JITTER_MAX = 0.1  # ...but moves by at most this many seconds either way
MIN_START = 8.0  # seconds: the interval set by the first throttle of an unpaced sink, at least
INCREASE = 3.0  # the factor of a counted throttle
HOLD = 1.0  # seconds after an increase in which further throttles are not counted
ADDITIVE = 0.0005  # calls/s per second: the fair part of the rate's growth
PROPORTIONAL = 0.0015  # per second: the scale-free part (the rate grows 0.15% a second)
QUIET = 60.0  # seconds without throttling after which the growth speeds up
QUIET_DOUBLING = 15.0  # ...doubling every this many more quiet seconds
FREE_BELOW = 0.05  # seconds: a shorter interval is no pacing at all
GAP_WEIGHT = 0.3  # weight of the newest inter-call gap in the moving average

# Request-level codes that mean "too many calls" (botocore's throttling codes that can come back
# from PutAuditEvents; 5xx codes are not a rate signal). Per-event, the service says "Throttling".
THROTTLING_CODES = frozenset({"ThrottlingException", "Throttling", "TooManyRequestsException",
                              "RequestLimitExceeded", "SlowDown"})
EVENT_THROTTLING = "Throttling"


def linger_jitter(linger: float, max_delay: float) -> float:
    """The Batcher's ``linger_jitter`` (a fraction of ``linger``) for a sink lingering ``linger``
    seconds with a pacing maximum of ``max_delay``: ``LINGER_JITTER``, or less when that would
    move a batch by more than ``LINGER_JITTER_MAX`` seconds; 0 (an exact linger) with pacing off."""
    if max_delay <= 0.0 or linger <= 0.0:
        return 0.0
    return min(LINGER_JITTER, LINGER_JITTER_MAX / linger)


def recovery_seconds(max_delay: float) -> float:
    """Upper bound on the time ``I`` takes from ``max_delay`` to 0 with no throttling, in whole
    seconds: the law stepped every 0.1 s with the speed-up of each step's start and without the
    additive part (the pacer applies the speed-up of a step's end, and the additive part only
    adds growth, so it is never slower)."""
    if max_delay <= FREE_BELOW:
        return 0.0
    r, s, target, step = 1.0 / max_delay, 0.0, 1.0 / FREE_BELOW, 0.1
    while r < target:
        r *= math.exp(PROPORTIONAL * _speedup(s) * step)
        s += step
    return float(math.ceil(s))


def _speedup(quiet: float) -> float:
    return 2.0 ** ((quiet - QUIET) / QUIET_DOUBLING) if quiet > QUIET else 1.0


class Pacer:
    """Decides how long the next PutAuditEvents call waits; see the module docstring."""

    def __init__(self, max_delay: float = 10.0, max_calls_per_second: float = 0.0,
                 clock: Callable[[], float] = time.monotonic,
                 rand: random.Random | None = None):
        if max_delay < 0:
            raise ValueError("max_delay must not be negative")
        if max_calls_per_second < 0:
            raise ValueError("max_calls_per_second must not be negative")
        self.max_delay = float(max_delay)
        self.min_spacing = 1.0 / max_calls_per_second if max_calls_per_second > 0 else 0.0
        self.clock = clock
        self.rand = rand or random.Random()
        self._lock = threading.Lock()
        now = clock()
        self._interval = 0.0
        self._updated = now  # when the growth was last applied
        self._throttled_at: float | None = None  # last counted throttle
        self._hold_until = now
        self._last_call: float | None = None
        self._jitter = 1.0
        self._gap: float | None = None
        self.calls = 0  # batches handed out
        self.answers = 0  # answers heard (botocore's retried attempts included)
        self.throttled = 0  # of those, throttled

    # -- what the Batcher asks ------------------------------------------------------------------
    @property
    def interval(self) -> float:
        """The current pacing interval in seconds (0: not paced)."""
        with self._lock:
            self._grow(self.clock())
            return self._interval

    def wait(self, now: float, full: bool) -> float:
        """Seconds the next call must still wait (0: go now). ``full``: the batch is full."""
        with self._lock:
            if self._last_call is None:
                return 0.0
            due = self._last_call + self.min_spacing
            if not full:
                self._grow(now)
                interval = self._interval
                if interval > 0.0:
                    if interval * (1.0 + JITTER) <= self.max_delay:
                        wait = interval * self._jitter
                    else:
                        u = (self._jitter - (1.0 - JITTER)) / (2.0 * JITTER)
                        wait = self.max_delay * (1.0 - JITTER * u)
                    due = max(due, self._last_call + wait)
            return max(0.0, due - now)

    def on_call(self, now: float) -> None:
        """A call is handed out now (full or not)."""
        with self._lock:
            if self._last_call is not None:
                gap = max(0.0, now - self._last_call)
                self._gap = gap if self._gap is None else (
                    GAP_WEIGHT * gap + (1.0 - GAP_WEIGHT) * self._gap)
            self._last_call = now
            self._jitter = 1.0 + JITTER * (2.0 * self.rand.random() - 1.0)
            self.calls += 1

    # -- what settle.py tells --------------------------------------------------------------------
    def on_response(self, throttled: bool, now: float) -> None:
        """One answer of the service: ``throttled`` for a request-level throttling error or a 200
        with per-event ``Throttling``."""
        with self._lock:
            self._grow(now)
            self.answers += 1
            if not throttled:
                return
            self.throttled += 1
            if now < self._hold_until:
                return  # formed before the last increase took effect
            gap = self._gap if self._gap is not None else 0.0
            self._interval = min(self.max_delay, max(INCREASE * self._interval, INCREASE * gap, MIN_START))
            self._throttled_at = now
            self._hold_until = now + max(HOLD, self._interval / 2.0)

    def on_result(self, outcome, now: float) -> None:
        """:meth:`on_response` for what ``Sender.send`` returned (a ``Result``) or raised (a
        ``RequestFailed``): throttled when the request failed with a throttling code (or HTTP
        429), or when any event came back with ``Throttling``."""
        self.on_response(is_throttled(outcome), now)

    # -- the law --------------------------------------------------------------------------------
    def _grow(self, now: float) -> None:
        dt = now - self._updated
        if dt <= 0.0:
            return
        self._updated = now
        if self._interval <= 0.0:
            return
        quiet = now - self._throttled_at if self._throttled_at is not None else QUIET
        k = _speedup(quiet)
        # dr/dt = k (A + P r): exact over dt, k taken at its end (it only grows).
        r = 1.0 / self._interval
        a_over_p = ADDITIVE / PROPORTIONAL
        r = (r + a_over_p) * math.exp(PROPORTIONAL * k * dt) - a_over_p
        interval = 1.0 / r
        self._interval = 0.0 if interval < FREE_BELOW else min(self.max_delay, interval)


def is_throttled(outcome) -> bool:
    """Whether a ``Result`` or ``RequestFailed`` says the account's call rate was exceeded."""
    failed = getattr(outcome, "failed", None)
    if failed is not None:
        return any(code == EVENT_THROTTLING for _, code, _ in failed)
    return (getattr(outcome, "code", None) in THROTTLING_CODES
            or getattr(outcome, "status", None) == 429)


def hear_retried_throttles(client, pacer: Pacer) -> None:
    """Tell ``pacer`` of throttled attempts botocore retries inside one call (they never reach
    the caller, yet each was a call the quota refused). botocore emits ``needs-retry`` after
    every attempt with ``response=(http_response, parsed)`` and the attempt number; a handler
    returning None leaves botocore's own retry decision alone (botocore ``endpoint.py``
    ``_needs_retry``). The last attempt is not reported here: its answer reaches the caller,
    who reports it through :meth:`Pacer.on_result`."""
    events = getattr(getattr(client, "meta", None), "events", None)
    if events is None:
        return
    retries = getattr(client.meta.config, "retries", None) or {}
    max_attempts = retries.get("total_max_attempts") or retries.get("max_attempts") or 1

    def heard(response=None, attempts=None, **_):
        if response is None or attempts is None or attempts >= max_attempts:
            return None
        http, parsed = response
        code = ((parsed or {}).get("Error") or {}).get("Code")
        if code in THROTTLING_CODES or getattr(http, "status_code", None) == 429:
            pacer.on_response(True, pacer.clock())
        return None

    events.register("needs-retry.cloudtrail-data.PutAuditEvents", heard,
                    unique_id="cloudtrail-sink-pacing")
