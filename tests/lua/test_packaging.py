"""A non-editable install ships the Lua tree: `cloudtrail_sink/lua` is a symlink to fluent-bit/
in the checkout, and the wheel must carry real files that the installed package then runs."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import zipfile

import pytest

from cloudtrail_sink import luaharness

# The checkout, not the installed package: tests/run installs sink/ non-editable.
REPO = pathlib.Path(__file__).resolve().parents[2]
LUA_FILES = ["cloudtrail.lua", "lua/cloudtrail/filter.lua", "lua/cloudtrail/spool.lua",
             "lua/cloudtrail/msgpack.lua", "lua/cloudtrail/clock.lua",
             "lua/cloudtrail/mapper.lua"]

pytestmark = pytest.mark.slow


def test_checkout_layout_points_the_harness_at_fluent_bit():
    link = REPO / "sink" / "src" / "cloudtrail_sink" / "lua"
    assert link.is_symlink() and os.readlink(link) == "../../../fluent-bit"
    assert luaharness.ENTRY_SCRIPT.is_file() and luaharness.ENTRY_CALL == "cb_cloudtrail"
    assert (luaharness.MODULE_DIR / "cloudtrail" / "filter.lua").is_file()


def test_wheel_carries_the_lua_tree_and_the_installed_copy_runs(tmp_path):
    wheels = tmp_path / "wheels"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w",
                            str(wheels), str(REPO / "sink")], capture_output=True, text=True,
                           timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    [wheel] = wheels.glob("cloudtrail_sink-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for rel in LUA_FILES:
        assert f"cloudtrail_sink/lua/{rel}" in names, rel

    site = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                              "--target", str(site), str(wheel)],
                             capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr[-3000:]
    spool = tmp_path / "spool"
    probe = f"""
import cloudtrail_sink.luaharness as h, pathlib
assert str(h.ENTRY_SCRIPT).startswith({str(site)!r}), h.ENTRY_SCRIPT
assert not pathlib.Path(h.LUA_DIR).is_symlink()
f = h.FilterHarness(h.ENTRY_SCRIPT, env={{"CLOUDTRAIL_SPOOL_DIR": {str(spool)!r},
                                         "CLOUDTRAIL_MAPPINGS": "/nonexistent.lua"}})
print(f.call("app", 1.0, {{"a": 1}})[0])
"""
    env = dict(os.environ, PYTHONPATH=str(site))
    run = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip() == "-1"
    # rejected (no mappings file), not raised; sealed when the process closed the Lua state
    assert len(list((spool / "rejected").glob("*.rej"))) == 1
