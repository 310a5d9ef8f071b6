"""The kproxyd:latest image, run the way the DaemonSet runs it, programs a lab node (opt-in, slow).

KPROXYD_TEST_IMAGE=1 builds the image with image/build.sh (about 2 minutes the first time, under a minute
with build/image cached), starts a one-node lab, and runs the image in node1's network namespace with the
DaemonSet's command, capabilities, read-only root and mounts (the ConfigMap's config.conf unchanged; the
lab's kubeconfig in place of the service-account one). A pod on node1 must then reach a ClusterIP Service.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kproxyd.lab import nsutil
from kproxyd.lab.cluster import LabCluster, wait_until
from kproxyd.lab.netlab import Reply
from tests.deploy.conftest import REPO, container_argv, daemonset_container, manifest

pytestmark = [
    pytest.mark.image,
    pytest.mark.netns,
    pytest.mark.skipif(
        os.environ.get("KPROXYD_TEST_IMAGE") != "1",
        reason="builds the kproxyd:latest image with podman (slow): set KPROXYD_TEST_IMAGE=1 to run it",
    ),
    pytest.mark.timeout(900),
]
IMAGE = "kproxyd:latest"
PODMAN_ENV = {**os.environ, "CONTAINERS_CONF": str(REPO / "image" / "containers.conf")}


def podman(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["podman", *args], env=PODMAN_ENV, capture_output=True, text=True, check=check)


@pytest.fixture(scope="module")
def image() -> str:
    """Build the image (the cached rootfs makes a rebuild quick)."""
    if os.geteuid() != 0:
        pytest.fail("the image test needs root (debootstrap, chroot, network namespaces)")
    missing = [tool for tool in ("podman", "runc", "debootstrap") if shutil.which(tool) is None]
    assert not missing, f"missing {missing}: apt-get install -y debootstrap podman runc"
    started = time.monotonic()
    build = subprocess.run(
        [str(REPO / "image" / "build.sh")], env={**PODMAN_ENV, "IMAGE": IMAGE}, capture_output=True, text=True
    )
    assert build.returncode == 0, f"image/build.sh failed:\n{build.stdout}\n{build.stderr}"
    print(f"image/build.sh took {time.monotonic() - started:.0f}s")
    return IMAGE


def podman_security_args(container: dict[str, Any]) -> list[str]:
    """The DaemonSet container's securityContext as podman flags."""
    security = container["securityContext"]
    if security.get("privileged"):
        return ["--privileged"]
    args = ["--user", str(security.get("runAsUser", 0))]
    caps = security.get("capabilities", {})
    args += [f"--cap-drop={c.lower()}" for c in caps.get("drop", [])]
    args += [f"--cap-add={c}" for c in caps.get("add", [])]
    if security.get("allowPrivilegeEscalation") is False:
        args += ["--security-opt", "no-new-privileges"]
    if security.get("readOnlyRootFilesystem"):
        args += ["--read-only", "--read-only-tmpfs=false"]
    return args


def podman_volume_args(config_dir: Path) -> list[str]:
    """The DaemonSet's volume mounts as podman flags: the ConfigMap from config_dir, hostPaths as they are."""
    pod = manifest("DaemonSet")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    args = []
    for mount in daemonset_container()["volumeMounts"]:
        volume = volumes[mount["name"]]
        ro = ":ro" if mount.get("readOnly") else ""
        if "configMap" in volume:
            args += ["-v", f"{config_dir}:{mount['mountPath']}{ro}"]
        elif "hostPath" in volume:
            path = Path(volume["hostPath"]["path"])
            if volume["hostPath"].get("type") == "FileOrCreate" and not path.exists():
                path.touch()  # as the kubelet does (for /run/xtables.lock: the file iptables locks)
            if not path.exists():
                continue  # /lib/modules on a host whose kernel has no modules (a microVM): nothing to mount
            args += ["-v", f"{path}:{mount['mountPath']}{ro}"]
        elif "emptyDir" in volume:
            args += ["--tmpfs", mount["mountPath"]]
        else:
            raise AssertionError(f"volume {mount['name']} has no podman equivalent here")
    return args


@pytest.fixture
def lab() -> Iterator[LabCluster]:
    with LabCluster(nodes=("node1",)) as cluster:
        yield cluster


def reaches(lab: LabCluster, ip: str, pods: set[str]) -> bool:
    results = lab.answers("client", ip, 80, count=10, timeout=0.5)
    return all(isinstance(r, Reply) for r in results) and {r.pod for r in results if isinstance(r, Reply)} == pods


def test_image_runs_as_the_daemonset_and_serves_a_cluster_ip(image: str, lab: LabCluster) -> None:
    lab.add_pod("web-0", "node1", {"app": "web"})
    lab.add_pod("client", "node1", {"app": "client"})
    service = lab.create_service(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": 8080}]},
        }
    )
    cluster_ip = service["spec"]["clusterIP"]
    # The ConfigMap's files: config.conf unchanged, the lab's kubeconfig (plain http) for kubeconfig.conf.
    config_dir = lab.workdir / "configmap"
    config_dir.mkdir()
    data = manifest("ConfigMap")["data"]
    (config_dir / "config.conf").write_text(data["config.conf"])
    (config_dir / "kubeconfig.conf").write_text(lab.kubeconfig.read_text())
    config_dir.chmod(0o755)
    for path in config_dir.iterdir():
        path.chmod(0o644)

    name = f"kproxyd-test-{uuid.uuid4().hex[:8]}"
    netns = lab.net.node("node1").netns
    container = daemonset_container()
    run = [
        "run", "--rm", "-d", "--name", name,
        "--network", f"ns:{nsutil.NETNS_RUN_DIR}/{netns}",
        *podman_security_args(container),
        *podman_volume_args(config_dir),
        "-e", "NODE_NAME=node1",
        image,
        *container_argv({"NODE_NAME": "node1"}),
    ]  # fmt: skip
    started = podman(*run, check=False)
    assert started.returncode == 0, f"podman run failed: {started.stderr}"
    try:
        wait_until(lambda: reaches(lab, cluster_ip, {"web-0"}), timeout=60, what=f"{cluster_ip}:80 via the image")
        assert lab.http_get("node1", "127.0.0.1", 10256, "/healthz")[0] == 200  # the readiness probe
        assert lab.http_get("node1", "127.0.0.1", 10256, "/livez")[0] == 200  # the liveness probe
        assert "KUBE-SVC-" in lab.iptables_save("node1", "nat")
        assert podman("inspect", "--format", "{{.State.Running}}", name).stdout.strip() == "true"
    except BaseException:
        print(podman("logs", name, check=False).stdout + podman("logs", name, check=False).stderr)
        raise
    finally:
        podman("stop", "--time", "10", name, check=False)
        podman("rm", "--force", "--ignore", name, check=False)
