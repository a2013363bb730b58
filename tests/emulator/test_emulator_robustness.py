"""Bad requests never crash it, concurrent clients are all served, it binds to loopback, and
stop() leaves no thread or open socket behind."""

from __future__ import annotations

import json
import socket
import threading
import urllib.request

from emusupport import CHANNEL_ARN, batch, client, get_json

GARBAGE = [
    b"\x00\x01\x02 not http\r\n\r\n",
    b"GET\r\n\r\n",
    b"POST /PutAuditEvents HTTP/1.1\r\nContent-Length: 50\r\n\r\n{\"trunc",
    b"POST /PutAuditEvents HTTP/1.1\r\nContent-Length: -5\r\n\r\n",
    b"POST /PutAuditEvents HTTP/1.1\r\nContent-Length: abc\r\n\r\n",
    b"POST /PutAuditEvents HTTP/1.1\r\nContent-Length: 99999999999\r\n\r\n",
    b"POST /PutAuditEvents HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n",
    b"GET /_emulator/events?after=%ff%fe HTTP/1.1\r\n\r\n",
    b"PUT /_emulator/faults HTTP/1.1\r\nContent-Length: 3\r\n\r\n\xff\xfe\xfd",
    b"PUT /_emulator/faults HTTP/1.1\r\nContent-Length: x\r\n\r\n",
    b"DELETE /nowhere HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
    b"POST /PutAuditEvents?channelArn=%ZZ HTTP/1.1\r\nAuthorization: AWS4-HMAC-SHA256 "
    b"Credential=A/20200101/us-east-1/cloudtrail-data/aws4_request, SignedHeaders=host;x-amz-date,"
    b" Signature=" + b"0" * 64 + b"\r\nX-Amz-Date: 20200101T000000Z\r\nContent-Length: 2\r\n\r\n{}",
]


def _raw(port, data, timeout=5.0):
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            return b""
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except OSError:
            pass
        return b"".join(chunks)


def test_garbage_requests_get_answers_or_closed_connections_and_it_keeps_serving(make_emulator):
    emu = make_emulator()
    for data in GARBAGE:
        answer = _raw(emu.port, data)
        assert answer == b"" or answer.startswith(b"HTTP/1."), (data[:40], answer[:80])
        assert not answer.startswith(b"HTTP/1.1 500") and not answer.startswith(b"HTTP/1.0 500")
    assert get_json(f"{emu.url}/healthz") == {"status": "ok"}
    assert len(client(emu).put_audit_events(channelArn=CHANNEL_ARN,
                                            auditEvents=batch(1))["successful"]) == 1


def test_concurrent_clients_are_all_served(make_emulator):
    emu = make_emulator(quota_per_second=0)
    errors, acked = [], []

    def worker(w):
        try:
            c = client(emu)
            for r in range(10):
                response = c.put_audit_events(channelArn=CHANNEL_ARN,
                                              auditEvents=batch(50, f"w{w}r{r}-"))
                acked.extend(e["id"] for e in response["successful"])
        except Exception as exc:  # collected: a thread's assertion would be lost
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == []
    assert len(acked) == 8 * 10 * 50
    stored = [e["eventData"]["UID"] for e in emu.events()]
    assert sorted(stored) == sorted(f"uid-{i}" for i in acked)
    assert emu.stats()["requests"] == {"ok": 80}


def test_binds_to_loopback_by_default(make_emulator, tmp_path):
    from cloudtrail_sink.emulator import Emulator

    emu = Emulator(tmp_path / "d.sqlite")
    emu.start()
    try:
        assert emu._server.server_address[0] == "127.0.0.1"
        assert emu.url == f"http://127.0.0.1:{emu.port}"
    finally:
        emu.stop()


def test_stop_closes_idle_keep_alive_connections(make_emulator):
    emu = make_emulator()
    c = client(emu)  # botocore keeps its connection open after this call
    c.put_audit_events(channelArn=CHANNEL_ARN, auditEvents=batch(1))
    idle = socket.create_connection(("127.0.0.1", emu.port))
    idle.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert idle.recv(4096).startswith(b"HTTP/1.1 200")
    port = emu.port
    emu.stop()  # must not wait for the idle connections' clients
    assert idle.recv(4096) == b""
    idle.close()
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        refused = False
    except OSError:
        refused = True
    assert refused


def test_stop_is_idempotent_and_db_is_released(make_emulator, tmp_path):
    import sqlite3

    db = tmp_path / "released.sqlite"
    emu = make_emulator(db_path=db)
    client(emu).put_audit_events(channelArn=CHANNEL_ARN, auditEvents=batch(2))
    emu.stop()
    emu.stop()
    con = sqlite3.connect(db)
    try:
        rows = con.execute("SELECT uid, json_extract(event_data, '$.UID') FROM events").fetchall()
    finally:
        con.close()
    assert rows == [("uid-e0", "uid-e0"), ("uid-e1", "uid-e1")]


def test_request_ids_are_unique_per_answer(make_emulator):
    emu = make_emulator()
    ids = set()
    for _ in range(5):
        with urllib.request.urlopen(f"{emu.url}/healthz", timeout=5) as resp:
            ids.add(resp.headers["x-amzn-RequestId"])
    assert len(ids) == 5


def test_answers_are_json_with_content_length(make_emulator):
    emu = make_emulator()
    answer = _raw(emu.port, b"GET /_emulator/stats HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"Content-Type: application/json" in head
    assert int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0]) == len(body)
    assert json.loads(body)["accepted"] == 0


def test_events_readable_after_stop_and_restart_of_the_same_object(make_emulator):
    emu = make_emulator()
    c = client(emu)
    c.put_audit_events(channelArn=CHANNEL_ARN, auditEvents=batch(2, "a"))
    emu.stop()
    assert [e["eventData"]["UID"] for e in emu.events()] == ["uid-a0", "uid-a1"]
    emu.start()
    client(emu).put_audit_events(channelArn=CHANNEL_ARN, auditEvents=batch(1, "b"))
    assert [e["eventData"]["UID"] for e in emu.events(after=2)] == ["uid-b0"]


def test_a_body_on_a_get_does_not_poison_the_keep_alive_connection(make_emulator):
    emu = make_emulator()
    body = b"GET /nothing HTTP/1.1\r\nHost: x\r\n\r\n"  # looks like a request; is a body
    answer = _raw(emu.port,
                  b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body)
                  + body
                  + b"GET /_emulator/stats HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
    import re

    assert re.findall(rb"HTTP/1\.1 \d+", answer) == [b"HTTP/1.1 200", b"HTTP/1.1 200"]
    assert answer.endswith(b'"requests":{}}')  # the second answer is the stats, not a 404
