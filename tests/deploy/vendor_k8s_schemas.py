"""Regenerate k8s_schemas.json: the Kubernetes OpenAPI definitions the deploy/ manifests use.

The schemas come from the `kubernetes-validate` wheel (instrumenta's kubernetes-json-schema, strict
flavour: unknown fields are errors), reduced to the closure of the kinds listed below, descriptions dropped.
Only this script needs the wheel; the tests read the JSON file:

    d=$(mktemp -d) && pip download --no-deps -d $d kubernetes-validate==1.37.0 && unzip -q $d/*.whl -d $d
    python tests/deploy/vendor_k8s_schemas.py $d/kubernetes_validate/kubernetes-json-schema/v1.31.0-local-strict
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

KINDS = {
    "v1/ServiceAccount": "io.k8s.api.core.v1.ServiceAccount",
    "v1/ConfigMap": "io.k8s.api.core.v1.ConfigMap",
    "rbac.authorization.k8s.io/v1/ClusterRole": "io.k8s.api.rbac.v1.ClusterRole",
    "rbac.authorization.k8s.io/v1/ClusterRoleBinding": "io.k8s.api.rbac.v1.ClusterRoleBinding",
    "apps/v1/DaemonSet": "io.k8s.api.apps.v1.DaemonSet",
}
REF_PREFIX = "/api/_definitions.json#/$defs/"


def _strip(node: Any, refs: set[str]) -> Any:
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if key == "description":
                continue
            if key == "$ref":
                name = value.removeprefix(REF_PREFIX).removeprefix("#/$defs/")
                refs.add(name)
                out[key] = f"#/$defs/{name}"
            else:
                out[key] = _strip(value, refs)
        return out
    if isinstance(node, list):
        return [_strip(item, refs) for item in node]
    return node


def main(schema_dir: str) -> None:
    defs = json.loads((Path(schema_dir) / "_definitions.json").read_text())["$defs"]
    wanted, done, out = list(KINDS.values()), set(), {}
    while wanted:
        name = wanted.pop()
        if name in done:
            continue
        done.add(name)
        refs: set[str] = set()
        out[name] = _strip(defs[name], refs)
        wanted.extend(refs - done)
    data = {"source": Path(schema_dir).name, "kinds": KINDS, "$defs": dict(sorted(out.items()))}
    target = Path(__file__).with_name("k8s_schemas.json")
    target.write_text(json.dumps(data, indent=None, separators=(",", ":"), sort_keys=False) + "\n")
    print(f"{target}: {len(out)} definitions from {data['source']}")


if __name__ == "__main__":
    main(sys.argv[1])
