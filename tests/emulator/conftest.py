"""Fixtures for the emulator tests: emulators with chosen options, always stopped afterwards."""

from __future__ import annotations

import threading

import pytest

from emusupport import CHANNEL_ARN


@pytest.fixture(autouse=True)
def no_leaked_threads():
    """Every emulator a test starts must be stopped with all its threads joined."""
    before = set(threading.enumerate())
    yield
    leaked = [t for t in threading.enumerate() if t not in before and t.is_alive()
              and t.name.startswith(("emulator-", "Thread-"))]
    assert not leaked, f"threads left running: {leaked}"


@pytest.fixture
def make_emulator(tmp_path, aws_env):
    """Factory: ``make_emulator(**Emulator kwargs)`` -> a started emulator, stopped at teardown."""
    from cloudtrail_sink.emulator import Emulator

    started = []

    def make(**kwargs):
        kwargs.setdefault("channels", {CHANNEL_ARN: None})
        kwargs.setdefault("db_path", tmp_path / f"emulator-{len(started)}.sqlite")
        emu = Emulator(**kwargs)
        emu.start()
        started.append(emu)
        return emu

    try:
        yield make
    finally:
        for emu in started:
            emu.stop()


class FakeClock:
    """A monotonic clock the test moves by hand (the quota's injected clock)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def fake_clock():
    return FakeClock()
