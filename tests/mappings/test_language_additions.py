"""drop: rules, enabled: false, {remaining: $x}, `mappings test --explain`, and the schema rules
the compiler hands the Lua mapper (schema.py is their one source)."""

from __future__ import annotations

import json

import pytest

from cloudtrail_sink import luaharness, schema
from cloudtrail_sink.cli import main
from cloudtrail_sink.mappings import CompileError, LuaMapper, MapperLoadError, compile_files
from cloudtrail_sink.mappings import compiler, luadata
from cloudtrail_sink.mappings.runner import check_examples, module_dir

from .conftest import SHIPPED

STAGES = """\
rules:
  - name: not-final
    match:
      tag: "kube.*"
      fields:
        $stage: {one_of: [RequestReceived, ResponseStarted]}
    drop: not the final stage
  - name: audit
    match: {tag: "kube.*"}
    oversize: truncate
    event:
      userIdentity: {type: T, principalId: $user}
      eventSource: k8s.io
      eventName: $verb
examples:
  - name: received is dropped
    tag: kube.audit
    record: {stage: RequestReceived, user: u, verb: get}
    rule: not-final
    expect_dropped: final stage
"""


def test_a_drop_rule_makes_no_event_and_says_so(compile_yaml):
    m = LuaMapper(compile_yaml(STAGES).lua_text())
    res = m.map("kube.audit", 1.0, {"stage": "RequestReceived", "user": "u", "verb": "get"})
    assert res.event is None and res.dropped and res.rule == "not-final"
    assert res.reason.startswith("dropped by rule 'not-final'") and "not the final stage" in res.reason
    done = m.map("kube.audit", 1.0, {"stage": "ResponseComplete", "user": "u", "verb": "get"})
    assert done.event["eventName"] == "get" and not done.dropped
    assert all(r.ok for r in check_examples(compile_yaml(STAGES)))


def test_enabled_false_switches_a_rule_off_and_skips_its_examples(compile_yaml, tmp_path, capsys):
    text = STAGES.replace("    drop: not the final stage", "    enabled: false\n    drop: not the final stage")
    compiled = compile_yaml(text)
    assert [r["name"] for r in compiled.rules] == ["audit"] and compiled.disabled == ["not-final"]
    m = LuaMapper(compiled.lua_text())
    assert m.map("kube.audit", 1.0, {"stage": "RequestReceived", "user": "u", "verb": "get"}).event
    [result] = check_examples(compiled)
    assert result.ok and result.skipped
    path = tmp_path / "m.yaml"
    assert main(["mappings", "check", str(path)]) == 0
    out = capsys.readouterr().out
    assert "skip " in out and "0 examples passed, 0 failed, 1 skipped" in out


def test_an_example_expecting_a_drop_fails_when_an_event_is_made(compile_yaml):
    text = STAGES.replace("RequestReceived, ResponseStarted", "ResponseStarted").replace(
        "    rule: not-final\n", "")
    [result] = check_examples(compile_yaml(text))
    assert not result.ok and "expected the record to be dropped" in result.message


@pytest.mark.parametrize("snippet, message", [
    ("    drop: x\n    oversize: reject\n", "oversize: a rule with 'drop:' builds no event"),
    ("    drop: '  '\n", "drop: say why the records are dropped"),
    ("    enabled: maybe\n    drop: x\n", "enabled: expected true or false"),
    ("", "rule: missing required key 'oversize' (or 'drop:'"),
])
def test_drop_and_enabled_are_checked(tmp_path, snippet, message):
    path = tmp_path / "m.yaml"
    path.write_text("rules:\n  - name: r\n    match: {tag: '*'}\n" + snippet)
    with pytest.raises(CompileError) as info:
        compile_files([path])
    assert any(message in p for p in info.value.problems), info.value.problems


REMAINING = """\
rules:
  - name: r
    match: {tag: "*"}
    decode:
      - {name: nv, from: $msg, format: kv}
    oversize: truncate
    event:
      userIdentity: {type: T, principalId: "$nv['user']"}
      eventSource: s
      eventName: {first: ["$nv['name']", "$nv['kind']"]}
      UID: {hash: ["$nv['id']"]}
      requestParameters: {object: {cmd: "$nv['cmd']"}}
      additionalEventData: {remaining: $nv}
"""


def test_remaining_keeps_each_field_once(mapper_for):
    m = mapper_for(REMAINING)
    ev = m.map("t", 1.0, {"msg": "user=bob,name=N,kind=K,id=7,cmd=ls -l,extra=1,empty="}).event
    # user, name, cmd are stored elsewhere; kind is a fallback of name (named, so left out);
    # id is only hashed (its value is not stored), so it stays; "" carries nothing
    assert ev["additionalEventData"] == {"id": "7", "extra": "1"}
    assert ev["requestParameters"] == {"cmd": "ls -l"} and ev["userIdentity"]["principalId"] == "bob"
    nothing_left = m.map("t", 1.0, {"msg": "user=bob,name=N,cmd=x"}).event
    assert "additionalEventData" not in nothing_left


def test_remaining_of_the_whole_record(mapper_for):
    m = mapper_for(REMAINING.replace("{remaining: $nv}", "{remaining: $}"))
    ev = m.map("t", 1.0, {"msg": "user=bob,name=N", "host": "h1"}).event
    assert ev["additionalEventData"] == {"msg": "user=bob,name=N", "host": "h1"}  # $msg only decoded


def test_explain_names_the_failed_condition_and_its_value(tmp_path, capsys):
    rec = tmp_path / "r.json"
    rec.write_text(json.dumps({"ident": "sshd", "host": "h", "time": "Nov 27 09:00:00", "pid": "1",
                               "message": "Failed password for root from 192.0.2.1 port 1 ssh2"}))
    assert main(["mappings", "test", "--explain", "--tag", "syslog", "--time", "1764234000",
                 "-m", str(SHIPPED), str(rec)]) == 0
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith(f"{rec}:1: rule ")]
    first = lines[0]
    assert "rule 'neuvector-audit-user'" in first and "10-neuvector.yaml:" in first
    assert 'not applied: match.fields.$ident: must match the pattern "controller$", is "sshd"' in first
    assert any("rule 'kubernetes-audit-failed-authentication'" in l
               and 'match.fields.$apiVersion: must equal "audit.k8s.io/v1", is absent' in l
               for l in lines)
    accepted = next(l for l in lines if "rule 'sshd-accepted'" in l)
    assert ("not applied: capture 'ssh': pattern did not match (its input: \"Failed password "
            "for root from 192.0.2.1 port 1 ssh2\")") in accepted
    assert lines[-1].endswith(": applied") and "rule 'sshd-failed'" in lines[-1]
    assert not any("rule 'catch-all'" in l for l in lines)  # rules after the one that applied


def test_explain_reports_drops_rejections_and_no_match(compile_yaml):
    m = LuaMapper(compile_yaml(STAGES).lua_text())
    assert m.explain("kube.a", 1.0, {"stage": "ResponseStarted"})[-1].endswith(
        "applied: dropped: not the final stage")
    lines = m.explain("kube.a", 1.0, {"stage": "ResponseComplete"})
    assert 'match.fields.$stage: must be one of "RequestReceived", "ResponseStarted", is ' \
           '"ResponseComplete"' in lines[0]
    assert lines[1].endswith("applied: rejected: eventName has no value")
    assert m.explain("app", 1.0, {})[-1] == 'no mapping rule matched tag "app"'
    assert 'match.tag: "app" matches none of "kube.*"' in m.explain("app", 1.0, {})[0]


# --- one source of truth for the schema rules ------------------------------------------------

def _mapper_module():
    lua = luaharness.new_runtime()
    lua.execute(f"package.path = {luaharness.lua_string_literal(module_dir())} .. '/?.lua;' .. "
                "package.path")
    return lua, lua.eval('require("cloudtrail.mapper")')


def test_the_compiled_data_carries_schema_py_and_the_mapper_reads_it_from_there(compile_yaml):
    compiled = compile_yaml(STAGES)
    data = compiled.data()["schema"]
    assert data["string_limits"] == schema.STRING_LIMITS
    assert data["object_limits"] == schema.OBJECT_LIMITS
    assert data["identity_limits"] == schema.IDENTITY_STRING_LIMITS
    assert data["details_limit"] == schema.DETAILS_LIMIT
    assert set(data["required"]) | set(compiler.FILLED_WHEN_ABSENT) | {"userIdentity"} == \
        set(schema.REQUIRED_TOP)
    # change a limit in the compiled data: the mapper enforces the changed one, so it has no
    # copy of its own
    data = compiled.data()
    data["schema"]["string_limits"]["eventName"] = 20
    m = LuaMapper(luadata.dumps(data))
    res = m.map("kube.a", 1.0, {"stage": "ResponseComplete", "user": "u", "verb": "x" * 30})
    assert res.event["eventName"] == "xxxxxx...[truncated]"
    assert res.event["additionalEventData"]["truncatedFields"] == ["eventName"]


def test_the_mapper_refuses_data_without_a_schema_section(compile_yaml):
    data = compile_yaml(STAGES).data()
    del data["schema"]
    with pytest.raises(MapperLoadError, match="no schema section: compile them again"):
        LuaMapper(luadata.dumps(data))
    data = compile_yaml(STAGES).data()
    del data["schema"]["object_limits"]["additionalEventData"]
    with pytest.raises(MapperLoadError, match="schema.object_limits lacks a field's limit"):
        LuaMapper(luadata.dumps(data))


def test_format_version_is_the_same_in_compiler_mapper_and_filter(compile_yaml, tmp_path):
    lua, mapper = _mapper_module()
    assert mapper.FORMAT == compiler.FORMAT
    path = tmp_path / "m.lua"
    path.write_text(compile_yaml(STAGES).lua_text())
    load = lua.eval('require("cloudtrail.filter").load_mappings')
    assert load(str(path).encode()) is not None
    data = compile_yaml(STAGES).data()
    data["format"] = compiler.FORMAT + 1
    path.write_text(luadata.dumps(data))
    assert load(str(path).encode())[0] is None
