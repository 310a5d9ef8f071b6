"""Dataplane backends: each renders ServicePlans (pure) and applies them to the kernel (thin)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from kproxyd.model import NodeInfo, ServicePortName
from kproxyd.plan import ServicePlan


class Backend(Protocol):
    """What the sync needs from a dataplane."""

    name: str

    def apply(
        self,
        plans: Mapping[ServicePortName, ServicePlan],
        changed: set[ServicePortName] | None,
        node: NodeInfo,
    ) -> None:
        """Make the kernel match plans; changed=None means a full sync. Atomic: on error nothing changed."""

    def drifted(self) -> bool:
        """True when the kernel no longer holds what was written (an external flush): resync fully."""

    def cleanup(self) -> None:
        """Remove everything this backend ever programmed."""
