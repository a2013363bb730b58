"""The HTTP side of the emulator and the ``Emulator`` object that owns its lifecycle.

Routes:

- ``POST /PutAuditEvents?channelArn=..[&externalId=..]`` -> ``ingest.PutAuditEvents``; errors as
  botocore parses them: status, ``x-amzn-ErrorType: <code>``, body ``{"message": ...}``, and a
  ``x-amzn-RequestId`` on every answer;
- ``GET /_emulator/events?limit=N&after=CURSOR[&wait=S]`` -> ``{"events": [...], "next": C}``
  (oldest first; ``wait`` blocks up to S <= 25 seconds for a first new event; ``tail=N`` instead
  of ``after`` returns the newest N);
- ``GET /_emulator/stats``; ``GET``/``PUT /_emulator/faults``; ``GET /healthz``; ``GET /`` the
  live page;
- ``POST /`` with ``X-Amz-Target: ...CloudTrail_20131101.<Operation>`` (the ``cloudtrail``
  control plane's Lake queries) and ``POST /_emulator/query`` (the page's query box) ->
  ``lake``.

Threads: one per connection (``ThreadingHTTPServer``, HTTP/1.1 keep-alive). ``stop()`` stops
accepting, shuts down every open connection so idle keep-alive threads end, joins all threads
and closes the database. Request handling never raises into the server: any unexpected error
answers 500 ``InternalFailure`` and is logged without the payload.
"""

from __future__ import annotations

import datetime as _dt
import importlib.resources
import json
import logging
import os
import socket
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable
from urllib.parse import parse_qs, urlsplit

from . import auth
from .channels import Channels
from .checker import CheckerPool
from .faults import FaultDice, Faults
from .ingest import ApiError, PutAuditEvents
from .lake import TARGET_PREFIX, Lake
from .quota import CallQuota
from .stats import Stats
from .storage import MAX_PAGE, EventStore, read_page

log = logging.getLogger("cloudtrail_sink.emulator")

MAX_BODY = 1_000_000
DRAIN_LIMIT = 16 * 1024 * 1024  # larger bodies are not read: the connection is closed
LAKE_MAX_BODY = 256 * 1024  # a QueryStatement is at most 10,000 characters
DEFAULT_PAGE = 1000
MAX_WAIT = 25.0


class Emulator:
    """A local CloudTrail Data endpoint (see the package docstring for what it checks)."""

    def __init__(self, db_path, host: str = "127.0.0.1", port: int = 0,
                 channels: dict[str, str | None] | None = None, quota_per_second: float = 100.0,
                 faults: Faults | None = None, seed: int = 0,
                 credentials: tuple[str, str] | None = None,
                 clock: Callable[[], float] = time.monotonic, workers: int | None = 0,
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
                                   self._checker)
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


class _Server(ThreadingHTTPServer):
    daemon_threads = False
    block_on_close = True
    allow_reuse_address = True

    def __init__(self, address, handler, emulator: Emulator) -> None:
        self.emulator = emulator
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, handler)

    def process_request(self, request, client_address):
        with self._open_lock:
            self._open.add(request)
        super().process_request(request, client_address)

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
        log.exception("unexpected error serving a connection")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "cloudtrail-data-emulator"
    timeout = 120  # idle keep-alive connections end eventually

    server: _Server

    def setup(self):
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def send_error(self, code, message=None, explain=None):
        """Protocol-level errors (unparsable request line, headers) in the service's JSON form."""
        self.close_connection = True
        if getattr(self, "request_version", "HTTP/0.9") == "HTTP/0.9":
            return  # not HTTP/1.x: there is no status line to answer with
        self.request_id = str(uuid.uuid4())
        try:
            self._error(code, "BadRequest" if code < 500 else "InternalFailure",
                        message or self.responses.get(code, ("Malformed HTTP request",))[0])
        except OSError:
            pass

    def log_message(self, format, *args):  # noqa: A002 - stdlib signature
        log.debug("%s %s", self.address_string(), format % args)

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
        try:
            parts = urlsplit(self.path)
            route = (self.command, parts.path)
            lake = (route == ("POST", "/_emulator/query")
                    or self.headers.get("X-Amz-Target", "").startswith(TARGET_PREFIX))
            if (route != ("PUT", "/_emulator/faults") and parts.path != "/PutAuditEvents"
                    and not lake):
                self._drain_body()  # a body nobody reads would be taken for the next request
            if parts.path == "/PutAuditEvents":
                self._put_audit_events(parts.query)
            elif lake:
                self._lake(route == ("POST", "/_emulator/query"))
            elif route == ("GET", "/_emulator/events"):
                self._events(parts.query)
            elif route == ("GET", "/_emulator/stats"):
                self._json(200, self.server.emulator.stats())
            elif route == ("GET", "/_emulator/faults"):
                self._json(200, self.server.emulator.faults.to_dict())
            elif route == ("PUT", "/_emulator/faults"):
                self._put_faults()
            elif route == ("GET", "/healthz"):
                self._json(200, {"status": "ok"})
            elif route in (("GET", "/"), ("GET", "/index.html")):
                self._page()
            else:
                self._error(404, "UnknownOperationException",
                            f"No operation {self.command} {parts.path}")
        except ApiError as exc:  # found before a route could answer (e.g. unreadable body)
            self._error(exc.status, exc.code, exc.message)
        except ConnectionError:
            self.close_connection = True
        except Exception:
            log.exception("unexpected error handling %s (request %s)", self.command,
                          self.request_id)
            self.close_connection = True
            try:
                self._error(500, "InternalFailure", "The emulator hit an unexpected error.")
            except OSError:
                pass

    # PutAuditEvents --------------------------------------------------------------------------
    def _put_audit_events(self, query: str):
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
            result = emulator._put(query, body, caller.region)
        except ApiError as exc:
            self._delay(emulator)
            stats.record(exc.code)
            return self._error(exc.status, exc.code, exc.message)
        self._delay(emulator)
        stats.record("partial" if result.failed else "ok", len(result.successful),
                     [entry["errorCode"] for entry in result.failed])
        self._json(200, result.body())

    def _lake(self, page: bool):
        body = self._read_body(LAKE_MAX_BODY)
        if body is None:
            return self._error(413, "RequestEntityTooLargeException",
                               f"The request body is larger than {LAKE_MAX_BODY} bytes.")
        api = self.server.emulator.lake.api
        answer = (api.page_query(body) if page
                  else api.handle(self.command, self.path, self.headers, body))
        self._send(answer.status, answer.body, answer.content_type, answer.headers)

    def _delay(self, emulator: Emulator):
        latency = emulator.faults.latency_ms
        if latency:
            emulator._stopping.wait(latency / 1000.0)

    # inspection ------------------------------------------------------------------------------
    def _events(self, query: str):
        params = parse_qs(query)
        try:
            limit = _int_param(params, "limit", DEFAULT_PAGE, 1, MAX_PAGE)
            after = _int_param(params, "after", 0, 0, None)
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

    def _put_faults(self):
        body = self._read_body(64 * 1024)
        try:
            if body is None:
                raise ValueError("faults body too large")
            faults = Faults.from_dict(json.loads(body or b"null"))
        except (ValueError, TypeError) as exc:
            return self._error(400, "ValidationException", str(exc))
        self.server.emulator.set_faults(faults)
        self._json(200, faults.to_dict())

    def _page(self):
        page = importlib.resources.files(__package__).joinpath("static/index.html").read_bytes()
        self._send(200, page, "text/html; charset=utf-8")

    # plumbing --------------------------------------------------------------------------------
    def _read_body(self, cap: int) -> bytes | None:
        """The request body, or None (after draining it) when it is larger than ``cap``."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            raise ApiErrorBeforeBody(411, "LengthRequiredException",
                                     "Chunked bodies are not supported: send Content-Length.")
        text = self.headers.get("Content-Length", "0").strip()
        if not text.isdigit():
            self.close_connection = True  # where this body ends is unknown
            raise ApiErrorBeforeBody(400, "BadRequest",
                                     "Content-Length must be a non-negative integer.")
        length = int(text)
        if length > cap:
            if length > DRAIN_LIMIT:
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

    def _drain_body(self):
        try:
            self._read_body(DRAIN_LIMIT)
        except ApiErrorBeforeBody:
            pass

    def _json(self, status: int, obj) -> None:
        self._send(status, json.dumps(obj, separators=(",", ":")).encode(), "application/json")

    def _error(self, status: int, code: str, message: str) -> None:
        body = json.dumps({"message": message}).encode()
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


class ApiErrorBeforeBody(ApiError):
    """An error found before the body could be read: the connection closes after it."""


def _int_param(params: dict[str, list[str]], name: str, default, low: int, high: int | None):
    values = params.get(name)
    if not values:
        return default
    try:
        value = int(values[0])
    except ValueError:
        raise ValueError(f"query parameter {name} must be an integer")
    if value < low or (high is not None and value > high):
        raise ValueError(f"query parameter {name} must be between {low} and {high or 'any'}")
    return value
