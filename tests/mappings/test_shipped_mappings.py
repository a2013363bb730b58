"""The shipped mappings: every file's examples pass, and realistic records map as users expect.

The NeuVector records are the two real syslog lines from the issue, split the way Fluent Bit's
syslog-rfc5424 parser splits them (same regular expression), so the test covers the path a
real line takes.
"""

from __future__ import annotations

import json
import pathlib
import re
import shutil

from cloudtrail_sink import schema
from cloudtrail_sink.cli import main
from cloudtrail_sink.mappings import LuaMapper, check_examples, compile_files
from cloudtrail_sink.mappings.runner import filled

SHIPPED = pathlib.Path(__file__).resolve().parents[2] / "mappings"

# Fluent Bit's parsers.conf: syslog-rfc5424
RFC5424 = re.compile(r"^\<(?P<pri>[0-9]{1,5})\>1 (?P<time>[^ ]+) (?P<host>[^ ]+) (?P<ident>[^ ]+) "
                     r"(?P<pid>[-0-9]+) (?P<msgid>[^ ]+) (?P<extradata>(\[(.*?)\]|-)) (?P<message>.+)$")

NV_KV = ("<12>1 2020-01-24T21:39:29.000Z neuvector-controller-pod-575f94dccf-rccmt /usr/local/bin/controller 12 neuvector - notification=incident,name=Process.Profile.Violation,level=Warning,reported_timestamp=1579901965,reported_at=2020-01-24T21:39:25Z,cluster_name=cluster.local,host_id=k43:HF45:AJC6:5RYO:O5OA:KACD:KRT2:M3O6:P3VQ:IC4I:FSRD:P3HJ:ETLS,host_name=k43,enforcer_id=90822bad25eea14180c0942bf30197528bdab8c8237f307cc3059e6bbdb91f7a,enforcer_name=k8s_neuvector-enforcer-pod_neuvector-enforcer-pod-cg8jp_neuvector_d4ef187e-041c-4bc2-9cdc-c563a3feac6c_0,workload_id=d1be6d14f1f2782029d0944040ea8c0ba581991de99df86041205e15abc80209,workload_name=k8s_node-pod_node-pod-7c57bdbf5d-dxkn4_default_cdd9cf23-488d-439c-9408-ed98f838c67b_0,workload_domain=default,workload_image=nvbeta/node:latest,workload_service=node-pod.default,proc_name=curl,proc_path=/usr/bin/curl,proc_cmd=curl google.com,proc_effective_uid=1000,proc_effective_user=neuvector,client_ip=,server_ip=,client_port=0,server_port=0,server_conn_port=0,ether_type=0,ip_proto=0,conn_ingress=false,proc_parent_name=docker-runc,proc_parent_path=/usr/bin/docker-runc,action=violate,group=nv.node-pod.default,aggregation_from=1579901965,count=1,message=Process profile violation")
NV_JSON = ('<12>1 2024-10-10T10:40:08.000Z neuvector-controller-pod-85d85c976-vzxqx /usr/local/bin/controller 12 neuvector - {"notification": "incident", "name":"Container.Suspicious.Process","level":"Warning","reported_timestamp":1728559008,"reported_at":"2024-10-10T11:16:48Z","cluster_name":"cluster.local","host_id":"ip-10-0-0-60:ec2762b0-e7fc-8ece-9a0a-9e421712cfc1","host_name":"ip-10-0-0-60","enforcer_id":"77a95fdf8019aa962eba5ca1d7758fd35e1c2168241483b2c7648b1485cbeeb4","enforcer_name":"neuvector-enforcer-pod-mh9gk","id":"680d3d31-ba0a-4a87-b6ab-799ef8615a76","workload_id":"8ce5890a508ec41cdd66eb6bae66f315c59faccdece8aaafe1b9621c45464f78","workload_name":"instance-manager-4e77d195a50f5adbdaf84e668fde5082","workload_domain":"longhorn-system","workload_image":"docker.io/rancher/mirrored-longhornio-longhorn-instance-manager:v1.6.2","workload_service":"instance-manager.longhorn-system","proc_name":"nc","proc_path":"/usr/bin/nc","proc_cmd":"nc -zv localhost 8503","proc_effective_user":"root","proc_parent_name":"sh","proc_parent_path":"/usr/bin/bash","action":"violate","group":"nv.instance-manager.longhorn-system","rule_id":"00000000-0000-0000-0000-000000000001","aggregation_from":1728558943,"count":12,"message":"Risky application: netcat process"}')


def parse_5424(line: str) -> dict:
    m = RFC5424.match(line)
    assert m, line
    return {k: v for k, v in m.groupdict().items()}


def test_check_passes_on_all_shipped_files(capsys):
    assert main(["mappings", "check", str(SHIPPED)]) == 0
    out = capsys.readouterr().out
    assert "FAIL" not in out and "no examples" not in out
    compiled = compile_files([SHIPPED])
    files = {ex.file for ex in compiled.examples}
    assert len(files) == len(compiled.files) == 5
    assert all(r.ok for r in check_examples(compiled))


def test_check_fails_when_a_shipped_rule_breaks(tmp_path, capsys):
    work = tmp_path / "mappings"
    shutil.copytree(SHIPPED, work)
    nv = work / "10-neuvector.yaml"
    nv.write_text(nv.read_text().replace("eventName: {first: [\"$nv['name']\"",
                                         "eventName: {first: [\"$nv['nmae']\""))
    assert main(["mappings", "check", str(work)]) == 1
    out = capsys.readouterr().out
    assert "FAIL mappings" not in out  # paths are the copies
    broken = [ex for ex in compile_files([SHIPPED]).examples
              if ex.rule and ex.rule.startswith("neuvector")]
    assert len(broken) >= 8 and out.count("FAIL") == len(broken) and "eventName" in out


def test_neuvector_key_value_line(shipped_mapper):
    rec = parse_5424(NV_KV)
    res = shipped_mapper.map("syslog.neuvector", 1579901969.0, rec)
    ev = res.event
    assert res.rule == "neuvector"
    assert ev["eventSource"] == "neuvector.incident"
    assert ev["eventName"] == "Process.Profile.Violation"
    assert ev["eventTime"] == "2020-01-24T21:39:25Z"            # reported_at, not syslog time
    assert ev["requestParameters"]["commandLine"] == "curl google.com"
    assert ev["responseElements"]["message"] == "Process profile violation"
    assert "client_ip" not in ev["additionalEventData"]             # empty: not stored
    assert "sourceIPAddress" not in ev                         # empty client_ip: no address
    assert schema.check_event(filled(ev), "123456789012") is None
    # no id in a key=value payload: the UID is a hash, stable across runtimes
    again = LuaMapper(compile_files([SHIPPED]).lua_text()).map("syslog.neuvector", 1579901969.0,
                                                                dict(reversed(list(rec.items()))))
    assert again.event["UID"] == ev["UID"] and len(ev["UID"]) == 32
    other = dict(rec, message=rec["message"].replace("count=1", "count=2"))
    assert shipped_mapper.map("syslog.neuvector", 1579901969.0, other).event["UID"] != ev["UID"]


def test_neuvector_message_with_commas_and_equals_stays_whole(shipped_mapper):
    rec = parse_5424(NV_KV.replace("message=Process profile violation",
                                   "message=Process profile violation, rule=x,y=z"))
    ev = shipped_mapper.map("syslog.neuvector", 1.0, rec).event
    assert ev["responseElements"]["message"] == "Process profile violation, rule=x,y=z"


def test_neuvector_json_line(shipped_mapper):
    ev = shipped_mapper.map("syslog.neuvector", 1728556808.0, parse_5424(NV_JSON)).event
    assert ev["UID"] == "680d3d31-ba0a-4a87-b6ab-799ef8615a76"
    assert ev["eventName"] == "Container.Suspicious.Process"
    assert ev["eventTime"] == "2024-10-10T11:16:48Z"
    assert ev["userIdentity"] == {
        "type": "NeuVectorWorkload",
        "principalId": "instance-manager-4e77d195a50f5adbdaf84e668fde5082",
        "details": {"workloadId": "8ce5890a508ec41cdd66eb6bae66f315c59faccdece8aaafe1b9621c45464f78",
                    "workloadDomain": "longhorn-system",
                    "workloadImage": "docker.io/rancher/mirrored-longhornio-longhorn-instance-manager:v1.6.2",
                    "workloadService": "instance-manager.longhorn-system",
                    "hostName": "ip-10-0-0-60", "clusterName": "cluster.local",
                    "processUser": "root"}}
    assert ev["responseElements"]["count"] == 12
    assert schema.check_event(filled(ev), "123456789012") is None


def test_unknown_records_keep_everything(shipped_mapper):
    rec = {"a": {"b": [1, 2.5, "x"]}, "n": -3}
    res = shipped_mapper.map("app.x", 1764237600.0, rec)
    assert res.rule == "catch-all"
    assert res.event["additionalEventData"] == rec
    assert res.event["eventName"] == "app.x"


# An audit notification as NeuVector's controller writes it (controller/common/output.go:
# `notification=audit,` then the Audit struct's fields in order: message comes before user=).
NV_AUDIT = ("<12>1 2024-10-10T10:41:40.000Z neuvector-controller-pod-85d85c976-vzxqx "
            "/usr/local/bin/controller 12 neuvector - notification=audit,"
            "name=Admission.Control.Violation,level=Warning,reported_timestamp=1728556900,"
            "reported_at=2024-10-10T10:41:40Z,cluster_name=cluster.local,host_id=,host_name=,"
            "enforcer_id=,enforcer_name=,workload_domain=default,workload_image=nginx:1.25,"
            "critical_vul_cnt=0,high_vul_cnt=3,medium_vul_cnt=12,message=Creation of Kubernetes "
            "Pod resource (web-0) violates Admission Control monitor-mode rule(s). Container web "
            "violates deny rule id 1000 with criteria: (image scanned = false), deny rule id 1001."
            ",user=kubernetes-admin,aggregation_from=1728556900,count=1")


def test_neuvector_audit_user_is_the_kubernetes_identity_not_the_controller(shipped_mapper):
    rec = parse_5424(NV_AUDIT)
    res = shipped_mapper.map("syslog.neuvector", 1728556900.5, rec)
    ev = res.event
    assert res.rule == "neuvector-audit-user"
    assert ev["userIdentity"] == {
        "type": "KubernetesUser", "principalId": "kubernetes-admin",
        "details": {"authenticatedBy": "kubernetes", "clusterName": "cluster.local",
                    "namespace": "default"}}
    assert "controller" not in ev["userIdentity"]["principalId"]
    # the message keeps its commas and ends where user= starts
    assert ev["responseElements"]["message"].endswith("deny rule id 1001.")
    assert ev["eventName"] == "Admission.Control.Violation"
    assert ev["eventTime"] == "2024-10-10T10:41:40Z"
    assert schema.check_event(filled(ev), "123456789012") is None
    # the same record gives the same UID; another record another
    again = shipped_mapper.map("syslog.neuvector", 1728556900.5, dict(reversed(list(rec.items()))))
    assert again.event["UID"] == ev["UID"]
    other = dict(rec, message=rec["message"].replace("count=1", "count=2"))
    assert shipped_mapper.map("syslog.neuvector", 1728556900.5, other).event["UID"] != ev["UID"]


def test_neuvector_audit_user_in_json_payloads_too(shipped_mapper):
    rec = parse_5424(NV_JSON.replace('{"notification": "incident"', '{"notification": "audit"')
                     .replace('"proc_name":"nc"', '"user":"system:serviceaccount:ci:deployer"'))
    res = shipped_mapper.map("syslog.neuvector", 1728556808.0, rec)
    assert res.rule == "neuvector-audit-user"
    assert res.event["userIdentity"]["principalId"] == "system:serviceaccount:ci:deployer"
    assert res.event["userIdentity"]["type"] == "KubernetesUser"


def test_sshd_invalid_user_is_the_principal_noted_invalid(shipped_mapper):
    for message, name in [
            ("Failed password for invalid user admin from 198.51.100.7 port 40022 ssh2",
             "FailedLogin"),
            ("Invalid user admin from 198.51.100.7 port 40022", "InvalidUser"),
            ("Connection closed by invalid user admin 198.51.100.7 port 40022 [preauth]",
             "ConnectionClosed"),
            ("error: maximum authentication attempts exceeded for invalid user admin from "
             "198.51.100.7 port 40022 ssh2 [preauth]", "MaxAuthTriesExceeded")]:
        rec = {"pri": "38", "time": "Jan 24 21:40:00", "host": "bastion-1", "ident": "sshd",
               "pid": "48377", "message": message}
        ev = shipped_mapper.map("syslog.auth", 1737754800.0, rec).event
        assert ev["userIdentity"] == {"type": "UnixUser", "principalId": "admin",
                                      "details": {"userState": "invalid"}}, message
        assert ev["eventName"] == name
        assert ev["sourceIPAddress"] == "198.51.100.7"
        assert ev["eventTime"] == "2025-01-24T21:40:00Z"


def _leaves(value, out):
    if isinstance(value, dict):
        for v in value.values():
            _leaves(v, out)
    elif isinstance(value, list):
        for v in value:
            _leaves(v, out)
    elif isinstance(value, str) and len(value) >= 6:
        out.append(value)
    return out


def test_every_shipped_example_maps_to_the_right_time_a_stable_uid_and_lean_events():
    """UTC time to the second, a UID stable for the same record, every source field stored at
    most once (no payload copy next to the fields taken from it), and events about the size of
    their record at most (CloudTrail Lake bills per byte; field names cost a little)."""
    compiled = compile_files([SHIPPED])
    mapper = LuaMapper(compiled.lua_text())
    checked = 0
    for ex in compiled.examples:
        if ex.expect is None:
            continue
        res = mapper.map(ex.tag, ex.time, ex.record)
        ev = res.event
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", ev["eventTime"]), ex.name
        again = mapper.map(ex.tag, ex.time, dict(reversed(list(ex.record.items()))))
        assert again.event["UID"] == ev["UID"], ex.name
        if res.rule == "catch-all":
            continue  # keeps the whole record on purpose
        counts: dict[str, int] = {}
        for leaf in _leaves(ev, []):
            counts[leaf] = counts.get(leaf, 0) + 1
        source = _leaves(ex.record, [])
        for text in ex.record.values():  # decoded payloads: the values inside the text
            if isinstance(text, str) and text.startswith("{"):
                source += _leaves(json.loads(text), [])
            elif isinstance(text, str) and "=" in text:
                source += _leaves(dict(kv.split("=", 1) for kv in text.split(",") if "=" in kv), [])
        for leaf, n in counts.items():
            allowed = source.count(leaf)
            if not allowed:
                continue  # a literal of the rule, not a source field
            if res.rule.startswith("kubernetes-audit") and leaf in ex.record.get("sourceIPs", []):
                allowed += 1  # sourceIPAddress is the first of sourceIPs, kept whole
            assert n <= allowed, (ex.name, leaf, n)
        event_bytes = len(schema.dumps(ev).encode())
        record_bytes = len(schema.dumps(ex.record).encode())
        # CloudTrail field names and literals cost a fixed few hundred bytes at most; a copy of
        # the payload (886 -> 1,413 bytes for a NeuVector incident before) would not fit
        assert event_bytes <= record_bytes + 300, (ex.name, event_bytes, record_bytes)
        checked += 1
    assert checked >= 30


def audit_record(stage: str, verb: str, resource: str, subresource: str | None = None,
                 code: int | None = None, audit_id: str = "a-1") -> dict:
    """A Kubernetes audit.k8s.io/v1 Event as the API server writes it for one stage."""
    ref = {"resource": resource, "namespace": "default", "name": "web-0", "apiVersion": "v1"}
    if subresource:
        ref["subresource"] = subresource
    rec = {"kind": "Event", "apiVersion": "audit.k8s.io/v1", "level": "Metadata",
           "auditID": audit_id, "stage": stage, "verb": verb,
           "requestURI": f"/api/v1/namespaces/default/{resource}/web-0",
           "user": {"username": "bob", "groups": ["system:authenticated"]},
           "sourceIPs": ["203.0.113.9"], "objectRef": ref,
           "requestReceivedTimestamp": "2025-11-27T10:00:02.500000Z",
           "stageTimestamp": "2025-11-27T10:00:02.600000Z"}
    if code is not None:
        rec["responseStatus"] = {"metadata": {}, "code": code}
    return rec


# Every stage the API server writes for one request (k8s.io/apiserver endpoints/filters/audit.go:
# RequestReceived, then ResponseStarted for long-running requests, then ResponseComplete, or
# Panic instead), and which of them become events by default.
REQUESTS = {
    "get a pod": ([("RequestReceived", None), ("ResponseComplete", 200)], ["ResponseComplete"]),
    "watch pods": ([("RequestReceived", None), ("ResponseStarted", 200),
                    ("ResponseComplete", 200)], ["ResponseComplete"]),
    "a panic": ([("RequestReceived", None), ("Panic", 500)], ["Panic"]),
    # a session into a pod: the start is kept, its end may come hours later or never
    "exec": ([("RequestReceived", None), ("ResponseStarted", 101), ("ResponseComplete", 101)],
             ["ResponseStarted", "ResponseComplete"]),
    "attach": ([("RequestReceived", None), ("ResponseStarted", 101)], ["ResponseStarted"]),
    "portforward": ([("RequestReceived", None), ("ResponseStarted", 101)], ["ResponseStarted"]),
}
SHAPE = {"get a pod": ("get", "pods", None), "watch pods": ("watch", "pods", None),
         "a panic": ("create", "pods", None), "exec": ("create", "pods", "exec"),
         "attach": ("create", "pods", "attach"), "portforward": ("create", "pods", "portforward")}


def test_kubernetes_audit_one_event_per_request_and_the_start_of_every_session(shipped_mapper):
    for name, (stages, kept) in REQUESTS.items():
        verb, resource, sub = SHAPE[name]
        made = []
        for stage, code in stages:
            res = shipped_mapper.map("kube.audit", 1764237602.0,
                                     audit_record(stage, verb, resource, sub, code))
            assert res.event is not None or res.dropped, (name, stage, res.reason)
            if res.event is not None:
                assert res.event["UID"] == f"a-1-{stage}"
                assert res.event["userIdentity"]["principalId"] == "bob"
                assert res.event["eventTime"] == "2025-11-27T10:00:02Z"
                made.append(stage)
        assert made == kept, name


def test_kubernetes_audit_switch_keeps_every_stage(tmp_path):
    """The documented switch (also what an audit policy omitting ResponseComplete needs)."""
    work = tmp_path / "mappings"
    shutil.copytree(SHIPPED, work)
    k8s = work / "20-kubernetes-audit.yaml"
    text = k8s.read_text()
    rule = "  - name: kubernetes-audit-not-final-stage\n"
    assert text.count(rule) == 1
    k8s.write_text(text.replace(rule, rule + "    enabled: false\n"))
    mapper = LuaMapper(compile_files([work]).lua_text())
    for name, (stages, _) in REQUESTS.items():
        verb, resource, sub = SHAPE[name]
        for stage, code in stages:
            res = mapper.map("kube.audit", 1764237602.0,
                             audit_record(stage, verb, resource, sub, code))
            assert res.event is not None and res.rule.startswith("kubernetes-audit"), (name, stage)
            assert res.event["UID"] == f"a-1-{stage}"
