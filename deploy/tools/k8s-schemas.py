#!/usr/bin/env python3
"""JSON schemas for kubeconform, offline: materialised once into a cache, then reused.

kubeconform fetches its schemas from GitHub unless told otherwise, and this project's machines
reach package registries only. Both sources here are pinned packages from registries:

* Kubernetes kinds: the PyPI wheel ``kubernetes-validate`` bundles, per Kubernetes version, the
  OpenAPI-derived schemas (``v<version>-local-strict/<kind>-<group>-<version>.json``, strict =
  ``additionalProperties: false``) with ``$ref``s into a shared ``_definitions.json``. The wheel
  is fetched with ``pip download`` (a zip; nothing is installed) and, for each kind the chart
  renders, the ``$ref``s are inlined: one standalone file per kind in kubeconform's layout
  (``v<version>-standalone-strict/<kind>-<group>-<version>.json``).
* ServiceMonitor and PrometheusRule: the prometheus-operator Go module ships its CRDs
  (``example/prometheus-operator-crd/``); ``go mod download`` fetches the module and each CRD
  version's ``openAPIV3Schema`` becomes ``crds/<group>/<kind>_<version>.json``, strict the way
  kubeconform's own openapi2jsonschema.py makes CRD schemas (``additionalProperties: false`` on
  every object that lists its properties and does not preserve unknown fields).

    python deploy/tools/k8s-schemas.py            # build what is missing, print the locations
    kubeconform -strict $(python deploy/tools/k8s-schemas.py | sed 's/^/-schema-location /') ...

stdout: the ``-schema-location`` values for kubeconform, one per line; progress on stderr.
Cache: ``$POP3K_CACHE/k8s-schemas/`` (default ``~/.cache/pop3-kafka``); a complete directory is
never rebuilt (its name carries the pins and the kinds), so a warm call takes milliseconds.
"""

from __future__ import annotations

import argparse
import copy
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import yaml

CACHE = Path(os.environ.get("POP3K_CACHE", Path.home() / ".cache" / "pop3-kafka"))
ROOT = CACHE / "k8s-schemas"
GO_ROOT = CACHE / "go"

KUBERNETES_VALIDATE = "kubernetes-validate==1.37.0"
#: the oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest the wheel has.
KUBERNETES_VERSIONS = ("1.28.0", "1.37.0")
#: (kind, group, version) of every object the chart can render; kubeconform fails on a kind
#: without a schema, so a new template kind shows up here at once.
KINDS = (
    ("ConfigMap", "", "v1"),
    ("Secret", "", "v1"),
    ("Service", "", "v1"),
    ("ServiceAccount", "", "v1"),
    ("StatefulSet", "apps", "v1"),
    ("PodDisruptionBudget", "policy", "v1"),
    ("NetworkPolicy", "networking.k8s.io", "v1"),
)
PROMETHEUS_OPERATOR = "github.com/prometheus-operator/prometheus-operator@v0.85.0"
CRD_FILES = (
    "example/prometheus-operator-crd/monitoring.coreos.com_servicemonitors.yaml",
    "example/prometheus-operator-crd/monitoring.coreos.com_prometheusrules.yaml",
)
# kubeconform's template variables; the first location also matches a kind's file name.
K8S_LOCATION = (
    "{{ .NormalizedKubernetesVersion }}-standalone{{ .StrictSuffix }}/{{ .ResourceKind }}{{ .KindSuffix }}.json"
)
CRD_LOCATION = "crds/{{ .Group }}/{{ .ResourceKind }}_{{ .ResourceAPIVersion }}.json"


def log(msg: str) -> None:
    print(f"[k8s-schemas] {msg}", file=sys.stderr, flush=True)


def cache_dir() -> Path:
    """Where this set of pins and kinds lives: a change of either gives a new directory."""
    key = json.dumps([KUBERNETES_VALIDATE, KUBERNETES_VERSIONS, KINDS, PROMETHEUS_OPERATOR, CRD_FILES])
    return ROOT / f"set-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


# ---------------------------------------------------------------------------- Kubernetes kinds


def fetch_wheel(dest: Path) -> Path:
    """The kubernetes-validate wheel, downloaded once into ``dest``."""
    name, version = KUBERNETES_VALIDATE.split("==")
    found = sorted(dest.glob(f"{name.replace('-', '_')}-{version}-*.whl"))
    if found:
        return found[0]
    dest.mkdir(parents=True, exist_ok=True)
    log(f"pip download {KUBERNETES_VALIDATE} (about 22 MB, once)")
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest", str(dest), KUBERNETES_VALIDATE],
        check=True,
        timeout=600,
        stdout=sys.stderr,
    )
    found = sorted(dest.glob(f"{name.replace('-', '_')}-{version}-*.whl"))
    if not found:
        raise SystemExit(f"pip download {KUBERNETES_VALIDATE} left no wheel in {dest}")
    return found[0]


def kind_file(kind: str, group: str, version: str) -> str:
    """kubeconform's file name: ``statefulset-apps-v1.json``; the core group has no part."""
    group_part = f"-{group.split('.', maxsplit=1)[0]}" if group else ""
    return f"{kind.lower()}{group_part}-{version}.json"


def inline_refs(node: Any, defs: dict[str, Any], trail: tuple[str, ...] = ()) -> Any:
    """``node`` with every ``$ref`` into ``_definitions.json`` replaced by the definition itself
    (the ref's sibling keys, e.g. ``description``, kept). A recursive definition is refused: none
    of the kinds above has one, and a standalone file cannot hold it."""
    if isinstance(node, list):
        return [inline_refs(x, defs, trail) for x in node]
    if not isinstance(node, dict):
        return node
    ref = node.get("$ref")
    if isinstance(ref, str):
        name = ref.rpartition("/$defs/")[2]
        if name not in defs:
            raise SystemExit(f"unresolvable $ref {ref!r}")
        if name in trail:
            raise SystemExit(f"recursive definition {' -> '.join((*trail, name))}: cannot inline it")
        target = inline_refs(defs[name], defs, (*trail, name))
        siblings = {k: inline_refs(v, defs, trail) for k, v in node.items() if k != "$ref"}
        return {**target, **siblings}
    return {k: inline_refs(v, defs, trail) for k, v in node.items()}


def build_kinds(wheel: Path, out: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        for k8s in KUBERNETES_VERSIONS:
            src = f"kubernetes_validate/kubernetes-json-schema/v{k8s}-local-strict"
            defs = json.loads(zf.read(f"{src}/_definitions.json"))["$defs"]
            target = out / f"v{k8s}-standalone-strict"
            target.mkdir(parents=True, exist_ok=True)
            for kind, group, version in KINDS:
                name = kind_file(kind, group, version)
                try:
                    doc = json.loads(zf.read(f"{src}/{name}"))
                except KeyError:
                    raise SystemExit(f"{wheel.name} has no {src}/{name}") from None
                (target / name).write_text(json.dumps(inline_refs(doc, defs)), encoding="utf-8")
            log(f"Kubernetes {k8s}: {len(KINDS)} kinds")


# ---------------------------------------------------------------------------- CRDs


def module_dir(module: str) -> Path:
    """The extracted source of a Go module (``go mod download``; cached in GOMODCACHE)."""
    env = {
        **os.environ,
        "GOPATH": str(GO_ROOT),
        "GOMODCACHE": str(GO_ROOT / "pkg" / "mod"),
        "GOCACHE": str(GO_ROOT / "cache"),
        "GOFLAGS": "-mod=mod",
        "GOTOOLCHAIN": "local",
    }
    with tempfile.TemporaryDirectory() as tmp:  # outside any module, so no go.mod is touched
        proc = subprocess.run(
            ["go", "mod", "download", "-json", module],
            cwd=tmp,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
    info = json.loads(proc.stdout or "{}")
    if proc.returncode != 0 or "Dir" not in info:
        raise SystemExit(f"go mod download {module} failed: {info.get('Error') or proc.stderr.strip()}")
    return Path(info["Dir"])


def strict(node: Any) -> Any:
    """additionalProperties: false on every object schema that lists its properties, unless it
    keeps unknown fields or already says what extra properties may be (as kubeconform does)."""
    if isinstance(node, list):
        return [strict(x) for x in node]
    if not isinstance(node, dict):
        return node
    out = {k: strict(v) for k, v in node.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def build_crds(source: Path, out: Path) -> int:
    count = 0
    for rel in CRD_FILES:
        crd = yaml.safe_load((source / rel).read_text(encoding="utf-8"))
        group = crd["spec"]["group"]
        kind = crd["spec"]["names"]["kind"]
        for v in crd["spec"]["versions"]:
            schema = copy.deepcopy(v["schema"]["openAPIV3Schema"])
            schema["properties"]["apiVersion"] = {"type": "string", "enum": [f"{group}/{v['name']}"]}
            schema["properties"]["kind"] = {"type": "string", "enum": [kind]}
            target = out / "crds" / group / f"{kind.lower()}_{v['name']}.json"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(json.dumps(strict(schema)), encoding="utf-8")
            count += 1
    return count


# ---------------------------------------------------------------------------- main


def ensure() -> Path:
    """The complete schema directory, built if missing (one builder at a time)."""
    final = cache_dir()
    if (final / ".complete").exists():
        return final
    ROOT.mkdir(parents=True, exist_ok=True)
    with (ROOT / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (final / ".complete").exists():
            return final
        tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=ROOT))
        tmp.chmod(0o755)  # mkdtemp's 0700 would hide the schemas from other users of the cache
        try:
            build_kinds(fetch_wheel(ROOT / "wheels"), tmp)
            n = build_crds(module_dir(PROMETHEUS_OPERATOR), tmp)
            log(f"{PROMETHEUS_OPERATOR}: {n} CRD schemas")
            (tmp / ".complete").write_text("", encoding="utf-8")
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--kubernetes-versions",
        action="store_true",
        help="print the Kubernetes versions schemas are built for (one per line) instead",
    )
    args = parser.parse_args(argv)
    if args.kubernetes_versions:
        print("\n".join(KUBERNETES_VERSIONS))
        return 0
    root = ensure()
    print(f"{root}/{K8S_LOCATION}")
    print(f"{root}/{CRD_LOCATION}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
