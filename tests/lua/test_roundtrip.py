"""Round trip: records -> Lua filter (shipped mappings) -> spool -> `cloudtrail-sink run --drain`
-> emulator. Every event arrives exactly as the filter wrote it; rejected records stay behind;
records a drop: rule takes are the only ones that make neither."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

from cloudtrail_sink.mappings import compile_files

from tests.conftest import CHANNEL_ARN
from .conftest import ACCOUNT, read_folder

MAPPINGS = pathlib.Path(__file__).resolve().parents[2] / "mappings"


def test_records_arrive_intact_through_filter_sink_and_emulator(lua_filter, spool, tmp_path,
                                                                emulator):
    compiled = compile_files([MAPPINGS], defaults={"recipientAccountId": ACCOUNT})
    rules = tmp_path / "compiled.lua"
    rules.write_text(compiled.lua_text())
    f = lua_filter(real_mapper=True, CLOUDTRAIL_MAPPINGS=str(rules),
                   CLOUDTRAIL_SEGMENT_MAX_EVENTS="4")
    sent = 0
    for round_ in range(3):
        for ex in compiled.examples:
            record = dict(ex.record) if isinstance(ex.record, dict) else ex.record
            if isinstance(record, dict):
                record["replica"] = round_  # distinct records, distinct derived UIDs
            assert f.call(ex.tag, ex.time + round_, record)[0] == -1
            sent += 1
    f.seal()
    written = read_folder(spool, "ready", ".seg")
    rejected = read_folder(spool, "rejected", ".rej")
    # records a drop: rule takes (Kubernetes audit stages before the final one) make no event
    dropped = 3 * sum(ex.expect_dropped is not None for ex in compiled.examples)
    assert dropped and len(written) + len(rejected) + dropped == sent and written

    env = dict(os.environ)
    result = subprocess.run(
        [sys.executable, "-m", "cloudtrail_sink", "run", "--drain", "--spool-dir", str(spool),
         "--channel-arn", CHANNEL_ARN, "--endpoint-url", emulator.url, "--listen", "127.0.0.1:0"],
        env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]

    stored = {e["eventData"]["UID"]: e["eventData"] for e in emulator.events()}
    expected = {w["eventData"]["UID"]: w["eventData"] for w in written}
    assert stored == expected
    assert list((spool / "ready").iterdir()) == []
    assert list((spool / "failed").glob("*.jsonl")) == []
    assert len(read_folder(spool, "rejected", ".rej")) == len(rejected)
