"""The shipped mappings: every file's examples pass, and realistic records map as users expect.

The NeuVector records are the two real syslog lines from the issue, split the way Fluent Bit's
syslog-rfc5424 parser splits them (same regular expression), so the test covers the path a
real line takes.
"""

from __future__ import annotations

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
