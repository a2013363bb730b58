"""The running sink: owns the lifecycle, the threads, the signals and the health answers.

Threads: one reader (``reading.SegmentReading``), ``max_in_flight`` sender workers
(``sending.Sending``: batcher -> sender -> ``settle.Settler``; beyond the first, a worker sends
only while the earlier ones wait on the network), the watcher's observer and rescan thread, the
HTTP status server. The calling thread owns the lifecycle.

Guarantees (the product's promise):

- At least once: a segment is deleted only after every one of its events is settled: accepted
  by the service, or written to ``failed/`` with its code and message (per-event permanent codes,
  the pre-send check, ``MalformedRecord``), and after its bytes that hold no record are in
  ``quarantine/``. A crash at any moment re-sends, never loses; the ack journal
  (``delivery/journal.py``) limits what a restart re-sends to what was in flight, and makes
  each dead letter appear once.
- Only what failed is re-sent; request-level throttling, 5xx and network errors are retried
  without limit; configuration and permission errors pause all delivery (``settle.py``).
- Memory is bounded by ``pending_limit`` events read but not settled, whatever the backlog.
- Shutdown (SIGTERM/SIGINT or :meth:`request_stop`): stop reading, let in-flight requests finish
  within ``grace_seconds``, settle their results, exit 0. Unsettled segments stay for next time.
- ``sink.lock`` (``spool/lock.py``) keeps a second sink off the same spool. ``--dry-run`` takes
  no lock and changes nothing on disk: it is given the dry-run sender and dead-letter printer
  (``dryrun.py``) and a tracker that deletes nothing and reads the ack journal without
  writing it (so it shows what the next run would send).
- A segment whose read or deletion fails is logged, counted (``segment_errors_total{stage}``)
  and offered again later (``tracker.py``). A drain that ends with such segments left returns
  :data:`EXIT_INCOMPLETE`, as does a drain not done within ``drain_timeout``.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import sys
import threading
import time
from typing import Any, Callable, TextIO

from .. import pacing, spool
from ..backoff import FullJitter, Pause
from ..batcher import Batcher
from ..config import ConfigError, SinkConfig, parse_listen
from ..spool.deadletters import DeadLetters
from ..mappingstatus import STATUS_FILE, MappingsStatus
from ..metrics import Metrics
from ..sender import Sender, make_client
from ..spool.lock import acquire_lock
from ..watcher import SegmentQueue, Watcher
from . import health
from .dryrun import DRY_RUN_ACCOUNT, DryRunDeadLetters, DryRunSender
from .journal import Journal
from .reading import SegmentReading
from .sending import Sending
from .settle import Settler
from .tracker import SegmentTracker

log = logging.getLogger("cloudtrail_sink.runner")

EXIT_INCOMPLETE = 4


class Runner:
    def __init__(self, cfg: SinkConfig, client: Any = None, sender: Any = None,
                 clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic,
                 rand: random.Random | None = None, out: TextIO | None = None):
        self.cfg = cfg
        self.clock = clock
        self.monotonic = monotonic
        self.rand = rand or random.Random()
        # A dry run creates nothing, not even the spool's folders.
        self.layout = (spool.layout if cfg.dry_run else spool.ensure_layout)(cfg.spool_dir)
        self.metrics = Metrics()
        # What Fluent Bit's filter says about its rules, read from the spool at each scrape.
        self.metrics.registry.register(MappingsStatus(
            os.path.join(self.layout.root, STATUS_FILE), clock=clock))
        self.queue = SegmentQueue(self.layout, on_ignored=self._on_ignored,
                                  stale_tmp_seconds=cfg.stale_tmp_seconds, clock=clock)
        self.watcher = Watcher(self.queue, poll=cfg.poll, poll_seconds=cfg.poll_seconds,
                               rescan_seconds=cfg.rescan_seconds)
        # Loaded at start (under the spool lock); a dry run reads it and writes nothing.
        self.journal = Journal(self.layout.acks, self.layout.ready, self.layout.failed,
                               writable=not cfg.dry_run, clock=clock)
        self.segments = SegmentTracker(
            self.queue, self.journal,
            delete=not cfg.dry_run, on_deleted=self._on_deleted,
            on_error=lambda stage: self.metrics.segment_errors.labels(stage).inc(), clock=monotonic,
            before_delete=lambda seg: self.metrics.observe_spool_wait(seg.path, self.clock()))
        # Throttle-aware pacing (pacing.py): the Batcher asks it before handing out a batch,
        # every answer (settle.py) and every throttled attempt botocore retries feed it.
        self.pacer = pacing.Pacer(cfg.max_pacing_delay_ms / 1000.0, cfg.max_calls_per_second,
                                  clock=monotonic, rand=self.rand)
        self.metrics.bind_pacing(self.pacer)
        linger = cfg.linger_ms / 1000.0
        self.batcher = Batcher(cfg.max_batch_events, cfg.max_request_bytes, linger,
                               clock=monotonic, pacer=self.pacer, rand=self.rand,
                               linger_jitter=pacing.linger_jitter(linger, self.pacer.max_delay))
        self.dead = (DryRunDeadLetters() if cfg.dry_run
                     else DeadLetters(self.layout, clock=clock, rand=self.rand))
        self.jitter = FullJitter(base=0.1, cap=cfg.max_backoff_seconds, rand=self.rand)
        self.pause = Pause(base=1.0, cap=cfg.max_pause_seconds, clock=monotonic, rand=self.rand)
        self.account_id = cfg.account_id
        self._own_client = None  # a boto3 client made here is closed on stop()
        if sender is not None:
            self.sender = sender
        elif cfg.dry_run:
            self.sender = DryRunSender(cfg.channel_arn, cfg.external_id, out or sys.stdout)
        else:
            if client is None:
                client = self._own_client = make_client(
                    cfg.effective_region, cfg.endpoint_url, cfg.role_arn, cfg.retry_mode,
                    cfg.max_attempts, cfg.max_in_flight)
            self.sender = Sender(client, cfg.channel_arn, cfg.external_id)
            pacing.hear_retried_throttles(client, self.pacer)
        self.settler = Settler(tracker=self.segments, batcher=self.batcher,
                               dead_letters=self.dead, metrics=self.metrics, jitter=self.jitter,
                               pause=self.pause, clock=clock, channel_arn=cfg.channel_arn,
                               pacer=self.pacer, monotonic=monotonic)
        self._stop = threading.Event()
        self.sending = Sending(sender=self.sender, batcher=self.batcher, settler=self.settler,
                               pause=self.pause, jitter=self.jitter, metrics=self.metrics,
                               stop=self._stop, monotonic=monotonic, workers=cfg.max_in_flight)
        self.reading = SegmentReading(
            cfg=cfg, layout=self.layout, queue=self.queue, tracker=self.segments,
            batcher=self.batcher, settler=self.settler, dead_letters=self.dead,
            metrics=self.metrics, jitter=self.jitter, stop=self._stop, account_id=self.account_id)
        self.metrics.bind_backlog(
            segments=lambda: self.queue.known(), size=lambda: self.queue.bytes,
            age=self._oldest_age, pending=lambda: self.segments.pending,
            paused=lambda: 1 if self.pause.paused else 0)
        self._threads: list[threading.Thread] = []
        self._lock_fd: int | None = None
        self.http = None
        self.started = monotonic()

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        cfg = self.cfg
        if not cfg.dry_run:
            self._lock_fd = acquire_lock(self.layout)
        try:
            if not cfg.dry_run:
                spool.ensure_acks(self.layout)
            self.journal.load()
            if cfg.listen and not cfg.dry_run:
                from ..httpserver import StatusServer
                host, port = parse_listen(cfg.listen)
                try:
                    self.http = StatusServer(host, port, self.metrics.registry, self.health,
                                             self.ready)
                except OSError as exc:
                    raise ConfigError(f"--listen {cfg.listen}: cannot listen there "
                                      f"({exc.strerror}); pick a free port, port 0 for any, "
                                      "or an empty value for no HTTP server") from None
                self.http.start()
            if cfg.dry_run:
                if self.account_id is None:
                    log.warning("dry run without --channel-arn: events without "
                                "recipientAccountId are checked and shown with "
                                f"{DRY_RUN_ACCOUNT}; the real run fills in the channel's account")
                self.queue.scan(publish_stale=False)
            else:
                self.watcher.start()
            self._spawn(self.reading.run, "sink-reader")
            for i in range(cfg.max_in_flight):
                self._spawn(lambda k=i: self.sending.worker(k), f"sink-sender-{i}")
        except BaseException:
            self.stop()
            raise
        log.info("sink started", extra={
            "spool": self.layout.root, "channel": cfg.channel_arn, "region": cfg.effective_region,
            "endpoint": cfg.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_CLOUDTRAIL_DATA"),
            "segments": self.queue.known(), "mode": "poll" if self.watcher.poll else "inotify",
            "dry_run": cfg.dry_run, "listen": f"{self.http.host}:{self.http.port}" if self.http else None})

    def _spawn(self, target: Callable[[], None], name: str) -> None:
        t = threading.Thread(target=target, name=name, daemon=True)
        self._threads.append(t)
        t.start()

    def request_stop(self) -> None:
        self._stop.set()

    def _on_signal(self, signum, frame) -> None:
        # Event.set() takes a lock the interrupted main thread may hold: set it from a thread.
        log.info("signal received; finishing in-flight requests",
                 extra={"signal": signal.Signals(signum).name})
        threading.Thread(target=self.request_stop, name="sink-signal", daemon=True).start()

    def run(self) -> int:
        """Start, wait for a signal (or for the drain to finish), stop. Returns the exit code."""
        installed = []
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                installed.append((sig, signal.signal(sig, self._on_signal)))
        rc = 0
        try:
            self.start()
            drain = self.cfg.drain or self.cfg.dry_run
            deadline = (self.monotonic() + self.cfg.drain_timeout
                        if drain and self.cfg.drain_timeout > 0 else None)
            while not self._stop.is_set():
                if drain and self.drained():
                    held = self.queue.held()
                    if held:
                        log.error("drain ended with segments that could not be read or deleted; "
                                  "they stay in ready/", extra={"segments": held[:20],
                                                                "count": len(held)})
                        rc = EXIT_INCOMPLETE
                    else:
                        log.info("drained: nothing left to deliver")
                    break
                if deadline is not None and self.monotonic() >= deadline:
                    log.error("drain timeout: not drained in time; unsettled segments stay in "
                              "ready/", extra={
                                  "drain_timeout_seconds": self.cfg.drain_timeout,
                                  "paused": self.pause.paused, "pause_reason": self.pause.reason,
                                  "pending_events": self.segments.pending,
                                  "backlog_segments": self.queue.known()})
                    rc = EXIT_INCOMPLETE
                    break
                if drain and self.reading.reading is None and self.queue.waiting() == 0:
                    self.batcher.flush()  # the last partial batch need not wait for the linger
                self._stop.wait(0.1 if drain else None)
        finally:
            self.stop()
            for sig, previous in installed:
                signal.signal(sig, previous)
        return rc

    def drained(self) -> bool:
        def empty() -> bool:
            return (self.queue.known() == 0 and self.segments.idle()
                    and self.batcher.count() == 0)
        if not empty():
            return False
        if self.cfg.dry_run:
            return True
        self.queue.scan()  # a segment whose inotify event is still on its way
        return empty()

    def stop(self) -> None:
        self._stop.set()
        self.queue.close()
        self.batcher.close()
        self.sending.close()
        deadline = self.monotonic() + self.cfg.grace_seconds
        for t in self._threads:
            t.join(max(0.0, deadline - self.monotonic()))
        alive = [t.name for t in self._threads if t.is_alive()]
        if alive:
            log.warning("grace period over with requests still in flight; their segments stay "
                        "and are sent again on the next start", extra={"threads": alive})
        self._threads = [t for t in self._threads if t.is_alive()]
        self.watcher.stop()
        if self.http is not None:
            self.http.stop()
            self.http = None
        self.segments.stop_deleting()
        self.journal.close()  # a sender thread outliving the grace period journals nothing
        if self._own_client is not None:
            try:
                self._own_client.close()
            except Exception:  # closing must not turn a clean stop into a crash
                log.debug("closing the client failed", exc_info=True)
            self._own_client = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        log.info("sink stopped", extra={"pending_events": self.segments.pending})

    # -- health ---------------------------------------------------------------------------------
    def health(self) -> tuple[bool, dict]:
        dead = ([t.name for t in self._threads if not t.is_alive()]
                if not self._stop.is_set() else [])
        return health.liveness(self.monotonic(), dead, self.segments.pending,
                               self.segments.last_progress, self.pause.paused,
                               self.cfg.stuck_seconds)

    def ready(self) -> tuple[bool, dict]:
        return health.readiness(self.monotonic(), self.segments.pending, self.queue.known(),
                                self.sending.last_success, self.pause.paused, self.pause.reason)

    def _oldest_age(self) -> float:
        oldest = self.queue.oldest_sealed_us()
        return 0.0 if oldest is None else max(0.0, self.clock() - oldest / 1e6)

    def _on_ignored(self, name: str, why: str) -> None:
        self.metrics.ignored.inc()
        log.warning("ignoring a file in ready/", extra={"file": name, "reason": why})

    def _on_deleted(self, seg) -> None:
        self.metrics.deleted.inc()
        log.debug("segment delivered and deleted", extra={"segment": seg.name,
                                                          "events": seg.records})
