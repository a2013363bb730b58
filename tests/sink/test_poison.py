"""Poison input settles: any bytes in a segment and any decoded value end, in bounded time, in
exactly one place (delivered once, ``failed/`` with the reason, or ``quarantine/`` with its
bytes), and never hold up the records after them. Each case here once kept a segment in
``ready/`` forever, re-sent its neighbours in a loop, or flooded ``failed/``."""

from __future__ import annotations

import base64
import collections
import os

import msgpack
import pytest

from cloudtrail_sink import spool
RAW_KEY = "recordMsgpackBase64"  # docs/spool.md: the record's bytes in a lossy dead letter

from sinksupport import ACCOUNT, drain_config, event, failed_lines, run_drain, stored_uids

DRAIN = dict(drain_timeout=40)  # old failure mode: never drained; now a failing exit code


def segment(spool_dir, n: int, data: bytes) -> str:
    lay = spool.ensure_layout(spool_dir)
    name = spool.ready_name(1_700_000_000_000_000 + n, "test_poison", n)
    with open(os.path.join(lay.ready, name), "wb") as f:
        f.write(data)
    return name


def record(data) -> bytes:
    return msgpack.packb({"eventData": data, "tag": "t", "time": 1.0}, use_bin_type=True)


def nested(uid: str, levels: int) -> dict:
    """A valid event whose eventData nests ``levels`` maps, itself included."""
    deep: dict = {}
    for _ in range(levels - 3):
        deep = {"a": deep}
    return event(uid, additionalEventData=deep, recipientAccountId=ACCOUNT)


def quarantined(spool_dir) -> list[str]:
    return sorted(os.listdir(os.path.join(spool_dir, "quarantine")))


@pytest.mark.parametrize("levels", [900, 1000, 1020])
def test_an_event_nested_too_deep_is_dead_lettered_once_and_its_neighbours_delivered_once(
        tmp_path, emulator, levels):
    spool_dir = tmp_path / "spool"
    raw = record(nested("deep", levels))
    segment(spool_dir, 1, record(event("before")) + raw + record(event("after")))
    run_drain(drain_config(spool_dir, emulator.url, **DRAIN))
    assert sorted(stored_uids(emulator)) == ["evt-after", "evt-before"]
    [line] = failed_lines(spool_dir)
    assert line["errorCode"] == "InvalidData" and "nested deeper" in line["errorMessage"]
    # The JSON form had to cut the nesting: the record's own bytes are kept beside it.
    assert base64.b64decode(line[RAW_KEY]) == raw
    assert os.listdir(spool_dir / "ready") == [] and quarantined(spool_dir) == []


def test_event_data_with_keys_of_any_type_or_any_depth_never_blocks_a_segment(tmp_path,
                                                                              emulator):
    spool_dir = tmp_path / "spool"
    int_keys = {**event("int-keys"), 7: "seven"}
    bin_keys = {**event("bin-keys"), b"\xffkey": b"\x00value"}
    # Deeper than msgpack's own stack (it cannot even decode it) and than Python's recursion.
    too_deep = b"\x83\xa9eventData" + b"\x81\xa1a" * 3000 + b"\x80" + b"\xa3tag\xa1t\xa4time\x01"
    list_key = b"\x81\xa9eventData\x81\x91\x01\xa1x"  # a map keyed by an array: unhashable
    data = (record(event(0)) + record(int_keys) + record(bin_keys) + too_deep + record(event(1))
            + list_key + record(nested("py-deep", 1010)) + record(event(2)))
    name = segment(spool_dir, 1, data)
    segment(spool_dir, 2, record(event(3)))
    run_drain(drain_config(spool_dir, emulator.url, **DRAIN))
    assert sorted(stored_uids(emulator)) == [f"evt-{i}" for i in range(4)]
    lines = failed_lines(spool_dir)
    assert sorted(line["eventData"]["UID"] for line in lines) == ["evt-bin-keys", "evt-int-keys",
                                                                 "evt-py-deep"]
    assert all(line["errorCode"] == "InvalidData" for line in lines)
    # The two values msgpack cannot build are quarantined alone, byte for byte.
    q = spool_dir / "quarantine"
    start = data.index(too_deep)
    assert (q / f"{name}.{start:012d}").read_bytes() == too_deep
    start = data.index(list_key)
    assert (q / f"{name}.{start:012d}").read_bytes() == list_key
    assert os.listdir(spool_dir / "ready") == []


def test_a_run_of_zero_bytes_is_one_quarantine_entry(tmp_path, emulator):
    """What a power loss leaves: 200 kB of zeros once became 200,000 dead letters."""
    spool_dir = tmp_path / "spool"
    zeros = segment(spool_dir, 1, bytes(200_000))
    segment(spool_dir, 2, b"")  # an empty segment: nothing to do but delete it
    between = segment(spool_dir, 3, record(event(0)) + bytes(1000) + record(event(1)))
    runner = run_drain(drain_config(spool_dir, emulator.url, **DRAIN))
    assert sorted(stored_uids(emulator)) == ["evt-0", "evt-1"]
    assert failed_lines(spool_dir) == []
    offset = len(record(event(0)))
    assert quarantined(spool_dir) == sorted([zeros, zeros + ".reason.json",
                                             f"{between}.{offset:012d}",
                                             f"{between}.{offset:012d}.reason.json"])
    assert (spool_dir / "quarantine" / zeros).read_bytes() == bytes(200_000)
    assert (spool_dir / "quarantine" / f"{between}.{offset:012d}").read_bytes() == bytes(1000)
    assert os.listdir(spool_dir / "ready") == []
    assert runner.metrics.registry.get_sample_value("cloudtrail_sink_segments_quarantined_total") == 2


def test_every_record_is_settled_in_exactly_one_place(tmp_path, emulator):
    """Values of every kind in one segment: each good event stored once, each refused one in
    failed/ once, everything else quarantined; counts add up."""
    spool_dir = tmp_path / "spool"
    values = [record(event(0)), msgpack.packb("a bare string"), msgpack.packb([1, 2]),
              record(event("bad", recipientAccountId="999999999999")),
              msgpack.packb({"tag": "no eventData"}), record(event(1))]
    segment(spool_dir, 1, b"".join(values))
    run_drain(drain_config(spool_dir, emulator.url, **DRAIN))
    assert sorted(stored_uids(emulator)) == ["evt-0", "evt-1"]
    codes = collections.Counter(line["errorCode"] for line in failed_lines(spool_dir))
    assert codes == {"InvalidRecipient": 1, "MalformedRecord": 1}
    assert len(quarantined(spool_dir)) == 2  # the string and the array: one run, + reason


def test_a_record_the_check_raises_on_is_dead_lettered_with_its_bytes_read_once(
        tmp_path, emulator, monkeypatch):
    """Whatever ``events.build`` raises on is refused as InvalidData under an id made from the
    record's bytes, which the dead letter keeps; the bytes are read from the segment once."""
    import hashlib

    from cloudtrail_sink import events
    from cloudtrail_sink.delivery import reader as segment_reader

    real_build, real_raw = events.build, segment_reader.Record.raw
    reads: collections.Counter = collections.Counter()

    def build(rec, *args):
        if rec["eventData"].get("UID") == "evt-boom":
            raise RuntimeError("a check that breaks")
        return real_build(rec, *args)

    def raw(entry, f):
        reads[entry.offset] += 1
        return real_raw(entry, f)

    monkeypatch.setattr(events, "build", build)
    monkeypatch.setattr(segment_reader.Record, "raw", raw)
    spool_dir = tmp_path / "spool"
    boom = record(event("boom", requestParameters={"bytes": b"\xff"}))  # lossy as JSON
    refused = record(event("other-account", recipientAccountId="999999999999"))
    values = [record(event(0)), boom, refused, record(event(1))]
    segment(spool_dir, 1, b"".join(values))
    run_drain(drain_config(spool_dir, emulator.url, **DRAIN))
    assert sorted(stored_uids(emulator)) == ["evt-0", "evt-1"]
    by_uid = {line["eventData"]["UID"]: line for line in failed_lines(spool_dir)}
    line = by_uid["evt-boom"]
    assert line["errorCode"] == "InvalidData"
    assert line["errorMessage"] == "sink: record cannot be checked (RuntimeError)"
    assert line["id"] == "r" + hashlib.sha256(boom).hexdigest()[:64]
    assert base64.b64decode(line[RAW_KEY]) == boom
    assert by_uid["evt-other-account"]["errorCode"] == "InvalidRecipient"
    boom_at, refused_at = len(values[0]), len(values[0]) + len(boom)
    assert reads == {boom_at: 1, refused_at: 1}
    assert os.listdir(spool_dir / "ready") == [] and quarantined(spool_dir) == []


@pytest.mark.timeout(120)
def test_bytes_crafted_to_make_every_record_search_walk_far_are_read_in_linear_time(tmp_path):
    """A run of map headers claiming 2**32 entries, each followed by the packed key
    ``eventData``: every search for the next record tries each header and walks to the end
    of the data (quadratic: about 20 minutes of CPU for 1 MB before the budget)."""
    from cloudtrail_sink.delivery import reader as segment_reader

    good = msgpack.packb({"tag": "t", "time": 1, "eventData": event(1)})
    unit = b"\xdf\xff\xff\xff\xff" + b"\xa9eventData"
    crafted = b"\xc1" + unit * (256 * 1024 // len(unit))
    path = tmp_path / "seg"
    path.write_bytes(good + crafted)
    budget = segment_reader.Budget.for_size(path.stat().st_size)
    steps = budget.left
    with open(path, "rb") as f:
        out = list(segment_reader.read_segment(f, budget))
    # The record before the crafted bytes is read; the rest is one run to the end of the file.
    assert [type(x).__name__ for x in out] == ["Record", "Junk"]
    assert out[0].value["eventData"] == event(1)
    assert (out[1].offset, out[1].end) == (len(good), None)
    assert budget.used <= steps


@pytest.mark.timeout(120)
def test_many_short_bad_stretches_do_not_reread_the_segment_for_each(tmp_path, monkeypatch):
    """Values msgpack cannot build (a map keyed by an array), each followed by a record: every
    one makes the reader look at the bytes after it; that reading is charged to the budget, so
    the read stays linear in the segment's size and accounts for every byte."""
    from cloudtrail_sink.delivery import reader as segment_reader

    bad = msgpack.packb({(1, 2): 1})
    good = msgpack.packb({"tag": "t", "eventData": event(1)})
    path = tmp_path / "seg"
    path.write_bytes((bad + good) * 20_000)
    size = path.stat().st_size
    searched = {"bytes": 0}
    real_pread = os.pread

    def pread(fd, n, offset):
        data = real_pread(fd, n, offset)
        searched["bytes"] += len(data)
        return data

    monkeypatch.setattr(os, "pread", pread)
    budget = segment_reader.Budget.for_size(size)
    steps = budget.left
    with open(path, "rb") as f:
        out = list(segment_reader.read_segment(f, budget))
    assert budget.used <= steps
    # Linear: the bytes read again to search are bounded by the budget (before it, each bad
    # value re-read up to 16 MiB after it: 20,000 x the rest of the segment, ~80 GB here).
    # (plus the one window read when it ran out).
    assert searched["bytes"] <= segment_reader.BYTES_PER_STEP * steps + spool.MAX_RECORD_BYTES
    # Every byte in exactly one item, in order; the records found are whole records.
    ends = [x.offset for x in out[1:]] + [size]
    assert out[0].offset == 0
    assert all((x.end if x.end is not None else size) == e for x, e in zip(out, ends))
    records = [x for x in out if isinstance(x, segment_reader.Record)]
    assert records and all(r.value["eventData"] == event(1) for r in records)
