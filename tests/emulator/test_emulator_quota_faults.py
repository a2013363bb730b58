"""The call quota (token bucket on an injected clock) and deterministic fault injection."""

from __future__ import annotations

import json

import pytest
from botocore.config import Config
from botocore.exceptions import ClientError
from emusupport import ACCOUNT, CHANNEL_ARN, batch, client, get_json, put_json

from cloudtrail_sink.emulator import Faults

OTHER_ACCOUNT_ARN = CHANNEL_ARN.replace(ACCOUNT, "999999999999")


def _put(c, arn=CHANNEL_ARN, n=1):
    return c.put_audit_events(channelArn=arn, auditEvents=batch(n))


def test_quota_allows_a_burst_then_throttles_until_the_clock_moves(make_emulator, fake_clock):
    emu = make_emulator(quota_per_second=10, clock=fake_clock, channels=None)
    c = client(emu)
    for _ in range(10):
        _put(c)
    with pytest.raises(ClientError) as excinfo:
        _put(c)
    assert type(excinfo.value) is ClientError
    err = excinfo.value.response
    assert (err["Error"]["Code"], err["ResponseMetadata"]["HTTPStatusCode"]) == (
        "ThrottlingException", 400)

    # Quota is per account and region: another account's channel still has its own bucket.
    _put(c, OTHER_ACCOUNT_ARN)

    fake_clock.advance(0.1)  # one token at 10/s
    _put(c)
    with pytest.raises(ClientError):
        _put(c)
    fake_clock.advance(5)  # refills to the cap of one second's worth, not more
    for _ in range(10):
        _put(c)
    with pytest.raises(ClientError):
        _put(c)
    assert emu.stats()["requests"]["ThrottlingException"] == 3


def test_quota_buckets_are_per_region(make_emulator, fake_clock):
    emu = make_emulator(quota_per_second=2, clock=fake_clock, channels=None)
    eu_arn = CHANNEL_ARN.replace("us-east-1", "eu-west-1")
    us, eu = client(emu), client(emu, region="eu-west-1")
    for _ in range(2):
        _put(us)
        _put(eu, eu_arn)
    for c, arn in ((us, CHANNEL_ARN), (eu, eu_arn)):
        with pytest.raises(ClientError) as excinfo:
            _put(c, arn)
        assert excinfo.value.response["Error"]["Code"] == "ThrottlingException"


def test_default_quota_is_100_calls_per_second(make_emulator, fake_clock):
    emu = make_emulator(clock=fake_clock)
    c = client(emu)
    for _ in range(100):
        _put(c)
    with pytest.raises(ClientError) as excinfo:
        _put(c)
    assert excinfo.value.response["Error"]["Code"] == "ThrottlingException"


def test_botocore_retries_quota_throttling(make_emulator, fake_clock):
    emu = make_emulator(quota_per_second=1, clock=fake_clock)
    retrying = client(emu, config=Config(retries={"mode": "standard", "total_max_attempts": 3}))
    _put(retrying)
    with pytest.raises(ClientError):
        _put(retrying)
    # Three attempts reached the emulator: botocore took ThrottlingException as retryable.
    assert emu.stats()["requests"]["ThrottlingException"] == 3


def test_zero_quota_disables_it(make_emulator, fake_clock):
    emu = make_emulator(quota_per_second=0, clock=fake_clock)
    c = client(emu)
    for _ in range(150):
        _put(c)
    assert emu.stats()["requests"] == {"ok": 150}


def test_injected_throttling_and_5xx_are_what_botocore_expects(make_emulator):
    emu = make_emulator(faults=Faults(throttle_rate=1.0))
    c = client(emu)
    with pytest.raises(ClientError) as excinfo:
        _put(c)
    assert excinfo.value.response["Error"]["Code"] == "ThrottlingException"
    assert excinfo.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400

    emu.set_faults(Faults(error_5xx_rate=1.0))
    seen = set()
    for _ in range(12):
        with pytest.raises(ClientError) as excinfo:
            _put(c)
        seen.add((excinfo.value.response["Error"]["Code"],
                  excinfo.value.response["ResponseMetadata"]["HTTPStatusCode"]))
    assert seen == {("InternalFailure", 500), ("ServiceUnavailable", 503)}
    assert emu.events() == []


def test_botocore_retries_injected_5xx(make_emulator):
    emu = make_emulator(faults=Faults(error_5xx_rate=1.0))
    c = client(emu, config=Config(retries={"mode": "standard", "total_max_attempts": 3}))
    with pytest.raises(ClientError):
        _put(c)
    requests = emu.stats()["requests"]
    assert requests.get("InternalFailure", 0) + requests.get("ServiceUnavailable", 0) == 3


def test_per_event_faults_are_reported_in_failed(make_emulator):
    emu = make_emulator(faults=Faults(event_throttling_rate=0.3,
                                      event_internal_failure_rate=0.3), seed=7)
    response = _put(client(emu), n=100)
    codes = [f["errorCode"] for f in response["failed"]]
    assert set(codes) == {"Throttling", "InternalFailure"}
    assert len(response["successful"]) + len(codes) == 100
    assert len(emu.events()) == len(response["successful"])
    assert emu.stats()["failed"] == {c: codes.count(c) for c in set(codes)}


def _run(make_emulator, seed):
    emu = make_emulator(faults=Faults(throttle_rate=0.3, error_5xx_rate=0.2,
                                      event_throttling_rate=0.1,
                                      event_internal_failure_rate=0.1), seed=seed,
                        quota_per_second=0)
    c = client(emu)
    trace = []
    for i in range(30):
        try:
            response = _put(c, n=10)
            trace.append(tuple((f["id"], f["errorCode"]) for f in response["failed"]))
        except ClientError as exc:
            trace.append(exc.response["Error"]["Code"])
    return trace


def test_faults_are_deterministic_for_a_seed(make_emulator):
    first = _run(make_emulator, seed=42)
    assert _run(make_emulator, seed=42) == first
    assert _run(make_emulator, seed=43) != first
    codes = {t for t in first if isinstance(t, str)}
    assert "ThrottlingException" in codes and codes & {"InternalFailure", "ServiceUnavailable"}
    assert any(isinstance(t, tuple) and t for t in first)  # some per-event failures too


def test_faults_can_be_changed_at_run_time_over_http(make_emulator):
    emu = make_emulator()
    c = client(emu)
    status, body = put_json(f"{emu.url}/_emulator/faults", {"throttle_rate": 1.0})
    assert (status, body["throttle_rate"]) == (200, 1.0)
    assert get_json(f"{emu.url}/_emulator/faults")["throttle_rate"] == 1.0
    with pytest.raises(ClientError):
        _put(c)
    put_json(f"{emu.url}/_emulator/faults", {})
    assert _put(c)["failed"] == []


@pytest.mark.parametrize("bad, word", [
    ({"throttle_rate": 1.5}, "throttle_rate"),
    ({"throttle_rate": "high"}, "throttle_rate"),
    ({"throttling": 0.1}, "throttling"),
    ([0.1], "object"),
])
def test_bad_faults_are_refused_with_the_field_named(make_emulator, bad, word):
    emu = make_emulator()
    status, body = put_json(f"{emu.url}/_emulator/faults", bad)
    assert status == 400
    assert word in body["message"]
    assert emu.faults == Faults()


def test_added_latency_delays_answers(make_emulator):
    import time

    emu = make_emulator(faults=Faults(latency_ms=300))
    c = client(emu)
    started = time.monotonic()
    _put(c)
    # A lower bound only: the answer cannot come before the injected delay.
    assert time.monotonic() - started >= 0.3


def test_faults_json_round_trip():
    faults = Faults.from_dict(json.loads('{"event_throttling_rate": 0.25, "latency_ms": 5}'))
    assert faults == Faults(event_throttling_rate=0.25, latency_ms=5)
    assert Faults.from_dict(faults.to_dict()) == faults
