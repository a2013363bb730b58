"""Fixtures of the reliability tests: a process group killed at teardown and a sink environment."""

from __future__ import annotations

import pytest

import relsupport


@pytest.fixture
def procs(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    group = relsupport.Processes(logs)
    try:
        yield group
    finally:
        group.cleanup()


@pytest.fixture
def sink_env(tmp_path, aws_env):
    return relsupport.aws_environ(tmp_path)
