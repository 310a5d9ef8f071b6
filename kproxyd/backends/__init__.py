"""Dataplane backends: each renders ServicePlans (pure) and applies them to the kernel (thin)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from kproxyd.model import NodeInfo, ServicePortName
from kproxyd.plan import ServicePlan


@dataclass(frozen=True, slots=True)
class WriteStats:
    """The size of what one sync sent to the kernel (zero when nothing was sent)."""

    bytes: int = 0
    lines: int = 0
    rules: Mapping[str, int] = field(default_factory=dict)  # rules per table after the write, where known


@dataclass(frozen=True, slots=True)
class FrontendCounter:
    """New connections to one Service frontend since its rules were last written (from kernel counters)."""

    service: str  # "ns/name:port"
    frontend: str  # "10.96.0.10:80/TCP", or "nodePort 30080/TCP"
    connections: int


class BackendUnavailableError(RuntimeError):
    """The kernel cannot run the configured proxy mode (e.g. ipvs without IPVS); the message says why."""


class Backend(Protocol):
    """What the sync needs from a dataplane."""

    name: str

    def apply(
        self,
        plans: Mapping[ServicePortName, ServicePlan],
        changed: set[ServicePortName] | None,
        node: NodeInfo,
    ) -> WriteStats:
        """Make the kernel match plans; changed=None means a full sync. Atomic: on error nothing changed."""

    def connection_counters(self) -> list[FrontendCounter]:
        """New connections per Service frontend, read from the kernel's rule or map counters."""

    def drifted(self) -> bool:
        """True when the kernel no longer holds what was written (an external flush): resync fully."""

    def cleanup(self) -> None:
        """Remove everything this backend ever programmed."""
