"""Fixtures shared by every test area.

`emulator` starts the local CloudTrail Data endpoint in a thread on a free loopback port, with a
fresh SQLite file, and stops it afterwards; `aws_env` gives boto3 fake static credentials and a
region so no test can reach a real AWS account or read the developer's profile.
"""

from __future__ import annotations

import os
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
ACCOUNT = "123456789012"
CHANNEL_ARN = f"arn:aws:cloudtrail:us-east-1:{ACCOUNT}:channel/0b9a1c0e-5d33-4a5f-9f55-3c7a1a2b3c4d"


@pytest.fixture
def aws_env(monkeypatch, tmp_path):
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "aws-config-absent"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "aws-credentials-absent"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture
def emulator(tmp_path, aws_env):
    """A running emulator that knows CHANNEL_ARN (no external id); `.url` is its endpoint."""
    from cloudtrail_sink.emulator import Emulator

    emu = Emulator(db_path=tmp_path / "emulator.sqlite", host="127.0.0.1", port=0,
                   channels={CHANNEL_ARN: None}, seed=1)
    emu.start()
    try:
        yield emu
    finally:
        emu.stop()
