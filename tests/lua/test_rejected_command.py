"""`cloudtrail-sink rejected list|show|replay` on rejected/ files written by the Lua filter."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

from cloudtrail_sink import cli
from cloudtrail_sink.mappings import compile_files
from cloudtrail_sink.schema import check_event

from .conftest import ACCOUNT, START, read_folder

MAPPINGS = pathlib.Path(__file__).resolve().parents[2] / "mappings"
SSHD = ("Accepted publickey for alice from 192.0.2.7 port 50022 ssh2")


def reject_some(lua_filter, spool):
    f = lua_filter()  # stand-in rules: only app.* maps
    f.call("syslog", START, {"ident": "sshd", "host": "web1", "pid": "7", "time": "Nov 27 10:00:00",
                             "message": SSHD})
    f.call("other", START + 1, {"msg": "x", "raw": b"\xff\xfe", "list": [], "map": {}})
    f.seal()


def compiled(tmp_path, files) -> str:
    path = tmp_path / "compiled.lua"
    path.write_text(compile_files(files, defaults={"recipientAccountId": ACCOUNT}).lua_text())
    return str(path)


def test_list_and_show(lua_filter, spool, capsys):
    reject_some(lua_filter, spool)
    assert cli.main(["rejected", "list", "--spool-dir", str(spool)]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert len(lines) == 2 and lines[0].split("\t")[1] == "syslog"
    assert "no rule matched" in lines[1] and "x" not in lines[1].split("\t")[3:]
    assert "2 rejected record(s)" in err
    assert cli.main(["rejected", "show", "--spool-dir", str(spool)]) == 0
    shown = [json.loads(line) for line in capsys.readouterr()[0].splitlines()]
    assert shown[1]["record"] == {"msg": "x", "raw": {"$base64": "//4="}, "list": [], "map": {}}


def test_replay_maps_what_the_fixed_rules_take_and_keeps_the_rest(lua_filter, spool, tmp_path,
                                                                  capsys):
    reject_some(lua_filter, spool)
    [rej] = os.listdir(spool / "rejected")
    rules = compiled(tmp_path, sorted(p for p in MAPPINGS.glob("*.yaml") if "catch-all" not in p.name))
    assert cli.main(["rejected", "replay", "--spool-dir", str(spool), "--mappings", rules,
                     "--dry-run"]) == 0
    assert "would replay 1 record(s); 1 would stay rejected" in capsys.readouterr()[0]
    assert os.listdir(spool / "ready") == []

    assert cli.main(["rejected", "replay", "--spool-dir", str(spool), "--mappings", rules]) == 0
    [event] = read_folder(spool, "ready", ".seg")
    assert os.listdir(spool / "ready")[0].split("-")[1].startswith("replay_")
    assert event["tag"] == "syslog" and event["time"] == START
    assert event["eventData"]["eventName"] == "AcceptedLogin"
    assert check_event(event["eventData"], ACCOUNT) is None
    [left] = read_folder(spool, "rejected", ".rej")
    assert left["record"] == {"msg": "x", "raw": b"\xff\xfe", "list": [], "map": {}}
    assert os.listdir(spool / "rejected") == [rej]  # replaced in place

    # with the catch-all rule everything maps and the file goes away
    everything = compiled(tmp_path, [MAPPINGS])
    assert cli.main(["rejected", "replay", "--spool-dir", str(spool), "--mappings", everything]) == 0
    assert os.listdir(spool / "rejected") == []
    assert len(read_folder(spool, "ready", ".seg")) == 2


def test_a_truncated_file_is_reported_and_left_alone(lua_filter, spool, tmp_path, capsys):
    reject_some(lua_filter, spool)
    [rej] = (spool / "rejected").iterdir()
    data = rej.read_bytes()
    rej.write_bytes(data[:-3])
    everything = compiled(tmp_path, [MAPPINGS])
    assert cli.main(["rejected", "replay", "--spool-dir", str(spool), "--mappings", everything]) == 1
    assert "truncated" in capsys.readouterr()[1]
    assert rej.read_bytes() == data[:-3] and os.listdir(spool / "ready") == []


def test_replay_with_a_missing_mappings_file_fails_clearly(spool, capsys):
    os.makedirs(spool)
    assert cli.main(["rejected", "replay", "--spool-dir", str(spool), "--mappings",
                     str(spool / "nope.lua")]) == 1
    assert "nope.lua" in capsys.readouterr()[1]


def test_replay_lets_a_drop_rule_take_its_records_and_says_how_many(lua_filter, spool, tmp_path,
                                                                    capsys):
    """Records rejected while no good rules were loaded include stages a drop: rule takes: the
    replay removes them as Fluent Bit would have, counted per rule, not 'still rejected'."""
    f = lua_filter()  # stand-in rules: kube.* maps to nothing, so both records are rejected
    base = {"kind": "Event", "apiVersion": "audit.k8s.io/v1", "auditID": "a-1", "verb": "get",
            "user": {"username": "bob"}, "sourceIPs": ["192.0.2.9"],
            "objectRef": {"resource": "pods"},
            "requestReceivedTimestamp": "2025-11-27T10:00:00.000000Z"}
    f.call("kube.audit", START, {**base, "stage": "RequestReceived"})
    f.call("kube.audit", START, {**base, "stage": "ResponseComplete",
                                 "responseStatus": {"code": 200}})
    f.seal()
    assert len(read_folder(spool, "rejected", ".rej")) == 2
    rules = compiled(tmp_path, [MAPPINGS])
    assert cli.main(["rejected", "replay", "--spool-dir", str(spool), "--mappings", rules,
                     "--dry-run"]) == 0
    assert ("would replay 1 record(s); 0 would stay rejected; dropped 1 by rule "
            "kubernetes-audit-not-final-stage") in capsys.readouterr()[0]
    assert cli.main(["rejected", "replay", "--spool-dir", str(spool), "--mappings", rules]) == 0
    assert ("replayed 1 record(s) into ready/; 0 still rejected; dropped 1 by rule "
            "kubernetes-audit-not-final-stage") in capsys.readouterr()[0]
    [event] = read_folder(spool, "ready", ".seg")
    assert event["eventData"]["UID"] == "a-1-ResponseComplete"
    assert os.listdir(spool / "rejected") == []


def test_replay_refuses_a_compiled_file_that_never_finishes_and_keeps_the_records(lua_filter,
                                                                                 spool, tmp_path):
    """The filter refuses a looping hand-written file (every record goes to rejected/); `rejected
    replay` given that same file refuses it the same way, naming it, instead of hanging (the
    timeout fails the test if it hangs), and leaves rejected/ as it was."""
    loop = tmp_path / "loop.lua"
    loop.write_text("local n = 0\nwhile true do n = n + 1 end\nreturn { format = 1 }\n")
    f = lua_filter(real_mapper=True, CLOUDTRAIL_MAPPINGS=str(loop))
    f.call("app.auth", START, {"user": "alice"})
    f.seal()
    [rejected] = read_folder(spool, "rejected", ".rej")
    assert "does not finish (more than 20000000 instructions)" in rejected["reason"]
    before = {p.name: p.read_bytes() for p in (spool / "rejected").iterdir()}
    done = subprocess.run([sys.executable, "-m", "cloudtrail_sink", "rejected", "replay",
                           "--spool-dir", str(spool), "--mappings", str(loop)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr.startswith(f"error: {loop}: mappings {loop} failed to evaluate: ")
    assert "loop.lua:2: does not finish (more than 20000000 instructions)" in done.stderr
    assert {p.name: p.read_bytes() for p in (spool / "rejected").iterdir()} == before
    assert os.listdir(spool / "ready") == []
