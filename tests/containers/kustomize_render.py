"""Render the kustomizations of deploy/kubernetes: `kubectl kustomize`, else a small renderer.

:func:`render` runs ``kubectl kustomize DIR`` when kubectl is on PATH (it embeds kustomize), with
no flag: what ``kubectl apply -k DIR`` (docs/deploy.md) and GitOps tools do. kustomize's default
load restrictor refuses a file outside the kustomization's folder, and so does the fallback.

Without kubectl, :func:`render_minimal` renders the subset of kustomize these manifests use, so
the schema checks still run: ``resources`` (files and folders holding a kustomization),
``components`` (folders of ``kind: Component``, applied to what the resources gave before the
kustomization's own generators and patches), ``namespace``, ``labels`` (``pairs``, without
selectors), ``configMapGenerator`` (``files``, ``envs``, ``behavior: replace`` or ``merge``,
``options.disableNameSuffixHash``), ``images`` (``newName``, ``newTag``) and ``patches``
(inline JSON6902 ``add`` / ``replace`` operations, or a strategic merge patch, inline or in a
``path`` file, whose lists of containers, volumes, env and mounts merge by name or mountPath and
honour ``$patch: delete``; new items go first, as kustomize puts them), applied to the resources
a ``target`` selects (``group``, ``kind`` and ``name``: regular expressions, as in kustomize;
``name`` may be left out). Generated ConfigMaps keep their plain names (no hash suffix);
anything else it meets is an error, so a kustomization that outgrows it fails loudly rather than
renders wrong.
"""

from __future__ import annotations

import copy
import pathlib
import re
import shutil
import subprocess

import yaml

SUPPORTED = {"apiVersion", "kind", "resources", "components", "namespace", "labels",
             "configMapGenerator", "images", "patches"}


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
    unknown = set(spec) - {"name", "files", "envs", "behavior", "options"}
    if set(spec.get("options", {})) - {"disableNameSuffixHash"}:
        raise ValueError(f"{folder}: configMapGenerator options not supported: {spec['options']}")
    if unknown:
        raise ValueError(f"{folder}: configMapGenerator fields not supported: {sorted(unknown)}")
    generated = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": spec["name"]}}
    return {**generated, "data": data} if data else generated


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


def _containers(doc: dict):
    spec = doc.get("spec", {}).get("template", {}).get("spec", {})
    for key in ("initContainers", "containers"):
        yield from spec.get(key, [])


def _selects(target: dict, doc: dict) -> bool:
    group = doc["apiVersion"].rpartition("/")[0]
    return (re.fullmatch(target["kind"], doc["kind"]) is not None
            and re.fullmatch(target.get("name", ".*"), doc["metadata"]["name"]) is not None
            and re.fullmatch(target.get("group", ".*"), group) is not None)


def render_minimal(folder: pathlib.Path, accumulated: list[dict] | None = None) -> list[dict]:
    """The resources of the kustomization in ``folder``; a component's edit ``accumulated``."""
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
            docs.extend(render_minimal(path))
        else:
            docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    for item in kust.get("components", []):
        docs = render_minimal(folder / item, docs)
    for spec in kust.get("configMapGenerator", []):
        generated = _generate(folder, spec)
        if spec.get("behavior") in ("replace", "merge"):
            for d in docs:
                if d["kind"] == "ConfigMap" and d["metadata"]["name"] == spec["name"]:
                    # The base's object (name, namespace, labels), with more or other data.
                    generated["metadata"] = d["metadata"]
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
