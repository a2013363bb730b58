"""The sink's metrics and health server (httpserver.py) under hostile and careless clients.

The port is 0.0.0.0:9464 in a pod: anything on the pod network can open connections and send
anything. What a user relies on: the kubelet's probes and Prometheus's scrapes keep getting
answers (200 idle connections cost no thread and do not lock a probe out; the listen queue holds
a burst of 128 while the server is busy; idle and slow clients are cut off at the timeout), and
the log stays one JSON object per line with no traceback, whatever a client does.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
import socket
import struct
import threading
import time
import urllib.request

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter

from cloudtrail_sink import httpserver, logs


@contextlib.contextmanager
def status_server(health=None, ready=None, **kwargs):
    registry = CollectorRegistry()
    Counter("demo_events", "events", registry=registry).inc(3)
    server = httpserver.StatusServer(
        "127.0.0.1", 0, registry, health or (lambda: (True, {"status": "ok"})),
        ready or (lambda: (True, {"status": "ready"})), **kwargs)
    server.start()
    try:
        yield server
    finally:
        server.stop()
    assert not server._thread.is_alive()


@contextlib.contextmanager
def json_log():
    """The sink's log, as JSON lines, at debug level (what an operator debugging would see)."""
    logger = logging.getLogger("cloudtrail_sink")
    saved = logger.handlers[:], logger.level, logger.propagate
    stream = io.StringIO()
    logs.setup("debug", "json", stream=stream)
    try:
        yield stream
    finally:
        logger.handlers[:], logger.level, logger.propagate = saved


@pytest.fixture
def log_stream():
    with json_log() as stream:
        yield stream


def log_lines(stream: io.StringIO) -> list[dict]:
    text = stream.getvalue()
    assert "Traceback" not in text
    return [json.loads(line) for line in text.splitlines()]


def get(server, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}{path}",
                                    timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def closed_by_server(sock: socket.socket, wait: float) -> bool:
    """True when the server closed ``sock`` within ``wait`` seconds (EOF or reset, no bytes)."""
    sock.settimeout(wait)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def reset(sock: socket.socket) -> None:
    """Close with an RST, as a client that crashes or gives up does."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def exchange(port: int, data: bytes, half_close: bool, wait: float = 5.0) -> bytes:
    """Send ``data``, then read until the server closes (or ``wait`` passes)."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as sock:
        try:
            sock.sendall(data)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server already answered and closed: what it sent is read below
        out = b""
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            out += chunk
        else:
            raise AssertionError(f"the server neither answered nor closed within {wait} s")
        return out


def slow_probe(body: dict):
    """A probe that signals `entered` when called and answers `body` once `release` is set."""
    entered, release = threading.Event(), threading.Event()

    def probe():
        entered.set()
        release.wait(10)
        return True, body

    return probe, entered, release


def test_200_idle_connections_cost_no_thread_and_do_not_lock_out_healthz():
    with status_server() as server:
        threads_before = threading.active_count()
        idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(200)]
        try:
            # The server keeps at most max_connections: the oldest idle ones are closed.
            closed = [s for s in idle if closed_by_server(s, 0.05)]
            deadline = time.monotonic() + 5
            while len(closed) < 200 - server.max_connections and time.monotonic() < deadline:
                closed += [s for s in idle if s not in closed and closed_by_server(s, 0.01)]
            assert len(closed) >= 200 - server.max_connections
            assert threading.active_count() == threads_before

            # A probe still gets in, within the kubelet's usual 1 s timeout.
            assert get(server, "/healthz", timeout=1.0) == (200, b'{"status": "ok"}\n')
        finally:
            for s in idle:
                s.close()
        assert threading.active_count() == threads_before
        assert get(server, "/metrics")[0] == 200


def test_the_listen_queue_holds_a_burst_of_128_while_the_server_is_busy():
    with open("/proc/sys/net/core/somaxconn") as f:
        if int(f.read()) < httpserver.BACKLOG:
            pytest.skip("net.core.somaxconn is below the server's backlog on this machine")
    slow_health, entered, release = slow_probe({"status": "ok"})
    with status_server(health=slow_health) as server:
        # One slow probe keeps the server's thread busy: new connections wait in the kernel's
        # accept queue, which drops connection attempts beyond the backlog.
        probe = threading.Thread(target=get, args=(server, "/healthz"))
        probe.start()
        burst = []
        try:
            assert entered.wait(5)
            for _ in range(httpserver.BACKLOG):
                burst.append(socket.create_connection(("127.0.0.1", server.port), timeout=0.5))
        finally:
            release.set()
            probe.join(10)
            for s in burst:
                s.close()
        assert len(burst) == httpserver.BACKLOG
        assert get(server, "/readyz")[0] == 200


def test_idle_and_slow_clients_are_cut_off_at_the_timeout():
    with status_server(timeout=0.3) as server:
        idle = socket.create_connection(("127.0.0.1", server.port))
        slow = socket.create_connection(("127.0.0.1", server.port))
        try:
            assert closed_by_server(idle, 5)
            # A head trickled one byte at a time never completes within the timeout.
            sent, started = 0, time.monotonic()
            with pytest.raises(OSError):
                for byte in b"GET /healthz HTTP/1.1\r\nHost: x\r\n" * 20:
                    slow.send(bytes([byte]))
                    sent += 1
                    time.sleep(0.02)
            assert time.monotonic() - started < 5
            assert closed_by_server(slow, 5)
            # Keep-alive: later requests on one connection are answered, then it idles out.
            with socket.create_connection(("127.0.0.1", server.port)) as sock:
                for method, status in ((b"DELETE", b"405"), (b"GET", b"200"), (b"HEAD", b"200")):
                    sock.sendall(method + b" /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                    head = sock.recv(65536)
                    assert head.startswith(b"HTTP/1.1 " + status + b" "), head
                    if status == b"405":
                        assert b"\r\nAllow: GET, HEAD\r\n" in head
                assert closed_by_server(sock, 5)
        finally:
            idle.close()
            slow.close()


@pytest.mark.parametrize("request_bytes, status", [
    (b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 9000 + b"\r\n\r\n", 431),
    (b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello", 413),
    (b"GET /healthz HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 413),
    (b"POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\n\r\n", 413),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400),  # TLS to a plain port
    (b"GET /healthz HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n", 400),
], ids=["head-too-large", "body", "chunked-body", "huge-body", "tls", "malformed"])
def test_oversized_or_malformed_requests_get_an_error_status_and_the_connection_closes(
        request_bytes, status, log_stream):
    with status_server() as server:
        answer = exchange(server.port, request_bytes, half_close=False)
        assert answer.startswith(f"HTTP/1.1 {status} ".encode()), answer[:200]
        assert b"Traceback" not in answer
        assert get(server, "/healthz") == (200, b'{"status": "ok"}\n')
    assert not [line for line in log_lines(log_stream) if line["level"] == "error"]


def test_a_client_that_disconnects_early_logs_at_most_one_json_line(log_stream, capfd):
    slow_ready, entered, release = slow_probe({"status": "ready"})
    with status_server(ready=slow_ready) as server:
        # Gone while its answer is computed: the server writes to a reset connection.
        sock = socket.create_connection(("127.0.0.1", server.port))
        sock.sendall(b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert entered.wait(5)
        reset(sock)
        time.sleep(0.1)  # the RST reaches the server's socket before the answer is written
        release.set()
        # Gone mid-head, and gone right after connecting.
        half = socket.create_connection(("127.0.0.1", server.port))
        half.sendall(b"GET /metr")
        time.sleep(0.05)
        reset(half)
        reset(socket.create_connection(("127.0.0.1", server.port)))
        # Gone without reading a large answer.
        for _ in range(5):
            gone = socket.create_connection(("127.0.0.1", server.port))
            gone.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n" * 50)
            reset(gone)
        assert get(server, "/healthz")[0] == 200
    lines = log_lines(log_stream)
    assert len(lines) <= 8, lines
    assert {line["message"] for line in lines} <= {"http client went away"}, lines
    assert all(line["level"] == "debug" for line in lines), lines
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err and "Exception" not in out + err


def test_an_endpoint_that_raises_answers_500_and_logs_one_line(log_stream):
    def broken_health():
        raise RuntimeError("ledger unavailable\n  with a second line")

    with status_server(health=broken_health) as server:
        status, body = get(server, "/healthz")
        assert (status, body) == (500, b"internal error\n")
        assert get(server, "/readyz")[0] == 200  # and it keeps serving
    (line,) = [line for line in log_lines(log_stream) if line["level"] == "error"]
    assert line["message"] == "http request failed" and line["route"] == "/healthz"
    assert "RuntimeError" in line["error"] and "exception" not in line


HEADER_LINES = st.sampled_from([
    b"Host: x", b"Host: 10.0.0.7:9464", b"Connection: close", b"Connection: keep-alive",
    b"Content-Length: 0", b"Content-Length: 5", b"Content-Length: -1",
    b"Content-Length: 99999999999999999999999", b"Transfer-Encoding: chunked",
    b"Expect: 100-continue", b"Upgrade: h2c", b"X: " + b"y" * 5000,
]) | st.binary(max_size=60)
REQUESTS = st.one_of(
    st.binary(max_size=3000),
    st.builds(
        lambda method, target, version, headers, tail: (
            method + b" " + target + b" " + version + b"\r\n"
            + b"".join(h + b"\r\n" for h in headers) + b"\r\n" + tail),
        st.sampled_from([b"GET", b"HEAD", b"POST", b"OPTIONS", b"get", b"G\x00T"])
        | st.binary(max_size=8),
        st.sampled_from([b"/healthz", b"/readyz", b"/metrics?x=1", b"/", b"*",
                         b"http://x/healthz", b"/%ff\xff"]) | st.binary(max_size=80),
        st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.1 extra"]),
        st.lists(HEADER_LINES, max_size=6),
        st.binary(max_size=300)),
)
STATUS_LINE = re.compile(rb"HTTP/1\.1 (\d{3}) ")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.lists(st.tuples(REQUESTS, st.booleans()), min_size=1, max_size=4))
def test_arbitrary_bytes_get_an_answer_or_a_close_and_the_server_stays_up(data):
    with json_log() as stream, status_server(timeout=0.2) as server:
        for request_bytes, half_close in data:
            answer = exchange(server.port, request_bytes, half_close)
            assert b"Traceback" not in answer
            statuses = [int(s) for s in STATUS_LINE.findall(answer)]
            if answer:
                assert STATUS_LINE.match(answer), answer[:200]
            # Health is fine here, so nothing a client sends may produce a 5xx.
            assert all(s < 500 for s in statuses), answer[:400]
        assert get(server, "/healthz") == (200, b'{"status": "ok"}\n')
        assert server._thread.is_alive()
    assert not [line for line in log_lines(stream) if line["level"] == "error"]
