"""HTTP hardening, tried as an attacker would: many simultaneous signed calls are all answered;
bodies are bounded on every route; bad requests answer 4xx with one log line and no traceback;
the external id is never logged; connections are capped and time out; the page and
/_emulator/* answer only loopback Host names by default; faults change only with the admin
token when one is set; and arbitrary bytes never get a 500 nor take the server down."""

from __future__ import annotations

import logging
import re
import socket
import threading
import time
import urllib.parse

import pytest
from emusupport import CHANNEL_ARN, batch, client, get_json
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_emulator_robustness import _raw

STATUS_RE = re.compile(rb"HTTP/1\.[01] (\d{3})")


def _status(answer: bytes) -> int | None:
    match = STATUS_RE.match(answer)
    return int(match[1]) if match else None


def _no_traceback(caplog, capfd):
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err
    assert "Traceback" not in caplog.text
    assert not [r for r in caplog.records if r.exc_info]


@pytest.mark.timeout(120)
def test_64_simultaneous_signed_calls_are_all_answered(make_emulator):
    emu = make_emulator(quota_per_second=0)
    clients = [client(emu) for _ in range(64)]  # one connection pool each, made up front
    start = threading.Barrier(64)
    answers, errors = [], []

    def call(i):
        try:
            start.wait(timeout=30)
            answers.append(clients[i].put_audit_events(channelArn=CHANNEL_ARN,
                                                       auditEvents=batch(10, f"t{i}-")))
        except Exception as exc:  # collected: a thread's assertion would be lost
            errors.append(exc)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=90)
    assert errors == []  # no reset, no refusal: retries are off in these clients
    assert len(answers) == 64 and all(len(a["successful"]) == 10 for a in answers)
    assert len(emu.events()) == 640
    assert emu._server.request_queue_size >= 128


@pytest.mark.parametrize("request_head", [
    b"GET /_emulator/events HTTP/1.1\r\nHost: localhost\r\nContent-Length: 200000\r\n\r\n",
    b"PUT /_emulator/faults HTTP/1.1\r\nHost: localhost\r\nContent-Length: 70000\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: localhost\r\nContent-Length: 10000000\r\n\r\n",
    b"POST /nowhere HTTP/1.1\r\nHost: localhost\r\nContent-Length: 65537\r\n\r\n",
])
def test_oversized_bodies_on_other_routes_are_refused_unread(make_emulator, request_head):
    emu = make_emulator()
    with socket.create_connection(("127.0.0.1", emu.port), timeout=10) as sock:
        sock.sendall(request_head + b"x" * 1000)  # the rest never comes: it is not waited for
        answer = sock.recv(65536)
        assert _status(answer) == 413
        assert b"Connection: close" in answer
        assert sock.recv(65536) == b""  # closed without reading the announced body
    assert get_json(f"{emu.url}/healthz") == {"status": "ok"}


def test_an_oversized_put_audit_events_body_is_refused(make_emulator):
    emu = make_emulator()
    with socket.create_connection(("127.0.0.1", emu.port), timeout=10) as sock:
        sock.sendall(b"POST /PutAuditEvents HTTP/1.1\r\nHost: localhost\r\n"
                     b"Content-Length: 20000000\r\n\r\n")
        answer = sock.recv(65536)
    assert _status(answer) == 413 and b"RequestEntityTooLargeException" in answer


@pytest.mark.parametrize("request_bytes", [
    b"GET /_emulator/events?after=" + b"9" * 30 + b" HTTP/1.1\r\nHost: localhost\r\n\r\n",
    b"GET /_emulator/events?after=9223372036854775808 HTTP/1.1\r\nHost: localhost\r\n\r\n",
    b"GET /_emulator/events?after=-1 HTTP/1.1\r\nHost: localhost\r\n\r\n",
    b"GET /_emulator/search?before=" + b"9" * 40 + b" HTTP/1.1\r\nHost: localhost\r\n\r\n",
    b"GET /_emulator/refusal?seq=%D9%A3 HTTP/1.1\r\nHost: localhost\r\n\r\n",
    "PUT /_emulator/faults HTTP/1.1\r\nHost: localhost\r\nContent-Length: ²\r\n\r\n".encode(
        "latin-1"),
    "POST /PutAuditEvents HTTP/1.1\r\nHost: localhost\r\nContent-Length: \u0663\r\n\r\n".encode(),
    b"GET /healthz HTTP/1.1\r\nContent-Length: 1_0\r\n\r\n",
])
def test_bad_numbers_answer_400_with_one_log_line_and_no_traceback(make_emulator, caplog, capfd,
                                                                   request_bytes):
    caplog.set_level(logging.DEBUG)
    emu = make_emulator()
    answer = _raw(emu.port, request_bytes)
    assert _status(answer) == 400, answer[:200]
    assert b"Traceback" not in answer
    _no_traceback(caplog, capfd)
    assert get_json(f"{emu.url}/healthz") == {"status": "ok"}


def test_an_unexpected_error_is_one_log_line_without_traceback(make_emulator, caplog, capfd,
                                                               monkeypatch):
    emu = make_emulator()

    def broken(*args):
        raise KeyError("secret-payload")

    monkeypatch.setattr(emu._store, "stored_counts", broken)
    answer = _raw(emu.port, b"GET /_emulator/summary HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert _status(answer) == 500 and b"secret-payload" not in answer
    [line] = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert re.search(r"KeyError at test_emulator_hardening\.py:\d+\Z", line)  # where it broke
    assert "secret-payload" not in line and "\n" not in line
    _no_traceback(caplog, capfd)


def test_the_external_id_is_never_logged(make_emulator, caplog, capfd):
    caplog.set_level(logging.DEBUG, logger="cloudtrail_sink")  # (botocore logs it, client side)
    emu = make_emulator(channels={CHANNEL_ARN: "ext-secret-123"})
    c = client(emu)
    c.put_audit_events(channelArn=CHANNEL_ARN, externalId="ext-secret-123",
                       auditEvents=batch(1, "ok"))
    with pytest.raises(c.exceptions.ChannelInsufficientPermission):
        c.put_audit_events(channelArn=CHANNEL_ARN, externalId="ext-secret-456",
                           auditEvents=batch(1, "no"))
    arn = urllib.parse.quote(CHANNEL_ARN, safe="")
    _raw(emu.port, f"POST /PutAuditEvents?channelArn={arn}&externalId=ext-secret-789 HTTP/1.1"
                   "\r\nContent-Length: abc\r\n\r\n".encode())
    _raw(emu.port, b"GET /?externalId=ext-secret-000 HTTP/9.9\r\n\r\n")  # malformed request line
    _raw(emu.port, b"GET /?externalId=ext-secret-111 HTTP/1.1\r\n" + b"X: y\r\n" * 200 + b"\r\n")
    out, err = capfd.readouterr()
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("cloudtrail_sink")]
    assert any("/PutAuditEvents" in line for line in lines)  # debug lines were there to look at
    for text in lines + [out, err]:
        assert "ext-secret" not in text


def test_host_header_check_against_dns_rebinding(make_emulator):
    emu = make_emulator()

    def status(path, host):
        return _status(_raw(emu.port, f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()))

    for host in ("localhost", f"localhost:{emu.port}", "127.0.0.1", f"127.0.0.1:{emu.port}",
                 f"[::1]:{emu.port}", "app.localhost:8000"):
        assert status("/_emulator/stats", host) == 200, host
    for host in ("evil.example", f"evil.example:{emu.port}", "127.0.0.1.evil.example", ""):
        assert status("/_emulator/stats", host) == 403, host
        assert status("/", host) == 403, host
        assert status("/healthz", host) == 200, host  # probes come with any Host
    anything = make_emulator(allowed_hosts=["*"])
    assert _status(_raw(anything.port, b"GET / HTTP/1.1\r\nHost: evil.example\r\n\r\n")) == 200
    named = make_emulator(allowed_hosts=["emulator"])
    assert _status(_raw(named.port, b"GET / HTTP/1.1\r\nHost: emulator:8000\r\n\r\n")) == 200
    assert _status(_raw(named.port, b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")) == 403


def test_faults_change_only_with_the_admin_token(make_emulator):
    emu = make_emulator(admin_token="tok-1")
    body = b'{"throttle_rate": 0.5}'

    def put(auth):
        head = (b"PUT /_emulator/faults HTTP/1.1\r\nHost: localhost\r\n" + auth
                + b"Content-Length: %d\r\n\r\n" % len(body))
        return _status(_raw(emu.port, head + body))

    assert put(b"") == 403
    assert put(b"Authorization: Bearer tok-2\r\n") == 403
    assert put("Authorization: Bearer t\u00f6k-1\r\n".encode("latin-1")) == 403
    assert emu.faults.throttle_rate == 0
    assert put(b"Authorization: Bearer tok-1\r\n") == 200
    assert emu.faults.throttle_rate == 0.5
    assert get_json(f"{emu.url}/_emulator/faults")["throttle_rate"] == 0.5  # reading is open


def test_connections_are_capped_and_idle_ones_time_out(make_emulator):
    emu = make_emulator(max_connections=4, connection_timeout=0.5)
    idle = [socket.create_connection(("127.0.0.1", emu.port), timeout=10) for _ in range(4)]
    try:
        deadline = time.monotonic() + 5
        while len(emu._server._open) < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        extra = _raw(emu.port, b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert _status(extra) == 503 and b"Connection: close" in extra
        started = time.monotonic()
        for sock in idle:  # the server ends them: nothing was sent within the timeout
            assert sock.recv(100) == b""
        assert time.monotonic() - started < 5
    finally:
        for sock in idle:
            sock.close()
    assert get_json(f"{emu.url}/healthz") == {"status": "ok"}


_METHODS = st.sampled_from(["GET", "POST", "PUT", "DELETE", "HEAD", "PATCH", "OPTIONS",
                            "TRACE", "CONNECT", "BREW", "get", ""])
_PATHS = st.one_of(
    st.sampled_from(["/", "/PutAuditEvents", "/_emulator/events", "/_emulator/search",
                     "/_emulator/event", "/_emulator/refusal", "/_emulator/summary",
                     "/_emulator/rates", "/_emulator/faults", "/_emulator/stats", "/healthz",
                     "*", ""]),
    st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=60).map(
        lambda t: "/" + t))
_QUERIES = st.lists(st.tuples(
    st.sampled_from(["after", "limit", "tail", "wait", "before", "seq", "id", "kind", "q",
                     "seconds", "events", "refusals", "channelArn", "externalId", "x"]),
    st.one_of(st.integers(-2**70, 2**70).map(str),
              st.text(st.characters(min_codepoint=33, max_codepoint=0x2000), max_size=20).map(
                  lambda t: urllib.parse.quote(t, safe=""))),
), max_size=4).map(lambda pairs: "&".join(f"{k}={v}" for k, v in pairs))
_HEADERS = st.lists(st.tuples(
    st.sampled_from(["Host", "Content-Length", "Transfer-Encoding", "Authorization",
                     "X-Amz-Date", "Connection", "Expect", "Content-Type", "X-Junk"]),
    st.one_of(st.integers(-5, 2**65).map(str),
              st.text(st.characters(min_codepoint=32, max_codepoint=255,
                                    blacklist_characters="\r\n"), max_size=40)),
), max_size=6)


@pytest.mark.timeout(300)
def test_arbitrary_requests_never_get_a_500_and_the_server_stays_up(make_emulator, caplog,
                                                                   capfd):
    emu = make_emulator(connection_timeout=2.0)

    @settings(max_examples=150, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(method=_METHODS, path=_PATHS, query=_QUERIES, headers=_HEADERS,
           body=st.binary(max_size=300), raw=st.one_of(st.none(), st.binary(max_size=200)))
    def one(method, path, query, headers, body, raw):
        if raw is not None:
            data = raw
        else:
            head = f"{method} {path}{'?' + query if query else ''} HTTP/1.1\r\n" + "".join(
                f"{name}: {value}\r\n" for name, value in headers) + "\r\n"
            data = head.encode("latin-1") + body
        answer = _raw(emu.port, data, timeout=10)
        assert answer == b"" or answer.startswith(b"HTTP/1."), answer[:100]
        statuses = [int(s) for s in STATUS_RE.findall(answer)]
        assert 500 not in statuses, answer[:300]

    one()
    assert get_json(f"{emu.url}/healthz") == {"status": "ok"}
    assert len(client(emu).put_audit_events(channelArn=CHANNEL_ARN,
                                            auditEvents=batch(1))["successful"]) == 1
    _no_traceback(caplog, capfd)
