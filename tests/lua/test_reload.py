"""Live reload of the compiled mappings inside the filter, through the filter_lua harness.

What a user relies on: replacing the file `CLOUDTRAIL_MAPPINGS` names (as `mappings compile -o`
and `mappings watch` do) changes how the NEXT records are mapped within one tick, with no
restart; every record is mapped by exactly one complete set of rules, none is lost or
rejected because of the switch; a broken file keeps the last good rules, is logged once and
shows in `<spool>/mappings-status.json`. Real compiler, real Lua mapper, injected clock.
"""

from __future__ import annotations

import json
import os
import pathlib
import tempfile
import threading

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cloudtrail_sink.mappings import compile_files

from .conftest import START, LuaFilter, read_folder

RULE = """\
rules:
  - name: app
    match: {{tag: "app.*"}}
    oversize: truncate
    event:
      userIdentity: {{type: AppUser, principalId: $user}}
      eventSource: app.example.com
      eventName: {name}
      UID: $id
"""


def compiled(name: str) -> str:
    with tempfile.TemporaryDirectory() as d:
        path = pathlib.Path(d) / "10-app.yaml"
        path.write_text(RULE.format(name=name))
        return compile_files([path]).lua_text()


OLD, NEW = compiled("OldName"), compiled("NewName")
BROKEN = OLD[: len(OLD) // 2]  # a half-written file: a Lua syntax error
REFUSED = "return { format = 1, rules = \"none\" }\n"  # loads, but the mapper refuses it


def replace(path: pathlib.Path, text: str) -> None:
    """What `mappings compile -o` does: a temporary file in the same folder, then rename."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class Pipeline:
    """A filter on a spool, fed numbered records; ticks advance the clock one second."""

    def __init__(self, root: pathlib.Path, first: str = OLD):
        self.spool = root / "spool"
        self.mappings = root / "mappings.lua"
        replace(self.mappings, first)
        self.f = LuaFilter(self.spool, {"CLOUDTRAIL_SPOOL_DIR": str(self.spool),
                                        "CLOUDTRAIL_MAPPINGS": str(self.mappings)},
                           real_mapper=True)
        self.sent = 0

    def record(self) -> None:
        self.sent += 1
        code = self.f.call("app.auth", self.f.now, {"user": "alice", "id": f"r-{self.sent:05d}"})
        assert code[0] == -1

    def tick(self) -> None:
        self.f.now = self.f.now + 1.0
        assert self.f.tick()[0] == -1

    def names_by_record(self) -> dict[str, str]:
        self.f.seal()
        return {e["eventData"]["UID"]: e["eventData"]["eventName"]
                for e in read_folder(self.spool, "ready", ".seg")}

    def rejected(self) -> list:
        return read_folder(self.spool, "rejected", ".rej")

    def status(self) -> dict:
        return json.loads((self.spool / "mappings-status.json").read_text())


def test_a_file_replaced_while_records_flow_switches_at_the_next_tick(tmp_path):
    p = Pipeline(tmp_path)
    assert p.status()["state"] == "ok" and p.status()["rules"] == 1
    for _ in range(3):
        p.record()
    p.tick()
    replace(p.mappings, NEW)
    p.record()  # replaced, but no tick yet: the old rules still apply
    p.tick()    # the switch happens here, between two records
    switched_at = p.f.now
    for _ in range(3):
        p.record()
    names = p.names_by_record()
    assert [names[f"r-{i:05d}"] for i in range(1, 8)] == ["OldName"] * 4 + ["NewName"] * 3
    assert p.rejected() == []
    status = p.status()
    assert status["state"] == "ok" and status["loaded_at"] == switched_at
    assert "error" not in status


def test_a_broken_file_keeps_the_last_good_rules_logs_once_and_shows_in_the_status(
        tmp_path, capfd):
    p = Pipeline(tmp_path)
    loaded_at = p.status()["loaded_at"]
    for bad in (BROKEN, REFUSED):
        replace(p.mappings, bad)
        for _ in range(5):
            p.tick()
            p.record()
        status = p.status()
        assert status["state"] == "error" and status["loaded_at"] == loaded_at
        assert str(p.mappings) in status["error"]
    p.mappings.unlink()  # gone altogether (a volume being replaced)
    p.tick()
    p.record()
    assert "cannot load mappings" in p.status()["error"]

    err = capfd.readouterr().err
    assert err.count("failed to evaluate") + err.count("cannot load mappings") == 2, err
    assert err.count("rejected by the mapping engine") == 1, err
    assert err.count("keeping the rules loaded at") == 3, err
    assert p.rejected() == []  # nothing rejected because of the bad files

    replace(p.mappings, NEW)
    p.tick()
    p.record()
    names = p.names_by_record()
    assert set(list(names.values())[:-1]) == {"OldName"} and names[f"r-{p.sent:05d}"] == "NewName"
    assert len(names) == p.sent
    assert p.status()["state"] == "ok" and "error" not in p.status()
    assert "mappings reloaded from" in capfd.readouterr().err


def test_without_any_good_rules_yet_records_are_rejected_with_the_reason_until_one_arrives(
        tmp_path):
    p = Pipeline(tmp_path, first=BROKEN)
    p.record()
    assert p.status()["state"] == "error" and p.status()["rules"] == 0
    replace(p.mappings, OLD)
    p.tick()
    p.record()
    [rejected] = p.rejected()
    assert "failed to evaluate" in rejected["reason"] or "cannot load" in rejected["reason"]
    assert list(p.names_by_record().values()) == ["OldName"]


def test_records_arriving_while_the_file_is_rewritten_are_never_lost(tmp_path):
    """A writer rewrites the file in every way a user might (atomic rename, in-place truncate
    and write, delete) while records and ticks flow: every record becomes exactly one event,
    mapped by one of the two complete rule sets."""
    p = Pipeline(tmp_path)
    stop = threading.Event()

    def rewrite():
        i = 0
        while not stop.is_set():
            text = (OLD, NEW)[i % 2]
            how = i % 3
            if how == 0:
                replace(p.mappings, text)
            elif how == 1:
                with open(p.mappings, "w") as fh:  # a reader may see it half written
                    fh.write(text[: len(text) // 3])
                    fh.flush()
                    fh.write(text[len(text) // 3:])
            else:
                try:
                    p.mappings.unlink()
                except FileNotFoundError:
                    pass
                replace(p.mappings, text)
            i += 1

    writer = threading.Thread(target=rewrite, daemon=True)
    writer.start()
    try:
        for n in range(600):
            p.record()
            if n % 3 == 0:
                p.tick()
    finally:
        stop.set()
        writer.join(timeout=10)
    names = p.names_by_record()
    assert len(names) == p.sent == 600
    assert set(names.values()) <= {"OldName", "NewName"}
    assert p.rejected() == []
    assert p.f.harness.lua.eval("1") == 1  # the Lua state is still healthy


FILES = {"old": OLD, "new": NEW, "broken": BROKEN, "refused": REFUSED, "missing": None}
GOOD = {"old": "OldName", "new": "NewName"}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(st.sampled_from(sorted(FILES)), st.just("record"), st.just("tick")),
                max_size=30))
def test_every_record_uses_the_rules_of_the_last_good_file_seen_at_a_tick(steps):
    """Model: the rules in use are those of the newest good file present at a tick."""
    with tempfile.TemporaryDirectory() as d:
        p = Pipeline(pathlib.Path(d))
        in_use, on_disk, expected = "OldName", "old", {}
        for step in steps:
            if step == "record":
                p.record()
                expected[f"r-{p.sent:05d}"] = in_use
            elif step == "tick":
                p.tick()
                in_use = GOOD.get(on_disk, in_use)
                assert p.status()["state"] == ("ok" if on_disk in GOOD else "error")
            else:
                on_disk = step
                if FILES[step] is None:
                    p.mappings.unlink(missing_ok=True)
                else:
                    replace(p.mappings, FILES[step])
        assert p.names_by_record() == expected
        assert p.rejected() == []


def test_a_file_from_an_older_compiler_keeps_the_last_good_rules_and_says_recompile(tmp_path):
    """Before the schema section existed, compiled files held only format and rules: such a
    file (an old `compiled-mappings` volume, an old image's file) must not replace good rules."""
    from cloudtrail_sink.mappings import luadata
    with tempfile.TemporaryDirectory() as d:
        path = pathlib.Path(d) / "10-app.yaml"
        path.write_text(RULE.format(name="Older"))
        data = compile_files([path]).data()
    del data["schema"]
    p = Pipeline(tmp_path)
    replace(p.mappings, luadata.dumps(data))
    p.tick()
    p.record()
    status = p.status()
    assert status["state"] == "error" and status["rules"] == 1
    assert "no schema section: compile them again" in status["error"]
    assert list(p.names_by_record().values()) == ["OldName"]
    assert p.rejected() == []


def test_a_file_that_never_finishes_evaluating_keeps_the_last_good_rules(tmp_path):
    """The filter evaluates the file on Fluent Bit's one engine thread: a hand-written file
    that loops must not hang the pipeline (a compiled file is one table constructor)."""
    p = Pipeline(tmp_path)
    replace(p.mappings, "while true do end\nreturn {}\n")
    p.tick()
    p.record()
    status = p.status()
    assert status["state"] == "error" and "does not finish" in status["error"]
    assert list(p.names_by_record().values()) == ["OldName"]
    replace(p.mappings, NEW)
    p.tick()
    p.record()
    assert list(p.names_by_record().values()) == ["OldName", "NewName"]
