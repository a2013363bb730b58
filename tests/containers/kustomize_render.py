"""Render the kustomizations of deploy/kubernetes: `kubectl kustomize`, else a small renderer.

:func:`render` runs ``kubectl kustomize DIR`` when kubectl is on PATH (it embeds kustomize), with
no flag: what ``kubectl apply -k DIR`` (docs/deploy.md) and GitOps tools do. kustomize's default
load restrictor refuses a file outside the kustomization's folder, and so does the fallback.

Without kubectl, :func:`render_minimal` renders the subset of kustomize these manifests use, so
the schema checks still run: ``resources`` (files and folders holding a kustomization),
``components`` (folders of ``kind: Component``, applied to what the resources gave before the
kustomization's own generators and patches), ``namespace``, ``labels`` (``pairs``, without
selectors), ``configMapGenerator`` (``files``, ``envs``, ``literals``, ``behavior: replace`` or
``merge``, ``options.disableNameSuffixHash``), ``images`` (``newName``, ``newTag``) and ``patches``
(inline JSON6902 ``add`` / ``replace`` operations, or a strategic merge patch, inline or in a
``path`` file, whose lists of containers, volumes, env and mounts merge by name or mountPath and
honour ``$patch: delete``; new items go first, as kustomize puts them), applied to the resources
a ``target`` selects (``group``, ``kind`` and ``name``: regular expressions, as in kustomize;
``name`` may be left out). As kustomize does, once the whole tree is built, a generated
ConfigMap gets its content hash appended to its name (:func:`content_hash`) unless a generator of
that name set ``disableNameSuffixHash`` (a base's choice holds for an overlay's ``merge`` or
``replace``), and every reference by the original name in a pod template (``envFrom``,
``configMapKeyRef``, ``configMap`` and ``projected`` volumes) is rewritten to it. Anything else it
meets is an error, so a kustomization that outgrows it fails loudly rather than renders wrong.
"""

from __future__ import annotations

import copy
import hashlib
import json
import pathlib
import re
import shutil
import subprocess

import yaml

SUPPORTED = {"apiVersion", "kind", "resources", "components", "namespace", "labels",
             "configMapGenerator", "images", "patches"}
# Set on a generated ConfigMap while the tree is built: does it get a hash suffix at the end?
_NEEDS_HASH = "__needs_hash_suffix__"


def render(folder: pathlib.Path) -> list[dict]:
    if shutil.which("kubectl"):
        proc = subprocess.run(["kubectl", "kustomize", str(folder)],
                              capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"kubectl kustomize {folder} failed:\n{proc.stderr}")
        return [d for d in yaml.safe_load_all(proc.stdout) if d]
    return render_minimal(folder)


def _env_file(path: pathlib.Path) -> dict[str, str]:
    data = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            data[key.strip()] = value
    return data


def _inside(folder: pathlib.Path, item: str) -> pathlib.Path:
    path = (folder / item).resolve()
    if not path.is_relative_to(folder.resolve()):
        raise ValueError(f"{folder}: {item} is not in or below the kustomization's folder "
                         "(kustomize's load restrictor refuses it)")
    return path


def _generate(folder: pathlib.Path, spec: dict) -> dict:
    data: dict[str, str] = {}
    for item in spec.get("files", []):
        path = _inside(folder, item)
        data[path.name] = path.read_text()
    for item in spec.get("envs", []):
        data.update(_env_file(_inside(folder, item)))
    for literal in spec.get("literals", []):
        key, sep, value = literal.partition("=")
        if not sep:
            raise ValueError(f"{folder}: configMapGenerator literal {literal!r} is not KEY=VALUE")
        # kustomize strips one pair of matching quotes around the value.
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        data[key] = value
    unknown = set(spec) - {"name", "files", "envs", "literals", "behavior", "options"}
    if set(spec.get("options", {})) - {"disableNameSuffixHash"}:
        raise ValueError(f"{folder}: configMapGenerator options not supported: {spec['options']}")
    if unknown:
        raise ValueError(f"{folder}: configMapGenerator fields not supported: {sorted(unknown)}")
    generated = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": spec["name"]},
                 _NEEDS_HASH: not spec.get("options", {}).get("disableNameSuffixHash", False)}
    return {**generated, "data": data} if data else generated


def content_hash(config_map: dict) -> str:
    """kustomize's name suffix for a ConfigMap: 10 characters of the SHA-256 of its data.

    As kustomize v5 computes it (api/hasher): Go's ``json.Marshal`` of ``{"data", "kind",
    "name"}`` (keys sorted, no spaces, ``<``, ``>``, ``&``, U+2028 and U+2029 escaped; the name
    left empty, ``""`` for no data), its first 10 hex digits with 0, 1, 3, a, e spelled g, h, k,
    m, t (kubectl's encoding, which keeps vowels and look-alike digits out of names).
    """
    if set(config_map) & {"binaryData", "immutable"}:
        raise ValueError(f"{config_map['metadata']['name']}: hash of binaryData or immutable "
                         "not supported")
    encoded = json.dumps({"data": config_map.get("data") or "", "kind": "ConfigMap", "name": ""},
                         sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    for char in "<>&\u2028\u2029":
        encoded = encoded.replace(char, f"\\u{ord(char):04x}")
    digest = hashlib.sha256(encoded.encode()).hexdigest()[:10]
    return digest.translate(str.maketrans("013ae", "ghkmt"))


def config_map_refs(doc: dict):
    """The dicts whose ``name`` names a ConfigMap in ``doc``'s pod (template)."""
    spec = _pod_spec(doc)
    for container in list(_containers(doc)) + spec.get("ephemeralContainers", []):
        for source in container.get("envFrom", []):
            if "configMapRef" in source:
                yield source["configMapRef"]
        for env in container.get("env", []):
            if "configMapKeyRef" in env.get("valueFrom", {}):
                yield env["valueFrom"]["configMapKeyRef"]
    for volume in spec.get("volumes", []):
        if "configMap" in volume:
            yield volume["configMap"]
        for source in volume.get("projected", {}).get("sources", []):
            if "configMap" in source:
                yield source["configMap"]


def _add_hash_suffixes(docs: list[dict]) -> None:
    renamed = {}
    for doc in docs:
        if doc.pop(_NEEDS_HASH, False):
            name = doc["metadata"]["name"]
            doc["metadata"]["name"] = renamed[name] = f"{name}-{content_hash(doc)}"
    for doc in docs:
        for ref in config_map_refs(doc):
            ref["name"] = renamed.get(ref["name"], ref["name"])


def _pointer_set(doc: dict, path: str, value, op: str) -> None:
    parts = [p.replace("~1", "/").replace("~0", "~") for p in path.strip("/").split("/")]
    node = doc
    for part in parts[:-1]:
        node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
    if op not in ("add", "replace"):
        raise ValueError(f"patch op {op!r} not supported")
    node[parts[-1]] = value


# The merge keys of the lists these manifests patch (Kubernetes' patchMergeKey).
MERGE_KEYS = {"containers": "name", "initContainers": "name", "volumes": "name", "env": "name",
              "volumeMounts": "mountPath"}


def _strategic_merge(node: dict, patch: dict) -> None:
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(node.get(key), dict):
            _strategic_merge(node[key], value)
        elif isinstance(value, list) and key in MERGE_KEYS:
            merge_key, items = MERGE_KEYS[key], node.setdefault(key, [])
            added = 0
            for item in value:
                found = next((x for x in items if x.get(merge_key) == item.get(merge_key)), None)
                if item.get("$patch") == "delete":
                    if found is not None:
                        items.remove(found)
                elif found is not None:
                    _strategic_merge(found, item)
                else:
                    items.insert(added, item)
                    added += 1
        elif isinstance(value, dict) and "$patch" in value:
            raise ValueError(f"strategic merge directive not supported at {key}: {value}")
        else:
            node[key] = value


def _pod_spec(doc: dict) -> dict:
    if doc["kind"] == "Pod":
        return doc.get("spec", {})
    return doc.get("spec", {}).get("template", {}).get("spec", {})


def _containers(doc: dict):
    spec = _pod_spec(doc)
    for key in ("initContainers", "containers"):
        yield from spec.get(key, [])


def _selects(target: dict, doc: dict) -> bool:
    group = doc["apiVersion"].rpartition("/")[0]
    return (re.fullmatch(target["kind"], doc["kind"]) is not None
            and re.fullmatch(target.get("name", ".*"), doc["metadata"]["name"]) is not None
            and re.fullmatch(target.get("group", ".*"), group) is not None)


def render_minimal(folder: pathlib.Path) -> list[dict]:
    """The resources of the kustomization in ``folder``, as ``kubectl kustomize`` prints them."""
    docs = _build(folder)
    _add_hash_suffixes(docs)  # last, over the whole tree, as kustomize does
    return docs


def _build(folder: pathlib.Path, accumulated: list[dict] | None = None) -> list[dict]:
    """The kustomization in ``folder`` before hash suffixes; a component's edit ``accumulated``."""
    kust = yaml.safe_load((folder / "kustomization.yaml").read_text())
    unknown = set(kust) - SUPPORTED
    if unknown:
        raise ValueError(f"{folder}/kustomization.yaml: fields not supported: {sorted(unknown)}")
    if (kust.get("kind") == "Component") != (accumulated is not None):
        raise ValueError(f"{folder}: a Component goes under `components:`, nothing else there")
    docs: list[dict] = accumulated if accumulated is not None else []
    for item in kust.get("resources", []):
        path = (folder / item)
        if path.is_dir():
            docs.extend(_build(path))
        else:
            docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    for item in kust.get("components", []):
        docs = _build(folder / item, docs)
    for spec in kust.get("configMapGenerator", []):
        generated = _generate(folder, spec)
        if spec.get("behavior") in ("replace", "merge"):
            for d in docs:
                if d["kind"] == "ConfigMap" and d["metadata"]["name"] == spec["name"]:
                    # The base's object (name, namespace, labels), with more or other data;
                    # a hash suffix the base disabled stays disabled.
                    generated["metadata"] = d["metadata"]
                    generated[_NEEDS_HASH] = generated[_NEEDS_HASH] and d.get(_NEEDS_HASH, False)
                    if spec["behavior"] == "merge":
                        generated["data"] = {**d.get("data", {}), **generated.get("data", {})}
            docs = [d for d in docs if not (d["kind"] == "ConfigMap"
                                            and d["metadata"]["name"] == spec["name"])]
        docs.append(generated)
    for patch in kust.get("patches", []):
        target = patch["target"]
        body = yaml.safe_load((folder / patch["path"]).read_text() if "path" in patch
                              else patch["patch"])
        for doc in docs:
            if _selects(target, doc):
                if isinstance(body, dict):
                    # The target picks the resources: the patch's own kind and name are ignored.
                    body = {k: v for k, v in body.items() if k not in ("apiVersion", "kind")}
                    body["metadata"] = {k: v for k, v in body.get("metadata", {}).items()
                                        if k not in ("name", "namespace")}
                    _strategic_merge(doc, copy.deepcopy(body))
                    continue
                for op in body:
                    _pointer_set(doc, op["path"], copy.deepcopy(op.get("value")), op["op"])
    for image in kust.get("images", []):
        for doc in docs:
            for container in _containers(doc):
                name, _, _tag = container["image"].partition(":")
                if name == image["name"] or name == image.get("newName"):
                    container["image"] = (f"{image.get('newName', name)}:"
                                          f"{image.get('newTag', _tag or 'latest')}")
    for doc in docs:
        if kust.get("namespace") and doc["kind"] not in ("Namespace", "ClusterRole",
                                                         "ClusterRoleBinding"):
            doc["metadata"]["namespace"] = kust["namespace"]
        for label in kust.get("labels", []):
            if label.get("includeSelectors"):
                raise ValueError("labels with includeSelectors not supported")
            doc["metadata"].setdefault("labels", {}).update(label["pairs"])
    return docs
