"""tests/guest/run.py's pure parts: module dependency order, the job file, the qemu command line."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

from tests.guest.run import KernelTree, module_closure, pytest_command, qemu_argv, write_job

MODULES_DEP = """\
kernel/fs/9p/9p.ko: kernel/fs/fscache/fscache.ko kernel/net/9p/9pnet.ko kernel/fs/netfs/netfs.ko
kernel/net/9p/9pnet.ko:
kernel/fs/fscache/fscache.ko: kernel/fs/netfs/netfs.ko
kernel/fs/netfs/netfs.ko:
kernel/drivers/char/hw_random/virtio-rng.ko:
"""


def _kernel(tmp_path: Path) -> KernelTree:
    (tmp_path / "modules.dep").write_text(MODULES_DEP)
    return KernelTree(release="6.1.0-1-amd64", vmlinuz=tmp_path / "vmlinuz", modules=tmp_path)


def test_module_closure_puts_dependencies_first_once(tmp_path: Path) -> None:
    closure = module_closure(_kernel(tmp_path).modules, ["9p", "netfs", "virtio_rng"])
    assert [p.relative_to(tmp_path).as_posix() for p in closure] == [
        "kernel/fs/netfs/netfs.ko",
        "kernel/fs/fscache/fscache.ko",
        "kernel/net/9p/9pnet.ko",
        "kernel/fs/9p/9p.ko",
        "kernel/drivers/char/hw_random/virtio-rng.ko",
    ]


def test_job_file_round_trips_through_sh(tmp_path: Path) -> None:
    command = pytest_command(["tests/netns/test_flows.py", "-k", "cluster-ip and not udp"], cwd=Path("/w t"))
    write_job(tmp_path, _kernel(tmp_path), command, Path("/w t"), time_scale=10)
    script = f'. {shlex.quote(str(tmp_path / "job.env"))}; eval "set -- $GUEST_COMMAND"; printf "%s\\n" "$@"'
    argv = subprocess.run(["sh", "-c", script], check=True, capture_output=True, text=True).stdout.splitlines()
    assert argv == ["/w t/.venv/bin/python", "-m", "pytest", "-o", "timeout=6000", *command[5:]]
    assert "export KPROXYD_LAB_TIME_SCALE=10" in (tmp_path / "job.env").read_text()


def test_qemu_runs_tcg_with_the_host_root_read_only(tmp_path: Path) -> None:
    argv = qemu_argv(_kernel(tmp_path), tmp_path / "initrd", tmp_path / "results", smp=2, memory=2048)
    assert argv[argv.index("-accel") + 1] == "tcg,thread=multi"
    assert "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap" in argv
    assert f"local,path={tmp_path / 'results'},mount_tag=results,security_model=none,multidevs=remap" in argv
