"""The sink image, built from the repository's Dockerfile and run for real.

What a user relies on: the image builds; it runs as a non-root user on a read-only root
filesystem; it delivers a spool kept on a named volume to a CloudTrail Data endpoint (here the
emulator, run from the same image); its health endpoints and Docker HEALTHCHECK answer; and a
SIGTERM (``docker stop``, a pod deletion) ends it with exit code 0 without losing an event: what
was not delivered is still in the spool and a restarted sink delivers it.

All containers use host networking on 127.0.0.1 (no bridge exists here).
"""

from __future__ import annotations

import json
import time

import pytest
from testcontainers.core.container import DockerContainer

import dockerkit

pytestmark = [pytest.mark.docker, pytest.mark.slow]

ACCOUNT = "123456789012"
CHANNEL_ARN = f"arn:aws:cloudtrail:us-east-1:{ACCOUNT}:channel/0b9a1c0e-5d33-4a5f-9f55-3c7a1a2b3c4d"
SPOOL = "/var/spool/cloudtrail"
FAKE_AWS = {
    "AWS_ACCESS_KEY_ID": "AKIDEXAMPLE",
    "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
    "AWS_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}
# What the Kubernetes manifests and compose.yaml give the sink too.
LEAST_PRIVILEGE = {"read_only": True, "cap_drop": ["ALL"],
                   "security_opt": ["no-new-privileges:true"]}


def event_lines(prefix: str, count: int) -> bytes:
    lines = []
    for i in range(count):
        lines.append(json.dumps({
            "version": "1.0",
            "userIdentity": {"type": "User", "principalId": f"alice-{i % 7}"},
            "eventSource": "demo.example.com",
            "eventName": "Login",
            "eventTime": "2026-11-27T10:00:00Z",
            "UID": f"{prefix}-{i:06d}",
            "recipientAccountId": ACCOUNT,
            "sourceIPAddress": "192.0.2.10",
            "additionalEventData": {"n": i},
        }))
    return ("\n".join(lines) + "\n").encode()


def start(containers: list, container: DockerContainer) -> DockerContainer:
    containers.append(container)
    return container.start()


def exit_code(container: DockerContainer, timeout: float) -> int:
    return container.get_wrapped_container().wait(timeout=timeout)["StatusCode"]


def write_spool(sink_image, containers, volume, prefix, count) -> None:
    """`cloudtrail-sink spool write` in a one-shot container, into the named volume."""
    writer = (DockerContainer(sink_image)
              .with_command(["spool", "write", "--spool-dir", SPOOL, "--max-events", "100",
                             "--progress", "never", "/tmp/events.jsonl"])
              .with_volume_mapping(volume, SPOOL, "rw")
              .with_copy_into_container(event_lines(prefix, count), "/tmp/events.jsonl")
              .with_kwargs(network_mode="host"))
    start(containers, writer)
    code = exit_code(writer, 120)
    assert code == 0, writer.get_logs()


def start_emulator(sink_image, containers, port, faults=None) -> str:
    command = ["emulator", "--listen", f"127.0.0.1:{port}", "--db",
               "/var/lib/cloudtrail-emulator/events.sqlite", "--channel", CHANNEL_ARN]
    if faults:
        command += ["--faults", json.dumps(faults)]
    emulator = (DockerContainer(sink_image).with_command(command)
                .with_tmpfs_mount("/var/lib/cloudtrail-emulator")
                .with_kwargs(network_mode="host", **LEAST_PRIVILEGE))
    start(containers, emulator)
    url = f"http://127.0.0.1:{port}"
    dockerkit.wait_for(lambda: dockerkit.http_get(url + "/healthz")[0] == 200, 60,
                       what=f"the emulator at {url}")
    return url


def sink_container(sink_image, volume, endpoint, listen, *extra) -> DockerContainer:
    container = (DockerContainer(sink_image)
                 .with_command(["run", "--channel-arn", CHANNEL_ARN, "--endpoint-url", endpoint,
                                "--listen", listen, "--grace-seconds", "10", *extra])
                 .with_volume_mapping(volume, SPOOL, "rw")
                 # The image's own HEALTHCHECK command, polled every second for the test.
                 .with_kwargs(network_mode="host",
                              healthcheck={"interval": 1_000_000_000, "timeout": 5_000_000_000,
                                           "retries": 3, "start_period": 1_000_000_000},
                              **LEAST_PRIVILEGE))
    for key, value in FAKE_AWS.items():
        container.with_env(key, value)
    # The healthcheck reads the listen address from the environment, as in compose/Kubernetes.
    container.with_env("CLOUDTRAIL_SINK_LISTEN", listen)
    return container


def run_once(client, image, **kwargs) -> str:
    """Run a container to its end and return its output; the container is always removed."""
    container = client.containers.create(image, network_mode="host", **kwargs)
    try:
        container.start()
        code = container.wait(timeout=60)["StatusCode"]
        output = container.logs().decode()
        assert code == 0, output
        return output
    finally:
        container.remove(force=True)


def delivered_uids(emulator_url: str) -> list[str]:
    return [e["eventData"]["UID"] for e in dockerkit.emulator_events(emulator_url)]


def test_sink_image_is_non_root_labelled_and_has_a_healthcheck(docker_engine, sink_image):
    config = docker_engine.images.get(sink_image).attrs["Config"]
    assert config["User"] == "10001:10001"
    assert "/opt/cloudtrail-sink/healthcheck.py" in " ".join(config["Healthcheck"]["Test"])
    assert config["Entrypoint"] == ["cloudtrail-sink"]
    labels = config["Labels"]
    for key in ("title", "description", "licenses", "version", "revision"):
        assert labels.get(f"org.opencontainers.image.{key}"), key

    out = run_once(docker_engine, sink_image, entrypoint=["id"], read_only=True)
    assert out.startswith("uid=10001(cloudtrail) gid=10001(cloudtrail)"), out

    # The spool skeleton a fresh named volume is seeded from: owned by 10001, group-writable
    # and setgid, so files Fluent Bit writes stay in the shared group.
    listing = run_once(docker_engine, sink_image, entrypoint=["stat", "-c", "%a %u %g %n"],
                       command=[f"{SPOOL}/{name}" for name in ("ready", "tmp", "failed",
                                                               "rejected", "quarantine")])
    listing = listing.split("\n")
    for line in filter(None, listing):
        mode, uid, gid, _ = line.split()
        assert (mode, uid, gid) == ("2770", "10001", "10001"), line


def test_sink_image_delivers_a_volume_spool_and_stops_cleanly_on_sigterm(
        sink_image, spool_volume, containers):
    emulator = start_emulator(sink_image, containers, dockerkit.free_port(),
                              faults={"latency_ms": 40})
    write_spool(sink_image, containers, spool_volume, "first", 600)

    listen = f"127.0.0.1:{dockerkit.free_port()}"
    sink = start(containers, sink_container(sink_image, spool_volume, emulator, listen))

    dockerkit.wait_for(lambda: len(set(delivered_uids(emulator))) == 600, 120,
                       what="600 events delivered from the volume to the emulator")
    assert dockerkit.http_get(f"http://{listen}/healthz")[0] == 200
    assert dockerkit.http_get(f"http://{listen}/readyz")[0] == 200
    dockerkit.wait_for(
        lambda: sink.get_wrapped_container().reload()
        or sink.get_wrapped_container().attrs["State"]["Health"]["Status"] == "healthy",
        60, what="Docker's HEALTHCHECK to report the sink healthy")

    # More events while the sink runs; SIGTERM as soon as some of them are on their way.
    write_spool(sink_image, containers, spool_volume, "second", 2000)
    dockerkit.wait_for(lambda: any(u.startswith("second-") for u in delivered_uids(emulator)),
                       60, interval=0.05, what="the second batch to start arriving")
    sink.get_wrapped_container().kill(signal="SIGTERM")
    started = time.monotonic()
    assert exit_code(sink, 60) == 0, sink.get_logs()
    assert time.monotonic() - started < 30  # in-flight requests end within the grace

    # Whatever was not delivered is still in the spool: a restarted sink (here --drain, which
    # exits once the spool is empty) delivers it, and every event arrives.
    drain = start(containers, sink_container(sink_image, spool_volume, emulator,
                                             f"127.0.0.1:{dockerkit.free_port()}", "--drain"))
    assert exit_code(drain, 180) == 0, drain.get_logs()
    uids = set(delivered_uids(emulator))
    expected = {f"first-{i:06d}" for i in range(600)} | {f"second-{i:06d}" for i in range(2000)}
    assert expected <= uids, f"lost {len(expected - uids)} events"
