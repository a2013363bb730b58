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
                .with_kwargs(network_mode="host", **LEAST_PRIVILEGE))
    # The database on a tmpfs the non-root user may write (the root filesystem is read-only).
    emulator.tmpfs["/var/lib/cloudtrail-emulator"] = "uid=10001,gid=10001,mode=0770,size=256m"
    start(containers, emulator)
    url = f"http://127.0.0.1:{port}"
    wait_or_show_logs(emulator, lambda: dockerkit.http_get(url + "/healthz")[0] == 200, 60,
                      f"the emulator at {url}")
    return url


def wait_or_show_logs(container: DockerContainer, predicate, timeout: float, what: str,
                      interval: float = 0.2):
    try:
        return dockerkit.wait_for(predicate, timeout, interval=interval, what=what)
    except TimeoutError as exc:
        out, err = container.get_logs()
        raise AssertionError(f"{exc}\n--- container output ---\n"
                             f"{(out + err).decode(errors='replace')[-4000:]}") from None


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

    # Who it runs as, and the spool skeleton a fresh named volume is seeded from: owned by
    # 10001, group-writable and setgid, so files Fluent Bit writes stay in the shared group.
    folders = " ".join(f"{SPOOL}/{name}" for name in ("ready", "tmp", "failed", "rejected",
                                                      "quarantine"))
    out = run_once(docker_engine, sink_image, entrypoint=["sh", "-c"],
                   command=[f"id && stat -c '%a %u %g %n' {folders}"], read_only=True)
    first, *listing = out.strip().split("\n")
    assert first.startswith("uid=10001(cloudtrail) gid=10001(cloudtrail)"), out
    assert len(listing) == 5, out
    for line in listing:
        mode, uid, gid, _ = line.split()
        assert (mode, uid, gid) == ("2770", "10001", "10001"), line


def test_sink_image_delivers_a_volume_spool_and_stops_cleanly_on_sigterm(
        sink_image, spool_volume, containers):
    # Slow answers (1 s each, 2 requests in flight) keep deliveries in flight when SIGTERM comes.
    emulator = start_emulator(sink_image, containers, dockerkit.free_port(),
                              faults={"latency_ms": 1000})
    total = 2600
    write_spool(sink_image, containers, spool_volume, "ev", total)
    expected = {f"ev-{i:06d}" for i in range(total)}

    listen = f"127.0.0.1:{dockerkit.free_port()}"
    sink = start(containers, sink_container(sink_image, spool_volume, emulator, listen,
                                            "--max-in-flight", "2"))
    wrapped = sink.get_wrapped_container()

    # Delivery starts; the health endpoints and Docker's HEALTHCHECK (the image's command) agree.
    wait_or_show_logs(sink, lambda: delivered_uids(emulator), 60, "a first delivery")
    assert dockerkit.http_get(f"http://{listen}/healthz")[0] == 200
    # Ready once a request succeeded (the emulator stores events before its slow answer).
    wait_or_show_logs(sink, lambda: dockerkit.http_get(f"http://{listen}/readyz")[0] == 200,
                      30, "/readyz to answer 200")
    wait_or_show_logs(sink, lambda: wrapped.reload() or
                      wrapped.attrs["State"]["Health"]["Status"] == "healthy",
                      60, "Docker's HEALTHCHECK to report the sink healthy")

    # SIGTERM while deliveries are in flight: exit 0 within the grace.
    before = set(delivered_uids(emulator))
    assert before < expected, "everything was delivered before SIGTERM: nothing was tested"
    wrapped.kill(signal="SIGTERM")
    assert exit_code(sink, 60) == 0, sink.get_logs()

    # Nothing lost: the same container started again (as `restart: unless-stopped` or a new
    # pod does) delivers the rest from the volume.
    wrapped.start()
    wait_or_show_logs(sink, lambda: expected <= set(delivered_uids(emulator)), 180,
                      f"all {total} events delivered after the restart")
    wrapped.kill(signal="SIGTERM")
    assert exit_code(sink, 60) == 0, sink.get_logs()
