"""The installed command exposes every sub-command users are told about in README.md."""

import subprocess
import sys

import pytest

from cloudtrail_sink import cli

COMMANDS = ["run", "spool", "failed", "rejected", "mappings", "emulator"]


def test_every_command_module_is_present():
    parser = cli.build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command")
    assert sorted(subparsers.choices) == sorted(COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_help_of_each_command_runs_as_a_module(command):
    result = subprocess.run([sys.executable, "-m", "cloudtrail_sink", command, "--help"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "usage: cloudtrail-sink" in result.stdout


def test_no_command_prints_help_and_fails():
    result = subprocess.run([sys.executable, "-m", "cloudtrail_sink"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "COMMAND" in result.stderr
