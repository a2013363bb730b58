"""Property: whatever bytes and msgpack values a segment holds, ``run --drain`` against the
emulator ends, and every record is accounted for: delivered, in ``failed/``, or its bytes in
``quarantine/`` (and nothing is left in ``ready/``)."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import tempfile

import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cloudtrail_sink import events, spool

from sinksupport import ACCOUNT, drain_config, event, failed_lines, run_drain

_serial = itertools.count()

scalars = (st.none() | st.booleans() | st.integers(-(2 ** 63), 2 ** 64 - 1)
           | st.floats() | st.text(max_size=20) | st.binary(max_size=20))
values = st.recursive(scalars, lambda inner: (
    st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=8) | st.integers(-5, 5) | st.binary(max_size=4), inner,
                      max_size=4)), max_leaves=12)


def good():
    return st.builds(lambda: {"eventData": event(f"p{next(_serial)}",
                                                 recipientAccountId=ACCOUNT), "tag": "t"})


@st.composite
def deep(draw) -> bytes:
    """An event whose additionalEventData nests 240 to 1,100 maps (msgpack.packb stops at 511:
    the nesting is written by hand)."""
    levels = draw(st.integers(240, 1100))
    record = _pack({"eventData": {**event(f"d{next(_serial)}"), "additionalEventData": "X"}})
    return record.replace(b"\xa1X", b"\x81\xa1a" * levels + b"\x80", 1)


def _pack(value) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


parts = st.lists(st.one_of(
    good().map(_pack),
    deep(),
    values.map(lambda v: _pack({"eventData": v})),
    st.dictionaries(st.sampled_from(["eventData", "tag", "time", "id"]), values,
                    max_size=4).map(_pack),
    values.map(_pack),
    st.binary(max_size=40),
), max_size=8)


def _quarantined_ranges(lay, name: str, size: int) -> list[tuple[int, int]]:
    out = []
    for entry in os.listdir(lay.quarantine):
        if entry.startswith(name) and entry.endswith(".reason.json"):
            with open(os.path.join(lay.quarantine, entry), encoding="utf-8") as f:
                reason = json.load(f)
            end = reason.get("end", size)
            with open(os.path.join(lay.quarantine, entry[:-len(".reason.json")]), "rb") as f:
                assert len(f.read()) == end - reason["offset"]
            out.append((reason["offset"], end))
    return sorted(out)


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(segments=st.lists(parts, min_size=1, max_size=3))
def test_any_segment_content_drains_and_every_record_is_accounted_for(emulator, segments):
    root = tempfile.mkdtemp(prefix="poison-")
    try:
        lay = spool.ensure_layout(os.path.join(root, "spool"))
        stored_before = len(emulator.events())
        datas = {}
        for n, seg in enumerate(segments):
            name = spool.ready_name(1_700_000_000_000_000 + n, "prop", n)
            datas[name] = b"".join(seg)
            with open(os.path.join(lay.ready, name), "wb") as f:
                f.write(datas[name])

        run_drain(drain_config(lay.root, emulator.url, drain_timeout=60, linger_ms=5))

        assert os.listdir(lay.ready) == []
        stored = [e["eventData"] for e in emulator.events()[stored_before:]]
        stored_uids = {d.get("UID") for d in stored}
        failed_ids = {line["id"] for line in failed_lines(lay.root)}
        maps = 0
        for name, data in datas.items():
            # Bytes outside the quarantined runs decode to maps only, each delivered or failed.
            pos = 0
            for start, end in _quarantined_ranges(lay, name, len(data)) + [(len(data),) * 2]:
                assert start >= pos
                unpacker = msgpack.Unpacker(raw=False, unicode_errors="replace",
                                            strict_map_key=False)
                unpacker.feed(data[pos:start])
                for value in unpacker:
                    assert isinstance(value, dict), value
                    maps += 1
                    data_ = value.get("eventData")
                    uid = data_.get("UID") if isinstance(data_, dict) else None
                    assert events.event_id(value) in failed_ids or uid in stored_uids, value
                pos = end
        # Nothing invented: no more outcomes than records.
        assert len(stored) + len(failed_lines(lay.root)) <= maps
    finally:
        shutil.rmtree(root, ignore_errors=True)
