"""The sink's HTTP endpoints: ``/metrics`` (Prometheus text), ``/healthz`` and ``/readyz``.

``/healthz`` answers 200 while the sink is alive and not stuck, 503 otherwise; ``/readyz`` 200
while it delivers or has nothing to deliver, 503 otherwise. Both bodies are one JSON object
explaining the answer (never payloads). Other paths answer 404; methods other than GET and HEAD
405. :meth:`StatusServer.start` serves in one daemon thread; :meth:`StatusServer.stop` closes
every connection and joins it.

The port is ``0.0.0.0:9464`` in a pod, open to anything on the pod network, so the server holds
up to whatever a client sends (the HTTP/1.1 parsing is h11's):

- One thread (an asyncio event loop) serves every connection: an idle or slow client costs a
  socket, never a thread. The listen backlog is :data:`BACKLOG` (128).
- At most ``max_connections`` (:data:`MAX_CONNECTIONS`) are open at once. A connection beyond
  that closes the one that has waited longest for a request (an idle keep-alive or a slow
  client), so a probe or a scrape always gets in; when every open connection is mid-response the
  newcomer is closed instead.
- ``timeout`` (:data:`TIMEOUT` seconds) bounds the wait for each request's complete head (from
  the connection's start or the previous response: idle keep-alive and slowloris clients alike)
  and the writing of each response; past it the connection is closed.
- A request head is at most :data:`MAX_HEAD` bytes (else 431); a request with a body (any
  non-zero ``Content-Length`` or a ``Transfer-Encoding``) gets 413, unread. Malformed requests get
  400. Every such answer closes the connection.
- Nothing reaches a client or the log as a traceback: an endpoint that raises answers 500
  ``internal error`` and logs one line (``http request failed``, the route and the error); a
  client that goes away early logs one debug line; anything else the event loop reports is one
  ``http server error`` line.
"""

from __future__ import annotations

import asyncio
import http
import json
import logging
import socket
import threading
from typing import Callable

import h11
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

log = logging.getLogger(__name__)

BACKLOG = 128
MAX_CONNECTIONS = 64
TIMEOUT = 10.0
MAX_HEAD = 8192
_READ_SIZE = 4096
_LINGER_SECONDS, _LINGER_BYTES = 2.0, 65536
_ROUTES = ("/metrics", "/healthz", "/readyz")


class _Closed(Exception):
    """The client closed, reset or timed out: nothing more to say to it."""


class _Refused(Exception):
    """A request answered with an error status, after which the connection closes."""

    def __init__(self, status: int, text: str):
        super().__init__(text)
        self.status, self.text = status, text


class _Client:
    __slots__ = ("writer", "task", "waiting_since")

    def __init__(self, writer: asyncio.StreamWriter, task, now: float):
        self.writer, self.task, self.waiting_since = writer, task, now


class StatusServer:
    def __init__(self, host: str, port: int, registry, health: Callable[[], tuple[bool, dict]],
                 ready: Callable[[], tuple[bool, dict]], *, timeout: float = TIMEOUT,
                 max_connections: int = MAX_CONNECTIONS):
        self.registry, self.health, self.ready = registry, health, ready
        self.timeout, self.max_connections = timeout, max_connections
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                    flags=socket.AI_PASSIVE)[0][0]
        # Bound here, not in start(): a taken port is the caller's error to report (OSError).
        self._sock = socket.create_server((host, port), family=family, backlog=BACKLOG)
        self.host, self.port = self._sock.getsockname()[:2]
        self._clients: dict[asyncio.Task, _Client] = {}
        self._loop = asyncio.new_event_loop()
        self._loop.set_exception_handler(_log_loop_error)
        self._stopped = self._loop.create_future()
        self._thread = threading.Thread(target=self._run, name="sink-http", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        if not self._thread.is_alive():
            self._sock.close()
            self._loop.close()
            return
        self._loop.call_soon_threadsafe(_resolve, self._stopped)
        self._thread.join(10)

    # -- the event loop's thread ----------------------------------------------------------------
    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._serve())
        finally:
            self._loop.close()

    async def _serve(self) -> None:
        # backlog again: asyncio calls listen() itself, with 100 unless told.
        server = await asyncio.start_server(self._accept, sock=self._sock, backlog=BACKLOG)
        try:
            await self._stopped
        finally:
            server.close()
            for client in list(self._clients.values()):
                client.writer.transport.abort()
                client.task.cancel()
            await asyncio.gather(*self._clients, return_exceptions=True)
            await server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        if len(self._clients) >= self.max_connections and not self._evict_one():
            writer.transport.abort()
            return
        client = self._clients[task] = _Client(writer, task, loop.time())
        try:
            await self._converse(reader, client)
            # Flush what is still buffered, then close; a client that reads nothing more is
            # evictable meanwhile and cut off at the timeout.
            client.waiting_since = loop.time()
            writer.close()
            await asyncio.wait_for(writer.wait_closed(), self.timeout)
        except (_Closed, asyncio.TimeoutError):
            pass
        except (ConnectionError, OSError) as exc:
            log.debug("http client went away", extra={"error": type(exc).__name__})
        except asyncio.CancelledError:
            pass  # evicted, or the server stops
        except Exception as exc:  # a bug here must not end the server or print a traceback
            log.error("http connection failed", extra={"error": f"{type(exc).__name__}: {exc}"})
        finally:
            del self._clients[task]
            writer.transport.abort()  # a no-op once closed

    def _evict_one(self) -> bool:
        waiting = [c for c in self._clients.values() if c.waiting_since is not None]
        if not waiting:
            return False
        oldest = min(waiting, key=lambda c: c.waiting_since)
        oldest.waiting_since = None
        oldest.writer.transport.abort()
        oldest.task.cancel()
        return True

    async def _converse(self, reader: asyncio.StreamReader, client: _Client) -> None:
        loop = asyncio.get_running_loop()
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        while True:
            client.waiting_since = loop.time()
            try:
                request = await self._read_request(conn, reader, loop.time() + self.timeout)
            except _Refused as refused:
                await self._write(client.writer, _plain_response(refused.status, refused.text))
                await self._linger(reader, client.writer)
                return
            if request is None:
                return
            client.waiting_since = None
            status, ctype, body = self._answer(request)
            headers = [("Content-Type", ctype), ("Content-Length", str(len(body))),
                       ("Cache-Control", "no-store")]
            if status == 405:
                headers.append(("Allow", "GET, HEAD"))
            out = conn.send(h11.Response(status_code=status, headers=headers,
                                         reason=http.HTTPStatus(status).phrase.encode()))
            if request.method != b"HEAD":
                out += conn.send(h11.Data(data=body))
            out += conn.send(h11.EndOfMessage())
            await self._write(client.writer, out)
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return  # Connection: close (HTTP/1.0, or the client asked)
            conn.start_next_cycle()

    async def _read_request(self, conn: h11.Connection, reader: asyncio.StreamReader,
                            deadline: float) -> h11.Request | None:
        """The next request, its (empty) body consumed; None when the client closed cleanly."""
        loop = asyncio.get_running_loop()
        request, taken = None, 0
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                status = exc.error_status_hint
                raise _Refused(status, http.HTTPStatus(status).phrase.lower()) from None
            if event is h11.NEED_DATA:
                if request is None and taken > MAX_HEAD:
                    raise _Refused(431, "request head too large")
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise _Closed()
                try:
                    data = await asyncio.wait_for(
                        reader.read(min(_READ_SIZE, MAX_HEAD + 1 - taken)), remaining)
                except asyncio.TimeoutError:
                    raise _Closed() from None
                taken += len(data)
                conn.receive_data(data)
            elif isinstance(event, h11.Request):
                request = event
                headers = dict(event.headers)
                if int(headers.get(b"content-length", 0)) or b"transfer-encoding" in headers:
                    raise _Refused(413, "no request body is accepted")
            elif isinstance(event, h11.EndOfMessage):
                return request
            elif isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                return None
            # h11.Data cannot come: a request with a body was refused above.

    async def _linger(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Half-close, then discard what the client still sends (bounded): closing a socket with
        unread input resets the connection, and a reset can destroy the error answer before
        the client reads it."""
        if writer.can_write_eof():
            writer.write_eof()
        loop = asyncio.get_running_loop()
        deadline, left = loop.time() + min(self.timeout, _LINGER_SECONDS), _LINGER_BYTES
        while left > 0 and (remaining := deadline - loop.time()) > 0:
            try:
                data = await asyncio.wait_for(reader.read(min(left, _READ_SIZE)), remaining)
            except asyncio.TimeoutError:
                return
            if not data:
                return
            left -= len(data)

    async def _write(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        writer.write(data)
        try:
            await asyncio.wait_for(writer.drain(), self.timeout)
        except asyncio.TimeoutError:
            raise _Closed() from None

    def _answer(self, request: h11.Request) -> tuple[int, str, bytes]:
        path = request.target.split(b"?", 1)[0].decode("latin-1")
        if request.method not in (b"GET", b"HEAD"):
            return 405, "text/plain; charset=utf-8", b"method not allowed\n"
        if path not in _ROUTES:
            return 404, "text/plain; charset=utf-8", b"not found\n"
        try:
            if path == "/metrics":
                return 200, CONTENT_TYPE_LATEST, generate_latest(self.registry)
            ok, info = (self.health if path == "/healthz" else self.ready)()
            return 200 if ok else 503, "application/json", (json.dumps(info) + "\n").encode()
        except Exception as exc:
            log.error("http request failed", extra={"route": path,
                                                    "error": f"{type(exc).__name__}: {exc}"})
            return 500, "text/plain; charset=utf-8", b"internal error\n"


def _plain_response(status: int, text: str) -> bytes:
    body = (text + "\n").encode()
    return (f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\n"
            "Content-Type: text/plain; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body


def _resolve(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


def _log_loop_error(loop, context: dict) -> None:
    exc = context.get("exception")
    log.error("http server error", extra={
        "error": f"{type(exc).__name__}: {exc}" if exc else str(context.get("message"))})
