"""``spool write`` reports each line a spool record cannot hold and keeps going, from a file or
a stream, and on a full disk stops without leaving a partial file behind."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys

import pytest

from sinksupport import event, uids_in_segment

# Each once killed the command with a traceback and dropped every line after it.
BAD_LINES = {
    2: json.dumps({"eventData": {**event("big"), "n": 2 ** 70}}),
    3: "[" * 10_000 + "]" * 10_000,
    4: '{"eventData": {"n": ' + "9" * 5000 + "}}",
    5: '{"eventData": {"n": 1}, "time": "soon"}',
}


def _input() -> bytes:
    lines = {1: json.dumps(event(1)), **BAD_LINES, 6: json.dumps(event(6))}
    return "".join(lines[i] + "\n" for i in sorted(lines)).encode()


def _write(spool_dir, src: str, data: bytes | None = None, **kw):
    return subprocess.run([sys.executable, "-m", "cloudtrail_sink", "spool", "write",
                           "--spool-dir", str(spool_dir), "--no-fsync", "--max-age", "0.2", src],
                          input=data, capture_output=True, timeout=60, **kw)


def _ready_uids(spool_dir) -> list[str]:
    ready = spool_dir / "ready"
    return sorted(u for n in os.listdir(ready) for u in uids_in_segment(ready / n))


@pytest.mark.parametrize("streamed", [False, True])
def test_each_bad_line_is_reported_and_skipped_and_the_rest_written(tmp_path, streamed):
    spool_dir = tmp_path / "spool"
    if streamed:  # a pipe: read as it comes, as `tail -f log | cloudtrail-sink spool write -`
        name, result = "<stdin>", _write(spool_dir, "-", _input())
    else:
        src = tmp_path / "events.jsonl"
        src.write_bytes(_input())
        name, result = str(src), _write(spool_dir, str(src))
    err = result.stderr.decode()
    assert result.returncode == 1, err
    assert "Traceback" not in err
    for lineno in BAD_LINES:
        assert f"{name}:{lineno}: " in err, err
    assert "beyond 64 bits" in err and "4300 digits" in err
    assert _ready_uids(spool_dir) == ["evt-1", "evt-6"]
    assert os.listdir(spool_dir / "tmp") == []


def _limit_file_size():
    # What a full disk does to a writer: write() fails (EFBIG here, ENOSPC there).
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))


@pytest.mark.parametrize("src", ["file", "-"])
def test_a_full_disk_stops_with_a_message_and_leaves_no_partial_file(tmp_path, src):
    spool_dir = tmp_path / "spool"
    data = "".join(json.dumps(event(i, pad=500)) + "\n" for i in range(200)).encode()
    if src == "file":
        (tmp_path / "in.jsonl").write_bytes(data)
        result = _write(spool_dir, str(tmp_path / "in.jsonl"), preexec_fn=_limit_file_size)
    else:
        result = _write(spool_dir, "-", data, preexec_fn=_limit_file_size)
    err = result.stderr.decode()
    assert result.returncode == 1 and "Traceback" not in err, err
    assert "cannot write to spool" in err and "no partial file is left" in err, err
    assert os.listdir(spool_dir / "tmp") == []
    assert os.listdir(spool_dir / "ready") == []  # nothing sealed: the first segment failed
