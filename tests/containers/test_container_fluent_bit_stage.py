"""The Dockerfile's mapping compilation and the `fluent-bit` stage's file layout, built for real.

The official Fluent Bit image cannot be pulled here and no Fluent Bit binary exists, so the
`fluent-bit` target is built on the debootstrapped stand-in base (``FLUENT_BIT_IMAGE`` build
arg): that proves every COPY finds its source and the image holds what the configs refer to
(the YAML configs, the Lua filter and its modules, the compiled mappings at the path the filter
reads by default, the spool and tail-position folders with the shared owner, the folder
fluent-bit.yaml tails). Running Fluent Bit itself is not tested here (its Lua is, under LuaJIT:
tests/lua).

What a user relies on: a broken rule in mappings/*.yaml, or a rule changed without its
`examples:`, fails the build (so `docker compose up --build` keeps the running pipeline) and the
message names the file and line as the user knows it (`mappings/...`, not `/src/mappings/...`);
a clean start finds every folder it reads; and a fresh named spool volume, whichever of the two
images seeds it, is writable by both containers' users as compose runs them, each able to delete
what the other wrote (the sink deletes the segments Fluent Bit writes).
"""

from __future__ import annotations

import pathlib
import re
import shutil
import subprocess
import uuid

import pytest
import yaml

import dockerkit

pytestmark = [pytest.mark.docker, pytest.mark.slow]

REPO = dockerkit.REPO
BUILD_LABEL = "cloudtrail-lake-shipper.build-stage"  # on the Dockerfile's build-only stages


def build_args(base_image, wheelhouse_url) -> dict[str, str]:
    return {"PYTHON_IMAGE": base_image, "FLUENT_BIT_IMAGE": base_image, "PIP_NO_INDEX": "1",
            "PIP_FIND_LINKS": wheelhouse_url}


def copy_context(dest: pathlib.Path) -> pathlib.Path:
    """The parts of the repository the Dockerfile reads (as .dockerignore lets through)."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build", "dist")
    for name in ("sink", "mappings", "fluent-bit", "deploy/docker"):
        shutil.copytree(REPO / name, dest / name, ignore=ignore)
    for name in ("Dockerfile", ".dockerignore"):
        shutil.copy2(REPO / name, dest / name)
    return dest


def build_containers(client) -> set[str]:
    return {c.id for c in client.containers.list(all=True, filters={"label": BUILD_LABEL})}


def test_a_broken_mapping_fails_the_build_naming_file_and_line(
        docker_engine, sink_image, base_image, wheelhouse_url, tmp_path):
    context = copy_context(tmp_path / "context")
    rule = yaml.safe_load((REPO / "mappings" / "40-sshd.yaml").read_text())["rules"][0]
    del rule["event"]["eventName"]  # a required field of every event
    (context / "mappings" / "45-broken.yaml").write_text(yaml.safe_dump({"rules": [rule]}))

    before = build_containers(docker_engine)
    # Without --force-rm, as Compose v1's `up --build` builds.
    with pytest.raises(dockerkit.BuildFailed) as failed:
        dockerkit.build_image("cloudtrail-test/mappings-broken:latest", "mappings",
                              build_args(base_image, wheelhouse_url), context=context,
                              force_rm=False)
    output = failed.value.output
    problems = [line for line in output.splitlines() if "45-broken.yaml:" in line]
    assert problems and all("mappings/45-broken.yaml:" in line and "/src/" not in line
                            for line in problems), output[-3000:]
    assert "eventName" in output, output[-3000:]

    # The failed step's container is left behind; the clean-up docs/deploy.md gives removes it.
    left = build_containers(docker_engine) - before
    assert left, "no labelled container left: the clean-up below would be untested"
    cleanup = re.search(r"^(docker container prune .*)$",
                        (REPO / "docs" / "deploy.md").read_text(), re.M).group(1)
    subprocess.run(cleanup.split(), check=True, capture_output=True, timeout=120)
    assert not left & build_containers(docker_engine)

def test_a_rule_changed_without_its_example_fails_the_build(
        sink_image, base_image, wheelhouse_url, tmp_path):
    context = copy_context(tmp_path / "context")
    sshd = context / "mappings" / "40-sshd.yaml"
    text = sshd.read_text()
    assert "eventName: AcceptedLogin\n" in text
    sshd.write_text(text.replace("eventName: AcceptedLogin\n", "eventName: SignedIn\n", 1))

    with pytest.raises(dockerkit.BuildFailed) as failed:
        dockerkit.build_image("cloudtrail-test/mappings-example:latest", "mappings",
                              build_args(base_image, wheelhouse_url), context=context)
    output = failed.value.output
    assert "mappings/40-sshd.yaml:" in output and ": examples: " in output, output[-3000:]
    assert "SignedIn" in output, output[-3000:]



@pytest.fixture(scope="module")
def fluent_bit_image(docker_engine, sink_image, base_image, wheelhouse_url):
    # A tag of its own: other checkouts may run this test on the same engine at the same time.
    tag = f"cloudtrail-test/fluent-bit-layout:{uuid.uuid4().hex[:10]}"
    dockerkit.build_image(tag, "fluent-bit", build_args(base_image, wheelhouse_url))
    try:
        yield tag
    finally:
        docker_engine.images.remove(tag, force=True)


def run_script(client, image: str, script: str, **kwargs) -> tuple[int, str]:
    container = client.containers.create(image, entrypoint=["sh", "-c"], command=[script],
                                         network_mode="host", **kwargs)
    try:
        container.start()
        code = container.wait(timeout=60)["StatusCode"]
        return code, container.logs().decode()
    finally:
        container.remove(force=True)


def test_fluent_bit_stage_holds_config_filter_mappings_and_shared_folders(
        docker_engine, fluent_bit_image):
    config = docker_engine.images.get(fluent_bit_image).attrs["Config"]
    env = dict(item.split("=", 1) for item in config["Env"])
    cmd = config["Cmd"]
    main_config = cmd[cmd.index("-c") + 1]
    expected_files = [main_config, "/fluent-bit/etc/fluent-bit-kubernetes.yaml",
                      "/fluent-bit/etc/parsers.yaml", "/fluent-bit/etc/cloudtrail.lua",
                      "/fluent-bit/etc/lua/cloudtrail/filter.lua", env["CLOUDTRAIL_MAPPINGS"]]
    spool = env["CLOUDTRAIL_SPOOL_DIR"]
    folders = [spool] + [f"{spool}/{name}"
                         for name in ("ready", "tmp", "failed", "rejected", "quarantine")]
    folders += ["/fluent-bit/state", "/var/lib/fluent-bit"]
    script = (f"ls {' '.join(expected_files)} >/dev/null && stat -c '%a %u %g %n' "
              f"{' '.join(folders)} && grep -c '^return {{' {env['CLOUDTRAIL_MAPPINGS']}")
    code, out = run_script(docker_engine, fluent_bit_image, script)
    assert code == 0, out
    lines = out.strip().split("\n")
    for line in lines[:len(folders)]:
        mode, uid, gid, name = line.split()
        assert (uid, gid) == ("10001", "10001"), line
        if name.startswith(spool):
            assert mode == "2770", line
    assert lines[len(folders)] == "1", out  # the compiled mappings: one Lua chunk

    # Every folder the compose config tails exists and is readable by compose's Fluent Bit user
    # (a missing one is an in_tail error at every scan).
    fb_config = yaml.safe_load((REPO / "fluent-bit" / "fluent-bit.yaml").read_text())
    tailed = [str(pathlib.PurePosixPath(i["path"]).parent)
              for i in fb_config["pipeline"]["inputs"] if i["name"] == "tail"]
    assert tailed
    code, out = run_script(docker_engine, fluent_bit_image,
                           " && ".join(f"test -d {d} -a -r {d} -a -x {d}" for d in tailed),
                           user=compose_user("fluent-bit"), read_only=True)
    assert code == 0, (tailed, out)


def compose_user(service: str) -> str | None:
    compose = yaml.safe_load((REPO / "compose.yaml").read_text())
    return compose["services"][service].get("user")


@pytest.mark.parametrize("first", ["fluent-bit", "sink"])
def test_a_fresh_spool_volume_is_writable_by_both_images_users(
        docker_engine, fluent_bit_image, sink_image, spool_volume, first):
    # Each image runs as compose runs it (its user, read-only root), the volume mounted where
    # compose mounts it; whichever starts first seeds the fresh volume from its image.
    spool = "/var/spool/cloudtrail"
    images = {"fluent-bit": fluent_bit_image, "sink": sink_image}
    second = "sink" if first == "fluent-bit" else "fluent-bit"

    def run(who: str, script: str) -> str:
        code, out = run_script(docker_engine, images[who], script, user=compose_user(who),
                               read_only=True, volumes={spool_volume: {"bind": spool,
                                                                       "mode": "rw"}})
        assert code == 0, f"{who}: {out}"
        return out

    def write(who: str) -> str:
        # The root (sink.lock, unspooled/) and ready/ (segments), as each program writes them.
        return (f"id -u && echo {who} > {spool}/probe-{who} && mkdir {spool}/dir-{who} "
                f"&& echo {who} > {spool}/ready/probe-{who}.seg")

    out = run(first, f"stat -c '%a %u %g' {spool} {spool}/ready && {write(first)}")
    root, ready, uid = out.split("\n")[:3]
    # As the Dockerfile promises: setgid and group-writable, closed to others, root included.
    assert root.split() == ready.split() == ["2770", "10001", "10001"], out
    assert uid == "10001", out
    # The second writes too, and removes what the first wrote (as the sink deletes segments).
    run(second, f"{write(second)} && rm -r {spool}/probe-{first} {spool}/dir-{first} "
                f"{spool}/ready/probe-{first}.seg")
    out = run(first, f"rm -r {spool}/probe-{second} {spool}/dir-{second} "
                     f"{spool}/ready/probe-{second}.seg && ls -A {spool}/ready")
    assert out.strip() == "", out
