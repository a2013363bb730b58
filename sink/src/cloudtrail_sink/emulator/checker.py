"""The CPU-heavy half of PutAuditEvents: parse the body, validate its shape, check every event.

Pure functions of (body bytes, channel ARN, account, region, ingestion time): no shared state,
so they run either in the serving thread or in a worker process (``CheckerPool``), which lets
the emulator use more than one core for the per-event checks.

``check_body`` returns ``BodyError(status, code, message)`` for a body the service refuses as a
whole (not JSON, wrong member types -> ``SerializationException``; auditEvents missing or not
1-100 entries, an ``id`` missing, longer than 128 or outside ``^[-_A-Za-z0-9]+$``,
``eventData`` missing -> ``ValidationException`` listing up to 10 violations), else a
``Checked``: the ids in request order, the first duplicated id (or None), and per event either
``("failed", errorCode, errorMessage, eventData text, uid, eventSource, eventName, principalId)``
(the last four as far as the text gives them, else None: what the page shows of a refusal) or
``("ok", eventID, uid, wrapped event JSON text, eventSource, eventName, principalId)``.
"""

from __future__ import annotations

import json
import os
import pickle
import queue
import re
import subprocess
import sys
import threading
from typing import NamedTuple

from .. import schema

MAX_EVENTS = 100
ID_RE = re.compile(r"\A[-_A-Za-z0-9]{1,128}\Z")
EVENT_VERSION = "1.0"


class BodyError(NamedTuple):
    status: int
    code: str
    message: str


class WorkerFailure(NamedTuple):
    error: str


class Checked(NamedTuple):
    ids: list[str]
    duplicate: str | None
    outcomes: list[tuple]  # see the module docstring


def check_body(body: bytes, arn: str, account: str, region: str, ingestion_time: str,
               check_events: bool = True) -> BodyError | Checked:
    """Check the body; with ``check_events`` False stop after its shape (outcomes empty)."""
    entries = _parse(body)
    if isinstance(entries, BodyError):
        return entries
    ids = [entry["id"] for entry in entries]
    seen: set[str] = set()
    duplicate = None
    for event_id in ids:
        if event_id in seen:
            duplicate = event_id
            break
        seen.add(event_id)
    if duplicate is not None or not check_events:
        return Checked(ids, duplicate, [])
    outcomes = []
    new_ids = _uuid4s(len(entries))
    for entry, event_id in zip(entries, new_ids):
        text = entry["eventData"]
        data, problem = schema.parse_event_text(text, account, entry.get("eventDataChecksum"))
        if problem is not None:
            outcomes.append(("failed", problem.code, problem.message, text,
                             *_best_effort_fields(text)))
            continue
        outcomes.append(("ok", event_id, data["UID"],
                         wrap(event_id, arn, region, account, data["eventTime"],
                              ingestion_time, text),
                         data["eventSource"], data["eventName"],
                         data["userIdentity"]["principalId"]))
    return Checked(ids, None, outcomes)


def _best_effort_fields(text: str) -> tuple[str | None, str | None, str | None, str | None]:
    """UID, eventSource, eventName, principalId of a refused event's text, where it has them as
    strings: a person fixing a mapping finds the refusal by them."""
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        return None, None, None, None
    if not isinstance(data, dict):
        return None, None, None, None
    identity = data.get("userIdentity")

    def text_of(value):
        return value[:1024] if isinstance(value, str) else None

    return (text_of(data.get("UID")), text_of(data.get("eventSource")),
            text_of(data.get("eventName")),
            text_of(identity.get("principalId")) if isinstance(identity, dict) else None)


def _uuid4s(count: int) -> list[str]:
    """``count`` random (version 4) UUIDs from one urandom call: uuid.uuid4() per event cost
    a tenth of the checks."""
    raw = os.urandom(16 * count)
    out = []
    for i in range(0, 16 * count, 16):
        h = raw[i:i + 16].hex()
        variant = "89ab"[int(h[16], 16) & 3]
        out.append(f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{variant}{h[17:20]}-{h[20:]}")
    return out


def _parse(body: bytes) -> list[dict] | BodyError:
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        return BodyError(400, "SerializationException", "The request body is not valid JSON.")
    if not isinstance(doc, dict):
        return BodyError(400, "SerializationException", "The request body must be a JSON object.")
    events = doc.get("auditEvents")
    if events is None:
        return BodyError(400, "ValidationException", "1 validation error detected: Value null at "
                         "'auditEvents' failed to satisfy constraint: Member must not be null")
    if not isinstance(events, list):
        return BodyError(400, "SerializationException", "auditEvents must be a JSON array.")
    errors = []
    if not 1 <= len(events) <= MAX_EVENTS:
        errors.append(f"Value at 'auditEvents' failed to satisfy constraint: Member must have "
                      f"length between 1 and {MAX_EVENTS} (it has {len(events)})")
    for index, entry in enumerate(events, start=1):
        where = f"'auditEvents.{index}.member"
        if not isinstance(entry, dict):
            return BodyError(400, "SerializationException",
                             f"auditEvents entry {index} must be a JSON object.")
        for name in ("id", "eventData", "eventDataChecksum"):
            value = entry.get(name)
            if value is not None and not isinstance(value, str):
                return BodyError(400, "SerializationException",
                                 f"auditEvents entry {index}: {name} must be a string.")
        event_id = entry.get("id")
        if event_id is None:
            errors.append(f"Value null at {where}.id' failed to satisfy constraint: Member must "
                          "not be null")
        elif not ID_RE.match(event_id):
            errors.append(f"Value at {where}.id' failed to satisfy constraint: Member must have "
                          "length between 1 and 128 and satisfy regular expression pattern: "
                          "^[-_A-Za-z0-9]+$")
        if entry.get("eventData") is None:
            errors.append(f"Value null at {where}.eventData' failed to satisfy constraint: "
                          "Member must not be null")
    if errors:
        return BodyError(400, "ValidationException",
                         f"{len(errors)} validation error{'s' if len(errors) > 1 else ''} "
                         f"detected: {'; '.join(errors[:10])}")
    return events


def wrap(event_id: str, arn: str, region: str, account: str, event_time: str,
         ingestion_time: str, event_data_text: str) -> str:
    """The stored form of an accepted event, as JSON text."""
    # Every value here matched a strict pattern (uuid, channel ARN, region, account, eventTime,
    # timestamp: no quote, backslash or control character), so plain formatting is valid JSON;
    # eventData was just parsed as a JSON object, so its text is spliced in as sent. This runs
    # once per stored event: json.dumps here cost a quarter of the time of a call.
    return (f'{{"eventVersion":"{EVENT_VERSION}","eventCategory":"ActivityAuditLog",'
            f'"eventType":"ActivityLog","eventID":"{event_id}","eventTime":"{event_time}",'
            f'"awsRegion":"{region}","recipientAccountId":"{account}",'
            f'"metadata":{{"ingestionTime":"{ingestion_time}","channelARN":"{arn}"}},'
            f'"eventData":{event_data_text}}}')


class _Worker:
    """One checker process: pickled argument tuples in on stdin, pickled results out on stdout."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            # -c, not -m: results must pickle as this module's classes, not __main__'s.
            [sys.executable, "-c", f"from {__name__} import _serve; _serve()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, sys.path))})

    def call(self, args: tuple):
        pickle.dump(args, self.proc.stdin, protocol=pickle.HIGHEST_PROTOCOL)
        self.proc.stdin.flush()
        return pickle.load(self.proc.stdout)

    def close(self) -> None:
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()


class CheckerPool:
    """Runs ``check_body`` in up to ``workers`` processes (0: in the calling thread).

    Workers are plain ``python -m`` subprocesses (no fork of this multi-threaded process, no
    re-import of the caller's main module), started on first use and ended by closing their
    stdin, which also happens when this process dies. A worker that fails is discarded: the
    call it was serving raises (the server answers InternalFailure) and later calls get a new
    worker.
    """

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._idle: queue.LifoQueue[_Worker] = queue.LifoQueue()
        self._all: list[_Worker] = []
        self._lock = threading.Lock()
        self._closed = False

    def check(self, *args) -> BodyError | Checked:
        if self.workers <= 0:
            return check_body(*args)
        worker = self._acquire()
        try:
            result = worker.call(args)
        except BaseException as exc:
            self._discard(worker)
            # Not an OSError: the server must not mistake a dead worker for a gone client.
            raise RuntimeError(f"checker worker died: {exc!r}") from None
        self._idle.put(worker)
        if isinstance(result, WorkerFailure):
            raise RuntimeError(f"checker worker failed: {result.error}")
        return result

    def _acquire(self) -> _Worker:
        try:
            return self._idle.get_nowait()
        except queue.Empty:
            pass
        with self._lock:
            if self._closed:
                raise RuntimeError("checker pool is closed")
            if len(self._all) < self.workers:
                worker = _Worker()
                self._all.append(worker)
                return worker
        return self._idle.get()

    def _discard(self, worker: _Worker) -> None:
        with self._lock:
            if worker in self._all:
                self._all.remove(worker)
        worker.proc.kill()
        worker.close()

    def close(self) -> None:
        """End every worker; call when no check is in flight."""
        with self._lock:
            self._closed = True
            workers, self._all = self._all, []
        for worker in workers:
            worker.close()


def _serve() -> None:
    """Worker main loop: answer ``check_body`` calls until stdin closes."""
    requests, answers = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # nothing but answers may reach the pipe
    while True:
        try:
            args = pickle.load(requests)
        except EOFError:
            return
        try:
            answer = check_body(*args)
        except Exception as exc:  # a bug, not bad input: the caller answers InternalFailure
            answer = WorkerFailure(f"{type(exc).__name__}: {exc}")
        pickle.dump(answer, answers, protocol=pickle.HIGHEST_PROTOCOL)
        answers.flush()

