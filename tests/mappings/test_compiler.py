"""The compiler: file:line: field messages, data-only Lua output, the compile command."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from cloudtrail_sink import luaharness
from cloudtrail_sink.cli import main
from cloudtrail_sink.mappings import CompileError, LuaMapper, compile_files
from cloudtrail_sink.mappings import luadata

GOOD = """\
rules:
  - name: falco
    match:
      tag: "falco*"
    oversize: reject
    event:
      userIdentity:
        type: FalcoUser
        principalId: $user
      eventSource: falco
      eventName:
        feild: $rule
"""


def problems_of(tmp_path, text, name="falco.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    with pytest.raises(CompileError) as info:
        compile_files([path])
    return [p.replace(str(path), name) for p in info.value.problems]


def test_unknown_key_names_file_line_and_field(tmp_path):
    assert problems_of(tmp_path, GOOD) == [
        "falco.yaml:12: eventName: unknown key 'feild' (did you mean 'field'?)"]


@pytest.mark.parametrize("snippet, expected", [
    ("      eventTime: {time: $t, format: iso}\n",
     "falco.yaml:13: eventTime.format: 'iso' is not one of auto, epoch_s"),
    ("      errorCode: {template: \"{$a\"}\n",
     "falco.yaml:13: errorCode.template: unmatched '{'"),
    ("      UID: $a[b]\n", "falco.yaml:13: UID: '$a[b]' is not a record accessor"),
    ("      eventName: dup\n", "falco.yaml:13: duplicate key 'eventName' (first at line 11)"),
    ("      sourceIP: $ip\n", "falco.yaml:13: event: unknown key 'sourceIP' (did you mean "
                              "'sourceIPAddress'?)"),
    ("      requestParameters: [a, b]\n", "falco.yaml:13: requestParameters: a list is not an "
                                          "expression"),
])
def test_problems_point_at_the_line(tmp_path, snippet, expected):
    text = GOOD.replace("        feild: $rule\n", "        field: $rule\n") + snippet
    found = problems_of(tmp_path, text)
    assert any(p.startswith(expected) for p in found), found


def test_missing_required_and_bad_condition(tmp_path):
    text = """\
    rules:
      - name: r
        match:
          tag: "*"
          fields:
            $x: {exits: true}
        oversize: sometimes
        event:
          userIdentity: {type: T}
          eventName: n
    """
    found = problems_of(tmp_path, text, "r.yaml")
    assert "r.yaml:6: match.fields.$x: unknown key 'exits' (did you mean 'exists'?)" in found
    assert "r.yaml:7: oversize: 'sometimes' is not truncate or reject" in found
    assert "r.yaml:9: event: missing required key 'eventSource'" in found
    assert "r.yaml:9: userIdentity: missing required key 'principalId'" in found


def test_invalid_lua_pattern_is_reported_with_its_line(tmp_path, capsys):
    path = tmp_path / "p.yaml"
    path.write_text(GOOD.replace("        feild: $rule\n", "        field: $rule\n")
                    .replace('      tag: "falco*"\n', '      tag: "falco*"\n      fields:\n'
                             '        $rule: {pattern: "[a-"}\n'))
    assert main(["mappings", "compile", str(path), "-o", str(tmp_path / "out.lua")]) == 1
    err = capsys.readouterr().err
    assert f"{path}:6: match.fields.$rule.pattern: invalid Lua pattern" in err
    assert not (tmp_path / "out.lua").exists()


def test_rule_names_unique_across_files(tmp_path):
    body = GOOD.replace("        feild: $rule\n", "        field: $rule\n")
    (tmp_path / "a.yaml").write_text(body)
    (tmp_path / "b.yaml").write_text(body)
    with pytest.raises(CompileError) as info:
        compile_files([tmp_path])
    assert any("b.yaml:2: name: rule name 'falco' is already used in" in p
               for p in info.value.problems)


def test_capture_count_must_match_field_names(tmp_path):
    text = GOOD.replace("        feild: $rule\n", "        field: $rule\n").replace(
        "    oversize: reject\n",
        "    capture:\n      - name: c\n        from: $msg\n        pattern: \"(%d+) ([a(]) (x)\"\n"
        "        fields: [a, b]\n    oversize: reject\n")
    assert any("fields: the pattern has 3 captures but 2 field names" in p
               for p in problems_of(tmp_path, text))


EVIL = 'a"b\\c]]\n\r\x00--[[ os.exit(1) ]] é\u2028\U0001F600 \\ddd \\065'


def test_lua_data_is_inert_and_exact():
    text = luadata.dumps({"s": EVIL, "n": [1, -2, 0.5, True, {"k": EVIL}]}, header="x\n]] y")
    lua = luaharness.new_runtime()
    load = lua.execute(b"return function(t) local f, e = load(t, '=c', 't', {}); "
                       b"if not f then return nil, e end; return f() end")
    out = load(text.encode())
    value = luaharness.from_lua(out, lua)
    assert value == {"s": EVIL, "n": [1, -2, 0.5, True, {"k": EVIL}]}
    for bad in (float("nan"), None, 2**60, {1: "x"}):
        with pytest.raises(ValueError):
            luadata.dumps({"v": bad})


def test_compile_writes_a_file_the_mapper_loads(tmp_path, capsys):
    src = tmp_path / "m.yaml"
    src.write_text(GOOD.replace("        feild: $rule\n", "        field: $rule\n"))
    out = tmp_path / "rules.lua"
    assert main(["mappings", "compile", str(src), "-o", str(out), "--event-version", "1.0"]) == 0
    text = out.read_text()
    assert text.startswith("-- Compiled") and "return {" in text
    res = LuaMapper.from_file(out).map("falco.x", 1764237600.0, {"user": "root", "rule": "R"})
    assert res.event["version"] == "1.0" and res.event["eventName"] == "R"
    # a failing compile leaves the previous file in place
    src.write_text(GOOD)
    assert main(["mappings", "compile", str(src), "-o", str(out)]) == 1
    assert out.read_text() == text


def test_compiled_file_with_code_is_refused(tmp_path):
    bad = tmp_path / "evil.lua"
    bad.write_text('return { format = 1, rules = os.exit(3) }')
    from cloudtrail_sink.mappings import MapperLoadError
    with pytest.raises(MapperLoadError, match=r"evil\.lua failed to evaluate: .*'os'"):
        LuaMapper.from_file(bad)


def test_mappings_test_refuses_a_compiled_file_that_never_finishes(tmp_path):
    """A hand-written compiled file that loops gets the filter's instruction cap: `mappings
    test` names the file and exits 1 instead of hanging (the timeout fails the test if not)."""
    loop = tmp_path / "loop.lua"
    loop.write_text("local n = 0\nwhile true do n = n + 1 end\nreturn { format = 1 }\n")
    record = tmp_path / "record.json"
    record.write_text('{"user": "alice"}\n')
    done = subprocess.run([sys.executable, "-m", "cloudtrail_sink", "mappings", "test",
                           "--tag", "app.auth", "-m", str(loop), str(record)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stdout == ""
    # (Lua shortens the position's file name to its last 60 characters; the message starts
    # with the whole one)
    assert done.stderr.startswith(f"cannot load the mappings: mappings {loop} failed to evaluate: ")
    assert "loop.lua:2: does not finish (more than 20000000 instructions)" in done.stderr


CHECKED = """\
rules:
  - name: only-app
    match: {tag: "app.*"}
    oversize: reject
    event:
      userIdentity: {type: T, principalId: $user}
      eventSource: s
      eventName: $what
examples:
  - name: maps
    tag: app.a
    time: 1764237600
    record: {user: u, what: w, id: 1}
    rule: only-app
    expect:
      eventSource: s
      eventName: w
      eventTime: "2025-11-27T10:00:00Z"
      UID: %s
      userIdentity: {type: T, principalId: u}
  - name: refused
    tag: other
    record: {user: u}
    expect_rejected: "no mapping rule matched tag 'other'"
  - name: no eventName
    tag: app.b
    record: {user: u}
    expect_rejected: "eventName has no value"
"""


def test_check_runs_expect_and_expect_rejected(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    mapper = LuaMapper(compile_files([_write(path, CHECKED % "x")]).lua_text())
    uid = mapper.map("app.a", 1764237600, {"user": "u", "what": "w", "id": 1}).event["UID"]
    _write(path, CHECKED % uid)
    assert main(["mappings", "check", str(path)]) == 0
    assert "3 examples passed, 0 failed" in capsys.readouterr().out
    # each kind of example fails when the rules change under it
    _write(path, (CHECKED % uid).replace("eventName: $what", "eventName: {first: [$what, x]}")
           .replace('tag: "app.*"', 'tag: "*"'))
    assert main(["mappings", "check", str(path)]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "refused: expected a rejection, got an event" in out
    assert "no eventName: expected a rejection" in out and "1 examples passed, 2 failed" in out


def _write(path, text):
    path.write_text(text)
    return path
