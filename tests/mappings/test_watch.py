"""`mappings compile` and `mappings watch`: every check before publishing, atomic output, the
last good file kept on a broken edit, layered folders, messages naming the file the user knows.

The watch logic runs with an injected clock (debounce and poll decided without sleeping); the
watchdog wiring and the command itself run for real (a thread, then a subprocess), including a
ConfigMap volume updated the way kubelet does it (a `..data` symlink swapped by rename).
"""

from __future__ import annotations

import io
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time

import pytest

from cloudtrail_sink.cli import main
from cloudtrail_sink.mappings import LuaMapper
from cloudtrail_sink.mappings.build import build, source_files
from cloudtrail_sink.mappings.watch import MappingsWatch

APP = """\
rules:
  - name: {rule}
    match: {{tag: "{tag}.*"}}
    oversize: truncate
    event:
      userIdentity: {{type: AppUser, principalId: $user}}
      eventSource: app.example.com
      eventName: {rule_name}
      UID: $id
examples:
  - name: a login
    tag: {tag}.auth
    time: 1764237600.0
    record: {{user: alice, id: r-1}}
    expect:
      userIdentity: {{type: AppUser, principalId: alice}}
      eventSource: app.example.com
      eventName: {example_name}
      eventTime: "2025-11-27T10:00:00Z"
      UID: r-1
"""


def app(name: str, example_name: str | None = None, rule: str = "app-login",
        tag: str = "app") -> str:
    return APP.format(rule_name=name, example_name=example_name or name, rule=rule, tag=tag)


BROKEN = app("Login").replace("      eventSource: app.example.com\n", "", 1)


def event_name(output: pathlib.Path) -> str:
    res = LuaMapper.from_file(output).map("app.auth", 1764237600.0, {"user": "u", "id": "x"})
    return res.event["eventName"]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def project(tmp_path):
    src = tmp_path / "mappings"
    src.mkdir()
    (src / "10-app.yaml").write_text(app("Login"))
    return tmp_path


# compile ------------------------------------------------------------------------------------

def test_compile_refuses_a_rule_changed_without_its_example_and_keeps_the_file(project, capsys):
    out = project / "rules.lua"
    assert main(["mappings", "compile", str(project / "mappings"), "-o", str(out)]) == 0
    good = out.read_text()
    assert "1 examples passed" in capsys.readouterr().err
    (project / "mappings" / "10-app.yaml").write_text(app("SignIn", example_name="Login"))
    assert main(["mappings", "compile", str(project / "mappings"), "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"{project / 'mappings' / '10-app.yaml'}:11: examples: a login: " in err
    assert "eventName" in err and "nothing written" in err
    assert out.read_text() == good
    assert sorted(p.name for p in project.iterdir()) == ["mappings", "rules.lua"]  # no temp left
    # the same rules without the example check are written
    assert main(["mappings", "compile", str(project / "mappings"), "-o", str(out),
                 "--no-examples"]) == 0
    assert event_name(out) == "SignIn"


def test_messages_name_the_file_relative_to_the_display_root(project, capsys):
    (project / "mappings" / "10-app.yaml").write_text(BROKEN)
    assert main(["mappings", "compile", str(project / "mappings"), "-o",
                 str(project / "rules.lua"), "--display-root", str(project)]) == 1
    err = capsys.readouterr().err
    assert "mappings/10-app.yaml:6: event: missing required key 'eventSource'" in err
    assert str(project) not in err


def test_every_file_a_message_names_is_shown_relative_to_the_display_root(project, capsys):
    (project / "mappings" / "20-again.yaml").write_text(app("Login"))  # the same rule name
    assert main(["mappings", "compile", str(project / "mappings"), "-o",
                 str(project / "rules.lua"), "--display-root", str(project)]) == 1
    err = capsys.readouterr().err
    assert "mappings/20-again.yaml:2: name: rule name 'app-login' is already used in " \
           "mappings/10-app.yaml" in err, err


def test_layered_folders_are_each_named_relative_to_their_display_root(tmp_path, capsys):
    """The Kubernetes sidecar layers the image's shipped rules with the ConfigMap: a message
    about both names each file as the user knows it (mappings/NAME.yaml, as in the repository
    and in the overlay folder), never by its path inside the image."""
    image = tmp_path / "usr" / "share" / "shipper"
    configmap = tmp_path / "etc" / "cloudtrail"
    (image / "mappings").mkdir(parents=True)
    (configmap / "mappings").mkdir(parents=True)
    (image / "mappings" / "40-app.yaml").write_text(app("Login"))
    (configmap / "mappings" / "50-mine.yaml").write_text(app("Mine", tag="mine"))  # same name
    assert main(["mappings", "compile", str(image / "mappings"), str(configmap / "mappings"),
                 "-o", str(tmp_path / "rules.lua"), "--display-root", str(configmap),
                 "--display-root", str(image)]) == 1
    err = capsys.readouterr().err
    assert "mappings/50-mine.yaml:2: name: rule name 'app-login' is already used in " \
           "mappings/40-app.yaml" in err, err
    assert str(tmp_path) not in err


def test_later_folders_add_rules_and_replace_files_of_the_same_name(tmp_path):
    shipped, mine = tmp_path / "shipped", tmp_path / "mine"
    shipped.mkdir()
    mine.mkdir()
    (shipped / "10-app.yaml").write_text(app("Login"))
    (shipped / "99-last.yaml").write_text(app("Last", rule="last", tag="last"))
    (mine / "10-app.yaml").write_text(app("MyLogin"))
    (mine / "50-mine.yaml").write_text(app("Mine", rule="mine", tag="mine"))
    assert [p.parent.name + "/" + p.name for p in source_files([shipped, mine])] == [
        "mine/10-app.yaml", "mine/50-mine.yaml", "shipped/99-last.yaml"]
    built = build([shipped, mine])
    assert built.rules == 3 and built.examples == 3
    res = LuaMapper(built.text).map("app.x", 1764237600.0, {"user": "u", "id": "i"})
    assert res.rule == "app-login" and res.event["eventName"] == "MyLogin"


# watch: the logic, with an injected clock -----------------------------------------------------

def test_watch_publishes_good_builds_and_keeps_the_last_good_file_on_a_broken_edit(project):
    clock, log = FakeClock(), io.StringIO()
    src, out = project / "mappings" / "10-app.yaml", project / "rules.lua"
    watch = MappingsWatch([str(project / "mappings")], str(out),
                          lambda paths: build(paths, display_root=str(project)),
                          clock=clock, debounce=0.5, poll_seconds=30, out=log)
    assert watch.step() == "published" and event_name(out) == "Login"

    src.write_text(BROKEN)
    watch.poke()
    clock.now += 0.4
    assert not watch.due(clock.now)        # still within the debounce
    watch.poke()                           # another event of the same save
    clock.now += 0.4
    assert not watch.due(clock.now)
    clock.now += 0.2
    assert watch.due(clock.now) and not watch.due(clock.now)  # due once
    good = out.read_text()
    assert watch.step() == "failed"
    assert out.read_text() == good
    assert "mappings/10-app.yaml:6: event: missing required key 'eventSource'" in log.getvalue()
    assert "kept the last good file" in log.getvalue()
    assert watch.step() == "unchanged"     # reported once, not at every event
    assert log.getvalue().count("missing required key") == 1

    src.write_text(app("SignIn", example_name="Login"))  # the example now fails
    assert watch.step() == "failed" and out.read_text() == good
    assert "mappings/10-app.yaml:11: examples: a login:" in log.getvalue()

    src.write_text(app("SignIn"))
    assert watch.step() == "published" and event_name(out) == "SignIn"


def test_an_output_that_cannot_be_written_is_reported_and_retried(project, capsys):
    out = project / "missing" / "rules.lua"
    assert main(["mappings", "compile", str(project / "mappings"), "-o", str(out)]) == 1
    assert f"{out}: cannot write: No such file or directory" in capsys.readouterr().err
    log = io.StringIO()
    watch = MappingsWatch([str(project / "mappings")], str(out), build, clock=FakeClock(),
                          out=log)
    assert watch.step() == "failed" and "cannot write" in log.getvalue()
    out.parent.mkdir()
    assert watch.step() == "published" and event_name(out) == "Login"


def test_watch_polls_as_a_backstop_when_no_event_arrives(project):
    clock = FakeClock()
    watch = MappingsWatch([str(project / "mappings")], str(project / "rules.lua"), build,
                          clock=clock, debounce=0.5, poll_seconds=5, out=io.StringIO())
    watch.step()
    clock.now += 4.9
    assert not watch.due(clock.now)
    clock.now += 0.2
    assert watch.due(clock.now)


# watch: for real --------------------------------------------------------------------------------

def wait_for(predicate, timeout=20.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_watch_thread_follows_a_configmap_volume_updated_like_kubelet(tmp_path):
    """kubelet: files are symlinks into `..data`, itself a symlink swapped by rename(2)."""
    vol = tmp_path / "volume"
    vol.mkdir()

    def publish(version: str, text: str) -> None:
        (vol / version).mkdir()
        (vol / version / "10-app.yaml").write_text(text)
        os.symlink(version, vol / "..data_tmp")
        os.replace(vol / "..data_tmp", vol / "..data")

    publish("..v1", app("Login"))
    os.symlink("..data/10-app.yaml", vol / "10-app.yaml")
    out = tmp_path / "compiled" / "rules.lua"
    out.parent.mkdir()
    watch = MappingsWatch([str(vol)], str(out), build, debounce=0.05, poll_seconds=3600,
                          out=io.StringIO())
    stop = threading.Event()
    thread = threading.Thread(target=watch.run, args=(stop,))
    thread.start()
    try:
        assert wait_for(lambda: out.exists() and event_name(out) == "Login")
        publish("..v2", app("SignIn"))
        assert wait_for(lambda: event_name(out) == "SignIn")
        good = out.read_text()
        publish("..v3", BROKEN)
        assert wait_for(lambda: "missing required key" in watch.out.getvalue())
        assert out.read_text() == good
    finally:
        stop.set()
        watch.stop_waiting()
        thread.join(timeout=10)
    assert not thread.is_alive()


def test_watch_command_keeps_the_last_good_file_and_stops_on_sigterm(project):
    out = project / "rules.lua"
    proc = subprocess.Popen(
        [sys.executable, "-m", "cloudtrail_sink", "mappings", "watch", "mappings", "-o",
         str(out), "--debounce", "0.1"],
        cwd=project, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    reader.start()
    try:
        assert wait_for(lambda: any("published" in line for line in lines)), lines
        good = out.read_text()
        (project / "mappings" / "10-app.yaml").write_text(BROKEN)
        assert wait_for(lambda: any("kept the last good file" in line for line in lines)), lines
        assert "mappings/10-app.yaml:6: event: missing required key 'eventSource'\n" in lines
        assert out.read_text() == good
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        reader.join(timeout=10)


def test_an_unexpected_build_error_is_reported_once_and_the_watch_goes_on(project):
    """Not a rule problem but an exception nobody planned for (a bug, a file that breaks a
    library): the last good file stays, the message comes once, and the next edit publishes."""
    clock, log = FakeClock(), io.StringIO()
    src, out = project / "mappings" / "10-app.yaml", project / "rules.lua"

    def flaky_build(paths):
        if "Boom" in src.read_text():
            raise RuntimeError("lupa went away")
        return build(paths)

    watch = MappingsWatch([str(project / "mappings")], str(out), flaky_build, clock=clock,
                          out=log)
    assert watch.step() == "published"
    good = out.read_text()
    src.write_text(app("Boom"))
    assert watch.step() == "failed" and out.read_text() == good
    assert watch.step() == "unchanged"
    assert log.getvalue().count("unexpected error while building (RuntimeError: lupa went "
                                "away); kept the last good file") == 1
    src.write_text(app("SignIn"))
    assert watch.step() == "published" and event_name(out) == "SignIn"


def test_a_source_nested_too_deeply_is_a_problem_of_that_file_not_a_crash(project, capsys):
    src, out = project / "mappings" / "10-app.yaml", project / "rules.lua"
    src.write_text("rules: " + "[" * 5000 + "]" * 5000 + "\n")
    assert main(["mappings", "compile", str(project / "mappings"), "-o", str(out)]) == 1
    assert f"{src}:1: nested too deeply to be a mapping file" in capsys.readouterr().err
    assert not out.exists()
    log = io.StringIO()
    watch = MappingsWatch([str(project / "mappings")], str(out), build, clock=FakeClock(),
                          out=log)
    assert watch.step() == "failed" and "nested too deeply" in log.getvalue()
    src.write_text(app("Login"))
    assert watch.step() == "published" and event_name(out) == "Login"
