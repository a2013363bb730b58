"""The running sink: wires spool, watcher, batcher, sender, ledger and dead letters together.

Threads: one reader (segments oldest first -> records -> pre-send check -> batcher), ``max_in_flight``
sender workers (batcher -> PutAuditEvents -> ledger/dead letters/retries), the watcher's
observer and rescan thread, the HTTP status server. The calling thread owns the lifecycle.

Guarantees (the product's promise):

- At least once: a segment is deleted only after every one of its events is finalized: accepted
  by the service, or written to ``failed/`` with its code and message (per-event permanent codes,
  the pre-send schema check, ``MalformedRecord``). A crash at any moment re-sends, never loses.
- Only what failed is re-sent: per-event ``Throttling``/``InternalFailure`` events go back alone,
  after a full-jitter backoff; the rest of their request is settled.
- Request-level throttling, 5xx and network errors are retried without limit (full jitter,
  capped); configuration and permission errors pause all delivery with a capped, doubling pause
  and an error log line each time; nothing is deleted meanwhile.
- Memory is bounded by ``pending_limit`` events read but not finalized, whatever the backlog.
- Shutdown (SIGTERM/SIGINT or :meth:`request_stop`): stop reading, let in-flight requests finish
  within ``grace_seconds``, settle their results, exit 0. Unsettled segments stay for next time.
- ``sink.lock`` (flock) keeps a second sink off the same spool: :class:`LockHeld` names the
  holder's pid. ``--dry-run`` takes no lock and changes nothing on disk (no folder created, no
  stale tmp/ file published, nothing deleted). Without ``--channel-arn`` it cannot know the
  channel's account: events lacking ``recipientAccountId`` are checked and shown with
  :data:`DRY_RUN_ACCOUNT` in it (the real run fills in the channel's account).
- A segment whose read fails unexpectedly, or whose deletion fails after it was settled, is
  logged, counted (``segment_errors_total{stage}``) and released: a scan offers it again after
  :data:`RETRY_FAILED_SEGMENT_SECONDS` (a delivered one is then only deleted, not re-sent), a
  delay that doubles with each failed read of the same segment, up to
  :data:`MAX_RETRY_FAILED_SEGMENT_SECONDS` (each read re-sends what precedes the failure).
  Nothing is deleted early. A drain that ends with such segments left returns
  :data:`EXIT_INCOMPLETE`, as does a drain not done within ``drain_timeout``.
"""

from __future__ import annotations

import collections
import dataclasses
import errno
import fcntl
import hashlib
import json
import logging
import os
import random
import signal
import sys
import threading
import time
from typing import Any, Callable, TextIO

from . import events, spool
from .backoff import FullJitter, Pause
from .batcher import Batcher, Item
from .config import ConfigError, SinkConfig, parse_listen
from .deadletter import DeadLetters, failure_line
from .delivery.journal import AckJournal, remove_orphans
from .delivery import reader as segment_reader
from .delivery.reader import Junk
from .ledger import Ledger, Segment
from .metrics import Metrics
from .sender import RETRYABLE_EVENT_CODES, RequestFailed, Result, Sender, make_client
from .watcher import SegmentQueue, Watcher

log = logging.getLogger("cloudtrail_sink.runner")

REJECTED_FLUSH = 500
HAND_ON_EVERY = 50
RETRY_FAILED_SEGMENT_SECONDS = 30.0
# A read that keeps failing re-sends the events before the failure point each time: back off
# (doubling per failure of the same segment) so a bad sector does not bill the same events forever.
MAX_RETRY_FAILED_SEGMENT_SECONDS = 3600.0
EXIT_INCOMPLETE = 4
DRY_RUN_ACCOUNT = "000000000000"


@dataclasses.dataclass(frozen=True)
class Refused:
    """A record the pre-send check refused, waiting to be dead-lettered with its bytes."""

    built: events.Rejected
    offset: int
    raw: bytes
    tag: Any
    time: Any


@dataclasses.dataclass(frozen=True)
class Dead:
    """One event on its way to ``failed/``: where it came from and why."""

    seg: Segment
    offset: int
    id: str
    code: str
    message: str
    event_data: Any
    raw: bytes | None
    tag: Any
    time: Any


def _event_data(text: str) -> Any:
    """The sent ``eventData`` text as a value for its dead letter (the text if unreadable)."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return text


def every_copy(items: list) -> list:
    """The items with their aliases (same id and data, from other segments): what is settled
    when the items are handed back, so none of them is settled twice."""
    return [x for it in items for x in it.all()]


def read_retry_seconds(failures: int) -> float:
    """Delay before a segment whose read failed ``failures`` times is offered again."""
    return min(RETRY_FAILED_SEGMENT_SECONDS * 2.0 ** (failures - 1),
               MAX_RETRY_FAILED_SEGMENT_SECONDS)


class LockHeld(RuntimeError):
    pass


def unsettled(batch: list[Item], settled: set) -> list[Item]:
    """The items of ``batch`` to retry after an unexpected error: every event (an item or one
    of its aliases) not in ``settled``, regrouped under its first unsettled copy."""
    out = []
    for it in batch:
        units = [x for x in it.all() if x not in settled]
        if not units:
            continue
        head = units[0]
        if head is not it or len(units) != len(it.all()):
            head.aliases = units[1:] or None
        out.append(head)
    return out


def acquire_lock(lay: spool.Layout) -> int:
    fd = os.open(lay.lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o640)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            os.close(fd)
            raise
        try:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
        finally:
            os.close(fd)
        raise LockHeld(f"spool {lay.root} is in use by another sink (pid {holder}); "
                       f"one sink per spool") from None
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
    except OSError as exc:
        # The pid is only a hint for the "in use" message; the flock is the lock. A full disk
        # must not keep the sink from starting and draining the very spool that fills it.
        log.warning("could not record the pid in the spool lock file",
                    extra={"lock": str(lay.lock), "error": exc.strerror})
    return fd


class DryRunSender:
    """Prints each request it would send as one JSON line; reports every event as accepted."""

    def __init__(self, channel_arn: str | None, external_id: str | None, out: TextIO):
        self.channel_arn = channel_arn
        self.external_id = external_id
        self.out = out
        self._lock = threading.Lock()

    def send(self, entries: list[dict]) -> Result:
        line = {"channelArn": self.channel_arn, "auditEvents": entries}
        if self.external_id:
            line["externalId"] = self.external_id
        text = json.dumps(line, ensure_ascii=False)
        with self._lock:
            self.out.write(text + "\n")
            self.out.flush()
        return Result({e["id"] for e in entries}, [])


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
        from prometheus_client import Counter
        self.segment_errors = Counter(
            "cloudtrail_sink_segment_errors", "Segments whose read or deletion failed (retried)",
            ["stage"], registry=self.metrics.registry)
        self.queue = SegmentQueue(self.layout, on_ignored=self._on_ignored,
                                  stale_tmp_seconds=cfg.stale_tmp_seconds, clock=clock)
        self.watcher = Watcher(self.queue, poll=cfg.poll, poll_seconds=cfg.poll_seconds,
                               rescan_seconds=cfg.rescan_seconds)
        self.ledger = Ledger(self._segment_complete, clock=monotonic)
        self.batcher = Batcher(cfg.max_batch_events, cfg.max_request_bytes, cfg.linger_ms / 1000.0,
                               clock=monotonic)
        self.dead = DeadLetters(self.layout, clock=clock, rand=self.rand)
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
        self.metrics.bind_backlog(
            segments=lambda: self.queue.known(), size=lambda: self.queue.bytes,
            age=self._oldest_age, pending=lambda: self.ledger.pending,
            paused=lambda: 1 if self.pause.paused else 0)
        self._stop = threading.Event()
        self._reading: str | None = None
        self._read_state: tuple[Segment, list] | None = None  # the segment being read
        self._undeleted: dict[str, str] = {}  # settled segments whose deletion failed
        self._read_failures: dict[str, int] = {}  # segment name -> failed reads so far
        # Held around each segment deletion; stop() sets _no_deletes under it before it lets
        # the spool lock go, so a sender thread outliving the grace period deletes nothing.
        self._delete_lock = threading.Lock()
        self._no_deletes = False
        self._threads: list[threading.Thread] = []
        self._lock_fd: int | None = None
        self.http = None
        self.last_success: float | None = None
        self.started = monotonic()

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        cfg = self.cfg
        if not cfg.dry_run:
            self._lock_fd = acquire_lock(self.layout)
        try:
            if not cfg.dry_run:
                spool.ensure_acks(self.layout)
                remove_orphans(self.layout.acks, self.layout.ready)
            if cfg.listen and not cfg.dry_run:
                from .httpserver import StatusServer
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
            self._spawn(self._reader, "sink-reader")
            for i in range(cfg.max_in_flight):
                self._spawn(self._worker, f"sink-sender-{i}")
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
                                  "pending_events": self.ledger.pending,
                                  "backlog_segments": self.queue.known()})
                    rc = EXIT_INCOMPLETE
                    break
                if drain and self._reading is None and self.queue.waiting() == 0:
                    self.batcher.flush()  # the last partial batch need not wait for the linger
                self._stop.wait(0.1 if drain else None)
        finally:
            self.stop()
            for sig, previous in installed:
                signal.signal(sig, previous)
        return rc

    def drained(self) -> bool:
        def empty() -> bool:
            return self.queue.known() == 0 and self.ledger.idle() and self.batcher.count() == 0
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
        with self._delete_lock:
            self._no_deletes = True
        if self._own_client is not None:
            try:
                self._own_client.close()
            except Exception:  # closing must not turn a clean stop into a crash
                log.debug("closing the client failed", exc_info=True)
            self._own_client = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        log.info("sink stopped", extra={"pending_events": self.ledger.pending})

    # -- health ---------------------------------------------------------------------------------
    def health(self) -> tuple[bool, dict]:
        now = self.monotonic()
        dead = [t.name for t in self._threads if not t.is_alive()] if not self._stop.is_set() else []
        stalled = now - self.ledger.last_progress if self.ledger.pending else 0.0
        stuck = (self.ledger.pending > 0 and not self.pause.paused
                 and stalled > self.cfg.stuck_seconds)
        info = {"status": "ok" if not dead and not stuck else "unhealthy",
                "dead_threads": dead, "pending_events": self.ledger.pending,
                "seconds_since_progress": round(stalled, 1)}
        return not dead and not stuck, info

    def ready(self) -> tuple[bool, dict]:
        now = self.monotonic()
        idle = self.ledger.pending == 0 and self.queue.known() == 0
        recent = self.last_success is not None and now - self.last_success < 60
        paused = self.pause.paused
        ok = not paused and (idle or recent)
        info = {"status": "ready" if ok else "not ready", "paused": paused,
                "pause_reason": self.pause.reason, "idle": idle,
                "backlog_segments": self.queue.known(), "pending_events": self.ledger.pending,
                "seconds_since_success": None if self.last_success is None
                else round(now - self.last_success, 1)}
        return ok, info

    def _oldest_age(self) -> float:
        oldest = self.queue.oldest_sealed_us()
        return 0.0 if oldest is None else max(0.0, self.clock() - oldest / 1e6)

    # -- reading --------------------------------------------------------------------------------
    def _on_ignored(self, name: str, why: str) -> None:
        self.metrics.ignored.inc()
        log.warning("ignoring a file in ready/", extra={"file": name, "reason": why})

    def _reader(self) -> None:
        while not self._stop.is_set():
            name = self.queue.pop()
            if name is None:
                return
            self._reading = name
            try:
                self._read_segment(name)
            except Exception:
                self._read_failed(name)
            finally:
                self._reading = None
                self._read_state = None

    def _read_failed(self, name: str) -> None:
        """Release what the failed read held (so nothing leaks and --drain ends) and let a
        later scan retry the segment; events already handed on settle normally, and the file
        is not deleted by them (the segment was never read to its end)."""
        state, self._read_state = self._read_state, None
        if state is not None and state[0].name == name:
            seg, rejected = state
            self.ledger.forget(seg, len(rejected))
        failures = self._read_failures.get(name, 0) + 1
        self._read_failures[name] = failures
        retry = read_retry_seconds(failures)
        self.queue.release(name, retry)
        self.segment_errors.labels("read").inc()
        log.exception("reading a segment failed; it stays in ready/ and is read again later",
                      extra={"segment": name, "failures": failures, "retry_in_seconds": retry})

    def _read_segment(self, name: str) -> None:
        path = os.path.join(self.layout.ready, name)
        if name in self._undeleted:  # settled before: only its deletion is left to do
            self._segment_complete(Segment(name, self._undeleted.pop(name)))
            return
        try:
            f = spool.open_segment(path)
        except FileNotFoundError:
            self.queue.done(name)
            return
        except spool.NotRegularFile as exc:
            # Swapped for a symlink/FIFO after it was listed: never opened, reported once.
            self.queue.ignore(name, exc.strerror or "not a regular file")
            return
        except OSError as exc:
            log.error("cannot open segment; will try again at the next rescan",
                      extra={"segment": name, "error": exc.strerror})
            self.queue.done(name)
            return
        journal = None if self.cfg.dry_run else AckJournal(self.layout.acks, name,
                                                             self.layout.failed)
        seg = self.ledger.open(name, path, journal)
        # Records a sink before this one already settled (accepted or dead-lettered).
        settled = journal.settled() if journal is not None else ()
        rejected: list[Refused] = []
        self._read_state = (seg, rejected)
        ready: list[Item] = []
        records = 0
        limit = self.cfg.pending_limit
        account = self.account_id
        max_bytes = self.cfg.max_request_bytes
        ledger, batcher, build, Prepared = self.ledger, self.batcher, events.build, events.Prepared

        def hand_on() -> None:
            # Counted in the ledger before the batcher sees them, so nothing can be settled
            # before it is counted; handed on in groups to spare a lock round-trip per event.
            ledger.add(seg, len(ready))
            batcher.add_many(ready)
            ready.clear()

        with f:
            for entry in segment_reader.read_segment(f):
                if entry.__class__ is Junk:
                    hand_on()
                    self._quarantine(f, name, entry, records)
                    if entry.end is None:
                        break
                    continue
                records += 1
                if settled and entry.offset in settled:
                    continue
                record = entry.value
                if ledger.pending + len(ready) >= limit or len(ready) >= HAND_ON_EVERY:
                    hand_on()
                    if ledger.pending >= limit and rejected:
                        # Refused events count as pending and only this thread settles them:
                        # write them out before waiting for room nobody else could make.
                        self._reject(seg, rejected)
                        rejected.clear()
                    if ledger.pending >= limit and not ledger.wait_for_room(
                            limit, self._stop.is_set):
                        ledger.abandon(seg)
                        return
                    if self._stop.is_set():
                        ledger.abandon(seg)
                        return
                try:
                    built = build(record, account, max_bytes)
                    if built.__class__ is not Prepared and account is None:
                        built = self._build_for_unknown_account(record, built, max_bytes)
                except Exception as exc:  # noqa: BLE001 - no content may stop a segment
                    built = events.Rejected(
                        "r" + hashlib.sha256(entry.raw(f)).hexdigest()[:64], "InvalidData",
                        f"sink: record cannot be checked ({type(exc).__name__})",
                        record.get("eventData"))
                tag, when = record.get("tag"), record.get("time")
                if built.__class__ is Prepared:
                    built.offset = entry.offset
                    ready.append(Item(seg, built, tag, when))
                else:
                    ledger.add(seg)
                    rejected.append(Refused(built, entry.offset, entry.raw(f), tag, when))
                    if len(rejected) >= REJECTED_FLUSH:
                        self._reject(seg, rejected)
                        rejected.clear()
            else:
                hand_on()
        if rejected:
            self._reject(seg, rejected)
            rejected.clear()
        self.ledger.read_done(seg)

    @staticmethod
    def _build_for_unknown_account(record: Any, built: Any, max_bytes: int) -> Any:
        """Dry run without a channel: the missing recipientAccountId the real run would fill
        in is not a problem; check the rest of the event with :data:`DRY_RUN_ACCOUNT`."""
        data = record.get("eventData") if record.__class__ is dict else None
        if data.__class__ is not dict or "recipientAccountId" in data:
            return built
        return events.build({**record, "eventData": {**data, "recipientAccountId": DRY_RUN_ACCOUNT}},
                            None, max_bytes)

    def _reject(self, seg: Segment, rejected: list[Refused]) -> None:
        """Dead-letter events the pre-send check refused (no API call spent on them)."""
        units = [Dead(seg, r.offset, r.built.id, r.built.code, r.built.message,
                      r.built.event_data, r.raw, r.tag, r.time) for r in rejected]
        while True:
            try:
                path = self._write_dead(units)
                break
            except OSError as exc:
                log.error("cannot write failed/ file; retrying", extra={"error": exc.strerror})
                if self._stop.wait(self.jitter.delay(5)):
                    self.ledger.abandon(seg)
                    raise
        log.info("events refused by the pre-send check went to failed/", extra={
            "segment": seg.name, "file": path and os.path.basename(path),
            "codes": dict(collections.Counter(u.code for u in units))})
        self.ledger.finalize(seg, len(units))

    def _write_dead(self, units: list[Dead]) -> str | None:
        """The one way events become dead letters: one ``failed/`` file for ``units``, their
        segments' journals told just before it appears. Raises only ``OSError`` (the disk);
        the caller finalizes the events after it returned."""
        now = self.clock()
        lines = [failure_line(code=u.code, message=u.message, segment=u.seg.name, tag=u.tag,
                              time_=u.time, id=u.id, event_data=u.event_data, failed_at=now,
                              raw=u.raw) for u in units]
        if self.cfg.dry_run:
            for line in lines:
                sys.stderr.write(json.dumps({"wouldFail": line["errorCode"], "id": line["id"],
                                             "errorMessage": line["errorMessage"],
                                             "segment": line["segment"]}) + "\n")
            return None

        def intent(name: str) -> None:
            per_seg: dict = {}
            for u in units:
                per_seg.setdefault(u.seg, []).append(u.offset)
            for seg, offsets in per_seg.items():
                if seg.journal is not None:
                    seg.journal.dead_lettered(name, offsets)

        path = self.dead.write(lines, intent=intent)
        for code, n in collections.Counter(u.code for u in units).items():
            self.metrics.failed.labels(code).inc(n)
        return path

    def _quarantine(self, f, name: str, junk: Junk, records: int) -> None:
        self.metrics.quarantined.inc()
        size = os.fstat(f.fileno()).st_size
        log.error("segment has bytes that hold no record; they go to quarantine/", extra={
            "segment": name, "offset": junk.offset, "end": junk.end, "size": size,
            "error": junk.error, "records_before": records})
        if self.cfg.dry_run:
            return
        while True:
            try:
                self.dead.quarantine(f, name, junk.offset, size, junk.error, records, junk.end)
                return
            except OSError as exc:
                # Deleting the segment without its quarantined bytes would lose them.
                log.error("cannot write to quarantine/; retrying", extra={"error": exc.strerror})
                if self._stop.wait(self.jitter.delay(5)):
                    raise

    def _segment_complete(self, seg: Segment) -> None:
        if not self.cfg.dry_run:
            try:
                with self._delete_lock:
                    if self._no_deletes:
                        return  # stopped: the next sink on this spool settles it again
                    os.unlink(seg.path)
            except FileNotFoundError:
                pass
            except OSError as exc:
                # Settled, but still on disk: a later scan hands it out again and only the
                # deletion is retried (a restart would re-send it: at least once).
                self._undeleted[seg.name] = seg.path
                self.queue.release(seg.name, RETRY_FAILED_SEGMENT_SECONDS)
                self.segment_errors.labels("delete").inc()
                log.error("cannot delete a delivered segment; will try again", extra={
                    "segment": seg.name, "error": exc.strerror,
                    "retry_in_seconds": RETRY_FAILED_SEGMENT_SECONDS})
                return
            if seg.journal is not None:
                seg.journal.remove()
            self.metrics.deleted.inc()
            self._read_failures.pop(seg.name, None)
            log.debug("segment delivered and deleted", extra={"segment": seg.name,
                                                              "events": seg.records})
        self.queue.done(seg.name)

    # -- sending --------------------------------------------------------------------------------
    def _wait_pause(self) -> bool:
        while True:
            remaining = self.pause.remaining()
            if remaining <= 0:
                return not self._stop.is_set()
            if self._stop.wait(remaining):
                return False

    def _worker(self) -> None:
        while self._wait_pause():
            batch = self.batcher.take()
            if batch is None:
                return
            if not self._wait_pause():
                return
            settled: set[Item] = set()
            try:
                self._send(batch, settled)
            except Exception:
                rest = unsettled(batch, settled)
                log.exception("unexpected error handling a request; its unsettled events will be "
                              "re-sent", extra={"events": len(batch), "unsettled": len(rest)})
                if rest:
                    self.batcher.retry(rest, self.jitter.delay(3))

    def _send(self, batch: list[Item], settled: set) -> None:
        """Send one batch and settle each of its events (and aliases) exactly once: finalized
        (accepted or dead-lettered) or handed back to the batcher. Each is added to ``settled``
        just before that happens, so after an unexpected exception only the others are retried
        (a second finalization could complete a segment early)."""
        entries = [it.p.entry() for it in batch]
        started = self.monotonic()
        try:
            result = self.sender.send(entries)
        except RequestFailed as exc:
            self.metrics.latency.observe(self.monotonic() - started)
            self._request_failed(batch, exc, settled)
            return
        self.metrics.latency.observe(self.monotonic() - started)
        self.metrics.batch.observe(len(batch))
        self.last_success = self.monotonic()
        if self.pause.paused:
            log.warning("delivery resumed", extra={"after": self.pause.reason})
            self.pause.succeed()
        failed = {fid: (code, msg) for fid, code, msg in result.failed}
        self.metrics.requests.labels("partial" if failed else "success").inc()
        delivered: dict = {}
        n_delivered = 0
        dead: list[tuple[Item, str, str]] = []
        successful = result.successful
        for it in batch:
            problem = failed.get(it.p.id) if failed else None
            if problem is None and it.p.id in successful:
                if it.aliases:
                    for x in it.aliases:
                        units = delivered.get(x.seg)
                        if units is None:
                            delivered[x.seg] = [x]
                        else:
                            units.append(x)
                    n_delivered += len(it.aliases)
                units = delivered.get(it.seg)
                if units is None:
                    delivered[it.seg] = [it]
                else:
                    units.append(it)
                n_delivered += 1
            elif problem is None or problem[0] in RETRYABLE_EVENT_CODES:
                code = problem[0] if problem else "NotAcknowledged"
                it.attempts += 1
                self.metrics.retried.labels(code).inc()
                settled.update(it.all())
                self.batcher.retry([it], self.jitter.delay(it.attempts - 1))
            else:
                dead.append((it, problem[0], problem[1]))
        if dead:
            self._dead_letter(dead, settled)
        for seg, units in delivered.items():
            settled.update(units)
            if seg.journal is not None:
                seg.journal.accepted([u.p.offset for u in units])
            self.ledger.finalize(seg, len(units))
        if n_delivered:
            self.metrics.delivered.inc(n_delivered)

    def _dead_letter(self, dead: list[tuple[Item, str, str]], settled: set) -> None:
        units = [Dead(x.seg, x.p.offset, x.p.id, code, msg, _event_data(x.p.text), None, x.tag,
                      x.time) for it, code, msg in dead for x in it.all()]
        try:
            path = self._write_dead(units)
        except OSError as exc:
            log.error("cannot write failed/ file; those events will be sent again",
                      extra={"error": exc.strerror})
            for it, _, _ in dead:
                it.attempts += 1
                settled.update(it.all())
                self.batcher.retry([it], self.jitter.delay(it.attempts))
            return
        log.warning("events rejected by the service went to failed/", extra={
            "file": path and os.path.basename(path),
            "codes": dict(collections.Counter(u.code for u in units))})
        per_seg: dict = {}
        for it, _, _ in dead:
            for x in it.all():
                per_seg.setdefault(x.seg, []).append(x)
        for seg, units in per_seg.items():
            settled.update(units)
            self.ledger.finalize(seg, len(units))

    def _request_failed(self, batch: list[Item], exc: RequestFailed, settled: set) -> None:
        self.metrics.requests.labels(exc.kind).inc()
        if exc.kind == "retry":
            attempt = max(it.attempts for it in batch)
            for it in batch:
                it.attempts += 1
            delay = self.jitter.delay(attempt)
            log.log(logging.INFO if attempt < 3 else logging.WARNING,
                    "request failed; retrying", extra={"code": exc.code, "status": exc.status,
                                                       "events": len(batch), "attempt": attempt + 1,
                                                       "retry_in_seconds": round(delay, 3)})
            settled.update(every_copy(batch))
            self.batcher.retry(batch, delay)
        elif exc.kind == "split" and len(batch) > 1:
            half = len(batch) // 2
            log.warning("request refused as invalid; splitting it to find the event at fault",
                        extra={"code": exc.code, "events": len(batch)})
            settled.update(every_copy(batch[:half]))
            self.batcher.requeue_batch(batch[:half])
            settled.update(every_copy(batch[half:]))
            self.batcher.requeue_batch(batch[half:])
        elif exc.kind == "split":
            self._dead_letter([(batch[0], exc.code, exc.message)], settled)
        else:
            length = self.pause.fail(f"{exc.code}: {exc.message}")
            if length is None:  # a pause is already running: wait for it with the others
                settled.update(every_copy(batch))
                self.batcher.retry(batch, self.pause.remaining())
                return
            log.error("DELIVERY PAUSED: the service refused the channel or the credentials; "
                      "nothing is deleted, retrying later", extra={
                          "code": exc.code, "status": exc.status, "error": exc.message,
                          "channel": self.cfg.channel_arn, "pause_seconds": round(length, 1),
                          "consecutive_failures": self.pause.failures})
            settled.update(every_copy(batch))
            self.batcher.retry(batch, length)
