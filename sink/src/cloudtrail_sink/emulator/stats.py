"""Counters since start: events accepted, events failed by code, requests by outcome.

A request's outcome is ``ok`` (HTTP 200, every event accepted), ``partial`` (HTTP 200 with at
least one event in ``failed[]``) or the error code it was answered with.
"""

from __future__ import annotations

import threading
from collections import Counter


class Stats:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._accepted = 0
        self._failed: Counter[str] = Counter()
        self._requests: Counter[str] = Counter()

    def record(self, outcome: str, accepted: int = 0, failed_codes: list[str] = ()) -> None:
        with self._lock:
            self._requests[outcome] += 1
            self._accepted += accepted
            self._failed.update(failed_codes)

    def snapshot(self) -> dict:
        with self._lock:
            return {"accepted": self._accepted, "failed": dict(self._failed),
                    "requests": dict(self._requests)}
