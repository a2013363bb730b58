"""The HTTP side of the emulator and the ``Emulator`` object that owns its lifecycle.

Routes (``ROUTES``; each has a body cap, larger bodies are refused with 413):

- ``POST /PutAuditEvents?channelArn=..[&externalId=..]`` -> ``ingest.PutAuditEvents``; errors as
  botocore parses them: status, ``x-amzn-ErrorType: <code>``, body ``{"message": ...}``, and a
  ``x-amzn-RequestId`` on every answer; a refused call or event is stored as a refusal;
- ``GET /_emulator/events?limit=N&after=CURSOR[&wait=S]`` -> ``{"events": [...], "next": C}``
  (oldest first; ``wait`` blocks up to S <= 25 seconds for a first new event; ``tail=N`` instead
  of ``after`` returns the newest N);
- the console's reads: ``GET /_emulator/search`` (filtered pages of events or refusals, newest
  first), ``/_emulator/event?id=``, ``/_emulator/refusal?seq=``, ``/_emulator/summary`` (stored
  and since-start counters; can wait for a change), ``/_emulator/rates`` (per second);
- ``GET /_emulator/stats``; ``GET``/``PUT /_emulator/faults`` (PUT needs ``Authorization: Bearer
  <admin token>`` when one is set); ``GET /healthz``; ``GET /`` the console page;
- ``POST /`` with ``X-Amz-Target: ...CloudTrail_20131101.<Operation>`` (the ``cloudtrail``
  control plane's Lake queries) and ``POST /_emulator/query`` (the page's query box) ->
  ``lake``; both take bodies up to ``LAKE_MAX_BODY``. Errors answered to a target call before
  ``lake`` sees it (body too large, chunked, bad length) carry the JSON 1.1 body
  ``{"__type": <code>, "message": ...}``: botocore's ``cloudtrail`` client reads the code there.
  ``GET /_emulator/stores`` (the event data stores a query names in ``FROM``) -> ``lake`` too.

The page and ``/_emulator/*`` answer only requests whose ``Host`` names an allowed host (loopback
names and the listen address by default), so a web page elsewhere cannot reach them through DNS
rebinding; ``PutAuditEvents`` (signed, it only writes) and ``/healthz`` (probes) answer any
host. Lake query calls (``X-Amz-Target``) read stored events: they answer any host only when
the emulator has credentials (``--access-key``), whose signature a rebinding page cannot make;
without them any key signs, so they get the same Host check as the page.

Connections: the listen backlog is ``BACKLOG``; at most ``max_connections`` are served at once,
one thread each (HTTP/1.1 keep-alive), and one more is answered 503 and closed at once; every
read waits at most ``connection_timeout`` seconds. ``stop()`` stops accepting, shuts down every
open connection so idle keep-alive threads end, joins all threads and closes the database.
Request handling never raises into the server and never logs a traceback or a query string
(the external id travels in it): an unexpected error answers 500 ``InternalFailure`` and is
logged as one line naming its type and where it happened.
"""

from __future__ import annotations

import datetime as _dt
import hmac
import importlib.resources
import json
import logging
import os
import re
import socket
import sys
import threading
import time
import traceback
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Iterable, NamedTuple
from urllib.parse import parse_qs, urlsplit

from . import auth
from .channels import Channels
from .checker import CheckerPool
from .faults import FaultDice, Faults
from .ingest import ApiError, PutAuditEvents, time_text
from .lake import TARGET_PREFIX, Lake
from .quota import CallQuota
from .stats import Stats
from .storage import MAX_CURSOR, MAX_PAGE, EventStore, Filters, RefusalRow, read_page

log = logging.getLogger("cloudtrail_sink.emulator")

MAX_BODY = 1_000_000
DRAIN_LIMIT = 16 * 1024 * 1024  # larger PutAuditEvents bodies are not read: the connection closes
SMALL_BODY = 64 * 1024  # every other route: larger bodies are refused (413) and not read
LAKE_MAX_BODY = 256 * 1024  # a QueryStatement is at most 10,000 characters
DEFAULT_PAGE = 1000
CONSOLE_PAGE = 50
MAX_WAIT = 25.0
MAX_RATE_SECONDS = 3600
BACKLOG = 128
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


class Emulator:
    """A local CloudTrail Data endpoint (see the package docstring for what it checks)."""

    def __init__(self, db_path, host: str = "127.0.0.1", port: int = 0,
                 channels: dict[str, str | None] | None = None, quota_per_second: float = 100.0,
                 faults: Faults | None = None, seed: int = 0,
                 credentials: tuple[str, str] | None = None,
                 clock: Callable[[], float] = time.monotonic, workers: int | None = 0,
                 admin_token: str | None = None, allowed_hosts: Iterable[str] | None = None,
                 max_connections: int = 128, connection_timeout: float = 30.0,
                 query_timeout: float = 30.0) -> None:
        self.db_path = db_path
        self.host = host
        self._requested_port = port
        self.channels = Channels(channels)
        self.credentials = credentials
        self.quota = CallQuota(quota_per_second, clock)
        self.dice = FaultDice(faults or Faults(), seed)
        # Per-event checks can run in worker processes so that they are not bound to one core
        # (the CLI does this by default); 0 (the default here) keeps them in the serving
        # threads: nothing to start, which suits tests. None: see default_workers().
        self.workers = default_workers() if workers is None else workers
        if self.workers < 0:
            raise ValueError("workers must be 0 or more")
        if max_connections < 1:
            raise ValueError("max_connections must be 1 or more")
        if not connection_timeout > 0:
            raise ValueError("connection_timeout must be more than 0 seconds")
        if not (query_timeout > 0 and query_timeout != float("inf")):
            raise ValueError("query_timeout must be a number of seconds above 0")
        # PUT /_emulator/faults needs "Authorization: Bearer <token>" when set.
        self.admin_token = admin_token or None
        # Host names the page and /_emulator/* answer to; "*" allows any (see the docstring).
        self.allowed_hosts = _allowed_hosts(host, allowed_hosts)
        self.max_connections = max_connections
        self.connection_timeout = connection_timeout
        self._stats = Stats()
        self.query_timeout = query_timeout  # seconds a Lake query may run
        self.lake: Lake | None = None
        self._store: EventStore | None = None
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self.wall_clock: Callable[[], _dt.datetime] = lambda: _dt.datetime.now(_dt.timezone.utc)

    # lifecycle -------------------------------------------------------------------------------
    def start(self) -> "Emulator":
        if self._server is not None:
            raise RuntimeError("emulator already started")
        self._stopping.clear()
        self._store = EventStore(self.db_path)
        self._checker = CheckerPool(self.workers)
        self._put = PutAuditEvents(self._store, self.channels, self.quota, self.dice,
                                   self._checker, lambda: self.wall_clock())
        self.lake = Lake(self._store, self.channels, self.credentials, lambda: self.wall_clock(),
                         self.query_timeout)
        try:
            self._server = _Server((self.host, self._requested_port), _Handler, self)
        except BaseException:
            self.lake.close()
            self._store.close()
            raise
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.1},
                                        name=f"emulator-{self.port}", daemon=True)
        self._thread.start()
        log.info("emulator listening on %s, database %s", self.url, os.fspath(self.db_path))
        for line in self.channels.describe():
            log.info("channel: %s", line)
        log.info("signature check: %s", "verified against the configured access key"
                 if self.credentials else "form only (no --access-key given)")
        log.info("event checks: %s", f"{self.workers} worker process(es)" if self.workers
                 else "in the serving threads")
        log.info("console and /_emulator/* answer Host: %s; fault changes %s",
                 "any" if "*" in self.allowed_hosts else ", ".join(sorted(self.allowed_hosts)),
                 "need the admin token" if self.admin_token else "are open (no --admin-token)")
        log.info("Lake queries end TIMED_OUT after %g s", self.query_timeout)
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._stopping.set()  # ends injected latency waits
        self._server.shutdown()
        self._store.release_waiters()  # ends long polls of the page
        self.lake.queries.close()  # ends queries that page requests are waiting for
        self._server.close_connections()
        self._server.server_close()  # joins the connection threads
        self._thread.join()
        self._checker.close()
        self.lake.close()
        self._store.close()
        self._server = None
        log.info("emulator stopped")

    def __enter__(self) -> "Emulator":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("emulator not started")
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        host = self.host if ":" not in self.host else f"[{self.host}]"
        return f"http://{host}:{self.port}"

    # inspection ------------------------------------------------------------------------------
    def events(self, limit: int | None = None, after: int | None = None) -> list[dict]:
        """Stored wrapped events with cursor > after, oldest first (also after ``stop()``)."""
        if self._server is None:
            bodies = read_page(self.db_path, limit, after)
        else:
            bodies, _ = self._store.page(limit, after)
        return [json.loads(body) for body in bodies]

    def stats(self) -> dict:
        return self._stats.snapshot()

    def set_faults(self, faults: Faults) -> None:
        self.dice.set(faults)
        log.info("faults set: %s", faults.to_dict())

    @property
    def faults(self) -> Faults:
        return self.dice.faults


def default_workers() -> int:
    """Checker processes used when not told: one per CPU beyond the first, at most 4.

    On 2 CPUs that is none: measured there (bench/emulator_throughput.py), worker processes
    cost ~1 ms more CPU per call (pickling, pipes) than they win back in parallelism.
    """
    cpus = os.cpu_count() or 1
    return 0 if cpus <= 2 else min(4, cpus - 1)


def _allowed_hosts(listen_host: str, given: Iterable[str] | None) -> frozenset[str]:
    if given is not None:
        return frozenset(name.strip().strip("[]").lower() for name in given if name.strip())
    names = set(LOOPBACK_HOSTS)
    if listen_host not in ("", "0.0.0.0", "::"):
        names.add(listen_host.strip("[]").lower())
    return frozenset(names)


def host_allowed(header: str | None, allowed: frozenset[str]) -> bool:
    """Whether a ``Host`` header (``name[:port]`` or ``[v6][:port]``) names an allowed host."""
    if "*" in allowed:
        return True
    if not header:
        return False
    header = header.strip().lower()
    if header.startswith("["):
        name = header[1:header.find("]")] if "]" in header else ""
    else:
        name = header.rsplit(":", 1)[0] if header.count(":") == 1 else header
    return name in allowed or name.endswith(".localhost") and "localhost" in allowed


class _Server(ThreadingHTTPServer):
    daemon_threads = False
    block_on_close = True
    allow_reuse_address = True
    request_queue_size = BACKLOG

    def __init__(self, address, handler, emulator: Emulator) -> None:
        self.emulator = emulator
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, handler)

    def process_request(self, request, client_address):
        with self._open_lock:
            full = len(self._open) >= self.emulator.max_connections
            if not full:
                self._open.add(request)
        if full:
            return self._refuse(request)
        super().process_request(request, client_address)

    def _refuse(self, request) -> None:
        """Over the connection cap: a short 503 (clients retry it), then close, no thread."""
        body = (b'{"__type":"ServiceUnavailable",'
                b'"message":"Too many connections to the emulator; retry."}')
        try:
            # Read the request if it comes at once: closing with unread data sends a reset,
            # which would destroy the answer before the client reads it.
            request.settimeout(0.1)
            try:
                request.recv(65536)
            except TimeoutError:
                pass
            request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json"
                            b"\r\nx-amzn-ErrorType: ServiceUnavailable\r\nConnection: close\r\n"
                            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            request.shutdown(socket.SHUT_WR)
            request.recv(65536, socket.MSG_DONTWAIT)
        except OSError:
            pass
        log.warning("connection refused: %d connections open (the cap)",
                    self.emulator.max_connections)
        self.shutdown_request(request)

    def shutdown_request(self, request):
        with self._open_lock:
            self._open.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        with self._open_lock:
            sockets = list(self._open)
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def handle_error(self, request, client_address):
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError)):
            log.debug("connection ended: %s", type(exc).__name__)
        else:
            log.error("unexpected error serving a connection: %s", _where(exc))


class Route(NamedTuple):
    """What serves one (method, path): ``serve(handler, query, body)``, and the largest body
    read for it (``None``: the route reads its own body)."""

    serve: Callable[["_Handler", str, bytes], None]
    body_cap: int | None = SMALL_BODY
    console: bool = True  # the page or its data: needs an allowed Host


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "cloudtrail-data-emulator"

    server: _Server
    _json_1_1 = False  # this request is a cloudtrail control-plane (X-Amz-Target) call

    def setup(self):
        # Every read (request line, headers, body) of this connection waits at most this long;
        # an idle keep-alive connection ends after it too.
        self.timeout = self.server.emulator.connection_timeout
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def send_error(self, code, message=None, explain=None):
        """Protocol-level errors (unparsable request line, headers) in the service's JSON form."""
        self.close_connection = True
        if getattr(self, "request_version", "HTTP/0.9") == "HTTP/0.9":
            return  # not HTTP/1.x: there is no status line to answer with
        self.request_id = str(uuid.uuid4())
        log.info("bad request answered %d: %s", code, _redact(message or ""))
        try:
            self._error(code, "BadRequest" if code < 500 else "InternalFailure",
                        message or self.responses.get(code, ("Malformed HTTP request",))[0])
        except OSError:
            pass

    def log_request(self, code="-", size="-"):
        # The path only: the query string carries the external id.
        path = urlsplit(self.path).path if hasattr(self, "path") else "-"
        log.debug("%s %s %s %s", self.address_string(), self.command, _redact(path), code)

    def log_message(self, format, *args):  # noqa: A002 - stdlib signature
        log.debug("%s %s", self.address_string(), _redact(format % args))

    # dispatch --------------------------------------------------------------------------------
    def do_POST(self):
        self._dispatch()

    def do_GET(self):
        self._dispatch()

    def do_PUT(self):
        self._dispatch()

    def do_DELETE(self):
        self._dispatch()

    def do_HEAD(self):
        self._dispatch()

    def do_PATCH(self):
        self._dispatch()

    def _dispatch(self):
        self.request_id = str(uuid.uuid4())
        self._json_1_1 = False
        try:
            parts = urlsplit(self.path)
            route = ROUTES.get((self.command, parts.path))
            if parts.path == "/PutAuditEvents":
                route = ROUTES[("POST", "/PutAuditEvents")]  # it answers other methods itself
            elif self.headers.get("X-Amz-Target", "").startswith(TARGET_PREFIX):
                route = LAKE_API  # the cloudtrail control plane answers on any path
                self._json_1_1 = True  # errors from here on carry __type (see _error)
            if route is None or route.body_cap is not None:
                body = self._read_body(route.body_cap if route else SMALL_BODY)
                if body is None:
                    self.close_connection = True
                    raise ApiError(413, "RequestEntityTooLargeException",
                                   f"The request body is larger than "
                                   f"{route.body_cap if route else SMALL_BODY} bytes.")
            else:
                body = b""
            emulator = self.server.emulator
            checked = route is not None and (
                route.console or route is LAKE_API and emulator.credentials is None)
            if checked and not host_allowed(self.headers.get("Host"), emulator.allowed_hosts):
                raise ApiError(403, "AccessDeniedException",
                               "Host header not allowed (see --allow-host).")
            if route is None:
                raise ApiError(404, "UnknownOperationException",
                               f"No operation {self.command} {parts.path}")
            route.serve(self, parts.query, body)
        except ApiError as exc:  # found before a route could answer (e.g. unreadable body)
            self._error(exc.status, exc.code, exc.message)
        except ConnectionError:
            self.close_connection = True
        except Exception as exc:
            log.error("unexpected error handling %s %s (request %s): %s", self.command,
                      _redact(urlsplit(self.path).path), self.request_id, _where(exc))
            self.close_connection = True
            try:
                self._error(500, "InternalFailure", "The emulator hit an unexpected error.")
            except OSError:
                pass

    # PutAuditEvents --------------------------------------------------------------------------
    def _put_audit_events(self, query: str, _body: bytes):
        emulator = self.server.emulator
        stats = emulator._stats
        try:
            body = self._read_body(MAX_BODY)
            if body is None:
                raise ApiError(413, "RequestEntityTooLargeException",
                               f"The request body is larger than {MAX_BODY} bytes.")
            if self.command != "POST":
                raise ApiError(405, "UnknownOperationException",
                               "PutAuditEvents must be called with POST")
            try:
                caller = auth.check_request(self.command, self.path, self.headers, body,
                                            emulator.credentials, emulator.wall_clock)
            except auth.AuthError as exc:
                raise ApiError(exc.status, exc.code, exc.message)
            result = emulator._put(query, body, caller.region, self.request_id)
        except ApiError as exc:
            self._delay(emulator)
            stats.record(exc.code)
            self._store_refusal(query, exc)
            return self._error(exc.status, exc.code, exc.message)
        self._delay(emulator)
        stats.record("partial" if result.failed else "ok", len(result.successful),
                     [entry["errorCode"] for entry in result.failed])
        self._json(200, result.body())

    def _store_refusal(self, query: str, exc: ApiError) -> None:
        arns = parse_qs(query).get("channelArn") or [None]
        arn = arns[0][:2048] if arns[0] else None
        self.server.emulator._store.add_refusals([RefusalRow(
            time_text(self.server.emulator.wall_clock()), "request", arn, self.request_id, None,
            exc.code, exc.message)])

    # Lake queries ----------------------------------------------------------------------------
    def _lake_api(self, _query: str, body: bytes):
        answer = self.server.emulator.lake.api.handle(self.command, self.path, self.headers, body)
        self._send(answer.status, answer.body, answer.content_type, answer.headers)

    def _lake_page(self, _query: str, body: bytes):
        answer = self.server.emulator.lake.api.page_query(body)
        self._send(answer.status, answer.body, answer.content_type, answer.headers)

    def _lake_stores(self, _query: str, _body: bytes):
        answer = self.server.emulator.lake.api.page_stores()
        self._send(answer.status, answer.body, answer.content_type, answer.headers)

    def _delay(self, emulator: Emulator):
        latency = emulator.faults.latency_ms
        if latency:
            emulator._stopping.wait(latency / 1000.0)

    # inspection ------------------------------------------------------------------------------
    def _events(self, query: str, _body: bytes):
        params = parse_qs(query)
        try:
            limit = _int_param(params, "limit", DEFAULT_PAGE, 1, MAX_PAGE)
            after = _int_param(params, "after", 0, 0, MAX_CURSOR)
            tail = _int_param(params, "tail", None, 1, MAX_PAGE)
            wait = _int_param(params, "wait", 0, 0, int(MAX_WAIT))
        except ValueError as exc:
            return self._error(400, "ValidationException", str(exc))
        store = self.server.emulator._store
        if tail is not None:
            bodies, cursor = store.tail(tail)
        else:
            if wait and store.last_seq <= after:
                store.wait_for_after(after, wait)
            bodies, cursor = store.page(limit, after)
        payload = f'{{"events":[{",".join(bodies)}],"next":{cursor}}}'.encode()
        self._send(200, payload, "application/json")

    def _search(self, query: str, _body: bytes):
        params = parse_qs(query)
        try:
            kind = _text_param(params, "kind") or "events"
            if kind not in ("events", "refusals"):
                raise ValueError("query parameter kind must be events or refusals")
            limit = _int_param(params, "limit", CONSOLE_PAGE, 1, 1000)
            before = _int_param(params, "before", None, 1, MAX_CURSOR)
            filters = Filters(**{name: _text_param(params, param) for name, param in (
                ("source", "eventSource"), ("name", "eventName"), ("principal", "principal"),
                ("uid", "uid"), ("code", "errorCode"), ("text", "q"))})
        except ValueError as exc:
            return self._error(400, "ValidationException", str(exc))
        store = self.server.emulator._store
        search = store.search_events if kind == "events" else store.search_refusals
        items, next_before = search(filters, before, limit)
        self._json(200, {"kind": kind, "items": items, "next": next_before})

    def _event(self, query: str, _body: bytes):
        try:
            event_id = _text_param(parse_qs(query), "id")
        except ValueError as exc:
            return self._error(400, "ValidationException", str(exc))
        found = self.server.emulator._store.event(event_id) if event_id else None
        if found is None:
            return self._error(404, "EventNotFound", "No stored event has this eventID.")
        seq, body = found
        self._send(200, f'{{"seq":{seq},"event":{body}}}'.encode(), "application/json")

    def _refusal(self, query: str, _body: bytes):
        try:
            seq = _int_param(parse_qs(query), "seq", None, 1, MAX_CURSOR)
        except ValueError as exc:
            return self._error(400, "ValidationException", str(exc))
        found = self.server.emulator._store.refusal(seq) if seq else None
        if found is None:
            return self._error(404, "RefusalNotFound", "No stored refusal has this seq.")
        self._json(200, found)

    def _summary(self, query: str, _body: bytes):
        params = parse_qs(query)
        try:
            events_after = _int_param(params, "events", None, 0, MAX_CURSOR)
            refusals_after = _int_param(params, "refusals", None, 0, MAX_CURSOR)
            wait = _int_param(params, "wait", 0, 0, int(MAX_WAIT))
        except ValueError as exc:
            return self._error(400, "ValidationException", str(exc))
        emulator = self.server.emulator
        store = emulator._store
        if wait and events_after is not None and refusals_after is not None:
            store.wait_for_change(events_after, refusals_after, wait)
        self._json(200, {"last": {"events": store.last_seq, "refusals": store.last_refusal},
                         "stored": store.stored_counts(), "sinceStart": emulator.stats()})

    def _rates(self, query: str, _body: bytes):
        try:
            seconds = _int_param(parse_qs(query), "seconds", 300, 1, MAX_RATE_SECONDS)
        except ValueError as exc:
            return self._error(400, "ValidationException", str(exc))
        now = self.server.emulator.wall_clock()
        rates = self.server.emulator._store.rates(
            time_text(now - _dt.timedelta(seconds=seconds))[:19])
        self._json(200, {"now": time_text(now), "seconds": seconds, **rates})

    def _put_faults(self, _query: str, body: bytes):
        token = self.server.emulator.admin_token
        if token is not None:
            given = self.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode("utf-8", "replace"),
                                       f"Bearer {token}".encode()):
                return self._error(403, "AccessDeniedException",
                                   "Changing faults needs Authorization: Bearer <admin token>.")
        try:
            faults = Faults.from_dict(json.loads(body or b"null"))
        except (ValueError, TypeError) as exc:
            return self._error(400, "ValidationException", str(exc))
        self.server.emulator.set_faults(faults)
        self._json(200, faults.to_dict())

    def _page(self, _query: str, _body: bytes):
        page = importlib.resources.files(__package__).joinpath("static/index.html").read_bytes()
        self._send(200, page, "text/html; charset=utf-8")

    # plumbing --------------------------------------------------------------------------------
    def _read_body(self, cap: int) -> bytes | None:
        """The request body, or None when it is larger than ``cap`` (drained if it is at most
        ``DRAIN_LIMIT`` and this is PutAuditEvents, else left unread: the connection closes)."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            raise ApiErrorBeforeBody(411, "LengthRequiredException",
                                     "Chunked bodies are not supported: send Content-Length.")
        text = self.headers.get("Content-Length", "0").strip()
        if not _LENGTH_RE.match(text):
            self.close_connection = True  # where this body ends is unknown
            raise ApiErrorBeforeBody(400, "BadRequest",
                                     "Content-Length must be a non-negative integer.")
        length = int(text)
        if length > cap:
            if length > DRAIN_LIMIT or cap < MAX_BODY:
                self.close_connection = True
            else:
                remaining = length
                while remaining:
                    chunk = self.rfile.read(min(remaining, 65536))
                    if not chunk:
                        raise ConnectionError("client went away")
                    remaining -= len(chunk)
            return None
        body = self.rfile.read(length) if length else b""
        if len(body) != length:
            raise ConnectionError("client went away")
        return body

    def _json(self, status: int, obj) -> None:
        self._send(status, json.dumps(obj, separators=(",", ":")).encode(), "application/json")

    def _error(self, status: int, code: str, message: str) -> None:
        # botocore reads a JSON 1.1 (cloudtrail) error's code from the body's __type alone, a
        # rest-json (cloudtrail-data) one's from the x-amzn-ErrorType header.
        error = {"__type": code, "message": message} if self._json_1_1 else {"message": message}
        body = json.dumps(error).encode()
        self._send(status, body, "application/json", {"x-amzn-ErrorType": code})

    def _send(self, status: int, body: bytes, content_type: str,
              extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("x-amzn-RequestId", self.request_id)
        self.send_header("Cache-Control", "no-store")
        for name, value in (extra or {}).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        # Headers and body leave in one write: two small writes meet Nagle's algorithm and the
        # client's delayed ACK, costing ~40 ms per call.
        self._headers_buffer.append(b"\r\n")
        if self.command != "HEAD":
            self._headers_buffer.append(body)
        self.flush_headers()


# Every route, in one place. A route added here gets the body cap, Host check and error
# handling of _dispatch.
ROUTES: dict[tuple[str, str], Route] = {
    ("POST", "/PutAuditEvents"): Route(_Handler._put_audit_events, None, console=False),
    ("GET", "/healthz"): Route(lambda h, q, b: h._json(200, {"status": "ok"}), console=False),
    ("GET", "/"): Route(_Handler._page),
    ("GET", "/index.html"): Route(_Handler._page),
    ("GET", "/_emulator/events"): Route(_Handler._events),
    ("GET", "/_emulator/search"): Route(_Handler._search),
    ("GET", "/_emulator/event"): Route(_Handler._event),
    ("GET", "/_emulator/refusal"): Route(_Handler._refusal),
    ("GET", "/_emulator/summary"): Route(_Handler._summary),
    ("GET", "/_emulator/rates"): Route(_Handler._rates),
    ("GET", "/_emulator/stats"): Route(lambda h, q, b: h._json(200, h.server.emulator.stats())),
    ("GET", "/_emulator/faults"): Route(
        lambda h, q, b: h._json(200, h.server.emulator.faults.to_dict())),
    ("PUT", "/_emulator/faults"): Route(_Handler._put_faults),
    ("POST", "/_emulator/query"): Route(_Handler._lake_page, LAKE_MAX_BODY),
    ("GET", "/_emulator/stores"): Route(_Handler._lake_stores),
}
# Signed cloudtrail control-plane calls (X-Amz-Target), on any path; signed, so any Host.
LAKE_API = Route(_Handler._lake_api, LAKE_MAX_BODY, console=False)


class ApiErrorBeforeBody(ApiError):
    """An error found before the body could be read: the connection closes after it."""


_LENGTH_RE = re.compile(r"\A[0-9]{1,18}\Z")  # ASCII digits only: int() also takes "٣"
_SECRET_PARAM_RE = re.compile(r"(externalId=)[^&\s'\"]*", re.IGNORECASE)


def _redact(text: str) -> str:
    """``text`` with any external id blanked: it is a shared secret, never logged."""
    return _SECRET_PARAM_RE.sub(r"\1***", text)


def _where(exc: BaseException) -> str:
    """One line naming an exception's type and the innermost place it was raised (no message:
    it could hold a payload)."""
    frames = traceback.extract_tb(exc.__traceback__)
    place = f" at {os.path.basename(frames[-1].filename)}:{frames[-1].lineno}" if frames else ""
    return f"{type(exc).__name__}{place}"


def _text_param(params: dict[str, list[str]], name: str) -> str:
    values = params.get(name)
    if not values:
        return ""
    if len(values[0]) > 1024:
        raise ValueError(f"query parameter {name} is longer than 1024 characters")
    return values[0]


def _int_param(params: dict[str, list[str]], name: str, default, low: int, high: int | None):
    values = params.get(name)
    if not values:
        return default
    if not re.fullmatch(r"-?[0-9]{1,19}", values[0]):
        raise ValueError(f"query parameter {name} must be an integer")
    value = int(values[0])
    if value < low or (high is not None and value > high):
        raise ValueError(f"query parameter {name} must be between {low} and {high or 'any'}")
    return value
