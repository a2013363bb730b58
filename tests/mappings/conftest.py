"""Helpers for the mapping tests: compile YAML text and run it in the real Lua mapper."""

from __future__ import annotations

import pathlib
import textwrap

import pytest

from cloudtrail_sink.mappings import LuaMapper, compile_files

REPO = pathlib.Path(__file__).resolve().parents[2]
SHIPPED = REPO / "mappings"


@pytest.fixture
def compile_yaml(tmp_path):
    """compile_yaml(text, name="m.yaml") -> Compiled, from YAML written to a temp file."""
    def make(text: str, name: str = "m.yaml"):
        path = tmp_path / name
        path.write_text(textwrap.dedent(text), encoding="utf-8")
        return compile_files([path])
    return make


@pytest.fixture
def mapper_for(compile_yaml):
    """mapper_for(yaml_text) -> LuaMapper running those rules."""
    def make(text: str) -> LuaMapper:
        return LuaMapper(compile_yaml(text).lua_text())
    return make


@pytest.fixture(scope="session")
def shipped_mapper() -> LuaMapper:
    return LuaMapper(compile_files([SHIPPED]).lua_text())
