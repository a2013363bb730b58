"""The spool contract on the Python side (docs/spool.md) and the pre-send path of one event."""

from __future__ import annotations

import hashlib
import json
import os
import random

import msgpack
import pytest

from cloudtrail_sink import events, schema, spool
from cloudtrail_sink.delivery.reader import Junk, read_segment

from sinksupport import ACCOUNT, event


class Clock:
    def __init__(self, t=1_800_000_000.0):
        self.t = t

    def __call__(self):
        self.t += 0.001
        return self.t


def test_writer_names_and_seals_by_count_and_bytes(tmp_path):
    clock = Clock()
    with spool.SpoolWriter(tmp_path, max_events=3, clock=clock, rand=random.Random(7)) as w:
        for i in range(7):
            w.write(event(i))
    names = sorted(os.listdir(tmp_path / "ready"))
    assert len(names) == 3  # 3 + 3 + 1 (sealed on close)
    assert names == [os.path.basename(p) for p in w.sealed]  # byte order == sealing order
    for n, name in enumerate(names, 1):
        sealed_us, writer, seq = spool.parse_ready_name(name)
        assert writer == w.writer and writer.startswith(f"cli_{os.getpid()}_") and seq == n
        assert len(name.split("-")[0]) == 16 and name.endswith(f"-{seq:010d}.seg")
    assert os.listdir(tmp_path / "tmp") == []
    assert sorted(os.listdir(tmp_path)) == sorted(spool.FOLDERS)
    assert oct(os.stat(tmp_path / "failed").st_mode & 0o777) == oct(0o750)

    with spool.SpoolWriter(tmp_path / "b", max_bytes=300, clock=clock) as w:
        for i in range(4):
            w.write(event(i, pad=200))
    assert len(w.sealed) == 4  # each record alone reaches 300 bytes


def test_records_round_trip_with_tag_time_and_id(tmp_path):
    with spool.SpoolWriter(tmp_path, clock=Clock()) as w:
        w.write(event(1), tag="app.auth", time=12.5, id="given-id")
        w.write(event(2))
    with spool.open_segment(w.sealed[0]) as f:
        records = list(read_segment(f))
    assert (records[0].offset, records[0].value) == (0, {"eventData": event(1), "tag": "app.auth",
                                                        "time": 12.5, "id": "given-id"})
    assert records[1].offset == records[0].end
    assert records[1].value["tag"] == "cli" and "id" not in records[1].value
    assert isinstance(records[1].value["time"], float)


def test_reader_refuses_symlinks_fifos_and_folders(tmp_path):
    secret = tmp_path / "secret"
    secret.write_bytes(msgpack.packb({"eventData": event("secret")}))
    link = tmp_path / "link.seg"
    link.symlink_to(secret)
    with pytest.raises(spool.NotRegularFile):
        spool.open_segment(str(link))
    fifo = tmp_path / "fifo.seg"
    os.mkfifo(fifo)
    with pytest.raises(spool.NotRegularFile):
        spool.open_segment(str(fifo))  # and does not block on a FIFO without a writer
    (tmp_path / "dir.seg").mkdir()
    with pytest.raises(spool.NotRegularFile):
        spool.open_segment(str(tmp_path / "dir.seg"))


@pytest.mark.parametrize("tail,why", [
    (b"\xc1", "FormatError"),                     # 0xc1 is never valid msgpack
    (msgpack.packb({"eventData": event(9)})[:-3], "truncated"),
])
def test_reader_reports_first_undecodable_offset(tmp_path, tail, why):
    good = b"".join(msgpack.packb({"eventData": event(i), "tag": "t", "time": 1.0})
                    for i in range(3))
    path = tmp_path / "s.seg"
    path.write_bytes(good + tail)
    with spool.open_segment(str(path)) as f:
        out = list(read_segment(f))
    assert [r.value["eventData"]["UID"] for r in out[:-1]] == ["evt-0", "evt-1", "evt-2"]
    err = out[-1]
    assert isinstance(err, Junk)
    assert err.offset == len(good) and err.end is None and why in err.error


def test_reader_replaces_invalid_utf8(tmp_path):
    raw = msgpack.packb({"eventData": {"UID": b"ab\xffcd"}}, use_bin_type=False)
    path = tmp_path / "s.seg"
    path.write_bytes(raw)
    with spool.open_segment(str(path)) as f:
        [rec] = list(read_segment(f))
    assert rec.value["eventData"]["UID"] == "ab\ufffdcd"


def test_event_id_derivation():
    assert events.event_id({"id": "rec-1", "eventData": {"UID": "u"}}) == "rec-1"
    assert events.event_id({"id": "bad id", "eventData": {"UID": "u-1_A"}}) == "u-1_A"
    uid = "arn:aws:x/y"
    assert events.event_id({"eventData": {"UID": uid}}) == (
        "u" + hashlib.sha256(uid.encode()).hexdigest()[:64])
    data = {"b": 1, "a": "é"}
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert events.event_id({"eventData": data}) == (
        "d" + hashlib.sha256(canonical.encode()).hexdigest()[:64])
    assert events.event_id({"eventData": {"UID": "x" * 129}})[0] == "u"  # too long for an id
    # Derived, never random: the same record gives the same id every time.
    assert events.event_id({"eventData": data}) == events.event_id({"eventData": dict(data)})


def test_build_fills_version_and_recipient_and_checksums():
    built = events.build({"eventData": event(1)}, ACCOUNT, 999_000)
    assert isinstance(built, events.Prepared)
    sent = json.loads(built.text)
    assert sent["version"] == "1.0" and sent["recipientAccountId"] == ACCOUNT
    assert built.checksum == schema.checksum(built.text)
    assert schema.check_event_text(built.text, ACCOUNT, built.checksum) is None
    kept = events.build({"eventData": event(2, version="2.0", recipientAccountId=ACCOUNT)},
                        ACCOUNT)
    assert json.loads(kept.text)["version"] == "2.0"


@pytest.mark.parametrize("record,code,field", [
    ({"eventData": {**event(1), "eventTime": "2026-11-27 10:00:00"}}, "InvalidData", "eventTime"),
    ({"eventData": {**event(1), "sourceIPAddress": "999.1.1.1"}}, "InvalidData", "sourceIPAddress"),
    ({"eventData": {k: v for k, v in event(1).items() if k != "eventName"}}, "FieldNotFound",
     "eventName"),
    ({"eventData": {**event(1), "eventName": "n" * 1025}}, "FieldTooLong", "eventName"),
    ({"eventData": event(1, additionalEventData={"k": "v" * 28_000})}, "FieldTooLong",
     "additionalEventData"),
    ({"eventData": {**event(1), "recipientAccountId": "999999999999"}}, "InvalidRecipient",
     "recipientAccountId"),
    ({"eventData": {**event(1), "requestParameters": {"blob": b"\x00"}}}, "InvalidData", "JSON"),
    ({"eventData": "not a map"}, "MalformedRecord", "event map"),
    ([1, 2], "MalformedRecord", "event map"),
])
def test_build_rejects_events_that_can_never_succeed(record, code, field):
    built = events.build(record, ACCOUNT, 999_000)
    assert isinstance(built, events.Rejected)
    assert built.code == code and built.message.startswith("sink: ") and field in built.message


def test_entry_size_is_exactly_what_botocore_sends():
    """The request-size budget is measured on botocore's own serialization of the request."""
    import boto3

    client = boto3.client("cloudtrail-data", region_name="us-east-1",
                          aws_access_key_id="a", aws_secret_access_key="b")
    serializer = client._serializer
    op = client.meta.service_model.operation_model("PutAuditEvents")
    names = ['q"\\\n\u2028é😀', 'ascii "quoted" \\ back\x7fdel\x01ctl', "plain"]
    built = [events.build({"eventData": event(i, pad=i * 7, eventName=names[i % 3])}, ACCOUNT)
             for i in range(6)]
    entries = [b.entry() for b in built]
    req = serializer.serialize_to_request({"auditEvents": entries, "channelArn": "arn"}, op)
    assert len(req["body"]) == events.request_size([b.size for b in built])


def test_events_nested_deeper_than_the_emulator_reads_are_refused_before_sending():
    deep = {}
    cur = deep
    for _ in range(300):  # deeper than schema.MAX_DEPTH; the Lua writer allows 250
        cur["a"] = {}
        cur = cur["a"]
    data = event(1, additionalEventData=deep, version="1.0", recipientAccountId=ACCOUNT)
    built = events.build({"eventData": data}, ACCOUNT)
    assert isinstance(built, events.Rejected) and built.code == "InvalidData"
    assert schema.check_event_text(schema.dumps(data), ACCOUNT).code == "InvalidData"
