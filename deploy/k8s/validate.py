#!/usr/bin/env python3
"""Validates Kubernetes manifests offline, without a cluster.

    deploy/k8s/validate.py [--gpe BIN] FILE...

- Kubernetes' own kinds are checked against the Kubernetes JSON schemas that
  the PyPI package kubernetes-validate bundles, strictly (an unknown field is
  an error), for the oldest and the newest version named below.
- Prometheus Operator kinds (PodMonitor, ServiceMonitor) are checked against
  the models generated from the operator's CRD schemas (PyPI package
  cloudcoil.models.prometheus_operator); a field the model does not know is
  an error too.
- A kind with no schema is an error, not a warning.
- Each Deployment that mounts a ConfigMap's gpe.toml must give the pod a
  terminationGracePeriodSeconds that covers its preStop sleep, that file's
  graceful_timeout and 5 s more. With --gpe, each gpe.toml is also checked
  with `BIN check -c`.

Exits 0 when every document passes, 1 otherwise (a missing package is named).
"""

import argparse
import subprocess
import sys
import tempfile
import tomllib

# Oldest version these manifests support (preStop `sleep` is on by default
# from 1.30) and the newest one kubernetes-validate knows.
K8S_VERSIONS = ["1.30.0", None]
GRACE_MARGIN = 5
PIP = "pip install kubernetes-validate cloudcoil.models.prometheus_operator"

try:
    import yaml
    from kubernetes_validate import utils as kv
    from cloudcoil.models.prometheus_operator import v1 as promop
except ImportError as e:
    sys.exit(f"validate.py: {e.name} is missing; install it with `{PIP}` (scripts/test does)")

OPERATOR_KINDS = {"PodMonitor": promop.PodMonitor, "ServiceMonitor": promop.ServiceMonitor}


def unknown_fields(given, known, path=""):
    """Paths present in `given` but absent from the model's round trip `known`."""
    if isinstance(given, dict) and isinstance(known, dict):
        out = []
        for k, v in given.items():
            if k not in known:
                out.append(f"{path}.{k}".lstrip("."))
            else:
                out.extend(unknown_fields(v, known[k], f"{path}.{k}"))
        return out
    if isinstance(given, list) and isinstance(known, list):
        return [p for i, (g, k) in enumerate(zip(given, known)) for p in unknown_fields(g, k, f"{path}[{i}]")]
    return []


def check_schema(doc):
    """Errors of one document against its schema."""
    kind = doc.get("kind", "?")
    if kind in OPERATOR_KINDS and str(doc.get("apiVersion", "")).startswith("monitoring.coreos.com/"):
        model = OPERATOR_KINDS[kind]
        try:
            parsed = model.model_validate(doc)
        except Exception as e:  # pydantic's ValidationError, reported whole
            return [str(e)]
        round_trip = parsed.model_dump(by_alias=True, exclude_none=True, mode="json")
        return [f"unknown field {p}" for p in unknown_fields(doc, round_trip)]
    errors = []
    for version in K8S_VERSIONS:
        version = version or kv.latest_version()
        try:
            kv.validate(doc, version, strict=True)
        except kv.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            errors.append(f"against {version}: {path}: {e.message}")
        except kv.SchemaNotFoundError as e:
            errors.append(f"no schema: {e.message}")
    return errors


def gpe_tomls(docs):
    """ConfigMap name -> its gpe.toml text."""
    return {
        d["metadata"]["name"]: d["data"]["gpe.toml"]
        for d in docs
        if d.get("kind") == "ConfigMap" and "gpe.toml" in (d.get("data") or {})
    }


def check_grace(doc, tomls):
    """The pod's grace period covers preStop + graceful_timeout + margin."""
    pod = doc["spec"]["template"]["spec"]
    maps = [v["configMap"]["name"] for v in pod.get("volumes", []) if "configMap" in v]
    errors = []
    for name in maps:
        if name not in tomls:
            continue
        graceful = tomllib.loads(tomls[name]).get("graceful_timeout", 30)
        grace = pod.get("terminationGracePeriodSeconds", 30)
        for c in pod["containers"]:
            sleep = c.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
            if grace < sleep + graceful + GRACE_MARGIN:
                errors.append(
                    f"container {c['name']}: terminationGracePeriodSeconds {grace} < preStop "
                    f"{sleep} + graceful_timeout {graceful} + {GRACE_MARGIN}"
                )
    return errors


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpe", help="a gpe binary, to run `gpe check` on each gpe.toml")
    ap.add_argument("files", nargs="+")
    args = ap.parse_args()
    loaded = []
    for f in args.files:
        with open(f) as fh:
            loaded.extend((f, d) for d in yaml.safe_load_all(fh) if d)
    tomls = gpe_tomls([d for _, d in loaded])
    failed = 0
    for f, doc in loaded:
        name = f"{f}: {doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        errors = check_schema(doc)
        if doc.get("kind") == "Deployment":
            errors += check_grace(doc, tomls)
        for e in errors:
            print(f"FAIL {name}: {e}")
        if not errors:
            print(f"ok   {name}")
        failed += bool(errors)
    if args.gpe:
        for name, text in tomls.items():
            with tempfile.NamedTemporaryFile("w", suffix=".toml") as t:
                t.write(text)
                t.flush()
                r = subprocess.run([args.gpe, "check", "-c", t.name], capture_output=True, text=True)
            if r.returncode != 0:
                print(f"FAIL ConfigMap/{name} gpe.toml: {r.stderr.strip()}")
                failed += 1
            else:
                print(f"ok   ConfigMap/{name} gpe.toml (gpe check)")
    print(f"{len(loaded)} documents and {len(tomls) if args.gpe else 0} gpe.toml checked, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
