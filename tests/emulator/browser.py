"""Headless Chromium driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``):
no chromedriver, no Playwright, no port. Chromium reads NUL-terminated JSON commands on its
fd 3 and writes answers and events on its fd 4.

``Browser(binary, profile)`` starts it with one page; ``goto(url)``, ``js(expression)`` (value of
an expression, promises awaited), ``wait_for(expression)`` (until truthy, else AssertionError
with what the page showed), ``screenshot(path)``; ``close()`` ends the whole process group.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import signal
import subprocess
import sys
import time

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars", "--mute-audio"]

_PLACE_FDS = ("import os, sys; os.dup2(int(sys.argv[1]), 3); os.dup2(int(sys.argv[2]), 4); "
              "os.execv(sys.argv[3], sys.argv[3:])")


class Browser:
    def __init__(self, binary: str, profile, width: int = 1400, height: int = 1500) -> None:
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()
        # Put the pipe ends on the fd numbers Chromium expects, in the child only; above 4
        # first, so that placing one cannot overwrite the other.
        to_chrome_r, from_chrome_w = (_above_four(fd) for fd in (to_chrome_r, from_chrome_w))
        with open(os.path.join(profile, "chromium.log"), "wb") as log:  # kept for failures
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _PLACE_FDS, str(to_chrome_r), str(from_chrome_w), binary,
                 *FLAGS, "--remote-debugging-pipe", f"--user-data-dir={profile}",
                 "about:blank"],
                pass_fds=(to_chrome_r, from_chrome_w), stdout=subprocess.DEVNULL, stderr=log,
                start_new_session=True,
                # Chromium's singleton socket folder goes to TMPDIR: the test's folder, not a
                # /tmp/org.chromium.Chromium.* left behind by every run.
                env={**os.environ, "TMPDIR": str(profile)})
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buffer = b""
        self._next_id = 0
        try:
            target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
            self._session = self.call("Target.attachToTarget",
                                      {"targetId": target, "flatten": True})["sessionId"]
            self.call("Emulation.setDeviceMetricsOverride",
                      {"width": width, "height": height, "deviceScaleFactor": 1,
                       "mobile": False}, session=True)
        except BaseException:
            self.close()
            raise

    # protocol --------------------------------------------------------------------------------
    def call(self, method: str, params: dict | None = None, session: bool = False,
             timeout: float = 60.0) -> dict:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = self._session
        os.write(self._to_chrome, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            answer = self._read(deadline)
            if answer.get("id") == self._next_id:
                if "error" in answer:
                    raise RuntimeError(f"{method}: {answer['error']}")
                return answer.get("result", {})

    def _read(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or self.proc.poll() is not None:
                raise AssertionError("chromium did not answer (exited or timed out)")
            ready, _, _ = select.select([self._from_chrome], [], [], left)
            if ready:
                chunk = os.read(self._from_chrome, 1 << 20)
                if not chunk:
                    raise AssertionError("chromium closed its DevTools pipe")
                self._buffer += chunk
        text, _, self._buffer = self._buffer.partition(b"\0")
        return json.loads(text)

    # page ------------------------------------------------------------------------------------
    def goto(self, url: str) -> None:
        self.call("Page.navigate", {"url": url}, session=True)
        self.wait_for("document.readyState === 'complete' && location.href === "
                      + json.dumps(url))

    def js(self, expression: str):
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                "awaitPromise": True}, session=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"page script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 30.0):
        deadline = time.monotonic() + timeout
        while True:
            value = self.js(f"(() => {{ try {{ return ({expression}); }} "
                            f"catch (e) {{ return null; }} }})()")
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"page never showed {expression}; it shows:\n"
                                     + str(self.js("document.body.innerText"))[:3000])
            time.sleep(0.1)

    def screenshot(self, path) -> None:
        data = self.call("Page.captureScreenshot", {"format": "png"}, session=True)["data"]
        with open(path, "wb") as f:
            f.write(base64.b64decode(data))
        print(f"screenshot: {path}")

    def close(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # Chromium's helper processes too
        except ProcessLookupError:
            pass
        self.proc.wait()
        for fd in (self._to_chrome, self._from_chrome):
            try:
                os.close(fd)
            except OSError:
                pass


def _above_four(fd: int) -> int:
    high = fcntl.fcntl(fd, fcntl.F_DUPFD, 10)
    os.close(fd)
    return high
