"""deploy/: every object validates against the Kubernetes OpenAPI schema, and kproxyd accepts its config.

The schemas (k8s_schemas.json, strict: unknown fields are errors) are vendored by vendor_k8s_schemas.py.
The validator below implements exactly the JSON-schema keywords that file uses and fails on any other,
so it cannot pass a manifest by ignoring a rule.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from kproxyd.cli import parse_config
from kproxyd.config import load_config_file
from tests.deploy.conftest import container_argv, load_manifests, manifest

SCHEMAS = json.loads((Path(__file__).with_name("k8s_schemas.json")).read_text())
DEFS: dict[str, Any] = SCHEMAS["$defs"]
_TYPES = {
    "object": dict,
    "array": list,
    "string": str,
    "boolean": bool,
    "null": type(None),
}
_IGNORED_KEYWORDS = {"format"}  # int32/int64/byte/date-time: representation hints, not constraints here


def _type_ok(value: Any, name: str) -> bool:
    if name == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if name == "number":
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, _TYPES[name])


def schema_errors(value: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """Why value does not match schema: one message per violation, each naming the field's path."""
    errors: list[str] = []
    for key, rule in schema.items():
        if key.startswith("x-kubernetes-") or key in _IGNORED_KEYWORDS:
            continue
        if key == "$ref":
            errors += schema_errors(value, DEFS[rule.removeprefix("#/$defs/")], path)
        elif key == "type":
            names = rule if isinstance(rule, list) else [rule]
            if not any(_type_ok(value, n) for n in names):
                errors.append(f"{path or '.'}: {type(value).__name__} {value!r:.40} is not {'/'.join(names)}")
        elif key == "enum":
            if value not in rule:
                errors.append(f"{path}: {value!r} is not one of {rule}")
        elif key == "oneOf":
            if sum(not schema_errors(value, option, path) for option in rule) != 1:
                errors.append(f"{path}: {value!r} matches not exactly one of {rule}")
        elif key == "required":
            if isinstance(value, dict):
                errors += [f"{path}.{field}: required" for field in rule if field not in value]
        elif key == "properties":
            if isinstance(value, dict):
                for field, sub in rule.items():
                    if field in value:
                        errors += schema_errors(value[field], sub, f"{path}.{field}")
        elif key == "additionalProperties":
            if isinstance(value, dict):
                known = schema.get("properties", {})
                for field, item in value.items():
                    if field in known:
                        continue
                    if rule is False:
                        errors.append(f"{path}.{field}: unknown field")
                    elif isinstance(rule, dict):
                        errors += schema_errors(item, rule, f"{path}.{field}")
        elif key == "items":
            if isinstance(value, list):
                for index, item in enumerate(value):
                    errors += schema_errors(item, rule, f"{path}[{index}]")
        else:
            raise AssertionError(f"schema keyword {key!r} at {path or '.'} is not implemented by this validator")
    return errors


def validate(obj: dict[str, Any]) -> list[str]:
    """Schema errors of a whole object, found by its apiVersion and kind."""
    kind = f"{obj.get('apiVersion')}/{obj.get('kind')}"
    assert kind in SCHEMAS["kinds"], f"no vendored schema for {kind}; add it to vendor_k8s_schemas.py"
    return schema_errors(obj, DEFS[SCHEMAS["kinds"][kind]])


OBJECTS = load_manifests()


def test_deploy_has_each_object_once() -> None:
    kinds = sorted((o["kind"], o["metadata"]["name"], o["metadata"].get("namespace", "")) for o in OBJECTS)
    assert kinds == [
        ("ClusterRole", "kproxyd", ""),
        ("ClusterRoleBinding", "kproxyd", ""),
        ("ConfigMap", "kproxyd", "kube-system"),
        ("DaemonSet", "kproxyd", "kube-system"),
        ("ServiceAccount", "kproxyd", "kube-system"),
    ]


@pytest.mark.parametrize("obj", OBJECTS, ids=lambda o: f"{o['kind']}/{o['metadata']['name']}")
def test_manifest_matches_openapi_schema(obj: dict[str, Any]) -> None:
    assert validate(obj) == []


def test_validator_rejects_what_the_api_server_rejects() -> None:
    """The validator is strict: typos, wrong types, missing required fields and bad enums all fail."""
    ds = manifest("DaemonSet")
    container = ds["spec"]["template"]["spec"]["containers"][0]
    cases = {
        "unknown field": {**ds, "spec": {**ds["spec"], "updateStrateg": {}}},
        "wrong type": {**ds, "spec": {**ds["spec"], "minReadySeconds": "10"}},
        "int-or-string neither": {
            **ds,
            "spec": {**ds["spec"], "updateStrategy": {"rollingUpdate": {"maxUnavailable": [1]}}},
        },
        "missing required": {**ds, "spec": {k: v for k, v in ds["spec"].items() if k != "selector"}},
        "wrong kind": {**ds, "kind": "Deployment"},
        "unknown container field": {
            **ds,
            "spec": {
                **ds["spec"],
                "template": {
                    **ds["spec"]["template"],
                    "spec": {**ds["spec"]["template"]["spec"], "containers": [{**container, "comand": ["x"]}]},
                },
            },
        },
    }
    daemonset = DEFS[SCHEMAS["kinds"]["apps/v1/DaemonSet"]]
    for name, obj in cases.items():
        assert schema_errors(obj, daemonset), f"{name} was not rejected"
    assert schema_errors(ds, daemonset) == []


def test_daemonset_shape() -> None:
    ds = manifest("DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    assert ds["metadata"]["namespace"] == "kube-system"
    assert ds["spec"]["selector"]["matchLabels"].items() <= ds["spec"]["template"]["metadata"]["labels"].items()
    assert ds["spec"]["updateStrategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}}
    assert pod["hostNetwork"] is True
    assert pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert pod["priorityClassName"] == "system-node-critical"
    assert pod["serviceAccountName"] == "kproxyd"
    assert {"operator": "Exists"} in pod["tolerations"]
    (container,) = pod["containers"]
    assert container["image"] == "kproxyd:latest"
    assert container["imagePullPolicy"] == "IfNotPresent"
    assert container["livenessProbe"]["httpGet"] == {"path": "/livez", "port": 10256}
    assert container["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": 10256}
    env = {e["name"]: e for e in container["env"]}
    assert env["NODE_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}


def test_daemonset_is_not_privileged_and_adds_only_net_capabilities() -> None:
    container = manifest("DaemonSet")["spec"]["template"]["spec"]["containers"][0]
    security = container["securityContext"]
    assert not security.get("privileged", False)
    assert security["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN", "NET_RAW"]}
    assert security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True


def test_daemonset_mounts_as_kube_proxy() -> None:
    pod = manifest("DaemonSet")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in pod["containers"][0]["volumeMounts"]}
    assert volumes[mounts["/run/xtables.lock"]["name"]]["hostPath"] == {
        "path": "/run/xtables.lock",
        "type": "FileOrCreate",
    }
    assert mounts["/run/xtables.lock"].get("readOnly") is not True
    assert volumes[mounts["/lib/modules"]["name"]]["hostPath"] == {"path": "/lib/modules"}
    assert mounts["/lib/modules"]["readOnly"] is True
    assert volumes[mounts["/var/lib/kproxyd"]["name"]]["configMap"] == {"name": "kproxyd"}


@pytest.fixture
def configmap_dir(tmp_path: Path) -> Path:
    """The ConfigMap's files, where the DaemonSet mounts them (relocated under tmp_path)."""
    for key, text in manifest("ConfigMap")["data"].items():
        (tmp_path / key).write_text(text)
    return tmp_path


def test_configmap_config_loads_unchanged(configmap_dir: Path) -> None:
    config = load_config_file(str(configmap_dir / "config.conf"))
    assert config.kubeconfig == "/var/lib/kproxyd/kubeconfig.conf"
    assert config.mode == "iptables"
    assert config.cluster_cidrs == ("10.244.0.0/16",)
    assert config.healthz_bind_address == "0.0.0.0:10256"
    assert config.localhost_nodeports is False  # no sysctl: see the ConfigMap's comment


def test_configmap_kubeconfig_uses_the_service_account(configmap_dir: Path) -> None:
    kubeconfig = yaml.safe_load((configmap_dir / "kubeconfig.conf").read_text())
    (cluster,) = kubeconfig["clusters"]
    (user,) = kubeconfig["users"]
    assert cluster["cluster"]["certificate-authority"] == "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"
    assert user["user"] == {"tokenFile": "/var/run/secrets/kubernetes.io/serviceaccount/token"}
    assert kubeconfig["current-context"] == "default"


def test_daemonset_command_parses(configmap_dir: Path) -> None:
    argv = container_argv({"NODE_NAME": "Worker-1"})
    assert argv[0] == "kproxyd"
    assert "--config=/var/lib/kproxyd/config.conf" in argv
    relocated = [a.replace("/var/lib/kproxyd", str(configmap_dir)) for a in argv[1:]]
    config = parse_config(relocated)
    assert config.hostname == "worker-1"
    assert config.kubeconfig == "/var/lib/kproxyd/kubeconfig.conf"
    assert config.cluster_cidrs == ("10.244.0.0/16",)
    # the config file is where the DaemonSet mounts the ConfigMap
    container = manifest("DaemonSet")["spec"]["template"]["spec"]["containers"][0]
    assert {m["name"]: m["mountPath"] for m in container["volumeMounts"]}["kproxyd"] == "/var/lib/kproxyd"


ALLOWED_RULES = {
    ("", "services"): {"get", "list", "watch"},
    ("", "nodes"): {"get", "list", "watch"},
    ("discovery.k8s.io", "endpointslices"): {"get", "list", "watch"},
    ("", "events"): {"create", "patch"},
    ("events.k8s.io", "events"): {"create", "patch"},
}


def test_rbac_grants_only_what_kproxyd_uses() -> None:
    granted: dict[tuple[str, str], set[str]] = {}
    for rule in manifest("ClusterRole")["rules"]:
        assert set(rule) <= {"apiGroups", "resources", "verbs"}, "no resourceNames/nonResourceURLs"
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                assert "*" not in (group, resource) and "*" not in rule["verbs"]
                granted.setdefault((group, resource), set()).update(rule["verbs"])
    assert granted == ALLOWED_RULES
    assert "aggregationRule" not in manifest("ClusterRole")


def test_rbac_binds_the_role_to_the_daemonsets_service_account() -> None:
    binding = manifest("ClusterRoleBinding")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": "kproxyd",
    }
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "kproxyd", "namespace": "kube-system"}]
    account = manifest("ServiceAccount")
    assert account["metadata"]["namespace"] == "kube-system"
    assert manifest("DaemonSet")["spec"]["template"]["spec"]["serviceAccountName"] == account["metadata"]["name"]
