"""The kernel-facing layer of the eBPF backend: compile bpf/sock_lb.c with bcc, attach it to a cgroup, pin
programs and maps under a bpffs directory, and read and write the pinned maps.

Both IP families' frontends live in one map set (addresses 16 bytes, IPv4 ones IPv4-mapped), so one
SockLbKernel per cgroup and pin directory serves both families' backends: one load, one revision counter.

Programs are attached without BPF_F_ALLOW_MULTI, so attaching a newly loaded program atomically replaces
the one an earlier run left (the kernel swaps them): together with the pinned maps, a restart never leaves
a connect() untranslated. Only programs pinned in our own directory are ever detached.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import socket
import struct
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from kproxyd.backends.ebpf.image import FrontendEntry, FrontendKey, Image, family_of
from kproxyd.backends.iptables.kernel import local_addresses
from kproxyd.model import Protocol

log = structlog.get_logger(__name__)

SOURCE = Path(__file__).resolve().parents[3] / "bpf" / "sock_lb.c"
CGROUP_SOCK_ADDR = 18  # BPF_PROG_TYPE_CGROUP_SOCK_ADDR
# program name → BPF attach type (include/uapi/linux/bpf.h)
HOOKS = {
    "connect4": 10,
    "connect6": 11,
    "sendmsg4": 14,
    "sendmsg6": 15,
    "recvmsg4": 19,
    "recvmsg6": 20,
    "getpeername4": 29,
    "getpeername6": 30,
}
MAPS = ("frontends", "slots", "counters", "affinity", "reverse", "names")
NAME_SIZE = 144  # struct service_name in bpf/lb_common.h
BPFFS_MAGIC = 0xCAFE4A11
BATCH_MIN = 64
_PROTOCOLS = {Protocol.TCP: socket.IPPROTO_TCP, Protocol.UDP: socket.IPPROTO_UDP}
_BY_NUMBER = {0: Protocol.TCP} | {number: proto for proto, number in _PROTOCOLS.items()}


def cgroup2_root() -> str:
    """Where cgroup2 is mounted (/sys/fs/cgroup, or /sys/fs/cgroup/unified on hybrid hosts); "" if nowhere."""
    with open("/proc/mounts") as f:
        for line in f:
            parts = line.split()
            if parts[2] == "cgroup2":
                return parts[1]
    return ""


def _is_bpffs(path: str) -> bool:
    class StatFs(ctypes.Structure):
        _fields_ = [("f_type", ctypes.c_long), ("rest", ctypes.c_byte * 112)]

    buf = StatFs()
    libc = ctypes.CDLL(None, use_errno=True)
    return bool(libc.statfs(path.encode(), ctypes.byref(buf)) == 0 and buf.f_type == BPFFS_MAGIC)


def ensure_bpffs(pin_path: str) -> None:
    """Mount bpffs at the pin path's parent when nothing is mounted there (as systemd does at boot)."""
    parent = os.path.dirname(pin_path.rstrip("/")) or "/"
    if not _is_bpffs(parent):
        log.info("mounting bpffs", path=parent)
        os.makedirs(parent, exist_ok=True)
        mounted = subprocess.run(["mount", "-t", "bpf", "bpf", parent], capture_output=True, check=False)
        if mounted.returncode != 0 or not _is_bpffs(parent):
            raise RuntimeError(f"{parent} is not a bpffs mount and mounting one failed")
    os.makedirs(pin_path, exist_ok=True)


_V4_MAPPED = bytes(10) + b"\xff\xff"
_WORDS = struct.Struct("<4I")  # the map's u32 addr[4], each word holding network-order bytes


def _ip(ip: str) -> tuple[int, ...]:
    """The map's form of an address: 16 bytes as four u32 words, an IPv4 address IPv4-mapped."""
    packed = socket.inet_pton(socket.AF_INET6, ip) if ":" in ip else _V4_MAPPED + socket.inet_aton(ip)
    return _WORDS.unpack(packed)


def _ip_text(words: Any) -> str:
    packed = _WORDS.pack(*words)
    if packed.startswith(_V4_MAPPED):
        return socket.inet_ntoa(packed[12:])
    return socket.inet_ntop(socket.AF_INET6, packed)


class SockLbKernel:
    """The socket load balancer's programs and pinned maps for one cgroup and one pin directory."""

    source_file = SOURCE
    map_names: tuple[str, ...] = MAPS  # bcc's table names, pinned as <pin_path>/<map_prefix><name>
    map_prefix = ""

    def __init__(self, cgroup: str, pin_path: str) -> None:
        self.cgroup = cgroup
        self.pin_path = pin_path
        self._bpf: Any = None
        self._tables: dict[str, Any] = {}
        self._unattached: dict[str, Any] = {}  # programs loaded, not attached yet: name → bcc function
        self._next_rev = 1
        self.generation = 0  # loads so far: a family's backend rereads its image when this moved

    def local_addresses(self, family: int = 4) -> list[str]:
        """This namespace's addresses of one family (where node ports answer)."""
        return local_addresses(family)

    @property
    def loaded(self) -> bool:
        """True once load() ran and nothing invalidated it since."""
        return self._bpf is not None

    def invalidate(self) -> None:
        """Forget the loaded programs (after a failure or drift): the next load() compiles and attaches anew."""
        self._bpf, self._tables, self._unattached = None, {}, {}

    def load(self) -> None:
        """Compile and load the programs (creating or reusing the pinned maps), continue the revision counter
        where the maps' frontends are and drop slots none of them uses. attach() comes after the first write:
        the new programs never see emptier maps than the ones they replace.
        """
        if not os.path.isdir(self.cgroup):
            raise RuntimeError(f"cgroup {self.cgroup!r} does not exist (ebpf mode needs cgroup2: --cgroup-root)")
        ensure_bpffs(self.pin_path)
        self._bpf, self._tables = self._compile(), {}
        self._unattached = {
            name: self._bpf.load_func(name.encode(), CGROUP_SOCK_ADDR, attach_type=attach_type)
            for name, attach_type in HOOKS.items()
        }
        self._collect_slots()
        self.generation += 1

    def _compile(self) -> Any:
        """bcc's object for the source. bcc reuses a pinned map whatever its key and value sizes: the maps an
        earlier layout pinned (e.g. IPv4-only keys) are unpinned first; its programs keep them until replaced.
        """
        from bcc import BPF  # imported here: cleanup and the pure layers must not need bcc

        text = self.source_file.read_text().replace("PIN_DIR", self.pin_path).encode()
        cflags = [f"-I{self.source_file.parent}"]  # bpf/lb_common.h
        bpf = BPF(text=text, cflags=cflags)
        stale = [self.map_prefix + name for name in self.map_names if not _fits(bpf.get_table(name.encode()))]
        if not stale:
            return bpf
        log.warning("pinned eBPF maps of an earlier layout: replacing them", maps=stale, pin_path=self.pin_path)
        bpf.cleanup()
        self.unpin_maps()
        return BPF(text=text, cflags=cflags)

    def unpin_maps(self) -> None:
        """Remove the maps' pins (programs still holding a map keep it until they are replaced)."""
        for name in self.map_names:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self.pin_path, self.map_prefix + name))

    def attach(self) -> None:
        """Attach the loaded programs to the cgroup and pin them (once per load; a no-op after)."""
        if not self._unattached:
            return
        from bcc import BPF

        cgroup_fd = os.open(self.cgroup, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for name, fn in self._unattached.items():
                BPF.attach_func(fn, cgroup_fd, HOOKS[name])  # replaces an earlier run's program in place
                self._pin(fn.fd, name)
        finally:
            os.close(cgroup_fd)
        self._unattached = {}
        log.info("eBPF socket load balancer attached", cgroup=self.cgroup, pin_path=self.pin_path)

    def _collect_slots(self) -> None:
        """Continue the revision counter; delete the slots and names no frontend uses."""
        frontends, slots, names = self._table("frontends"), self._table("slots"), self._table("names")
        used: set[tuple[int, int]] = set()
        for v in frontends.values():
            used.update((v.rev, i) for i in range(v.count))
            self._next_rev = max(self._next_rev, v.rev + 1)
        for k in [k for k in slots if (k.rev, k.slot) not in used]:
            del slots[k]
        for k in [k for k in names if frontends.get(k) is None]:
            del names[k]

    def _pin(self, fd: int, name: str) -> None:
        from bcc.libbcc import lib

        path = os.path.join(self.pin_path, f"prog_{name}")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        if lib.bpf_obj_pin(fd, path.encode()) != 0:
            raise OSError(ctypes.get_errno(), f"pinning {path} failed")

    def _table(self, name: str) -> Any:
        # Cached: bcc's get_table decodes the key and leaf types from JSON on every call.
        if name not in self._tables:
            self._tables[name] = self._bpf.get_table(name.encode())
        return self._tables[name]

    def _key(self, key: FrontendKey) -> Any:
        table = self._table("frontends")
        proto = _PROTOCOLS[key.protocol] if key.port else 0  # port 0: the cluster IP's address entry
        return table.Key(_ip(key.ip), socket.htons(key.port), proto, 0)

    def read_image(self, family: int) -> Image:
        """What the pinned maps hold for one IP family (an earlier run's state after a restart)."""
        frontends, slots, names = self._table("frontends"), self._table("slots"), self._table("names")
        image: Image = {}
        for k, v in frontends.items():
            key = _frontend_key(k)
            if family_of(key.ip) != family:
                continue
            backends = []
            for i in range(v.count):
                be = slots.get(slots.Key(v.rev, i))
                backends.append((_ip_text(be.addr), socket.ntohs(be.port)) if be is not None else ("::", 0))
            name = names.get(k)
            image[key] = FrontendEntry(tuple(backends), v.flags, v.affinity, name.name.decode() if name else "")
        return image

    def write(self, upserts: Image, deletes: list[FrontendKey]) -> int:
        """Write changed frontends (their new slots first, then the entry that points at them), delete
        removed ones; returns the number of map writes.
        """
        frontends, slots, counters = self._table("frontends"), self._table("slots"), self._table("counters")
        names = self._table("names")
        slot_items: list[tuple[Any, Any]] = []
        entries: list[tuple[Any, Any]] = []
        name_items: list[tuple[Any, Any]] = []
        replaced = []
        for key, entry in upserts.items():
            rev, self._next_rev = self._next_rev, self._next_rev + 1
            for i, (ip, port) in enumerate(entry.slots):
                slot_items.append((slots.Key(rev, i), slots.Leaf(_ip(ip), socket.htons(port), 0)))
            fkey = self._key(key)
            previous = frontends.get(fkey)
            if previous is not None:
                replaced.append((previous.rev, previous.count))
            entries.append((fkey, frontends.Leaf(rev, len(entry.slots), entry.flags, entry.affinity)))
            if entry.service:
                name_items.append((fkey, names.Leaf(entry.service.encode()[: NAME_SIZE - 1])))
        # Every new slot before any entry that points at it; old slots only once nothing points at them.
        _update(slots, slot_items)
        _update(frontends, entries)
        _update(names, name_items)
        writes = len(slot_items) + len(entries) + len(name_items)
        for rev, count in replaced:
            writes += self._delete_slots(slots, rev, count)
        for key in deletes:
            fkey = self._key(key)
            previous = frontends.get(fkey)
            with contextlib.suppress(KeyError):
                del frontends[fkey]
            for table in (counters, names):
                with contextlib.suppress(KeyError):
                    del table[fkey]
            if previous is not None:
                writes += 1 + self._delete_slots(slots, previous.rev, previous.count)
        return writes

    @staticmethod
    def _delete_slots(slots: Any, rev: int, count: int) -> int:
        for i in range(count):
            with contextlib.suppress(KeyError):
                del slots[slots.Key(rev, i)]
        return count

    def counters(self) -> Iterator[tuple[FrontendKey, int]]:
        """Connections plus unconnected datagrams translated per frontend."""
        for k, v in self._table("counters").items():
            yield _frontend_key(k), sum(cpu.connections + cpu.packets for cpu in v)  # per-CPU values

    def attached(self) -> bool:
        """True while the maps are pinned and a connect4 program is attached to the cgroup."""
        from bcc.libbcc import lib

        if not os.path.exists(os.path.join(self.pin_path, "frontends")):
            return False
        fd = os.open(self.cgroup, os.O_RDONLY | os.O_DIRECTORY)
        try:
            count = ctypes.c_uint32(1)
            ids = (ctypes.c_uint32 * 1)()
            flags = ctypes.c_uint32(0)
            res = lib.bpf_prog_query(fd, HOOKS["connect4"], 0, ctypes.byref(flags), ids, ctypes.byref(count))
            return bool(res == 0 and count.value > 0)
        finally:
            os.close(fd)


class _MapInfo(ctypes.Structure):
    """The head of struct bpf_map_info (the kernel fills what fits)."""

    _fields_ = [(name, ctypes.c_uint32) for name in ("type", "id", "key_size", "value_size")]


def _fits(table: Any) -> bool:
    """True when the map behind a bcc table has the key and value sizes the source declares."""
    from bcc.libbcc import lib

    info, size = _MapInfo(), ctypes.c_uint32(ctypes.sizeof(_MapInfo))
    if lib.bpf_obj_get_info(table.map_fd, ctypes.byref(info), ctypes.byref(size)) != 0:
        raise OSError(ctypes.get_errno(), "BPF_OBJ_GET_INFO_BY_FD failed")
    leaf = getattr(table, "sLeaf", table.Leaf)  # per-CPU tables: bcc's Leaf is one value per CPU
    return bool(info.key_size == ctypes.sizeof(table.Key) and info.value_size == ctypes.sizeof(leaf))


def _frontend_key(k: Any) -> FrontendKey:
    return FrontendKey(_ip_text(k.addr), socket.ntohs(k.port), _BY_NUMBER[k.proto])


def _update(table: Any, items: list[tuple[Any, Any]]) -> None:
    """Write items in one BPF_MAP_UPDATE_BATCH call (a few, one by one)."""
    if len(items) < BATCH_MIN:
        for key, value in items:
            table[key] = value
        return
    keys = (table.Key * len(items))(*(key for key, _ in items))
    values = (table.Leaf * len(items))(*(value for _, value in items))
    table.items_update_batch(keys, values)


def detach_and_unpin(cgroup: str, pin_path: str) -> list[str]:
    """Detach the programs pinned under pin_path from cgroup and remove the pin directory; no compile.

    Cheap and safe when nothing is there: touches only what is pinned in pin_path.
    """
    if not os.path.isdir(pin_path):
        return []
    from bcc.libbcc import lib

    detached = []
    fd_cgroup = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY) if os.path.isdir(cgroup) else -1
    try:
        for name, attach_type in HOOKS.items():
            path = os.path.join(pin_path, f"prog_{name}")
            if not os.path.exists(path) or fd_cgroup < 0:
                continue
            fd = lib.bpf_obj_get(path.encode())
            if fd < 0:
                continue
            if lib.bpf_prog_detach2(fd, fd_cgroup, attach_type) == 0:
                detached.append(name)
            os.close(fd)
    finally:
        if fd_cgroup >= 0:
            os.close(fd_cgroup)
    shutil.rmtree(pin_path, ignore_errors=True)
    log.info("eBPF programs detached and unpinned", cgroup=cgroup, pin_path=pin_path, detached=detached)
    return detached


# The layout of bpf/lb_common.h, for reading the pinned maps without compiling the programs (`kproxyd explain`).
class _FrontendKey(ctypes.Structure):
    _fields_ = [
        ("addr", ctypes.c_uint32 * 4),
        ("port", ctypes.c_uint16),
        ("proto", ctypes.c_uint8),
        ("pad", ctypes.c_uint8),
    ]


class _Frontend(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint32) for name in ("rev", "count", "flags", "affinity")]


class _SlotKey(ctypes.Structure):
    _fields_ = [("rev", ctypes.c_uint32), ("slot", ctypes.c_uint32)]


class _Backend(ctypes.Structure):
    _fields_ = [("addr", ctypes.c_uint32 * 4), ("port", ctypes.c_uint16), ("pad", ctypes.c_uint16)]


class _Counter(ctypes.Structure):
    _fields_ = [("connections", ctypes.c_uint64), ("packets", ctypes.c_uint64)]


class _ServiceName(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char * NAME_SIZE)]


class _SourcePrefix(ctypes.Structure):
    _fields_ = [("prefixlen", ctypes.c_uint32), ("addr", ctypes.c_uint32 * 4)]


class PinnedMap:
    """One pinned map opened by path, read through bcc's libbcc (lookups and key iteration, no compile)."""

    def __init__(self, path: str, key: type[ctypes.Structure], value: type[Any], per_cpu: bool = False) -> None:
        """Open it; OSError when it is not there or its key or value size is not the layout's."""
        from bcc.libbcc import lib
        from bcc.utils import get_possible_cpus

        self._key, self._value, self._lib = key, value, lib
        self._cpus = len(get_possible_cpus()) if per_cpu else 1
        self.fd = lib.bpf_obj_get(path.encode())
        if self.fd < 0:
            raise OSError(f"cannot open the pinned map {path}")
        info, size = _MapInfo(), ctypes.c_uint32(ctypes.sizeof(_MapInfo))
        lib.bpf_obj_get_info(self.fd, ctypes.byref(info), ctypes.byref(size))
        if (info.key_size, info.value_size) != (ctypes.sizeof(key), ctypes.sizeof(value)):
            self.close()
            raise OSError(f"{path} has another layout than bpf/lb_common.h's (a daemon of another version?)")

    def get(self, key: ctypes.Structure) -> Any:
        """The value at key (a list of per-CPU values for a per-CPU map), None when there is none."""
        value = (self._value * self._cpus)()
        if self._lib.bpf_lookup_elem(self.fd, ctypes.byref(key), ctypes.byref(value)) != 0:
            return None
        return list(value) if self._cpus > 1 else value[0]

    def __iter__(self) -> Iterator[Any]:
        """Every key."""
        key, following = self._key(), self._key()
        previous: Any = None  # NULL: the first key
        while self._lib.bpf_get_next_key(self.fd, previous, ctypes.byref(following)) == 0:
            ctypes.memmove(ctypes.byref(key), ctypes.byref(following), ctypes.sizeof(key))
            previous = ctypes.byref(key)
            yield self._key.from_buffer_copy(key)

    def close(self) -> None:
        """Close the map's file descriptor."""
        os.close(self.fd)


@dataclass(frozen=True, slots=True)
class PinnedFrontend:
    """One frontend as the pinned maps hold it, with its slots read and its connections counted so far."""

    rev: int
    entry: FrontendEntry
    connections: int


class PinnedFrontends:
    """One program's pinned frontend maps (the socket load balancer's, or with prefix "tc_" tc's), read-only."""

    def __init__(self, pin_path: str, prefix: str = "") -> None:
        """Open frontends, slots, counters and (when pinned: a daemon of an earlier version has none) names."""
        base = os.path.join(pin_path, prefix)
        self._maps = {
            "frontends": PinnedMap(base + "frontends", _FrontendKey, _Frontend),
            "slots": PinnedMap(base + "slots", _SlotKey, _Backend),
            "counters": PinnedMap(base + "counters", _FrontendKey, _Counter, per_cpu=True),
        }
        if os.path.exists(base + "names"):
            self._maps["names"] = PinnedMap(base + "names", _FrontendKey, _ServiceName)
        self._base = base

    def frontend(self, key: FrontendKey) -> PinnedFrontend | None:
        """The frontend at key (port 0, protocol TCP: a cluster IP's address entry), None when there is none."""
        fkey = _pinned_key(key)
        found = self._maps["frontends"].get(fkey)
        if found is None:
            return None
        slots = []
        for i in range(found.count):
            backend = self._maps["slots"].get(_SlotKey(found.rev, i))
            slots.append(
                (_ip_text(backend.addr), socket.ntohs(backend.port)) if backend is not None else ("::", 0)
            )
        counts = self._maps["counters"].get(fkey) or []
        connections = sum(cpu.connections + cpu.packets for cpu in counts)
        entry = FrontendEntry(tuple(slots), found.flags, found.affinity, self._name(fkey))
        return PinnedFrontend(found.rev, entry, connections)

    def service_at(self, ip: str) -> str:
        """The Service ("ns/name") of a frontend at ip, "" when none is named (scans the names map)."""
        names = self._maps.get("names")
        wanted = tuple(_ip(ip))
        for key in names if names is not None else ():
            if tuple(key.addr) == wanted:
                return self._name(key).split(":")[0]
        return ""

    def pod_sources(self) -> tuple[str, ...]:
        """tc's pod-source prefixes (tc_pod_sources) as CIDRs (IPv4 ones stored IPv4-mapped: 96 + length)."""
        sources = PinnedMap(self._base + "pod_sources", _SourcePrefix, ctypes.c_uint8)
        try:
            return tuple(_prefix_text(k) for k in sources)
        finally:
            sources.close()

    def _name(self, key: ctypes.Structure) -> str:
        names = self._maps.get("names")
        found = names.get(key) if names is not None else None
        return found.name.decode(errors="replace") if found is not None else ""

    def close(self) -> None:
        """Close the maps."""
        for pinned in self._maps.values():
            pinned.close()


def _prefix_text(key: _SourcePrefix) -> str:
    ip = _ip_text(key.addr)
    return f"{ip}/{key.prefixlen - 96 if ':' not in ip else key.prefixlen}"


def _pinned_key(key: FrontendKey) -> _FrontendKey:
    proto = _PROTOCOLS[key.protocol] if key.port else 0
    return _FrontendKey((ctypes.c_uint32 * 4)(*_ip(key.ip)), socket.htons(key.port), proto, 0)
