"""Permanent per-event failures end in ``failed/`` with their code and message, nothing else is
held back, and ``failed replay`` delivers them exactly once after the cause is fixed.

The scenario an operator meets: the sink was pointed at the wrong channel (another account), so
every event addressed to the right account is refused with ``InvalidRecipient`` (permanent: no
retry can fix it), while events addressed to that other account go through. Once the operator
points the sink at the right channel and replays the dead letters, they are delivered, once.
Events that can never succeed (``FieldTooLong``) stay in ``failed/`` through a replay filtered
by another code.
"""

from __future__ import annotations

import collections
import json

import pytest

import relsupport
from relsupport import ACCOUNT, CHANNEL_ARN, OTHER_ACCOUNT, OTHER_CHANNEL_ARN

N = 300  # events per kind


def _events():
    """(uid, eventData) for three kinds: for the right account, the other one, and too long."""
    out = []
    for i in range(N):
        out.append((f"dl-right-{i:04d}", relsupport.make_event(f"dl-right-{i:04d}", account=ACCOUNT)))
        out.append((f"dl-other-{i:04d}", relsupport.make_event(f"dl-other-{i:04d}",
                                                              account=OTHER_ACCOUNT)))
        if i % 30 == 0:
            ev = relsupport.make_event(f"dl-long-{i:04d}", account=ACCOUNT)
            ev["eventName"] = "n" * 1025  # over the 1024-byte limit: FieldTooLong, forever
            out.append((f"dl-long-{i:04d}", ev))
    return out


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_permanent_failures_are_dead_lettered_then_replayed_once(tmp_path, procs, sink_env):
    from cloudtrail_sink.emulator import Emulator
    from cloudtrail_sink.spool import SpoolWriter

    spool = tmp_path / "spool"
    events = _events()
    by_uid = dict(events)
    with SpoolWriter(spool, kind="cli", max_events=97) as writer:
        for uid, ev in events:
            writer.write(ev, tag="dead-letter-test", time=1764237600.0)

    emu = Emulator(db_path=tmp_path / "emulator.sqlite", host="127.0.0.1", port=0,
                   channels={CHANNEL_ARN: None, OTHER_CHANNEL_ARN: None}, seed=3)
    emu.start()
    try:
        # 1. Wrong channel: the right-account events and the too-long ones are dead-lettered.
        wrong = procs.start(relsupport.sink_cmd(spool, emu.url, OTHER_CHANNEL_ARN, "--drain"),
                            sink_env, name="sink-wrong-channel")
        assert relsupport.wait_exit(wrong, 120) == 0, procs.tail(wrong)
        assert relsupport.spool_files(spool, "ready") == []

        lines = relsupport.failed_lines(spool)
        codes = collections.Counter(line["errorCode"] for line in lines)
        n_long = sum(1 for uid in by_uid if uid.startswith("dl-long-"))
        assert codes == {"InvalidRecipient": N, "FieldTooLong": n_long}, codes
        for line in lines:
            uid = line["eventData"]["UID"]
            # The dead letter keeps the event as written, where it came from, and why.
            assert line["eventData"] == by_uid[uid]
            assert line["tag"] == "dead-letter-test" and line["time"] == 1764237600.0
            assert line["segment"].endswith(".seg") and line["failedAt"].endswith("Z")
            assert line["errorMessage"], line
            assert "nnnnnnnnnn" not in line["errorMessage"], "payload leaked into the message"
            assert line["id"]
        stored = collections.Counter(relsupport.stored_uids(emu))
        assert set(stored) == {u for u in by_uid if u.startswith("dl-other-")}

        # `failed list` shows them (a user's first look at what went wrong).
        listed = relsupport.cli(["failed", "list", "--spool-dir", str(spool)], sink_env)
        assert listed.returncode == 0, listed.stderr
        assert "InvalidRecipient" in listed.stdout and "FieldTooLong" in listed.stdout

        # 2. The cause is fixed: replay only InvalidRecipient, run the sink on the right channel.
        replay = relsupport.cli(["failed", "replay", "--spool-dir", str(spool),
                                 "--code", "InvalidRecipient"], sink_env)
        assert replay.returncode == 0, replay.stderr
        remaining = relsupport.failed_lines(spool)
        assert {l["errorCode"] for l in remaining} == {"FieldTooLong"}
        assert len(remaining) == n_long
        assert relsupport.spool_files(spool, "ready"), "replay wrote no segment into ready/"

        right = procs.start(relsupport.sink_cmd(spool, emu.url, CHANNEL_ARN, "--drain"),
                            sink_env, name="sink-right-channel")
        assert relsupport.wait_exit(right, 120) == 0, procs.tail(right)

        # 3. A second replay of the same code finds nothing: nothing is delivered twice.
        again = relsupport.cli(["failed", "replay", "--spool-dir", str(spool),
                                "--code", "InvalidRecipient"], sink_env)
        assert again.returncode == 0, again.stderr
        final = procs.start(relsupport.sink_cmd(spool, emu.url, CHANNEL_ARN, "--drain"),
                            sink_env, name="sink-final")
        assert relsupport.wait_exit(final, 120) == 0, procs.tail(final)

        stored = collections.Counter(relsupport.stored_uids(emu))
        right_uids = {u for u in by_uid if u.startswith("dl-right-")}
        other_uids = {u for u in by_uid if u.startswith("dl-other-")}
        assert set(stored) == right_uids | other_uids
        assert all(stored[u] == 1 for u in right_uids), "a replayed event was delivered twice"
        assert all(stored[u] == 1 for u in other_uids)
        # The never-deliverable events are still kept, with their reason.
        assert len(relsupport.failed_lines(spool)) == n_long
    finally:
        procs.cleanup()
        emu.stop()


@pytest.mark.timeout(120)
def test_failed_line_is_json_with_code_and_message(tmp_path, procs, sink_env):
    """A dead letter is plain JSON a user can read with any tool (one object per line)."""
    from cloudtrail_sink.emulator import Emulator
    from cloudtrail_sink.spool import SpoolWriter

    spool = tmp_path / "spool"
    with SpoolWriter(spool) as writer:
        ev = relsupport.make_event("dl-bad-time")
        ev["eventTime"] = "yesterday"
        writer.write(ev)
    emu = Emulator(db_path=tmp_path / "e.sqlite", channels={CHANNEL_ARN: None}, seed=1)
    emu.start()
    try:
        p = procs.start(relsupport.sink_cmd(spool, emu.url, CHANNEL_ARN, "--drain"), sink_env)
        assert relsupport.wait_exit(p, 60) == 0, procs.tail(p)
    finally:
        procs.cleanup()
        emu.stop()
    files = relsupport.spool_files(spool, "failed")
    assert len(files) == 1 and files[0].endswith(".jsonl")
    text = (spool / "failed" / files[0]).read_text(encoding="utf-8")
    (line,) = [json.loads(l) for l in text.splitlines()]
    assert line["errorCode"] == "InvalidData" and "eventTime" in line["errorMessage"]
    assert relsupport.stored_uids(emu) == []


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_service_side_permanent_failures_are_dead_lettered_then_replayed_once(tmp_path, procs,
                                                                              sink_env):
    """The service itself refuses some events for good (``AccountNotSubscribed`` in
    ``failed[]`` of a 200 answer, which the sink cannot foresee): those go to ``failed/`` with
    the service's code and message while their neighbours are delivered; once the account is
    subscribed, ``failed replay`` delivers them exactly once."""
    from cloudtrail_sink.emulator import Emulator
    from cloudtrail_sink.spool import SpoolWriter

    spool = tmp_path / "spool"
    uids = [f"{'svc-refused' if i % 7 == 0 else 'svc-ok'}-{i:04d}" for i in range(700)]
    with SpoolWriter(spool, max_events=150) as writer:
        for uid in uids:
            writer.write(relsupport.make_event(uid), tag="svc")
    refused = {u for u in uids if u.startswith("svc-refused")}

    emu = Emulator(db_path=tmp_path / "emulator.sqlite", channels={CHANNEL_ARN: None}, seed=4)
    emu.start()
    proxy = relsupport.RefusingProxy(emu.url, prefix="svc-refused")
    try:
        first = procs.start(relsupport.sink_cmd(spool, proxy.url, CHANNEL_ARN, "--drain"),
                            sink_env, name="sink-refused")
        assert relsupport.wait_exit(first, 120) == 0, procs.tail(first)
        assert proxy.refused >= len(refused)
        lines = relsupport.failed_lines(spool)
        assert sorted(l["eventData"]["UID"] for l in lines) == sorted(refused)
        for line in lines:
            assert line["errorCode"] == "AccountNotSubscribed"
            assert line["errorMessage"] == "The account is not subscribed to CloudTrail Lake"
        assert collections.Counter(relsupport.stored_uids(emu)) == \
            collections.Counter(u for u in uids if u not in refused)

        proxy.refusing = False  # the account got subscribed
        replay = relsupport.cli(["failed", "replay", "--spool-dir", str(spool)], sink_env)
        assert replay.returncode == 0, replay.stderr
        second = procs.start(relsupport.sink_cmd(spool, proxy.url, CHANNEL_ARN, "--drain"),
                             sink_env, name="sink-subscribed")
        assert relsupport.wait_exit(second, 120) == 0, procs.tail(second)

        assert relsupport.failed_lines(spool) == []
        assert collections.Counter(relsupport.stored_uids(emu)) == collections.Counter(uids)
    finally:
        procs.cleanup()
        proxy.stop()
        emu.stop()
