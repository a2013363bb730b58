"""Whatever lands in ``ready/``, the sink neither crashes nor loses bytes (docs/spool.md):

- a segment cut in the middle of a record, or with garbage after good records: the records
  before the bad byte are delivered, and those after the garbage too; the bad bytes are in
  ``quarantine/`` exactly (with a ``.reason.json`` naming offset, end and size), the segment
  leaves ``ready/``;
- bytes that are not msgpack at all: all of them quarantined, nothing delivered;
- an empty segment: it does not block delivery of the others;
- decodable maps that are not events: ``failed/`` as ``MalformedRecord``; values that are not
  maps at all: ``quarantine/`` (a run of them is one entry); neighbours delivered;
- random bytes: the same accounting holds (nothing lost, the sink keeps going);
- symlinks, FIFOs, folders and names not ending in ``.seg`` in ``ready/``: never opened, never
  deleted, never delivered (a symlink to a readable segment outside the spool must not ship it).
"""

from __future__ import annotations

import json
import os
import random

import msgpack
import pytest

import relsupport
from relsupport import CHANNEL_ARN


def _record(uid: str) -> bytes:
    return msgpack.packb({"eventData": relsupport.make_event(uid), "tag": "t", "time": 1.0},
                         use_bin_type=True)


def _name(n: int, writer: str = "cli_1_test01") -> str:
    return f"{1764237600000000 + n:016d}-{writer}-{n:010d}.seg"


def _run_drain(tmp_path, procs, sink_env, spool, timeout=90):
    from cloudtrail_sink.emulator import Emulator

    emu = Emulator(db_path=tmp_path / "emulator.sqlite", channels={CHANNEL_ARN: None}, seed=5)
    emu.start()
    try:
        p = procs.start(relsupport.sink_cmd(spool, emu.url, CHANNEL_ARN, "--drain"), sink_env,
                        name="sink-drain")
        code = relsupport.wait_exit(p, timeout)
        assert code == 0, f"exit {code}\n{procs.tail(p)}"
        return relsupport.stored_uids(emu), procs.tail(p, 200)
    finally:
        procs.cleanup()
        emu.stop()


def _reason(spool, name):
    with open(os.path.join(spool, "quarantine", name + ".reason.json"), encoding="utf-8") as f:
        return json.load(f)


@pytest.mark.timeout(180)
def test_damaged_segments_deliver_the_good_part_and_quarantine_the_rest(tmp_path, procs,
                                                                         sink_env):
    from cloudtrail_sink.spool import ensure_layout

    spool = tmp_path / "spool"
    lay = ensure_layout(spool)
    good = [_record(f"ok-{i}") for i in range(5)]
    sixth = _record("cut-5")
    tr = b"".join(_record(f"tr-{i}") for i in range(5))
    gb = b"".join(_record(f"gb-{i}") for i in range(3))
    garbage = b"\xc1\xc1 not msgpack \x00"
    segments = {
        # name: (bytes, uids expected delivered, offset of the first bad byte or None,
        #        end of the bad bytes when records follow them)
        _name(1): (b"".join(good), {f"ok-{i}" for i in range(5)}, None, None),
        _name(2): (tr + sixth[:17], {f"tr-{i}" for i in range(5)}, len(tr), None),
        # The records after the garbage are found again and delivered.
        _name(3): (gb + garbage + b"".join(_record(f"gb-after-{i}") for i in range(2)),
                   {f"gb-{i}" for i in range(3)} | {"gb-after-0", "gb-after-1"}, len(gb),
                   len(gb) + len(garbage)),
        _name(4): (b"\xc1 this is not msgpack at all\n" * 20, set(), 0, None),
        _name(5): (b"", set(), None, None),
        _name(6): (_record("last-0"), {"last-0"}, None, None),
    }
    for name, (data, _, _, _) in segments.items():
        with open(os.path.join(lay.ready, name), "wb") as f:
            f.write(data)

    stored, log = _run_drain(tmp_path, procs, sink_env, spool)

    expected = set().union(*(uids for _, uids, _, _ in segments.values()))
    assert set(stored) == expected, sorted(set(stored) ^ expected)
    assert len(stored) == len(expected), "a record before the bad byte was sent twice"
    assert relsupport.spool_files(spool, "ready") == []
    quarantined = set(relsupport.spool_files(spool, "quarantine"))
    for name, (data, uids, offset, end) in segments.items():
        if offset is None:
            assert name not in quarantined or _reason(spool, name)["size"] == 0
            continue
        entry = name if end is None else f"{name}.{offset:012d}"
        assert entry in quarantined and entry + ".reason.json" in quarantined, quarantined
        reason = _reason(spool, entry)
        assert reason["offset"] == offset and reason["size"] == len(data), reason
        assert reason.get("end") == end and reason["error"], reason
        assert reason["recordsBefore"] == len([u for u in uids if "-after-" not in u]), reason
        assert reason["segment"].endswith(name)
        # The quarantined bytes are exactly the undecodable ones: nothing is lost.
        with open(os.path.join(spool, "quarantine", entry), "rb") as f:
            assert f.read() == data[offset:end]
    assert relsupport.failed_lines(spool) == []


@pytest.mark.timeout(120)
def test_values_that_are_not_events_are_dead_lettered_or_quarantined(tmp_path, procs, sink_env):
    from cloudtrail_sink.spool import ensure_layout

    spool = tmp_path / "spool"
    lay = ensure_layout(spool)
    parts = [_record("mf-0"), msgpack.packb("a bare string"), _record("mf-1"),
             msgpack.packb({"tag": "no eventData here"}), msgpack.packb([1, 2, 3]),
             msgpack.packb({"eventData": "not a map"}), _record("mf-2")]
    data = b"".join(parts)
    with open(os.path.join(lay.ready, _name(1)), "wb") as f:
        f.write(data)

    stored, _ = _run_drain(tmp_path, procs, sink_env, spool)

    assert sorted(stored) == ["mf-0", "mf-1", "mf-2"]
    lines = relsupport.failed_lines(spool)
    assert [l["errorCode"] for l in lines] == ["MalformedRecord"] * 2, lines
    assert all(l["errorMessage"] for l in lines)
    assert relsupport.spool_files(spool, "ready") == []
    # The two values that are not maps: each quarantined with exactly its bytes.
    for i in (1, 4):
        offset = len(b"".join(parts[:i]))
        entry = f"{_name(1)}.{offset:012d}"
        with open(os.path.join(spool, "quarantine", entry), "rb") as f:
            assert f.read() == parts[i]
        assert _reason(spool, entry)["end"] == offset + len(parts[i])
    assert len(relsupport.spool_files(spool, "quarantine")) == 4


@pytest.mark.timeout(180)
@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_random_bytes_are_accounted_for(tmp_path, procs, sink_env, seed):
    """Random bytes after good records: every good record is delivered once, and whatever the
    sink could not send is either a ``MalformedRecord`` dead letter or quarantined verbatim."""
    from cloudtrail_sink.spool import ensure_layout

    rng = random.Random(seed)
    spool = tmp_path / "spool"
    lay = ensure_layout(spool)
    head = b"".join(_record(f"rb{seed}-{i}") for i in range(4))
    data = head + bytes(rng.randrange(256) for _ in range(rng.randrange(1, 4096)))
    name = _name(seed)
    with open(os.path.join(lay.ready, name), "wb") as f:
        f.write(data)
    with open(os.path.join(lay.ready, _name(99)), "wb") as f:
        f.write(_record(f"rb{seed}-after"))

    stored, _ = _run_drain(tmp_path, procs, sink_env, spool)

    assert relsupport.spool_files(spool, "ready") == []
    for i in range(4):
        assert stored.count(f"rb{seed}-{i}") == 1
    assert stored.count(f"rb{seed}-after") == 1
    # Every byte after the good records is quarantined verbatim or decodes to a map that is a
    # MalformedRecord dead letter; quarantined runs never overlap.
    covered = []
    for entry in relsupport.spool_files(spool, "quarantine"):
        if not entry.startswith(name) or entry.endswith(".reason.json"):
            continue
        reason = _reason(spool, entry)
        end = reason.get("end", len(data))
        assert len(head) <= reason["offset"] < end <= len(data) == reason["size"], reason
        with open(os.path.join(spool, "quarantine", entry), "rb") as f:
            assert f.read() == data[reason["offset"]:end], "quarantined bytes differ"
        covered.append((reason["offset"], end))
    covered.sort()
    gaps, pos = [], len(head)
    for start, end in covered:
        assert start >= pos, "quarantined runs overlap"
        gaps.append((pos, start))
        pos = end
    gaps.append((pos, len(data)))
    maps = 0
    for start, end in gaps:
        unpacker = msgpack.Unpacker(raw=False, unicode_errors="replace", strict_map_key=False)
        unpacker.feed(data[start:end])
        values = list(unpacker)
        assert all(isinstance(v, dict) for v in values), values[:5]
        maps += len(values)
    lines = relsupport.failed_lines(spool)
    assert len(lines) == maps, (len(lines), maps)
    assert {l["errorCode"] for l in lines} <= {"MalformedRecord"}


@pytest.mark.timeout(120)
def test_links_fifos_folders_and_other_names_are_never_opened_or_deleted(tmp_path, procs,
                                                                          sink_env):
    from cloudtrail_sink.spool import ensure_layout

    spool = tmp_path / "spool"
    lay = ensure_layout(spool)
    outside = tmp_path / "outside.seg"
    outside_bytes = b"".join(_record(f"outside-{i}") for i in range(3))
    outside.write_bytes(outside_bytes)
    odd = {
        "link": _name(1),
        "dangling": _name(2),
        "fifo": _name(3),
        "folder": _name(4),
        "not-seg": _name(5) + ".partial",
        "readme": "README.txt",
    }
    os.symlink(outside, os.path.join(lay.ready, odd["link"]))
    os.symlink(tmp_path / "nowhere.seg", os.path.join(lay.ready, odd["dangling"]))
    os.mkfifo(os.path.join(lay.ready, odd["fifo"]))
    os.mkdir(os.path.join(lay.ready, odd["folder"]))
    with open(os.path.join(lay.ready, odd["not-seg"]), "wb") as f:
        f.write(_record("partial-0"))
    with open(os.path.join(lay.ready, odd["readme"]), "w") as f:
        f.write("not a segment\n")
    with open(os.path.join(lay.ready, _name(6)), "wb") as f:
        f.write(_record("real-0") + _record("real-1"))

    # --drain must finish although these entries stay (a FIFO must not block the sink).
    stored, log = _run_drain(tmp_path, procs, sink_env, spool, timeout=60)

    assert sorted(stored) == ["real-0", "real-1"], "something outside a real segment was sent"
    assert sorted(relsupport.spool_files(spool, "ready")) == sorted(odd.values())
    assert os.path.islink(os.path.join(lay.ready, odd["link"]))
    assert outside.read_bytes() == outside_bytes, "the link's target was touched"
    assert relsupport.spool_files(spool, "quarantine") == []
    assert relsupport.failed_lines(spool) == []
    # Reported in the log, so an operator learns why these stay.
    assert odd["link"] in log and odd["fifo"] in log, log
