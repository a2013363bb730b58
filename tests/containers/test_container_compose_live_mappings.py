"""Under compose, an edited mapping file on the host changes new events within seconds.

The project is a temporary folder holding a COPY of mappings/ (never the repository's files)
and a compose file made from the repository's compose.yaml:

- `mappings`: the repository's service definition as it is (command, bind mount of ./mappings,
  the `compiled-mappings` volume, health check, hardening), on the sink image built from this
  Dockerfile, with host networking (the only networking these machines allow);
- `fluent-bit`: the repository's service definition (user, environment, the read-only
  `compiled-mappings` volume, `depends_on: mappings: service_healthy`), but running
  `fluent_bit_standin.py` in the sink image instead of Fluent Bit, which cannot run here: the
  real `cloudtrail.lua` under the filter_lua-faithful harness, fed syslog lines over TCP and
  ticked once a second as fluent-bit.yaml does. The spool is a host folder the test reads.

What it proves, with docker-compose v1: editing `mappings/40-sshd.yaml` on the host changes the
`eventName` of new events within 10 s, every record sent becomes exactly one event (none lost,
none rejected), a broken edit prints `mappings/40-sshd.yaml:LINE: ...` in the `mappings` log and
changes nothing, and no container is restarted or replaced. Not covered: Fluent Bit's own
engine (see fluent_bit_standin.py), and the sink's delivery (tested in test_container_sink_image).
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import socket
import subprocess
import threading
import time
import uuid

import msgpack
import pytest
import yaml

import dockerkit

pytestmark = [pytest.mark.docker, pytest.mark.slow]

REPO = dockerkit.REPO
HERE = pathlib.Path(__file__).resolve().parent
IMAGE = "cloudtrail-test/sink-live-mappings:latest"
SYSLOG_PORT = 39514
OLD, NEW = "AcceptedLogin", "AcceptedLoginEdited"


@pytest.fixture(scope="module")
def live_image(docker_engine, base_image, wheelhouse_url):
    # A tag of its own: other sessions may rebuild the shared sink tag from other sources.
    dockerkit.build_image(IMAGE, "sink", {"PYTHON_IMAGE": base_image, "PIP_NO_INDEX": "1",
                                          "PIP_FIND_LINKS": wheelhouse_url})
    yield IMAGE
    docker_engine.images.remove(IMAGE, force=True)


def project_compose(project: pathlib.Path, spool: pathlib.Path) -> dict:
    services = yaml.safe_load((REPO / "compose.yaml").read_text())["services"]
    watch = {k: v for k, v in services["mappings"].items() if k != "build"}
    watch.update(image=IMAGE, network_mode="host")

    fb = services["fluent-bit"]
    compiled_dir = str(pathlib.PurePosixPath(fb["environment"]["CLOUDTRAIL_MAPPINGS"]).parent)
    compiled_mount = [v for v in fb["volumes"] if v.split(":")[1] == compiled_dir]
    assert compiled_mount, "fluent-bit no longer mounts the compiled mappings volume"
    standin = {
        "image": IMAGE,
        "entrypoint": ["python", "/standin/fluent_bit_standin.py"],
        "user": fb["user"],
        "read_only": fb["read_only"],
        "cap_drop": fb["cap_drop"],
        "restart": fb["restart"],
        "network_mode": "host",
        "healthcheck": {"disable": True},
        "environment": {**fb["environment"], "STANDIN_SYSLOG_PORT": str(SYSLOG_PORT),
                        "CLOUDTRAIL_SPOOL_DIR": "/var/spool/cloudtrail"},
        "volumes": [f"{spool}:/var/spool/cloudtrail", *compiled_mount,
                    f"{project / 'standin'}:/standin:ro"],
        "depends_on": fb["depends_on"],
    }
    return {"version": "3.9", "services": {"mappings": watch, "fluent-bit": standin},
            "volumes": {"compiled-mappings": {}}}


class Compose:
    def __init__(self, tool: str, project: pathlib.Path):
        self.tool = tool
        self.project = project
        self.name = f"cttest{uuid.uuid4().hex[:10]}"

    def run(self, *args: str, timeout: float = 300) -> str:
        proc = subprocess.run([self.tool, "-p", self.name, "-f", str(self.project / "compose.yaml"),
                               *args], capture_output=True, text=True, timeout=timeout,
                              cwd=self.project)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout

    def container(self, service: str) -> dict:
        cid = self.run("ps", "-q", service).strip()
        out = subprocess.run(["docker", "inspect", cid], capture_output=True, text=True,
                             check=True, timeout=60).stdout
        return json.loads(out)[0]

    def logs(self, service: str) -> str:
        return self.run("logs", "--no-color", service)


class Sender:
    """One syslog TCP connection; sshd logins numbered 1, 2, ... with their send times."""

    def __init__(self, rate: float = 20.0):
        self.sock = dockerkit.wait_for(self._connect, 120, what="the Fluent Bit stand-in")
        self.rate = rate
        self.sent: list[float] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _connect():
        return socket.create_connection(("127.0.0.1", SYSLOG_PORT), timeout=5)

    def _run(self):
        while not self.stop.is_set():
            seq = len(self.sent) + 1
            stamp = time.strftime("%b %e %H:%M:%S", time.gmtime())
            line = (f"<38>{stamp} bastion-1 sshd[{seq}]: Accepted password for "
                    f"user{seq:06d} from 192.0.2.1 port 22 ssh2\n")
            self.sock.sendall(line.encode())
            self.sent.append(time.time())
            time.sleep(1 / self.rate)

    def close(self):
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join(timeout=10)
        self.sock.close()


def events(spool: pathlib.Path) -> dict[int, str]:
    """seq -> eventName of every event in ready/ (each seq must appear once)."""
    out: dict[int, str] = {}
    for seg in sorted((spool / "ready").glob("*.seg")):
        with open(seg, "rb") as fh:
            for entry in msgpack.Unpacker(fh, raw=False, strict_map_key=False):
                data = entry["eventData"]
                seq = int(data["userIdentity"]["principalId"].removeprefix("user"))
                assert seq not in out, f"event {seq} twice"
                out[seq] = data["eventName"]
    return out


def test_editing_a_mapping_on_the_host_changes_new_events_without_restart_or_loss(
        live_image, require_tool, tmp_path):
    tool = require_tool("docker-compose", "apt-get install docker-compose")
    project, spool = tmp_path / "project", tmp_path / "spool"
    shutil.copytree(REPO / "mappings", project / "mappings")
    (project / "standin").mkdir()
    shutil.copy2(HERE / "fluent_bit_standin.py", project / "standin")
    shutil.copy2(REPO / "fluent-bit" / "parsers.yaml", project / "standin")
    spool.mkdir()
    os.chmod(spool, 0o777)  # the stand-in runs as 10001, as the fluent-bit service does
    (project / "compose.yaml").write_text(yaml.safe_dump(project_compose(project, spool)))
    sshd = project / "mappings" / "40-sshd.yaml"
    assert sshd.read_text().count(OLD) >= 2  # the rule and its example

    compose = Compose(tool, project)
    sender = None
    try:
        compose.run("up", "-d")
        sender = Sender()
        before = {s: compose.container(s) for s in ("mappings", "fluent-bit")}
        sender.thread.start()
        dockerkit.wait_for(lambda: len(events(spool)) >= 10, 30, what="the first events")

        edited_at = time.time()
        sshd.write_text(sshd.read_text().replace(OLD, NEW))  # in place, as an editor saves
        dockerkit.wait_for(lambda: NEW in events(spool).values(), 15,
                           what="an event with the edited eventName")

        # A broken edit: the last good rules stay, the error names the file as the user knows it.
        good = sshd.read_text()
        sshd.write_text(good.replace(f"      eventName: {NEW}\n", "", 1))
        dockerkit.wait_for(lambda: "kept the last good file" in compose.logs("mappings"), 15,
                           what="the watch to report the broken edit")
        logs = compose.logs("mappings")
        assert "mappings/40-sshd.yaml:" in logs and "eventName" in logs, logs[-2000:]
        assert "/src/mappings" not in logs
        time.sleep(2)  # records keep flowing under the broken file
        sender.close()
        total = len(sender.sent)
        got = dockerkit.wait_for(lambda: (e := events(spool)) and len(e) == total and e, 30,
                                 what=f"all {total} records as events")
        after = {s: compose.container(s) for s in ("mappings", "fluent-bit")}
    finally:
        if sender is not None:
            sender.close()
        try:
            logs_on_failure = compose.logs("mappings") + compose.logs("fluent-bit")
        except AssertionError:
            logs_on_failure = ""
        compose.run("down", "-v", "--timeout", "5")

    # Every record is one event: none lost, none rejected, none passed through unspooled.
    assert sorted(got) == list(range(1, total + 1)), logs_on_failure[-3000:]
    assert not list((spool / "rejected").glob("*")) and not (spool / "unspooled").exists()
    # One switch, old rules before it, new after it, within 10 s of the edit.
    names = [got[seq] for seq in range(1, total + 1)]
    switch = names.index(NEW)
    assert set(names[:switch]) == {OLD} and set(names[switch:]) == {NEW}
    latency = sender.sent[switch] - edited_at
    print(f"{total} records, {total} events; first record mapped by the edited rule was sent "
          f"{latency:.2f} s after the edit")
    assert latency <= 10.0, latency
    # The broken edit changed nothing and shows in the status file.
    status = json.loads((spool / "mappings-status.json").read_text())
    assert status["state"] == "ok"  # the watch never published the broken compile
    # No container restarted or replaced.
    for service in before:
        assert after[service]["Id"] == before[service]["Id"], service
        assert after[service]["State"]["StartedAt"] == before[service]["State"]["StartedAt"]
        assert after[service]["RestartCount"] == 0 and after[service]["State"]["Running"]
