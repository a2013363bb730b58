"""Prometheus metrics of one sink, in their own registry (so tests can run several sinks).

Names (all prefixed ``cloudtrail_sink_``):

=====================================  =========  ==============================================
events_delivered_total                 counter    events the service accepted
events_failed_total{code}              counter    events dead-lettered into failed/, by code
events_retried_total{code}             counter    per-event re-sends (Throttling, InternalFailure)
requests_total{outcome}                counter    PutAuditEvents calls: success, partial,
                                                  retry, pause, split
request_duration_seconds               histogram  latency of PutAuditEvents calls
batch_events                           histogram  events per request
segments_deleted_total                 counter    segments fully finalized and deleted
segments_quarantined_total             counter    segments with undecodable bytes
segment_errors_total{stage}            counter    segments whose read or deletion failed
                                                  (retried)
ignored_files_total                    counter    names in ready/ never opened (not *.seg,
                                                  symlinks, FIFOs, folders)
backlog_segments                       gauge      segments waiting or in progress
backlog_bytes                          gauge      their bytes
backlog_oldest_age_seconds             gauge      age of the oldest one (0 when none)
pending_events                         gauge      events read and not yet finalized
delivery_paused                        gauge      1 while paused by a configuration or
                                                  permission error
calls_total                            counter    answers to PutAuditEvents calls (botocore's
                                                  retried throttled attempts included)
throttled_calls_total                  counter    of those, throttled (request-level throttling
                                                  or per-event Throttling)
pacing_interval_seconds                gauge      current pacing interval (0: not paced)
spool_wait_seconds                     histogram  per segment: from its seal (mtime) to the
                                                  acknowledgement of its last event
=====================================  =========  ==============================================

Fluent Bit's mapping rules (``mappings_*``, ``mapping_dropped_records_total``) are read from the
spool at each scrape by ``mappingstatus.MappingsStatus``, which lists them.
"""

from __future__ import annotations

import os
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily

PREFIX = "cloudtrail_sink_"


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.delivered = Counter(PREFIX + "events_delivered", "Events the service accepted",
                                 registry=r)
        self.failed = Counter(PREFIX + "events_failed", "Events dead-lettered into failed/",
                              ["code"], registry=r)
        self.retried = Counter(PREFIX + "events_retried", "Per-event re-sends", ["code"],
                               registry=r)
        self.requests = Counter(PREFIX + "requests", "PutAuditEvents calls by outcome",
                                ["outcome"], registry=r)
        self.latency = Histogram(PREFIX + "request_duration_seconds",
                                 "Latency of PutAuditEvents calls", registry=r,
                                 buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60))
        self.batch = Histogram(PREFIX + "batch_events", "Events per PutAuditEvents request",
                               registry=r, buckets=(1, 5, 10, 25, 50, 75, 99, 100))
        self.deleted = Counter(PREFIX + "segments_deleted", "Segments finalized and deleted",
                               registry=r)
        self.quarantined = Counter(PREFIX + "segments_quarantined",
                                   "Segments with undecodable bytes", registry=r)
        self.segment_errors = Counter(PREFIX + "segment_errors",
                                      "Segments whose read or deletion failed (retried)",
                                      ["stage"], registry=r)
        self.ignored = Counter(PREFIX + "ignored_files", "Names in ready/ never opened",
                               registry=r)
        self.backlog_segments = Gauge(PREFIX + "backlog_segments",
                                      "Segments waiting or in progress", registry=r)
        self.backlog_bytes = Gauge(PREFIX + "backlog_bytes", "Bytes of those segments",
                                   registry=r)
        self.backlog_age = Gauge(PREFIX + "backlog_oldest_age_seconds",
                                 "Age of the oldest segment waiting", registry=r)
        self.pending = Gauge(PREFIX + "pending_events", "Events read and not yet finalized",
                             registry=r)
        self.paused = Gauge(PREFIX + "delivery_paused",
                            "1 while delivery is paused by a configuration error", registry=r)
        self.pacing_interval = Gauge(PREFIX + "pacing_interval_seconds",
                                     "Current pacing interval (0: not paced)", registry=r)
        self.spool_wait = Histogram(PREFIX + "spool_wait_seconds",
                                    "Per segment: from its seal to the acknowledgement of its "
                                    "last event", registry=r,
                                    buckets=(.25, .5, 1, 1.5, 2, 3, 5, 7.5, 10, 15, 30, 60, 120,
                                             300, 900, 3600))
        for outcome in ("success", "partial", "retry", "pause", "split"):
            self.requests.labels(outcome)

    def bind_backlog(self, segments: Callable[[], float], size: Callable[[], float],
                     age: Callable[[], float], pending: Callable[[], float],
                     paused: Callable[[], float]) -> None:
        """Gauges computed when scraped, so nothing ticks while idle."""
        self.backlog_segments.set_function(segments)
        self.backlog_bytes.set_function(size)
        self.backlog_age.set_function(age)
        self.pending.set_function(pending)
        self.paused.set_function(paused)

    def bind_pacing(self, pacer) -> None:
        """Calls, throttled calls and the interval, read from the pacer when scraped."""
        self.pacing_interval.set_function(lambda: pacer.interval)
        self.registry.register(_PacingCalls(pacer))

    def observe_spool_wait(self, path: str, now: float) -> None:
        """Record how long the segment at ``path`` waited since it was sealed (its mtime, on
        the wall clock ``now``), just before it is deleted."""
        try:
            sealed = os.stat(path).st_mtime
        except OSError:
            return
        self.spool_wait.observe(max(0.0, now - sealed))


class _PacingCalls:
    def __init__(self, pacer):
        self.pacer = pacer

    def collect(self):
        yield CounterMetricFamily(PREFIX + "calls", "Answers to PutAuditEvents calls",
                                  value=self.pacer.answers)
        yield CounterMetricFamily(PREFIX + "throttled_calls",
                                  "Throttled answers to PutAuditEvents calls",
                                  value=self.pacer.throttled)
