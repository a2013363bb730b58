"""The answers of ``/healthz`` (liveness) and ``/readyz`` (readiness), from the sink's state.

- Live unless a sink thread died, or events are pending and nothing settled for
  ``stuck_seconds`` while delivery is not paused (a pause for a configuration error is not a
  reason to restart the sink).
- Ready when not paused and either idle (nothing pending, no backlog) or a request succeeded in
  the last 60 s.
"""

from __future__ import annotations

RECENT_SUCCESS_SECONDS = 60


def liveness(now: float, dead_threads: list[str], pending: int, last_progress: float,
             paused: bool, stuck_seconds: float) -> tuple[bool, dict]:
    stalled = now - last_progress if pending else 0.0
    stuck = pending > 0 and not paused and stalled > stuck_seconds
    ok = not dead_threads and not stuck
    return ok, {"status": "ok" if ok else "unhealthy", "dead_threads": dead_threads,
                "pending_events": pending, "seconds_since_progress": round(stalled, 1)}


def readiness(now: float, pending: int, backlog: int, last_success: float | None,
              paused: bool, pause_reason: str | None) -> tuple[bool, dict]:
    idle = pending == 0 and backlog == 0
    recent = last_success is not None and now - last_success < RECENT_SUCCESS_SECONDS
    ok = not paused and (idle or recent)
    return ok, {"status": "ready" if ok else "not ready", "paused": paused,
                "pause_reason": pause_reason, "idle": idle, "backlog_segments": backlog,
                "pending_events": pending,
                "seconds_since_success": None if last_success is None
                else round(now - last_success, 1)}
