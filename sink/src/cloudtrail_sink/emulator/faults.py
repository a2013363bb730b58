"""Fault injection: what share of requests and events the emulator fails on purpose.

``Faults`` is the configuration (rates in [0, 1], latency in milliseconds); ``FaultDice`` draws
from one ``random.Random(seed)`` under a lock, so a run that sends the same requests in the same
order gets the same failures: retry tests are repeatable.

Per request, in this order: ``throttle_rate`` answers ``ThrottlingException`` (HTTP 400),
``error_5xx_rate`` answers ``InternalFailure`` (500) or ``ServiceUnavailable`` (503), each half
of the time. Per event (only in requests that got through), ``event_throttling_rate`` reports
``Throttling`` and ``event_internal_failure_rate`` ``InternalFailure`` in ``failed[]``.
``latency_ms`` is added before every ``PutAuditEvents`` answer.
"""

from __future__ import annotations

import dataclasses
import random
import threading
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Faults:
    """Injected failure rates (each a probability in [0, 1]) and added latency."""

    throttle_rate: float = 0.0
    """Share of PutAuditEvents requests answered with ThrottlingException (HTTP 400)."""
    error_5xx_rate: float = 0.0
    """Share of requests answered with InternalFailure (500) or ServiceUnavailable (503)."""
    event_throttling_rate: float = 0.0
    """Share of events reported in failed[] with errorCode Throttling."""
    event_internal_failure_rate: float = 0.0
    """Share of events reported in failed[] with errorCode InternalFailure."""
    latency_ms: float = 0
    """Milliseconds added before answering each PutAuditEvents request."""

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"fault {field.name} must be a number")
            if field.name == "latency_ms":
                if not 0 <= value <= 60_000:
                    raise ValueError("fault latency_ms must be between 0 and 60000")
            elif not 0.0 <= value <= 1.0:
                raise ValueError(f"fault {field.name} must be a rate between 0 and 1")

    @classmethod
    def from_dict(cls, data: Any) -> "Faults":
        """Build from JSON-like data; unknown names are an error that names them."""
        if not isinstance(data, dict):
            raise ValueError("faults must be a JSON object")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown fault field(s) {', '.join(unknown)}; "
                             f"known: {', '.join(sorted(known))}")
        return cls(**data)

    def to_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


class FaultDice:
    """Seeded draws deciding which request or event fails; thread-safe."""

    def __init__(self, faults: Faults, seed: int) -> None:
        self._faults = faults
        self._random = random.Random(seed)
        self._lock = threading.Lock()

    @property
    def faults(self) -> Faults:
        return self._faults

    def set(self, faults: Faults) -> None:
        if not isinstance(faults, Faults):
            raise TypeError("set_faults takes a Faults instance")
        self._faults = faults

    def request_fault(self) -> tuple[int, str, str] | None:
        """(status, error code, message) to answer instead of serving, or None."""
        f = self._faults
        if not f.throttle_rate and not f.error_5xx_rate:
            return None
        with self._lock:
            throttle = f.throttle_rate and self._random.random() < f.throttle_rate
            if throttle:
                return 400, "ThrottlingException", "Rate exceeded (injected fault)"
            if f.error_5xx_rate and self._random.random() < f.error_5xx_rate:
                if self._random.random() < 0.5:
                    return 500, "InternalFailure", "Internal failure (injected fault)"
                return 503, "ServiceUnavailable", "Service unavailable (injected fault)"
        return None

    def event_fault(self) -> tuple[str, str] | None:
        """(errorCode, errorMessage) to report for one event instead of checking it, or None."""
        f = self._faults
        if not f.event_throttling_rate and not f.event_internal_failure_rate:
            return None
        with self._lock:
            draw = self._random.random()
        if draw < f.event_throttling_rate:
            return "Throttling", "Event throttled (injected fault)"
        if draw < f.event_throttling_rate + f.event_internal_failure_rate:
            return "InternalFailure", "Internal failure (injected fault)"
        return None
