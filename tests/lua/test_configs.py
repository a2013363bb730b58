"""Fluent Bit YAML configs, checked structurally (no Fluent Bit binary exists here).

Every section and plugin key must be one Fluent Bit 5.1 knows; the Lua filter must point at the
real script and function; the tick must exist and reach the filter; every input must reach the
filter; syslog lines in both RFC formats must split into the fields the mappings use. Then one
syslog line goes parser -> Lua filter (shipped mappings) -> spool. Records the filter could not
spool must reach the `unspooled` file output on the spool volume, and the replay documented in
docs/fluent-bit.md must send them back with their tag and time.
"""

from __future__ import annotations

import fnmatch
import io
import json
import os
import pathlib
import re
import socket
import struct
import subprocess
import sys
import textwrap
import threading

import msgpack
import pytest
import yaml

from cloudtrail_sink.mappings import compile_files

from .conftest import ACCOUNT, START, read_folder

FB = pathlib.Path(__file__).resolve().parents[2] / "fluent-bit"
CONFIGS = ["fluent-bit.yaml", "fluent-bit-kubernetes.yaml"]

SERVICE_KEYS = {
    "flush", "grace", "daemon", "dns.mode", "dns.resolver", "log_file", "log_level",
    "parsers_file", "plugins_file", "streams_file", "http_server", "http_listen", "http_port",
    "health_check", "hc_errors_count", "hc_retry_failure_count", "hc_period", "hot_reload",
    "storage.path", "storage.sync", "storage.checksum", "storage.backlog.mem_limit",
    "storage.metrics", "storage.max_chunks_up", "scheduler.cap", "scheduler.base",
    "coro_stack_size", "json.convert_nan_to_null",
}
INPUT_COMMON = {"name", "tag", "alias", "log_level", "mem_buf_limit", "storage.type", "threaded",
                "routable", "processors", "storage.pause_on_chunks_overlimit",
                "log_suppress_interval"}
FILTER_COMMON = {"name", "match", "match_regex", "alias", "log_level"}
TLS = {"tls", "tls.verify", "tls.debug", "tls.ca_file", "tls.crt_file", "tls.key_file",
       "tls.vhost"}
INPUT_KEYS = {
    "syslog": {"mode", "listen", "port", "path", "unix_perm", "parser", "buffer_chunk_size",
               "buffer_max_size", "receive_buffer_size", "source_address_key",
               "raw_message_key"} | TLS,
    "forward": {"listen", "port", "unix_path", "unix_perm", "buffer_chunk_size",
                "buffer_max_size", "tag_prefix", "shared_key", "self_hostname",
                "security.users", "empty_shared_key"} | TLS,
    "tail": {"path", "exclude_path", "path_key", "offset_key", "buffer_chunk_size",
             "buffer_max_size", "skip_long_lines", "skip_empty_lines", "read_from_head",
             "refresh_interval", "rotate_wait", "ignore_older", "db", "db.sync", "db.locking",
             "db.journal_mode", "db.compare_filename", "parser", "key", "inotify_watcher",
             "tag_regex", "static_batch_size", "file_cache_advise", "multiline.parser",
             "multiline.key_content", "docker_mode", "docker_mode_flush", "docker_mode_parser",
             "exit_on_eof", "unicode.encoding", "generic.encoding"},
    "dummy": {"dummy", "metadata", "rate", "interval_sec", "interval_nsec", "samples", "copies",
              "start_time_sec", "start_time_nsec", "fixed_timestamp", "flush_on_startup"},
}
FILTER_KEYS = {
    "lua": {"script", "code", "call", "protected_mode", "time_as_table", "type_int_key",
            "type_array_key", "enable_flb_null"},
    "parser": {"key_name", "parser", "preserve_key", "reserve_data", "unescape_key"},
    "kubernetes": {"buffer_size", "kube_url", "kube_ca_file", "kube_ca_path", "kube_token_file",
                   "kube_token_ttl", "kube_tag_prefix", "merge_log", "merge_parser",
                   "merge_log_key", "merge_log_trim", "keep_log", "tls.debug", "tls.verify",
                   "use_journal", "cache_use_docker_id", "regex_parser", "k8s-logging.parser",
                   "k8s-logging.exclude", "labels", "annotations",
                   "kube_meta_preload_cache_dir", "dummy_meta", "dns_retries", "dns_wait_time",
                   "use_kubelet", "kubelet_host", "kubelet_port", "kube_meta_cache_ttl",
                   "namespace_labels", "namespace_annotations", "owner_references"},
}
OUTPUT_COMMON = {"name", "match", "match_regex", "alias", "log_level", "retry_limit",
                 "storage.total_limit_size", "workers", "processors"}
OUTPUT_KEYS = {
    "file": {"path", "file", "format", "delimiter", "label_delimiter", "template",
             "csv_column_names", "mkdir"},
}
PARSER_KEYS = {"name", "format", "regex", "time_key", "time_format", "time_keep", "time_offset",
               "time_strict", "types", "decode_field", "decode_field_as", "skip_empty_values"}


def load(name: str) -> dict:
    return yaml.safe_load((FB / name).read_text())


def parsers() -> dict[str, dict]:
    doc = load("parsers.yaml")
    assert set(doc) == {"parsers"}
    out = {}
    for p in doc["parsers"]:
        assert set(p) <= PARSER_KEYS, set(p) - PARSER_KEYS
        out[p["name"]] = p
    return out


def as_list(value) -> list:
    if isinstance(value, list):
        return value
    return [v.strip() for v in str(value).split(",")] if "," in str(value) else [value]


def tag_matches(pattern: str, tag: str) -> bool:
    return fnmatch.fnmatchcase(tag, pattern)


@pytest.fixture(params=CONFIGS)
def config(request):
    return request.param, load(request.param)


def test_sections_and_keys_are_known(config):
    name, doc = config
    assert set(doc) <= {"service", "includes", "pipeline", "parsers", "env"}
    assert set(doc["service"]) <= SERVICE_KEYS, set(doc["service"]) - SERVICE_KEYS
    assert set(doc["pipeline"]) <= {"inputs", "filters", "outputs"}
    for item in doc["pipeline"]["inputs"]:
        known = INPUT_COMMON | INPUT_KEYS[item["name"]]
        assert set(item) <= known, (name, item["name"], set(item) - known)
    for item in doc["pipeline"]["filters"]:
        known = FILTER_COMMON | FILTER_KEYS[item["name"]]
        assert set(item) <= known, (name, item["name"], set(item) - known)
        assert "match" in item
    for item in doc["pipeline"].get("outputs", []):
        known = OUTPUT_COMMON | OUTPUT_KEYS[item["name"]]
        assert set(item) <= known, (name, item["name"], set(item) - known)
        assert ("match" in item) != ("match_regex" in item), item
    for include in doc.get("includes", []):
        assert (FB / include).is_file()


def test_http_server_and_health_on_2020(config):
    _, doc = config
    svc = doc["service"]
    assert svc["http_server"] is True and svc["http_port"] == 2020 and svc["health_check"] is True


def test_lua_filter_points_at_the_entry_and_is_last(config):
    _, doc = config
    filters = doc["pipeline"]["filters"]
    lua = filters[-1]
    assert lua["name"] == "lua" and lua["call"] == "cb_cloudtrail"
    script = FB / lua["script"]
    assert script.is_file()
    assert re.search(r"^function cb_cloudtrail\(tag, timestamp, record\)", script.read_text(), re.M)
    assert lua.get("protected_mode", True) is True
    assert [f for f in filters if f["name"] == "lua"] == [lua]


def test_tick_exists_and_every_input_reaches_the_filter(config):
    _, doc = config
    lua = doc["pipeline"]["filters"][-1]
    ticks = [i for i in doc["pipeline"]["inputs"] if i["name"] == "dummy"]
    assert len(ticks) == 1 and ticks[0]["tag"] == "cloudtrail.tick" and ticks[0]["rate"] == 1
    assert tag_matches(lua["match"], "cloudtrail.tick")
    for item in doc["pipeline"]["inputs"]:
        tag = item.get("tag", "any.forwarded.tag").replace("*", "var.log.x.log")
        assert tag_matches(lua["match"], tag), item


def routes_to(output: dict, tag: str) -> bool:
    """Fluent Bit's router: `match` is a wildcard pattern, `match_regex` an Onigmo regex searched
    in the tag (Python's `re` reads these patterns the same way)."""
    if "match_regex" in output:
        return re.search(output["match_regex"], tag) is not None
    return tag_matches(output["match"], tag)


DEPLOYED_SPOOL = "/var/spool/cloudtrail"  # CLOUDTRAIL_SPOOL_DIR in compose.yaml and the DaemonSet


def test_records_the_filter_could_not_spool_are_kept_in_the_spool_volume(config):
    """A record the Lua filter returns with code 0 (modules not loaded, unexpected error, spool
    folder not writable) goes on to the outputs; with none matching, Fluent Bit drops it (and
    refuses to start with no output at all). Every tag the filter sees, except the tick it
    always drops, must reach the one `file` output in <spool>/unspooled, in the default format
    that keeps tag and time for the replay."""
    name, doc = config
    lua = doc["pipeline"]["filters"][-1]
    [out] = doc["pipeline"]["outputs"]
    assert out["name"] == "file" and out["alias"] == "unspooled"
    assert out["path"] == DEPLOYED_SPOOL + "/unspooled" and out["mkdir"] is True
    assert "format" not in out  # `TAG: [TIME, JSON]`: tag and time kept
    assert out["file"] == "records.log"  # one file: a tag never becomes a path
    tags = ["syslog", "kube.audit", "any.forwarded.tag", "x", "cloudtrail.tick.not", "a*b",
            "cloudtrail.ticks", "kube.var.log.containers.app_default_app-123.log"]
    for item in doc["pipeline"]["inputs"]:
        tags.append(item.get("tag", "any.forwarded.tag").replace("*", "var.log.x.log"))
    for tag in tags:
        if tag == "cloudtrail.tick":
            continue
        assert tag_matches(lua["match"], tag) and routes_to(out, tag), (name, tag)
    assert not routes_to(out, "cloudtrail.tick")


def test_the_unspooled_folder_exists_where_the_deployments_put_the_spool():
    compose = yaml.safe_load((FB.parent / "compose.yaml").read_text())
    env = compose["services"]["fluent-bit"]["environment"]
    assert env["CLOUDTRAIL_SPOOL_DIR"] == DEPLOYED_SPOOL
    assert any(v.endswith(":" + DEPLOYED_SPOOL) for v in compose["services"]["fluent-bit"]["volumes"])
    ds = yaml.safe_load((FB.parent / "deploy/kubernetes/base/daemonset.yaml").read_text())
    pod = ds["spec"]["template"]["spec"]
    fb = next(c for c in pod["containers"] if c["name"] == "fluent-bit")
    assert {"name": "CLOUDTRAIL_SPOOL_DIR", "value": DEPLOYED_SPOOL} in fb["env"]
    # Created group-writable up front: Fluent Bit (uid 0, gid 10001, no capabilities) writes
    # there through its group, and the sink container's user can move replayed files away.
    prepare = next(c for c in pod["initContainers"] if c["name"] == "prepare-spool")
    assert DEPLOYED_SPOOL + "/unspooled" in prepare["command"]


def test_inputs_listen_where_documented(config):
    _, doc = config
    inputs = {i["name"]: i for i in doc["pipeline"]["inputs"]}
    assert inputs["syslog"]["mode"] == "tcp" and inputs["syslog"]["port"] == 5140
    assert inputs["forward"]["port"] == 24224


def test_every_parser_named_exists(config):
    _, doc = config
    known = parsers()
    for item in doc["pipeline"]["inputs"] + doc["pipeline"]["filters"]:
        if item["name"] in ("syslog", "tail", "parser") and "parser" in item:
            for name in as_list(item["parser"]):
                assert name in known, name


def test_syslog_is_parsed_before_the_lua_filter(config):
    _, doc = config
    names = [f["name"] for f in doc["pipeline"]["filters"]]
    parser = doc["pipeline"]["filters"][names.index("parser")]
    assert names.index("parser") < names.index("lua")
    assert as_list(parser["parser"]) == ["syslog-rfc5424", "syslog-rfc3164"]
    assert parser["key_name"] == "message" and tag_matches(parser["match"], "syslog")


def test_kubernetes_variant_reads_container_logs_and_the_audit_log():
    doc = load("fluent-bit-kubernetes.yaml")
    tails = [i for i in doc["pipeline"]["inputs"] if i["name"] == "tail"]
    containers = next(t for t in tails if t["path"] == "/var/log/containers/*.log")
    assert containers["multiline.parser"] == "docker, cri" and containers["tag"] == "kube.*"
    audit = next(t for t in tails if "audit" in t["path"])
    assert audit["tag"] == "kube.audit" and audit["parser"] == "cloudtrail-json"
    k8s = next(f for f in doc["pipeline"]["filters"] if f["name"] == "kubernetes")
    assert tag_matches(k8s["match"], "kube.var.log.containers.app_default_app-123.log")
    assert not tag_matches(k8s["match"], "kube.audit")
    assert k8s["k8s-logging.exclude"] is False  # pods cannot opt out of an audit trail
    assert all(t["db"].startswith("/var/lib/fluent-bit/") for t in tails)


def onigmo_to_python(regex: str) -> re.Pattern:
    return re.compile(regex.replace("(?<", "(?P<"))


def parse_syslog(line: str) -> dict | None:
    known = parsers()
    for name in ("syslog-rfc5424", "syslog-rfc3164"):
        m = onigmo_to_python(known[name]["regex"]).match(line)
        if m:
            return {k: v for k, v in m.groupdict().items() if v is not None}
    return None


@pytest.mark.parametrize("line, fields", [
    ("<34>1 2026-11-27T10:00:00.123Z web1 sshd 4711 ID47 - Accepted password for bob from "
     "10.0.0.5 port 5022 ssh2",
     {"pri": "34", "time": "2026-11-27T10:00:00.123Z", "host": "web1", "ident": "sshd",
      "pid": "4711", "msgid": "ID47", "extradata": "-",
      "message": "Accepted password for bob from 10.0.0.5 port 5022 ssh2"}),
    ('<165>1 2026-11-27T10:00:00Z host app - - [ex@1 k="v\\]x"][b@2 a="1"] hello',
     {"pri": "165", "time": "2026-11-27T10:00:00Z", "host": "host", "ident": "app", "pid": "-",
      "msgid": "-", "extradata": '[ex@1 k="v\\]x"][b@2 a="1"]', "message": "hello"}),
    ("<38>Nov  7 10:00:00 web1 sshd[4711]: Failed password for root from 10.0.0.9 port 22 ssh2",
     {"pri": "38", "time": "Nov  7 10:00:00", "host": "web1", "ident": "sshd", "pid": "4711",
      "message": "Failed password for root from 10.0.0.9 port 22 ssh2"}),
    ("<13>Nov 27 10:00:00 web1 cron: job done",
     {"pri": "13", "time": "Nov 27 10:00:00", "host": "web1", "ident": "cron",
      "message": "job done"}),
])
def test_syslog_parsers_split_both_rfcs(line, fields):
    assert parse_syslog(line) == fields


def test_unparseable_syslog_lines_are_left_whole():
    assert parse_syslog("just some text") is None
    raw = onigmo_to_python(parsers()["syslog-raw"]["regex"]).match("just some text")
    assert raw.groupdict() == {"message": "just some text"}


def test_a_syslog_line_through_parser_filter_and_shipped_mappings(lua_filter, spool, tmp_path):
    compiled = compile_files([FB.parent / "mappings"], defaults={"recipientAccountId": ACCOUNT})
    path = tmp_path / "compiled.lua"
    path.write_text(compiled.lua_text())
    f = lua_filter(real_mapper=True, CLOUDTRAIL_MAPPINGS=str(path))
    record = parse_syslog("<38>Nov 27 10:00:00 web1 sshd[4711]: Accepted publickey for alice "
                          "from 192.0.2.7 port 50022 ssh2: ED25519 SHA256:abc")
    assert f.call("syslog", START, record)[0] == -1
    f.seal()
    [entry] = read_folder(spool, "ready", ".seg")
    event = entry["eventData"]
    assert event["eventName"] == "AcceptedLogin"
    assert event["userIdentity"]["principalId"] == "alice"
    assert event["sourceIPAddress"] == "192.0.2.7"
    assert event["recipientAccountId"] == ACCOUNT


def documented_replay_script() -> str:
    doc = (FB.parent / "docs" / "fluent-bit.md").read_text()
    marker = "<!-- replay-unspooled.py: tests/lua/test_configs.py runs this block -->"
    block = doc.split(marker, 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    return textwrap.dedent(block)


def test_the_documented_replay_sends_unspooled_records_back_with_tag_and_time(
        tmp_path, lua_filter, spool):
    """The recovery in docs/fluent-bit.md: lines as out_file writes them go to a forward input
    (a stand-in on 127.0.0.1 here) with their own tag and time, and the filter then maps them."""
    records = [
        ("syslog", 1764237600, 123456789, parse_syslog(
            "<38>Nov 27 10:00:00 web1 sshd[4711]: Accepted publickey for alice from 192.0.2.7 "
            "port 50022 ssh2: ED25519 SHA256:abc")),
        ("app.x", 1764237601, 5, {"msg": "é ü \" \\ ok", "n": 3, "nested": {"a": [1, 2]}}),
    ]
    folder = tmp_path / "replay-spool" / "unspooled"
    folder.mkdir(parents=True)
    # out_file's default format: "%s: [%PRIu64.%09lu, %s]\n" with Fluent Bit's compact JSON
    (folder / "20261127T100000.replay").write_text("".join(
        f"{tag}: [{sec}.{nsec:09d}, {json.dumps(rec, ensure_ascii=False, separators=(',', ':'))}]\n"
        for tag, sec, nsec, rec in records), encoding="utf-8")
    (folder / "records.log").write_text("not: [to be sent]\n")  # still being written: left alone

    server = socket.create_server(("127.0.0.1", 0))
    received = bytearray()

    def serve():
        conn, _ = server.accept()
        with conn:
            while chunk := conn.recv(65536):
                received.extend(chunk)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        env = {**os.environ, "FORWARD": "127.0.0.1:%d" % server.getsockname()[1],
               "CLOUDTRAIL_SPOOL_DIR": str(folder.parent)}
        done = subprocess.run([sys.executable, "-c", documented_replay_script()], env=env,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert done.stdout == "20261127T100000.replay: 2 records sent\n"
        thread.join(timeout=10)
        assert not thread.is_alive()
    finally:
        server.close()

    sent = list(msgpack.Unpacker(io.BytesIO(bytes(received)), raw=False))
    assert len(sent) == 2
    for (tag, sec, nsec, rec), (s_tag, s_time, s_rec) in zip(records, sent):
        assert s_tag == tag and s_rec == rec
        assert s_time.code == 0 and struct.unpack(">II", s_time.data) == (sec, nsec)

    compiled = compile_files([FB.parent / "mappings"], defaults={"recipientAccountId": ACCOUNT})
    path = tmp_path / "compiled.lua"
    path.write_text(compiled.lua_text())
    f = lua_filter(real_mapper=True, CLOUDTRAIL_MAPPINGS=str(path))
    for s_tag, s_time, s_rec in sent:
        sec, nsec = struct.unpack(">II", s_time.data)
        assert f.call(s_tag, sec + nsec / 1e9, s_rec)[0] == -1
    f.seal()
    events = [e["eventData"] for e in read_folder(spool, "ready", ".seg")]
    assert [e["eventName"] for e in events] == ["AcceptedLogin", "app.x"]
