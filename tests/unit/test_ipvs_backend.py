"""The IPVS backend's write order, against recording fakes of its kernel layer."""

from __future__ import annotations

from collections.abc import Collection, Iterable

import pytest

from kproxyd.backends.ipvs import backend as ipvs_backend
from kproxyd.backends.ipvs.backend import IpvsBackend
from kproxyd.backends.ipvs.render import LiveService, ServiceChanges, VirtualServerKey
from kproxyd.config import ProxyConfig
from kproxyd.model import NodeInfo
from tests.model_factories import eps, plans, spn, svc

NODE = NodeInfo("node1", addresses=("192.168.0.2",))


class Recorder:
    """Every fake appends what it was asked to do, in order."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def ensure_jumps(self) -> None:
        self.calls.append("jumps")

    def restore(self, text: str) -> None:
        self.calls.append("iptables" if text.startswith("*nat") else f"ipset {text.split()[0]}")


class Ipset:
    def __init__(self, recorder: Recorder, live: dict[str, set[str]]) -> None:
        self.recorder, self.live = recorder, live

    def sets(self, wanted: Iterable[str]) -> dict[str, set[str]]:
        return {name: members for name, members in self.live.items() if name in set(wanted)}

    def restore(self, text: str) -> None:
        if text:
            self.recorder.restore(text)


class Link:
    def __init__(self, recorder: Recorder, live: set[str]) -> None:
        self.recorder, self.live = recorder, live

    def addresses(self, family: int) -> set[str]:
        return set(self.live)

    def update(self, family: int, add: Collection[str], remove: Collection[str]) -> None:
        self.recorder.calls += [f"address + {ip}" for ip in add] + [f"address - {ip}" for ip in remove]


class Kernel:
    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder

    def set_timeouts(self, tcp: int, tcp_fin: int, udp: int) -> None:
        pass

    def services(self, keys: Iterable[VirtualServerKey] | None = None) -> dict[VirtualServerKey, LiveService]:
        return {}

    def apply(self, changes: ServiceChanges) -> None:
        self.recorder.calls += [f"virtual service {key}" for key in changes.create]


def test_a_service_address_comes_after_its_rules_and_virtual_service(monkeypatch: pytest.MonkeyPatch) -> None:
    """The node reaches a cluster IP from that address: it must not answer before KUBE-MARK-MASQ can match,
    nor before IPVS has a virtual service for it (the local stack would reset the connection)."""
    monkeypatch.setattr(ipvs_backend, "prepare_kernel", lambda scheduler, strict_arp: None)
    recorder = Recorder()
    backend = IpvsBackend(
        ProxyConfig(cluster_cidrs=("10.0.0.0/8",), mode="ipvs"),
        iptables=recorder,  # type: ignore[arg-type]
        kernel=Kernel(recorder),  # type: ignore[arg-type]
        link=Link(recorder, {"172.30.0.9"}),  # type: ignore[arg-type]
        ipset=Ipset(recorder, {"KUBE-CLUSTER-IP": {"172.30.0.9,tcp:80"}}),  # type: ignore[arg-type]
        local_addresses=lambda _family: ["192.168.0.2"],
    )
    backend.apply(plans((svc(spn(), "172.30.0.41"), eps("10.180.0.1"))), None, NODE)
    assert recorder.calls == [
        "jumps",
        "ipset create",
        "iptables",
        "virtual service TCP/172.30.0.41:80",
        "address + 172.30.0.41",
        "address - 172.30.0.9",
        "ipset del",
    ]
