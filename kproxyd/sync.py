"""The sync: take recorded changes, re-plan what changed, hand it to the backend; and when to run it.

SyncRunner runs syncs one at a time, at most once per min-sync-period after a change, and a full one every
sync-period. A failed apply keeps the previous rules (the backend writes atomically) and is retried with
backoff as a full sync, so nothing recorded in between is lost.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import structlog

from kproxyd.backends import Backend, WriteStats
from kproxyd.metrics import ProxyMetrics
from kproxyd.model import ServicePortName
from kproxyd.plan import ServicePlan, changed_plans, plan_service_port
from kproxyd.tracker import Changes, ProxyStateTracker

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class SyncResult:
    """What one sync did."""

    full: bool
    changed: int  # ServicePorts whose plan changed (all of them on a full sync)
    services: int  # ServicePorts programmed in total
    applied: bool  # False when there was nothing to write
    seconds: float = 0.0  # how long the backend took to write it
    stats: WriteStats = field(default_factory=WriteStats)


SyncObserver = Callable[
    [Mapping[ServicePortName, ServicePlan], Mapping[ServicePortName, ServicePlan], "set[ServicePortName] | None"],
    None,
]
"""Called after each successful apply with (old plans, new plans, changed ports or None for a full sync)."""


class Proxier:
    """Turns tracked changes into plans and applies them through one backend."""

    def __init__(
        self,
        tracker: ProxyStateTracker,
        backend: Backend,
        metrics: ProxyMetrics,
        observers: Sequence[SyncObserver] = (),
    ) -> None:
        self._tracker = tracker
        self._backend = backend
        self._metrics = metrics
        self._observers = tuple(observers)
        self._plans: dict[ServicePortName, ServicePlan] = {}
        self._ports_of: dict[str, tuple[ServicePortName, ...]] = {}  # Service key -> its ports in _plans
        metrics.watch_plans(lambda: self._plans.values())

    @property
    def plans(self) -> Mapping[ServicePortName, ServicePlan]:
        """The plans last applied successfully."""
        return self._plans

    def sync(self, force_full: bool = False) -> SyncResult:
        """One sync. Raises when the backend fails; the next sync is then a full one."""
        if force_full:
            self._tracker.request_full()
        changes = self._tracker.take_changes()
        plans, ports_of, touched = self._replan(changes)
        changed = set(plans) if changes.full else changed_plans(self._plans, plans, touched)
        self._metrics.record_changes(changes.service_events, changes.endpoint_events)
        if not changes.full and not changed:
            return SyncResult(False, 0, len(plans), applied=False)
        start = time.monotonic()
        try:
            stats = self._backend.apply(plans, None if changes.full else changed, changes.node)
        except Exception:
            self._tracker.request_full()
            self._metrics.record_failure(self._backend.name)
            raise
        seconds = time.monotonic() - start
        self._metrics.record_sync(seconds, changes.full, stats.rules)
        self._metrics.record_programming(changes.trigger_times.values())
        old, self._plans, self._ports_of = self._plans, plans, ports_of
        self._notify(old, plans, None if changes.full else changed)
        return SyncResult(changes.full, len(changed), len(plans), applied=True, seconds=seconds, stats=stats)

    def _notify(
        self,
        old: Mapping[ServicePortName, ServicePlan],
        new: Mapping[ServicePortName, ServicePlan],
        changed: set[ServicePortName] | None,
    ) -> None:
        for observer in self._observers:
            try:
                observer(old, new, changed)
            except Exception:  # follow-up work (conntrack, health ports) never fails a sync
                log.exception("sync observer failed", observer=getattr(observer, "__qualname__", repr(observer)))

    def _replan(
        self, changes: Changes
    ) -> tuple[dict[ServicePortName, ServicePlan], dict[str, tuple[ServicePortName, ...]], list[ServicePortName]]:
        """The new plans, their per-Service index, and the ports that may have changed (old and new ones of the
        changed Services): a partial sync's work follows the change, not the number of Services."""
        plans = {} if changes.full else dict(self._plans)
        # The index is updated in place: after a failed apply the next sync is a full one, which rebuilds it.
        ports_of = {} if changes.full else self._ports_of
        touched: list[ServicePortName] = []
        for key, view in changes.services.items():
            for name in ports_of.pop(key, ()):
                del plans[name]
                touched.append(name)
            for port in view.ports:
                plans[port.name] = plan_service_port(port, view.endpoints.get(port.name, ()), changes.node)
                touched.append(port.name)
            if view.ports:
                ports_of[key] = tuple(port.name for port in view.ports)
        return plans, ports_of, touched


class SyncRunner:
    """Runs a sync function in its own thread, with kube-proxy's cadence.

    Changes are batched to at most one sync per min_period. Every check_period the backend is asked
    whether its rules drifted (kube-proxy's canary check); a drift, or full_period without one, makes
    the next sync full. A failed sync is retried with backoff.
    """

    def __init__(
        self,
        sync: Callable[[bool], object],
        min_period: float,
        check_period: float,
        drifted: Callable[[], bool] = lambda: False,
        full_period: float = 3600.0,
        max_retry_delay: float = 30.0,
    ) -> None:
        self._sync = sync
        self._min_period = min_period
        self._check_period = check_period
        self._drifted = drifted
        self._full_period = full_period
        self._max_retry_delay = max_retry_delay
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._pending = True
        self._full_requested = True
        self._thread = threading.Thread(target=self._loop, name="sync", daemon=True)
        self.last_success = 0.0  # time.time() of the last successful sync, 0 before the first
        self.oldest_pending = 0.0  # time.time() when the oldest unsynced change was queued

    def start(self) -> None:
        """Start the loop (the first sync, a full one, runs at once)."""
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop after the running sync, if any."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)

    def request(self) -> None:
        """Ask for a sync; several requests within min_period become one."""
        if not self._pending:
            self.oldest_pending = time.time()
        self._pending = True
        self._wake.set()

    def _loop(self) -> None:
        last_start = last_full = -float("inf")
        next_check = time.monotonic() + self._check_period
        retry_delay = 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            if now >= next_check:
                next_check = now + self._check_period
                self._check_drift()
            full = self._full_requested or now - last_full >= self._full_period
            due = last_start + max(self._min_period, retry_delay)
            if (self._pending or full) and now >= due:
                self._pending = self._full_requested = False
                last_start = now
                if self._run(full):
                    retry_delay = 0.0
                    last_full = now if full else last_full
                else:
                    self._pending, self._full_requested = True, full
                    retry_delay = min(max(2 * retry_delay, self._min_period, 0.5), self._max_retry_delay)
                continue
            wake_at = min(next_check, last_full + self._full_period)
            if self._pending or full:
                wake_at = min(wake_at, due)
            self._wake.wait(max(wake_at - now, 0.0))
            self._wake.clear()

    def _check_drift(self) -> None:
        try:
            drifted = self._drifted()
        except Exception:
            log.exception("drift check failed")
            return
        if drifted:
            log.warning("programmed rules were changed from outside; forcing a full resync")
            self._full_requested = True

    def _run(self, full: bool) -> bool:
        queued = self.oldest_pending
        log.debug("sync started", full=full, queued_ms=round((time.time() - queued) * 1000, 2) if queued else None)
        try:
            self._sync(full)
        except Exception:
            log.exception("sync failed; previous rules kept, will retry")
            return False
        self.last_success = time.time()
        if not self._pending:
            self.oldest_pending = 0.0
        return True
