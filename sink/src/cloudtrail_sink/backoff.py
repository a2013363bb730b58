"""Full-jitter exponential backoff (AWS Architecture Blog, "Exponential Backoff And Jitter").

``delay(attempt) = rand() * min(cap, base * 2 ** attempt)`` for attempt = 0, 1, 2, ...
The random source is injected, so tests get deterministic delays without sleeping.

:class:`Pause` is the delivery-wide gate used for configuration and permission errors: each
consecutive failure doubles the pause (``base * 2 ** n``, capped, with jitter on the upper half
so many nodes do not retry in lockstep); one success clears it. Clock injected.
"""

from __future__ import annotations

import random
import threading
import time
from typing import Callable


class FullJitter:
    def __init__(self, base: float = 0.1, cap: float = 20.0, rand: random.Random | None = None):
        self.base = base
        self.cap = cap
        self.rand = rand or random.Random()

    def ceiling(self, attempt: int) -> float:
        return min(self.cap, self.base * (2 ** min(attempt, 62)))

    def delay(self, attempt: int) -> float:
        return self.rand.random() * self.ceiling(attempt)


class Pause:
    """Holds delivery after an error no retry can fix alone (bad channel, denied, expired)."""

    def __init__(self, base: float = 1.0, cap: float = 300.0, clock: Callable[[], float] = time.monotonic,
                 rand: random.Random | None = None):
        self.base = base
        self.cap = cap
        self.clock = clock
        self.rand = rand or random.Random()
        self.failures = 0
        self.until = 0.0
        self.reason: str | None = None
        self._lock = threading.Lock()

    def fail(self, reason: str) -> float | None:
        """Record one more failure and start a pause; returns its length in seconds, or None
        when a pause is already running (requests that were in flight when it started must not
        double it again)."""
        with self._lock:
            if self.until > self.clock():
                return None
            ceiling = min(self.cap, self.base * (2 ** min(self.failures, 30)))
            length = ceiling / 2 + self.rand.random() * ceiling / 2
            self.failures += 1
            self.until = self.clock() + length
            self.reason = reason
            return length

    def succeed(self) -> None:
        with self._lock:
            self.failures = 0
            self.until = 0.0
            self.reason = None

    @property
    def paused(self) -> bool:
        return self.failures > 0

    def remaining(self) -> float:
        return max(0.0, self.until - self.clock())
