"""The call-rate quota: a token bucket per (account, region), driven by an injected clock.

The service allows 100 PutAuditEvents calls per second per account and region. Each bucket holds
at most ``rate`` tokens (one second's worth, so a burst of ``rate`` calls passes) and refills at
``rate`` tokens per second of ``clock()``. A call takes one token or is refused. A rate of 0 or
less switches the quota off.
"""

from __future__ import annotations

import threading
from typing import Callable


class CallQuota:
    def __init__(self, rate: float, clock: Callable[[], float]) -> None:
        self.rate = float(rate)
        self._clock = clock
        self._buckets: dict[tuple[str, str], tuple[float, float]] = {}
        self._lock = threading.Lock()

    def take(self, account: str, region: str) -> bool:
        """Take one token for this account and region; False when the quota is exhausted."""
        if self.rate <= 0:
            return True
        now = self._clock()
        key = (account, region)
        with self._lock:
            tokens, last = self._buckets.get(key, (self.rate, now))
            tokens = min(self.rate, tokens + max(0.0, now - last) * self.rate)
            if tokens < 1.0:
                self._buckets[key] = (tokens, now)
                return False
            self._buckets[key] = (tokens - 1.0, now)
            return True
