"""The sync: take recorded changes, re-plan what changed, hand it to the backend; and when to run it.

SyncRunner runs syncs one at a time, at most once per min-sync-period after a change, and a full one every
sync-period. A failed apply keeps the previous rules (the backend writes atomically) and is retried with
backoff as a full sync, so nothing recorded in between is lost.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import structlog

from kproxyd.backends import Backend, WriteStats
from kproxyd.backends.common import gc_paused
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
        # A partial sync re-plans in place (a copy would cost O(Services) per change): the lock keeps scrapes
        # from iterating the plans meanwhile, and a failed apply puts the replaced plans back.
        self._lock = threading.Lock()
        self._plans: dict[ServicePortName, ServicePlan] = {}
        self._ports_of: dict[str, tuple[ServicePortName, ...]] = {}  # Service key -> its ports in _plans
        metrics.watch_plans(self._plan_list)

    @property
    def plans(self) -> Mapping[ServicePortName, ServicePlan]:
        """The plans last applied successfully (read from the sync thread, or between syncs)."""
        return self._plans

    def _plan_list(self) -> list[ServicePlan]:
        with self._lock:
            return list(self._plans.values())

    def sync(self, force_full: bool = False) -> SyncResult:
        """One sync. Raises when the backend fails; the next sync is then a full one."""
        if force_full:
            self._tracker.request_full()
        changes = self._tracker.take_changes()
        self._metrics.record_changes(changes.service_events, changes.endpoint_events)
        return self._sync_full(changes) if changes.full else self._sync_partial(changes)

    def _sync_full(self, changes: Changes) -> SyncResult:
        plans: dict[ServicePortName, ServicePlan] = {}
        ports_of: dict[str, tuple[ServicePortName, ...]] = {}
        # Frozen after: the collections a later change triggers no longer traverse every plan and object.
        with gc_paused():
            _replan(changes, plans, ports_of)
            result = self._apply(plans, None, changes)
        with self._lock:
            old, self._plans, self._ports_of = self._plans, plans, ports_of
        self._notify(old, plans, None)
        return result

    def _sync_partial(self, changes: Changes) -> SyncResult:
        with self._lock:
            replaced = _replan(changes, self._plans, self._ports_of)
        old = _Before(self._plans, replaced)
        changed = changed_plans(old, self._plans, replaced)
        if not changed:
            return SyncResult(False, 0, len(self._plans), applied=False)
        try:
            result = self._apply(self._plans, changed, changes)
        except Exception:
            with self._lock:
                _restore(self._plans, replaced)  # the index stays: the next sync is a full one, which rebuilds it
            raise
        self._notify(old, self._plans, changed)
        return result

    def _apply(
        self, plans: dict[ServicePortName, ServicePlan], changed: set[ServicePortName] | None, changes: Changes
    ) -> SyncResult:
        start = time.monotonic()
        try:
            stats = self._backend.apply(plans, changed, changes.node)
        except Exception:
            self._tracker.request_full()
            self._metrics.record_failure(self._backend.name)
            raise
        seconds = time.monotonic() - start
        self._metrics.record_sync(seconds, changes.full, stats.rules)
        self._metrics.record_programming(changes.trigger_times.values())
        count = len(plans) if changed is None else len(changed)
        return SyncResult(changes.full, count, len(plans), applied=True, seconds=seconds, stats=stats)

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
    changes: Changes, plans: dict[ServicePortName, ServicePlan], ports_of: dict[str, tuple[ServicePortName, ...]]
) -> dict[ServicePortName, ServicePlan | None]:
    """Re-plan the changed Services' ports into plans and their per-Service index, in place: a partial sync's
    work follows the change, not the number of Services. Returns what each touched port had before (None:
    nothing), for the old and the new ports of the changed Services."""
    replaced: dict[ServicePortName, ServicePlan | None] = {}
    for key, view in changes.services.items():
        for name in ports_of.pop(key, ()):
            replaced.setdefault(name, plans.pop(name))
        for port in view.ports:
            replaced.setdefault(port.name, plans.get(port.name))
            plans[port.name] = plan_service_port(port, view.endpoints.get(port.name, ()), changes.node)
        if view.ports:
            ports_of[key] = tuple(port.name for port in view.ports)
    return replaced


def _restore(
    plans: dict[ServicePortName, ServicePlan], replaced: Mapping[ServicePortName, ServicePlan | None]
) -> None:
    """Undo _replan on plans."""
    for name, was in replaced.items():
        if was is None:
            plans.pop(name, None)
        else:
            plans[name] = was


class _Before(Mapping[ServicePortName, ServicePlan]):
    """The plans as they were before a partial sync: the current ones with the replaced entries put back
    (a view for this sync's comparisons and observers, which look up the changed ports)."""

    def __init__(
        self,
        current: Mapping[ServicePortName, ServicePlan],
        replaced: Mapping[ServicePortName, ServicePlan | None],
    ) -> None:
        self._current = current
        self._replaced = replaced

    def __getitem__(self, name: ServicePortName) -> ServicePlan:
        if name not in self._replaced:
            return self._current[name]
        was = self._replaced[name]
        if was is None:
            raise KeyError(name)
        return was

    def __iter__(self) -> Iterator[ServicePortName]:
        yield from (name for name in self._current if self._replaced.get(name, name) is not None)
        yield from (name for name, was in self._replaced.items() if was is not None and name not in self._current)

    def __len__(self) -> int:
        return sum(1 for _ in self)


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
