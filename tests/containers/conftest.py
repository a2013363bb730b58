"""Fixtures of the container tests.

Tests that need a Docker engine use ``docker_engine`` (or a fixture built on it): without an
engine they skip with the reason, except under ``CI=true`` where a missing engine is a failure.
Tests that need a tool (``docker-compose``, ``kubectl``) use ``require_tool`` the same way.

Images are built once per session (vfs storage copies every layer: builds are slow and big):
``sink_image`` is the ``sink`` target of the repository's Dockerfile built on a debootstrapped
Debian base (the official python image cannot be pulled here) substituted through the
``PYTHON_IMAGE`` build arg, with pip fed from a wheelhouse served on 127.0.0.1.
"""

from __future__ import annotations

import os
import shutil
import uuid

import pytest

# The reaper image cannot be pulled here: every test removes its own containers instead.
os.environ["TESTCONTAINERS_RYUK_DISABLED"] = "true"

import dockerkit  # noqa: E402  (after the environment is set for testcontainers)

from dockerkit import unavailable  # noqa: E402


@pytest.fixture(scope="session")
def require_tool():
    def check(name: str, hint: str) -> str:
        path = shutil.which(name)
        if not path:
            unavailable(f"`{name}` is not installed ({hint})")
        return path
    return check


@pytest.fixture(scope="session")
def docker_engine():
    problem = dockerkit.engine_problem()
    if problem:
        unavailable(problem)
    import docker

    client = docker.from_env(timeout=120)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture(scope="session")
def base_image(docker_engine):
    try:
        return dockerkit.ensure_base_image()
    except RuntimeError as exc:
        unavailable(str(exc))


@pytest.fixture(scope="session")
def wheelhouse_url(docker_engine):
    house = dockerkit.Wheelhouse().build()
    try:
        yield house.serve()
    finally:
        house.close()


@pytest.fixture(scope="session")
def sink_image(docker_engine, base_image, wheelhouse_url):
    dockerkit.build_image(dockerkit.SINK_IMAGE, "sink", {
        "PYTHON_IMAGE": base_image,
        "PIP_NO_INDEX": "1",
        "PIP_FIND_LINKS": wheelhouse_url,
    })
    return dockerkit.SINK_IMAGE


@pytest.fixture
def spool_volume(docker_engine):
    """A fresh named volume (as compose makes them), removed afterwards."""
    name = f"cloudtrail-test-spool-{uuid.uuid4().hex[:10]}"
    volume = docker_engine.volumes.create(name)
    try:
        yield name
    finally:
        volume.remove(force=True)


@pytest.fixture
def containers(docker_engine):
    """Register testcontainers here; each is removed (force, with anonymous volumes) at the end."""
    started = []
    try:
        yield started
    finally:
        for container in reversed(started):
            try:
                container.stop()
            except Exception:  # already gone
                pass
