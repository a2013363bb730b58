"""Fixtures for the Lua filter tests: the real entry script under the filter_lua harness.

`lua_filter(**env)` starts `fluent-bit/cloudtrail.lua` exactly as Fluent Bit would (through
`cloudtrail_sink.luaharness.FilterHarness`) on a spool in tmp_path, with a clock the test sets
(`f.now = ...`, read by the Lua side through `cloudtrail.clock.now`) and, unless
`real_mapper=True`, the TEST-ONLY stand-in mapper `tests/lua/standin_mapper.lua`.
"""

from __future__ import annotations

import os
import pathlib
import shutil

import msgpack
import pytest

from cloudtrail_sink.luaharness import ENTRY_SCRIPT, MODULE_DIR, FilterHarness

HERE = pathlib.Path(__file__).resolve().parent
STANDIN_MAPPER = HERE / "standin_mapper.lua"
START = 1_764_237_600.0  # 2025-11-27T10:00:00Z
ACCOUNT = "123456789012"
STANDIN_RULES = 'return { format = 1, rules = { { tag_prefix = "app." } } }\n'


def lua_str(text: str | os.PathLike) -> str:
    return "[==[" + os.fspath(text) + "]==]"


class LuaFilter:
    """One filter instance (one Fluent Bit start) on a spool, with an injected clock."""

    def __init__(self, spool: pathlib.Path, env: dict[str, str], real_mapper: bool = False,
                 now: float = START) -> None:
        self.spool = spool
        prelude = [
            f"package.path = {lua_str(MODULE_DIR)} .. '/?.lua;' .. package.path",
            "FAKE_NOW = " + repr(float(now)),
            "local clock = require('cloudtrail.clock')",
            "clock.now = function() return FAKE_NOW end",
        ]
        if not real_mapper:
            prelude.append(
                f"package.loaded['cloudtrail.mapper'] = dofile({lua_str(STANDIN_MAPPER)})")
        self.harness = FilterHarness(ENTRY_SCRIPT, env=env, prelude="\n".join(prelude))

    @property
    def now(self) -> float:
        return float(self.harness.globals()[b"FAKE_NOW"])

    @now.setter
    def now(self, value: float) -> None:
        self.harness.globals()[b"FAKE_NOW"] = float(value)

    def call(self, tag: str, ts: float, record: dict):
        return self.harness.call(tag, ts, record)

    def tick(self):
        return self.harness.call("cloudtrail.tick", self.now, {"tick": 1})

    def seal(self) -> None:
        """Let the age limit pass and tick, as the once-a-second dummy input does."""
        self.now = self.now + 3600
        assert self.tick()[0] == -1


def read_folder(spool: pathlib.Path, folder: str, suffix: str) -> list[dict]:
    out = []
    for path in sorted((spool / folder).glob("*" + suffix)):
        with open(path, "rb") as f:
            out.extend(msgpack.Unpacker(f, raw=False, strict_map_key=False))
    return out


@pytest.fixture
def spool(tmp_path) -> pathlib.Path:
    return tmp_path / "spool"


@pytest.fixture
def standin_mappings(tmp_path) -> pathlib.Path:
    path = tmp_path / "mappings.lua"
    path.write_text(STANDIN_RULES)
    return path


@pytest.fixture
def lua_filter(spool, standin_mappings):
    made: list[LuaFilter] = []

    def make(real_mapper: bool = False, now: float = START, **env: str) -> LuaFilter:
        full = {"CLOUDTRAIL_SPOOL_DIR": str(spool), "CLOUDTRAIL_MAPPINGS": str(standin_mappings)}
        full.update(env)
        f = LuaFilter(spool, full, real_mapper=real_mapper, now=now)
        made.append(f)
        return f

    yield make
    made.clear()


def require_luajit() -> str:
    path = shutil.which("luajit")
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail("luajit is not installed (tests/run installs it as root)")
        pytest.skip("luajit is not installed")
    return path
