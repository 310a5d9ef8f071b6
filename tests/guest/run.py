"""Run a command (normally a pytest selection) inside Debian's stock 6.1 kernel under qemu TCG: a second kernel.

Host entry points (as root, from a worktree after `make setup`; exit status is pytest's, 124 if none came back):
    make test-guest GUEST_PYTEST='tests/netns/test_flows.py -k cluster-ip' GUEST_ARGS='--smp 2'
    .venv/bin/python -m tests.guest.run [--smp N] [--memory MB] [--timeout S] [--time-scale X] -- <pytest args>
    run_pytest(["tests/netns/test_flows.py"]) -> GuestResult(returncode, output, seconds)  (from Python)
Without pytest args the FULL selection runs (CI runs REPRESENTATIVE).

The guest sees the host's `/` read-only over 9p under a tmpfs overlay (writes land in guest RAM only), runs
`<worktree>/.venv/bin/python -m pytest <args>` in this worktree with KPROXYD_LAB_TIME_SCALE set (lab waits
stretched for TCG), streams its console to stdout and hands back pytest's exit status through a writable 9p
share. The kernel package (linux-image-amd64's 6.1 dependency) and busybox-static are fetched with
`apt-get download` once and cached under $KPROXYD_GUEST_CACHE (default ~/.cache/kproxyd/guest), keyed by
package version. See docs/guest.md.
"""

from __future__ import annotations

import argparse
import codecs
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
KERNEL_METAPACKAGE = "linux-image-amd64"
BUSYBOX_PACKAGE = "busybox-static"
# What the initramfs insmods (with their dependencies) before it can mount the host's root.
BOOT_MODULES = ("virtio_pci", "9pnet_virtio", "9p", "overlay", "virtio-rng")
# Loaded up front in stage 2 because nothing autoloads them (br_netfilter owns net.bridge.* sysctls).
PRELOAD_MODULES = ("br_netfilter",)
DEFAULT_TIMEOUT = 3600.0
# Python under TCG runs about 10x slower than natively, and two kproxyds starting at once on one busy vCPU took
# 224 s to their first sync: the lab's waits (KPROXYD_LAB_TIME_SCALE) and pytest-timeout's per-test limit
# are stretched by this much inside the guest (it only costs time when a wait is about to fail).
DEFAULT_TIME_SCALE = 20.0
# What CI runs in the guest (tests/guest/test_second_kernel.py): what only a kernel with IPVS can prove; the
# iptables and nftables modes run natively in CI. docs/guest.md has both selections' measured times.
REPRESENTATIVE = ("tests/netns/test_ipvs_backend.py", "tests/netns/test_flows.py", "-k", "ipvs")
# What `make test-guest` runs without GUEST_PYTEST: every mode but ebpf through the flow and semantics suites.
FULL = (
    "tests/netns/test_nftables_kernel.py",
    "tests/netns/test_iptables_kernel.py",
    "tests/netns/test_ipvs_backend.py",
    "tests/netns/test_flows.py",
    "tests/netns/test_semantics.py",
    "-k",
    "not ebpf",
)
PYTEST_TIMEOUT = 300  # pyproject's [tool.pytest.ini_options] timeout


@dataclass(frozen=True)
class KernelTree:
    """An unpacked Debian kernel package: its vmlinuz and its depmod-ed modules directory."""

    release: str
    vmlinuz: Path
    modules: Path


@dataclass(frozen=True)
class GuestResult:
    """What a guest run produced: the command's exit status (None when it never reported), console, time."""

    returncode: int | None
    output: str
    seconds: float


def cache_root() -> Path:
    """Where unpacked packages are kept between runs."""
    default = Path.home() / ".cache" / "kproxyd" / "guest"
    return Path(os.environ.get("KPROXYD_GUEST_CACHE", default))


def _apt(*args: str) -> str:
    return subprocess.run(["apt-cache", *args], check=True, capture_output=True, text=True).stdout


def resolve_package(name: str) -> tuple[str, str]:
    """(package, version) apt would install for NAME, following linux-image-amd64 to its versioned kernel."""
    if name == KERNEL_METAPACKAGE:
        name = re.findall(r"Depends: (linux-image-[0-9][^\s]*)", _apt("depends", name))[0]
    version = re.findall(r"^Version: (\S+)", _apt("show", "--no-all-versions", name), re.M)[0]
    return name, version


def unpacked(name: str) -> Path:
    """The package's files unpacked under the cache (downloaded and unpacked on first use)."""
    package, version = resolve_package(name)
    target = cache_root() / f"{package}_{version.replace(':', '%')}"
    if (target / ".ready").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as tmp:
        subprocess.run(
            ["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", f"{package}={version}"],
            cwd=tmp,
            check=True,
        )
        (deb,) = Path(tmp).glob("*.deb")
        tree = Path(tmp) / "tree"
        subprocess.run(["dpkg-deb", "-x", str(deb), str(tree)], check=True)
        _post_unpack(tree)
        (tree / ".ready").touch()
        try:
            tree.rename(target)
        except OSError:  # a concurrent run won the race; its tree is as good as ours
            if not (target / ".ready").exists():
                raise
    return target


def _post_unpack(tree: Path) -> None:
    """A kernel package ships no modules.dep: generate it with the (already cached) busybox depmod."""
    for release_dir in (tree / "lib" / "modules").glob("*"):
        busybox = unpacked(BUSYBOX_PACKAGE) / "bin" / "busybox"
        subprocess.run([str(busybox), "depmod", "-b", str(tree), release_dir.name], check=True)


def kernel_tree() -> KernelTree:
    """Debian's current 6.1 kernel, unpacked and depmod-ed."""
    root = unpacked(KERNEL_METAPACKAGE)
    (vmlinuz,) = (root / "boot").glob("vmlinuz-*")
    release = vmlinuz.name.removeprefix("vmlinuz-")
    return KernelTree(release=release, vmlinuz=vmlinuz, modules=root / "lib" / "modules" / release)


def module_closure(modules: Path, names: Sequence[str]) -> list[Path]:
    """Module files for NAMES and everything they depend on, dependencies first (from modules.dep)."""
    deps: dict[str, list[str]] = {}
    for line in (modules / "modules.dep").read_text().splitlines():
        path, _, needs = line.partition(":")
        deps[path] = needs.split()
    by_name = {Path(path).name.removesuffix(".ko").replace("-", "_"): path for path in deps}
    ordered: list[str] = []

    def visit(path: str) -> None:
        for dep in deps[path]:
            visit(dep)
        if path not in ordered:
            ordered.append(path)

    for name in names:
        visit(by_name[name.replace("-", "_")])
    return [modules / path for path in ordered]


def build_initramfs(kernel: KernelTree, out: Path) -> Path:
    """A cpio initramfs: static busybox, the boot modules and the stage-1 /init."""
    busybox = unpacked(BUSYBOX_PACKAGE) / "bin" / "busybox"
    with tempfile.TemporaryDirectory(prefix="kproxyd-initramfs-") as tmp:
        root = Path(tmp)
        for sub in ("bin", "dev", "proc", "sys", "modules"):
            (root / sub).mkdir()
        shutil.copy2(busybox, root / "bin" / "busybox")
        shutil.copy2(HERE / "initramfs_init.sh", root / "init")
        (root / "init").chmod(0o755)
        files = module_closure(kernel.modules, BOOT_MODULES)
        for path in files:
            shutil.copy2(path, root / "modules" / path.name)
        (root / "modules" / "order").write_text("".join(f"{path.name}\n" for path in files))
        listing = subprocess.run(["find", "."], cwd=root, check=True, capture_output=True).stdout
        with open(out, "wb") as cpio:
            subprocess.run(
                [str(busybox), "cpio", "-o", "-H", "newc"],
                cwd=root,
                input=listing,
                stdout=cpio,
                stderr=subprocess.DEVNULL,
                check=True,
            )
    return out


def qemu_argv(kernel: KernelTree, initramfs: Path, results: Path, smp: int, memory: int) -> list[str]:
    """The qemu command line: TCG (KVM does not boot here), serial console on stdio, two 9p shares."""
    accel = "tcg,thread=multi" if smp > 1 else "tcg"
    append = f"console=ttyS0 quiet loglevel=3 panic=-1 kproxyd_stage2={HERE / 'stage2.sh'}"
    return [
        "qemu-system-x86_64", "-accel", accel, "-m", str(memory), "-smp", str(smp),
        "-display", "none", "-monitor", "none", "-serial", "stdio", "-no-reboot", "-nic", "none",
        "-kernel", str(kernel.vmlinuz), "-initrd", str(initramfs), "-append", append,
        "-device", "virtio-rng-pci",
        "-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
        "-virtfs", f"local,path={results},mount_tag=results,security_model=none,multidevs=remap",
    ]  # fmt: skip


def write_job(results: Path, kernel: KernelTree, command: Sequence[str], cwd: Path, time_scale: float) -> None:
    """The environment stage2.sh sources: where the modules are, what to run, where and with which env."""
    job = {
        "GUEST_MODULES": str(kernel.modules),
        "GUEST_PRELOAD": " ".join(PRELOAD_MODULES),
        "GUEST_CWD": str(cwd),
        "GUEST_COMMAND": shlex.join(command),
        "KPROXYD_LAB_TIME_SCALE": str(time_scale),
        "PY_COLORS": "1" if sys.stdout.isatty() else "0",
    }
    (results / "job.env").write_text("".join(f"export {key}={shlex.quote(value)}\n" for key, value in job.items()))


def _stream(fd: int, sink: list[str], echo: bool) -> None:
    """Copy the guest console as it comes (chunks, not lines: pytest's progress dots end no line)."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    while chunk := os.read(fd, 65536):
        text = decoder.decode(chunk).replace("\r", "")
        sink.append(text)
        if echo:
            sys.stdout.write(text)
            sys.stdout.flush()


def run_in_guest(
    command: Sequence[str],
    *,
    cwd: Path = REPO,
    smp: int = 1,
    memory: int = 1024,
    timeout: float = DEFAULT_TIMEOUT,
    time_scale: float = DEFAULT_TIME_SCALE,
    echo: bool = True,
) -> GuestResult:
    """Boot the guest, run COMMAND in CWD (a path on the host's tree), stream the console, power off."""
    kernel = kernel_tree()
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="kproxyd-guest-") as tmp:
        results = Path(tmp) / "results"
        results.mkdir()
        initramfs = build_initramfs(kernel, Path(tmp) / "initramfs.cpio")
        write_job(results, kernel, command, cwd, time_scale)
        output = _run_qemu(qemu_argv(kernel, initramfs, results, smp, memory), timeout, echo)
        rc_file = results / "rc"
        returncode = int(rc_file.read_text()) if rc_file.exists() else None
    return GuestResult(returncode=returncode, output=output, seconds=time.monotonic() - start)


def _run_qemu(argv: Sequence[str], timeout: float, echo: bool) -> str:
    """Run qemu to its exit (killed on timeout or interrupt); its console output."""
    chunks: list[str] = []
    qemu = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert qemu.stdout is not None
    reader = threading.Thread(target=_stream, args=(qemu.stdout.fileno(), chunks, echo), daemon=True)
    reader.start()
    try:
        qemu.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        chunks.append(f"guest: timed out after {timeout:.0f} s, qemu killed\n")
    finally:
        if qemu.poll() is None:
            qemu.kill()
            qemu.wait()
        reader.join(timeout=5)
        qemu.stdout.close()
    return "".join(chunks)


def pytest_command(
    pytest_args: Sequence[str], cwd: Path = REPO, time_scale: float = DEFAULT_TIME_SCALE
) -> list[str]:
    """pytest from CWD's own venv; pytest-timeout's limit stretched (a --timeout in pytest_args still wins)."""
    python = str(cwd / ".venv" / "bin" / "python")
    return [python, "-m", "pytest", "-o", f"timeout={PYTEST_TIMEOUT * time_scale:.0f}", *pytest_args]


def run_pytest(
    pytest_args: Sequence[str], *, smp: int = 1, memory: int = 1024, timeout: float = DEFAULT_TIMEOUT,
    time_scale: float = DEFAULT_TIME_SCALE, echo: bool = True,
) -> GuestResult:  # fmt: skip
    """Run a pytest selection of this worktree inside the guest."""
    command = pytest_command(pytest_args, time_scale=time_scale)
    return run_in_guest(command, smp=smp, memory=memory, timeout=timeout, time_scale=time_scale, echo=echo)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: run a pytest selection in the guest; exit with pytest's status (or 124 when it never reported)."""
    parser = argparse.ArgumentParser(prog="python -m tests.guest.run", description=__doc__.splitlines()[0])
    parser.add_argument("--smp", type=int, default=1, help="guest CPUs (multi-threaded TCG when > 1)")
    parser.add_argument("--memory", type=int, default=1024, help="guest memory in MiB")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="kill qemu after this (s)")
    parser.add_argument("--time-scale", type=float, default=DEFAULT_TIME_SCALE, help="stretch lab waits by this")
    parser.add_argument("pytest_args", nargs="*", help="after --: pytest arguments (default: FULL)")
    args = parser.parse_args(argv)
    result = run_pytest(
        args.pytest_args or FULL,
        smp=args.smp,
        memory=args.memory,
        timeout=args.timeout,
        time_scale=args.time_scale,
    )
    verdict = "no exit status (crashed or timed out)" if result.returncode is None else f"exit {result.returncode}"
    print(f"guest run: {verdict} after {result.seconds:.1f} s", file=sys.stderr)
    return 124 if result.returncode is None else result.returncode


if __name__ == "__main__":
    sys.exit(main())
