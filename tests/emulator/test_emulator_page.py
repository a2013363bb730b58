"""The live page at ``/``, opened in headless Chromium: an event sent while the page is open
appears in its DOM, with the counters, without reloading.

Chromium runs with a virtual-time budget: virtual time stands still while a request is pending,
so the page's long poll holds the dump until the test has sent its event; the page's own pause
between polls then uses up the budget and Chromium dumps the DOM.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time

import pytest
from emusupport import CHANNEL_ARN, batch, client

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture
def chromium():
    if CHROMIUM is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is not installed (tests/run installs Debian's chromium as root)")
        pytest.skip("chromium is not installed (apt-get install chromium, or run tests/run as "
                    "root)")
    return CHROMIUM


def _wait_until_parked(emu, proc, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not emu._store._changed._waiters:
        assert proc.poll() is None, "chromium exited before the page started polling"
        assert time.monotonic() < deadline, "the page never started its long poll"
        time.sleep(0.02)


def _dom_after(emu, chromium, profile, send) -> str:
    """Open the page, call ``send()`` once the page waits for new events, return the DOM."""
    proc = subprocess.Popen(
        [chromium, *FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=2500",
         "--dump-dom", f"{emu.url}/"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True,
        # Chromium's singleton socket folder goes to TMPDIR: the test's, not /tmp.
        env={**os.environ, "TMPDIR": os.path.dirname(os.fspath(profile))})
    try:
        _wait_until_parked(emu, proc)
        send()
        dom, _ = proc.communicate(timeout=90)
    finally:
        try:  # the whole group: Chromium's helper processes too
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    assert proc.returncode == 0
    return dom.decode()


def _rows(dom: str) -> list[str]:
    return re.findall(r'<tr class="event" data-uid="([^"]*)"', dom)


@pytest.mark.timeout(120)
def test_page_shows_an_event_sent_while_it_is_open(make_emulator, chromium, tmp_path):
    emu = make_emulator()
    c = client(emu)
    c.put_audit_events(channelArn=CHANNEL_ARN, auditEvents=batch(1, "before"))
    dom = _dom_after(emu, chromium, tmp_path / "profile", lambda: c.put_audit_events(
        channelArn=CHANNEL_ARN, auditEvents=batch(1, "live")))
    assert _rows(dom) == ["uid-live0", "uid-before0"]  # newest first, came without a reload
    assert re.search(r'id="accepted">2<', dom)
    assert re.search(r'data-refreshes="([2-9]|\d\d+)"', dom)


@pytest.mark.timeout(120)
def test_page_jumps_to_the_newest_when_events_arrive_faster_than_it_shows(
        make_emulator, chromium, tmp_path):
    emu = make_emulator()
    c = client(emu)
    # One call, one transaction: the long poll wakes to 100 new events, more than the 50 the
    # page shows, so its next refresh must jump to the newest 50 rather than fall behind.
    dom = _dom_after(emu, chromium, tmp_path / "profile", lambda: c.put_audit_events(
        channelArn=CHANNEL_ARN, auditEvents=batch(100, "burst")))
    assert _rows(dom) == [f"uid-burst{i}" for i in range(99, 49, -1)]
    assert re.search(r'id="accepted">100<', dom)
