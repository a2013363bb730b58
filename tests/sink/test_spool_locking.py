"""The stale-tmp backstop never takes a file a live writer holds (flock), and writers seal by age:
a quiet `tail -f log | cloudtrail-sink spool write -` loses nothing and reaches ready/ promptly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import lupa.luajit21 as lupa
import msgpack

from cloudtrail_sink import spool
from cloudtrail_sink.luaharness import MODULE_DIR
from cloudtrail_sink.watcher import SegmentQueue

from sinksupport import event, uids_in_segment, wait_for


class Clock:
    def __init__(self, now: float = 1_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def ready_uids(lay) -> list[str]:
    out = []
    for name in sorted(os.listdir(lay.ready)):
        out += uids_in_segment(os.path.join(lay.ready, name))
    return out


def test_stale_tmp_backstop_never_takes_a_file_a_live_spool_writer_holds(tmp_path):
    lay = spool.ensure_layout(tmp_path)
    w = spool.SpoolWriter(tmp_path, fsync=False)
    w.write(event(1))
    [tmp] = os.listdir(lay.tmp)
    os.utime(os.path.join(lay.tmp, tmp), (1, 1))  # input quiet for ages
    q = SegmentQueue(lay, stale_tmp_seconds=300, clock=lambda: time.time() + 301)
    assert q.publish_stale_tmp() == 0
    assert os.listdir(lay.ready) == [] and os.listdir(lay.tmp) == [tmp]
    w.write(event(2))
    w.close()
    assert ready_uids(lay) == ["evt-1", "evt-2"] and os.listdir(lay.tmp) == []


def test_stale_tmp_backstop_takes_the_file_once_its_writer_is_gone(tmp_path):
    lay = spool.ensure_layout(tmp_path)
    w = spool.SpoolWriter(tmp_path, fsync=False)
    w.write(event(1))
    w._file.close()  # the writer process died: the kernel drops its lock
    q = SegmentQueue(lay, stale_tmp_seconds=300, clock=lambda: time.time() + 301)
    assert q.publish_stale_tmp() == 1
    assert ready_uids(lay) == ["evt-1"] and os.listdir(lay.tmp) == []


def test_stale_tmp_backstop_never_takes_a_file_the_lua_writer_holds(tmp_path):
    lay = spool.ensure_layout(tmp_path)
    lua = lupa.LuaRuntime()
    lua.execute(f"package.path = [==[{MODULE_DIR}]==] .. '/?.lua;' .. package.path")
    new_writer = lua.eval("function(root) return require('cloudtrail.spool').new{"
                          "root = root, max_age = 3600, writer = 'fb_1_abcdef'} end")
    append = lua.eval("function(w, data) return w:append_event(data) end")
    seal_all = lua.eval("function(w) return w:seal_all() end")
    w = new_writer(str(tmp_path))
    record = msgpack.packb({"eventData": event(1), "tag": "t", "time": 1.0})
    assert append(w, record)
    [tmp] = os.listdir(lay.tmp)
    os.utime(os.path.join(lay.tmp, tmp), (1, 1))
    q = SegmentQueue(lay, stale_tmp_seconds=300, clock=lambda: time.time() + 301)
    assert q.publish_stale_tmp() == 0 and os.listdir(lay.tmp) == [tmp]
    assert append(w, msgpack.packb({"eventData": event(2), "tag": "t", "time": 1.0}))
    seal_all(w)
    assert ready_uids(lay) == ["evt-1", "evt-2"] and os.listdir(lay.tmp) == []
    # Sealed: the lock went with the rename, so a crashed writer's next file is not held.
    assert append(w, record)
    [tmp] = os.listdir(lay.tmp)
    fd = spool.lock_if_abandoned(os.path.join(lay.tmp, tmp))
    assert fd is None  # still written by the live writer
    seal_all(w)


def test_spool_writer_seals_a_segment_by_age(tmp_path):
    clock = Clock()
    lay = spool.ensure_layout(tmp_path)
    w = spool.SpoolWriter(tmp_path, fsync=False, clock=clock, max_age=1.0)
    assert w.seconds_to_seal() is None and w.tick() is None
    w.write(event(1))
    clock.now += 0.5
    assert w.tick() is None and w.seconds_to_seal() == 0.5 and os.listdir(lay.ready) == []
    clock.now += 0.5
    assert w.tick() is not None and ready_uids(lay) == ["evt-1"]
    w.write(event(2))
    clock.now += 2
    w.write(event(3))  # the old segment is sealed before the append, as the Lua writer does
    assert ready_uids(lay) == ["evt-1", "evt-2"]
    clock.now -= 60  # the clock stepped back: sealed at once, not held until it catches up
    assert w.seconds_to_seal() == 0.0  # and whoever waits on it (spool write's select) wakes now
    assert w.tick() is not None
    w.close()
    assert sorted(ready_uids(lay)) == ["evt-1", "evt-2", "evt-3"] and len(w.sealed) == 3


def test_spool_write_streamed_input_reaches_ready_while_stdin_is_idle(tmp_path):
    spool_dir = tmp_path / "spool"
    proc = subprocess.Popen([sys.executable, "-m", "cloudtrail_sink", "spool", "write",
                             "--spool-dir", str(spool_dir), "--no-fsync", "--max-age", "0.2", "-"],
                            stdin=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        lay = spool.layout(spool_dir)
        proc.stdin.write((json.dumps(event(1)) + "\n").encode() + json.dumps(event(2)).encode())
        proc.stdin.flush()  # evt-2 has no newline yet: still on its way
        wait_for(lambda: os.path.isdir(lay.ready) and ready_uids(lay) == ["evt-1"])
        assert proc.poll() is None  # sealed while stdin is open and quiet
        proc.stdin.write(b"\n" + (json.dumps(event(3)) + "\n").encode())
        proc.stdin.flush()
        wait_for(lambda: ready_uids(lay) == ["evt-1", "evt-2", "evt-3"])
        proc.stdin.write(json.dumps(event(4)).encode())  # last line without a newline
        proc.stdin.close()
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        proc.stderr.close()
    assert ready_uids(lay) == ["evt-1", "evt-2", "evt-3", "evt-4"]
    assert os.listdir(lay.tmp) == []
