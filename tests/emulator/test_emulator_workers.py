"""Per-event checks in worker processes (the CLI's default) answer exactly like in-thread
checks, and a worker that dies costs one call an InternalFailure, not the emulator."""

from __future__ import annotations

import pytest
from botocore.exceptions import ClientError
from emusupport import CHANNEL_ARN, NO_CLIENT_VALIDATION, audit_event, batch, client
from test_emulator_event_checks import CASES


def _answers(emu):
    c = client(emu, config=NO_CLIENT_VALIDATION)
    entries = [audit_event(f"case{i}", data=text) for i, (_, text, _, _) in enumerate(CASES)]
    entries.append(audit_event("good"))
    out = [c.put_audit_events(channelArn=CHANNEL_ARN, auditEvents=entries)]
    for bad in ([], batch(101), [audit_event("a.b")], [audit_event("d"), audit_event("d")]):
        try:
            c.put_audit_events(channelArn=CHANNEL_ARN, auditEvents=bad)
        except ClientError as exc:
            out.append((exc.response["Error"]["Code"], exc.response["Error"]["Message"]))
    return out


def _strip(answers):
    first = dict(answers[0])
    first.pop("ResponseMetadata")
    first["successful"] = [s["id"] for s in first["successful"]]  # eventIDs are fresh uuids
    return [first, *answers[1:]]


def test_worker_processes_answer_like_in_thread_checks(make_emulator):
    in_thread = _strip(_answers(make_emulator(workers=0)))
    emu = make_emulator(workers=2)
    in_workers = _strip(_answers(emu))
    assert in_workers == in_thread
    assert len(in_thread) == 5  # four whole-request errors came back
    assert [e["eventData"]["UID"] for e in emu.events()] == ["uid-good"]


def test_a_dead_worker_fails_one_call_and_is_replaced(make_emulator):
    emu = make_emulator(workers=1)
    c = client(emu)
    assert len(c.put_audit_events(channelArn=CHANNEL_ARN, auditEvents=batch(5))["successful"]) == 5
    (worker,) = emu._checker._all
    worker.proc.kill()
    worker.proc.wait()
    with pytest.raises(ClientError) as excinfo:
        c.put_audit_events(channelArn=CHANNEL_ARN, auditEvents=batch(5, "x"))
    assert excinfo.value.response["Error"]["Code"] == "InternalFailure"
    assert excinfo.value.response["ResponseMetadata"]["HTTPStatusCode"] == 500
    response = c.put_audit_events(channelArn=CHANNEL_ARN, auditEvents=batch(5, "y"))
    assert len(response["successful"]) == 5
    assert emu._checker._all[0] is not worker
    assert len(emu.events()) == 10


def test_stop_ends_the_workers(make_emulator):
    emu = make_emulator(workers=2)
    c = client(emu)
    c.put_audit_events(channelArn=CHANNEL_ARN, auditEvents=batch(1))
    procs = [w.proc for w in emu._checker._all]
    assert procs and all(p.poll() is None for p in procs)
    emu.stop()
    assert all(p.poll() is not None for p in procs)


def test_negative_workers_are_refused(tmp_path):
    from cloudtrail_sink.emulator import Emulator

    with pytest.raises(ValueError, match="workers"):
        Emulator(tmp_path / "w.sqlite", workers=-1)
