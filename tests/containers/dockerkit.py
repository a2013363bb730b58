"""Helpers of the container tests: engine check, base image, wheelhouse, image build, waiting.

Contract:

- :func:`engine_problem` returns ``None`` when a Docker engine answers, else the reason in words
  (the tests skip with it, or fail under ``CI=true``).
- :func:`ensure_base_image` makes the debootstrapped stand-in for the official python image
  through ``engine.sh base-image`` (built once; the engine keeps it between runs).
- :class:`Wheelhouse` builds wheels of ``./sink`` and its dependencies on the host (the build
  cannot verify TLS itself) and serves them over HTTP on 127.0.0.1 for the build's pip, which
  gets ``PIP_NO_INDEX=1 PIP_FIND_LINKS=<url>`` as build args: the Dockerfile stays plain.
  Binary wheels are built for the host's Python, which must be the base image's minor version
  (3.11: this machine kind and Debian bookworm alike).
- :func:`build_image` runs the classic builder (``DOCKER_BUILDKIT=0``; there is no buildx here)
  with host networking and raises :class:`BuildFailed` carrying the build output.
- Every address used is 127.0.0.1.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

REPO = pathlib.Path(__file__).resolve().parents[2]
ENGINE_SH = REPO / "tests" / "containers" / "engine.sh"
STATE = REPO / ".work" / "docker"
BASE_IMAGE = "cloudtrail-test/base:bookworm"
SINK_IMAGE = "cloudtrail-test/sink:latest"
WHEELHOUSE_PORT = 39465


def unavailable(reason: str):
    """Skip with ``reason``; under CI=true fail instead, since CI must run these tests."""
    import pytest

    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true but {reason}", pytrace=False)
    pytest.skip(reason)


class BuildFailed(RuntimeError):
    def __init__(self, message: str, output: str):
        super().__init__(f"{message}\n--- build output (last 60 lines) ---\n"
                         + "\n".join(output.splitlines()[-60:]))
        self.output = output


def docker_cli() -> str | None:
    return shutil.which("docker")


def engine_problem() -> str | None:
    if not docker_cli():
        return "no docker client on PATH"
    try:
        proc = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"],
                              capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "`docker info` did not answer within 20 s"
    if proc.returncode != 0 or not proc.stdout.strip():
        return ("no Docker engine answers (`docker info` failed); run the suite as root with "
                "CLOUDTRAIL_TEST_DOCKER=1 bash tests/run to install and start one")
    return None


def ensure_base_image(name: str = BASE_IMAGE) -> str:
    proc = subprocess.run(["bash", str(ENGINE_SH), "base-image", name],
                          capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"could not make base image {name}:\n{proc.stderr[-3000:]}")
    return name


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - signature of the base class
        pass


class Wheelhouse:
    """Wheels of ./sink and its dependencies (plus the build backend), served on 127.0.0.1."""

    def __init__(self, folder: pathlib.Path = STATE / "wheels"):
        self.folder = folder
        self._server: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def build(self) -> "Wheelhouse":
        self.folder.mkdir(parents=True, exist_ok=True)
        for old in self.folder.glob("cloudtrail_sink-*.whl"):
            old.unlink()  # always today's sink, never a stale one
        pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
        # --find-links the same folder: dependencies fetched by an earlier run are reused.
        for args in (["wheel", "--find-links", str(self.folder), "-w", str(self.folder),
                      str(REPO / "sink")],
                     ["download", "--find-links", str(self.folder), "-d", str(self.folder),
                      "setuptools>=77", "wheel"]):
            proc = subprocess.run(pip + args, capture_output=True, text=True, timeout=600)
            if proc.returncode != 0:
                raise RuntimeError(f"pip {args[0]} failed:\n{proc.stdout}{proc.stderr}"[-4000:])
        return self

    def serve(self) -> str:
        handler = functools.partial(_QuietHandler, directory=str(self.folder))
        # A fixed port when free: the URL is a build arg, and a changed build arg would void
        # the build cache of the pip step on every run.
        try:
            self._server = http.server.ThreadingHTTPServer(("127.0.0.1", WHEELHOUSE_PORT), handler)
        except OSError:
            self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True,
                                        name="wheelhouse")
        self._thread.start()
        return f"http://127.0.0.1:{self._server.server_address[1]}/"

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=10)
            self._server = None


def build_image(tag: str, target: str, build_args: dict[str, str],
                context: pathlib.Path = REPO, dockerfile: pathlib.Path | None = None,
                timeout: float = 900, force_rm: bool = True) -> str:
    # --force-rm: vfs keeps a full copy of the file system per failed step's container.
    # Without it, a failed step's container stays, as after Compose v1's `up --build`.
    cmd = ["docker", "build", "--force-rm" if force_rm else "--rm", "--network", "host",
           "--target", target, "-t", tag]
    if dockerfile is not None:
        cmd += ["-f", str(dockerfile)]
    for key, value in build_args.items():
        cmd += ["--build-arg", f"{key}={value}"]
    cmd.append(str(context))
    env = dict(os.environ, DOCKER_BUILDKIT="0")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    output = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise BuildFailed(f"docker build --target {target} failed (exit {proc.returncode})",
                          output)
    return output


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait_for(predicate, timeout: float, interval: float = 0.2, what: str = "condition"):
    """Poll ``predicate`` until it returns a truthy value; that value is returned."""
    deadline = time.monotonic() + timeout
    last_error = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except (OSError, ValueError) as exc:  # not up yet
            last_error = exc
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout} s waiting for {what}"
                       + (f" (last error: {last_error})" if last_error else ""))


def emulator_events(base_url: str) -> list[dict]:
    """Every event the emulator stored, oldest first, following its cursor."""
    events: list[dict] = []
    after = None
    while True:
        url = f"{base_url}/_emulator/events?limit=1000" + (f"&after={after}" if after else "")
        status, body = http_get(url)
        if status != 200:
            raise ValueError(f"GET {url}: HTTP {status}")
        page = json.loads(body)
        events.extend(page["events"])
        if not page["events"] or not page.get("next"):
            return events
        after = page["next"]
