"""``cloudtrail-sink emulator``: options, startup log, clean exit on SIGTERM/SIGINT."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys

import pytest
from emusupport import ACCOUNT, CHANNEL_ARN, batch, client


class Running:
    def __init__(self, proc, url, log):
        self.proc, self.url, self.log = proc, url, log


@pytest.fixture
def run_cli(aws_env):
    procs = []

    def start(*args):
        proc = subprocess.Popen([sys.executable, "-m", "cloudtrail_sink", "emulator", *args],
                                stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        procs.append(proc)
        log = []
        for line in proc.stderr:
            log.append(line)
            if line.startswith("emulator ready at "):
                return Running(proc, line.split()[-1], log)
        proc.wait()
        raise AssertionError("emulator did not start:\n" + "".join(log))

    try:
        yield start
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            proc.stderr.close()


def _stop(running, sig=signal.SIGTERM) -> str:
    running.proc.send_signal(sig)
    rest = running.proc.stderr.read()
    assert running.proc.wait(timeout=30) == 0
    return "".join(running.log) + rest


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serves_configured_channel_and_stops_cleanly(run_cli, tmp_path, sig):
    db = tmp_path / "cli.sqlite"
    running = run_cli("--listen", "127.0.0.1:0", "--db", str(db),
                      "--channel", f"{CHANNEL_ARN},ext-123", "--seed", "3")
    assert running.url.startswith("http://127.0.0.1:")

    emu = type("E", (), {"url": running.url})
    c = client(emu)
    with pytest.raises(c.exceptions.ChannelInsufficientPermission):
        c.put_audit_events(channelArn=CHANNEL_ARN, auditEvents=batch(1))
    ok = c.put_audit_events(channelArn=CHANNEL_ARN, externalId="ext-123", auditEvents=batch(2))
    assert len(ok["successful"]) == 2

    log = _stop(running, sig)
    assert "external id required" in log
    assert "ext-123" not in log  # the external id is a secret: never logged
    assert "emulator stopped" in log
    con = sqlite3.connect(db)
    try:
        assert con.execute("SELECT COUNT(*) FROM events").fetchone()[0] == 2
    finally:
        con.close()


def test_open_mode_is_announced_and_faults_quota_options_apply(run_cli, tmp_path):
    running = run_cli("--listen", "127.0.0.1:0", "--db", str(tmp_path / "o.sqlite"),
                      "--faults", '{"event_throttling_rate": 1.0}', "--quota", "0")
    emu = type("E", (), {"url": running.url})
    other = f"arn:aws:cloudtrail:us-east-1:{ACCOUNT}:channel/11111111-2222-3333-4444-555555555555"
    response = client(emu).put_audit_events(channelArn=other, auditEvents=batch(3))
    assert [f["errorCode"] for f in response["failed"]] == ["Throttling"] * 3
    log = _stop(running)
    assert "any well-formed channel ARN (open mode" in log


def test_access_key_makes_it_verify_signatures(run_cli, tmp_path):
    running = run_cli("--listen", "127.0.0.1:0", "--db", str(tmp_path / "k.sqlite"),
                      "--access-key", "AKIDCLI", "--secret-key", "cli-secret")
    emu = type("E", (), {"url": running.url})
    good = client(emu, aws_access_key_id="AKIDCLI", aws_secret_access_key="cli-secret")
    assert len(good.put_audit_events(channelArn=CHANNEL_ARN,
                                     auditEvents=batch(1))["successful"]) == 1
    bad = client(emu, aws_access_key_id="AKIDCLI", aws_secret_access_key="other")
    with pytest.raises(Exception) as excinfo:
        bad.put_audit_events(channelArn=CHANNEL_ARN, auditEvents=batch(1))
    assert excinfo.value.response["Error"]["Code"] == "InvalidSignatureException"
    assert "cli-secret" not in _stop(running)


@pytest.mark.parametrize("args, word", [
    (["--faults", '{"nope": 1}'], "nope"),
    (["--faults", "{not json"], "faults"),
    (["--faults", '{"throttle_rate": 2}'], "throttle_rate"),
    (["--channel", "arn:aws:cloudtrail:us-east-1:1:channel/x"], "arn:aws:cloudtrail:us-east-1:1"),
    (["--channel", f"{CHANNEL_ARN},x"], "external id"),
    (["--listen", "8000"], "--listen"),
    (["--listen", "127.0.0.1:http"], "port"),
    (["--access-key", "AKID"], "--secret-key"),
    (["--query-timeout", "0"], "--query-timeout"),
    (["--query-timeout", "nan"], "--query-timeout"),
    ([], "CLOUDTRAIL_EMULATOR_QUERY_TIMEOUT"),
], ids=["unknown-fault", "faults-not-json", "rate-out-of-range", "bad-channel",
        "bad-external-id", "listen-no-host", "listen-bad-port", "key-without-secret",
        "query-timeout-zero", "query-timeout-nan", "query-timeout-env-not-a-number"])
def test_bad_options_exit_2_naming_the_problem(tmp_path, monkeypatch, capsys, args, word):
    from cloudtrail_sink.cli import main

    monkeypatch.delenv("CLOUDTRAIL_EMULATOR_SECRET_KEY", raising=False)
    monkeypatch.setenv("CLOUDTRAIL_EMULATOR_QUERY_TIMEOUT", "soon" if not args else "")
    # In-process: these fail before anything is started, so no process is needed.
    assert main(["emulator", "--db", str(tmp_path / "x.sqlite"), *args]) == 2
    assert word in capsys.readouterr().err
    assert not (tmp_path / "x.sqlite").exists()


def test_unusable_database_or_address_exit_1_naming_it(tmp_path, capsys):
    from cloudtrail_sink.cli import main

    missing_dir = tmp_path / "no-such-dir" / "e.sqlite"
    assert main(["emulator", "--listen", "127.0.0.1:0", "--db", str(missing_dir)]) == 1
    assert str(missing_dir) in capsys.readouterr().err

    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["emulator", "--listen", f"127.0.0.1:{port}",
                     "--db", str(tmp_path / "e.sqlite")]) == 1
    assert f"127.0.0.1:{port}" in capsys.readouterr().err


def test_admin_token_from_the_environment_and_allowed_hosts(run_cli, tmp_path, monkeypatch):
    from test_emulator_robustness import _raw

    monkeypatch.setenv("CLOUDTRAIL_EMULATOR_ADMIN_TOKEN", "tok-env")
    running = run_cli("--listen", "127.0.0.1:0", "--db", str(tmp_path / "t.sqlite"),
                      "--allow-host", "emulator", "--max-connections", "8",
                      "--connection-timeout", "5")
    port = int(running.url.rsplit(":", 1)[1])
    body = b'{"latency_ms": 1}'

    def put_faults(auth):
        return _raw(port, b"PUT /_emulator/faults HTTP/1.1\r\nHost: emulator\r\n" + auth
                    + b"Content-Length: %d\r\n\r\n" % len(body) + body)

    assert put_faults(b"").startswith(b"HTTP/1.1 403")
    assert put_faults(b"Authorization: Bearer tok-env\r\n").startswith(b"HTTP/1.1 200")
    assert _raw(port, b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n").startswith(b"HTTP/1.1 403")
    log = _stop(running)
    assert "answer Host: emulator; fault changes need the admin token" in log
    assert "tok-env" not in log


def test_query_timeout_from_the_environment_or_the_option(run_cli, tmp_path, monkeypatch):
    from lakesupport import lake, store, store_id, wait_ended
    from test_emulator_lake_queries import HEAVY

    from emusupport import event_data

    monkeypatch.setenv("CLOUDTRAIL_EMULATOR_QUERY_TIMEOUT", "0.3")
    running = run_cli("--listen", "127.0.0.1:0", "--db", str(tmp_path / "q.sqlite"))
    emu = type("E", (), {"url": running.url})
    store(emu, [event_data(uid="t1")])
    ct = lake(emu)
    query_id = ct.start_query(QueryStatement=HEAVY.format(eds=store_id(ct)))["QueryId"]
    described = wait_ended(ct, query_id, timeout=20)
    assert described["QueryStatus"] == "TIMED_OUT"
    assert "0.3 s" in described["ErrorMessage"]
    assert "Lake queries end TIMED_OUT after 0.3 s" in _stop(running)

    # The option wins over the environment.
    running = run_cli("--listen", "127.0.0.1:0", "--db", str(tmp_path / "q.sqlite"),
                      "--query-timeout", "120")
    assert "Lake queries end TIMED_OUT after 120 s" in _stop(running)
