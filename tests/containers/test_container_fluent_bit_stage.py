"""The Dockerfile's mapping compilation and the `fluent-bit` stage's file layout, built for real.

The official Fluent Bit image cannot be pulled here and no Fluent Bit binary exists, so the
`fluent-bit` target is built on the debootstrapped stand-in base (``FLUENT_BIT_IMAGE`` build
arg): that proves every COPY finds its source and the image holds what the configs refer to
(the YAML configs, the Lua filter and its modules, the compiled mappings at the path the filter
reads by default, the spool and tail-position folders with the shared owner). Running Fluent
Bit itself is not tested here (its Lua is, under LuaJIT: tests/lua).

What a user relies on: a broken rule in mappings/*.yaml, or a rule changed without its
`examples:`, fails the build (so `docker compose up --build` keeps the running pipeline) and the
message names the file and line as the user knows it (`mappings/...`, not `/src/mappings/...`).
"""

from __future__ import annotations

import pathlib
import shutil

import pytest
import yaml

import dockerkit

pytestmark = [pytest.mark.docker, pytest.mark.slow]

REPO = dockerkit.REPO


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


def test_a_broken_mapping_fails_the_build_naming_file_and_line(
        sink_image, base_image, wheelhouse_url, tmp_path):
    context = copy_context(tmp_path / "context")
    rule = yaml.safe_load((REPO / "mappings" / "40-sshd.yaml").read_text())["rules"][0]
    del rule["event"]["eventName"]  # a required field of every event
    (context / "mappings" / "45-broken.yaml").write_text(yaml.safe_dump({"rules": [rule]}))

    with pytest.raises(dockerkit.BuildFailed) as failed:
        dockerkit.build_image("cloudtrail-test/mappings-broken:latest", "mappings",
                              build_args(base_image, wheelhouse_url), context=context)
    output = failed.value.output
    problems = [line for line in output.splitlines() if "45-broken.yaml:" in line]
    assert problems and all("mappings/45-broken.yaml:" in line and "/src/" not in line
                            for line in problems), output[-3000:]
    assert "eventName" in output, output[-3000:]


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


def test_fluent_bit_stage_holds_config_filter_mappings_and_shared_folders(
        docker_engine, sink_image, base_image, wheelhouse_url):
    tag = "cloudtrail-test/fluent-bit-layout:latest"
    dockerkit.build_image(tag, "fluent-bit", build_args(base_image, wheelhouse_url))
    try:
        config = docker_engine.images.get(tag).attrs["Config"]
        env = dict(item.split("=", 1) for item in config["Env"])
        cmd = config["Cmd"]
        main_config = cmd[cmd.index("-c") + 1]
        expected_files = [main_config, "/fluent-bit/etc/fluent-bit-kubernetes.yaml",
                          "/fluent-bit/etc/parsers.yaml", "/fluent-bit/etc/cloudtrail.lua",
                          "/fluent-bit/etc/lua/cloudtrail/filter.lua", env["CLOUDTRAIL_MAPPINGS"]]
        folders = [env["CLOUDTRAIL_SPOOL_DIR"] + "/" + name
                   for name in ("ready", "tmp", "failed", "rejected", "quarantine")]
        folders += ["/fluent-bit/state", "/var/lib/fluent-bit"]
        script = (f"ls {' '.join(expected_files)} >/dev/null && stat -c '%a %u %g %n' "
                  f"{' '.join(folders)} && grep -c '^return {{' {env['CLOUDTRAIL_MAPPINGS']}")
        container = docker_engine.containers.create(tag, entrypoint=["sh", "-c"],
                                                    command=[script], network_mode="host")
        try:
            container.start()
            code = container.wait(timeout=60)["StatusCode"]
            out = container.logs().decode()
        finally:
            container.remove(force=True)
        assert code == 0, out
        lines = out.strip().split("\n")
        for line in lines[:len(folders)]:
            mode, uid, gid, name = line.split()
            assert (uid, gid) == ("10001", "10001"), line
            if "/spool/" in name:
                assert mode == "2770", line
        assert lines[len(folders)] == "1", out  # the compiled mappings: one Lua chunk
    finally:
        docker_engine.images.remove(tag, force=True)
