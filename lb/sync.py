"""The load-balancer sync loops: one per sandbox the process serves.

Like kube-proxy's proxier: a View or sandbox change only marks sandboxes dirty; a sync
takes the latest View's per-network VIP tables (planned once per View, per changed
service), skips a sandbox whose tables did not change, and hands the backend the plan and
the VIPs that may differ (followed through the tables' history, not by comparing every
VIP), so a change among 10,000 services costs its VIPs in each sandbox. Then UDP conntrack
entries towards backends that left are deleted, beside the loop (a ctnetlink dump walks
the kernel's whole conntrack hash, ~10 ms here even for an empty netns: it must not hold
back the next sandbox's rules). Changes arriving meanwhile coalesce into
the next sync. A failed sync forgets what it believed the kernel held, so the next one
reads the kernel again and converges.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

from discovery.gcpause import release_free_memory
from discovery.metrics import Metrics
from discovery.state.view import View

from .conntrack import forget_udp_flows
from .iptables import IptablesBackend
from .ipvs import IpvsBackend, ipvs_available
from .plan import EMPTY_TABLE, Plan, PlanCache, VipTable, changed_vips, lost_backends, rule_count

log = logging.getLogger(__name__)

BACKENDS = ("auto", "ipvs", "nftables", "iptables")
TRIM_AFTER = 1000  # rules or elements written by one sync before the C heap's free pages are handed back
IDLE_AFTER = 1.0  # seconds without a change before a sandbox's backend lets go of its caches


def make_backend(choice: str, drain_grace: float):
    """``auto``: IPVS when the kernel has it, else nftables when it works, else iptables."""
    from discovery.errors import SvcnetError
    from discovery.host.nft import nft_available

    if choice == "ipvs" or (choice == "auto" and ipvs_available()):
        if not ipvs_available():
            raise SvcnetError("--lb-backend ipvs: IPVS is not available here (no ip_vs module, or no modprobe: "
                              "apt-get install kmod); use --lb-backend nftables, iptables or auto")
        return IpvsBackend(drain_grace)
    if choice == "nftables" or (choice == "auto" and nft_available()):
        if not nft_available():
            raise SvcnetError("--lb-backend nftables: nftables is not usable here (apt-get install libnftables1; "
                              "the kernel needs nf_tables); use --lb-backend iptables or auto")
        from .nftables import NftablesBackend
        return NftablesBackend()
    return IptablesBackend()


def clear_other_backends(active: str, netns: str) -> None:
    """Rules another backend left in ``netns`` (an agent restarted with another
    ``--lb-backend``) would still catch VIP traffic first: take them out before the first sync.
    Only the nftables switch is handled; iptables and IPVS share the reject chain."""
    from discovery.host import netlink
    from discovery.host.xtables import LOCK, table_in_use

    if active == "nftables":
        with LOCK, netlink.entered_netns(netns):
            legacy = {name for name in ("nat", "mangle") if table_in_use(name)}
        if "nat" in legacy:
            IptablesBackend().remove(netns)
        if "mangle" in legacy and Path("/proc/net/ip_vs").exists():
            IpvsBackend().remove(netns)
        return
    from discovery.host.nft import nft_available

    if nft_available():
        from .nftables import NftablesBackend
        NftablesBackend().remove(netns)


class _Sandbox:
    __slots__ = ("name", "netns", "attached", "foreign", "tables", "plan", "kernel", "revision", "deadline",
                 "cleared", "dirty", "task", "holds_cache")

    def __init__(self, name: str, netns: str, attached: tuple[str, ...], foreign: bool) -> None:
        self.name = name
        self.netns = netns
        self.attached = attached
        self.foreign = foreign  # a netns svcnet did not make: take our rules out when we leave
        self.tables: tuple[VipTable, ...] | None = None  # the network tables the last sync applied
        self.plan: Plan | None = None  # what the last successful sync applied
        self.kernel = None  # the backend's notion of the kernel state (None: read it)
        self.revision = -1
        self.deadline: float | None = None  # a drain to finish (IPVS)
        self.cleared = False  # other backends' leftovers removed
        self.dirty = asyncio.Event()
        self.task: asyncio.Task | None = None
        self.holds_cache = False  # synced since the backend last let go of its caches


class LbSync:
    """One task per sandbox, so a slow sync (a sandbox's first, at 10,000 services) never
    holds back another sandbox's change; at most ``workers`` syncs run at once, each in a
    worker thread. The View's per-network VIP tables are planned once per View and shared;
    a sandbox rewrites only the VIPs its tables changed since it last synced."""

    def __init__(self, backend, metrics: Metrics, workers: int = 4) -> None:
        self.backend = backend
        self.view = View()
        self.sandboxes: dict[str, _Sandbox] = {}
        self._plans = PlanCache()
        self._tables: tuple[View, dict[str, VipTable]] | None = None
        self._workers = asyncio.Semaphore(workers)
        self._cleanups: set[asyncio.Task] = set()
        self._trim: asyncio.TimerHandle | None = None  # a malloc_trim due after sandboxes went quiet
        self._release_caches = getattr(backend, "release", None)  # backends that keep caches per sandbox
        self._flow_warned: set[str] = set()
        self._running = False
        self._synced = asyncio.Condition()
        self._conntrack_warned = False
        # no sync before the first View (from etcd or the snapshot on disk): an empty View
        # would take every VIP out of every sandbox of a restarted node
        self._has_view = asyncio.Event()
        self.syncs = metrics.counter("svcnet_lb_syncs_total", "Load-balancer syncs, by result.", ("result",))
        self.duration = metrics.histogram("svcnet_lb_sync_seconds", "Duration of one load-balancer sync.")
        self.rules_written = metrics.counter("svcnet_lb_rules_written_total",
                                             "Rules, set elements and IPVS entries written by syncs.")
        self.services_written = metrics.counter("svcnet_lb_services_written_total",
                                                "VIPs (re)programmed in some sandbox.")
        self.flows_forgotten = metrics.counter("svcnet_lb_conntrack_deleted_total",
                                               "UDP conntrack entries deleted towards removed backends.")
        metrics.gauge("svcnet_lb_vips", "VIPs programmed, summed over sandboxes.",
                      lambda: sum(len(s.plan or {}) for s in self.sandboxes.values()))
        metrics.gauge("svcnet_lb_rules", "Rules the plans need, summed over sandboxes (iptables count).",
                      lambda: sum(rule_count((s.plan or {}).values()) for s in self.sandboxes.values()))
        metrics.gauge("svcnet_lb_backend_info", "The dataplane in use.", lambda: {(backend.name,): 1}, ("backend",))

    def _conntrack_failed(self, sandbox: str, exc: Exception) -> None:
        # once per process at warning: a kernel without nf_conntrack_netlink fails every time
        level = logging.DEBUG if self._conntrack_warned else logging.WARNING
        self._conntrack_warned = True
        log.log(level, "conntrack cleanup failed; UDP flows to removed tasks move only when they idle out "
                "sandbox=%s error=%r", sandbox, exc)

    # ---- inputs ----------------------------------------------------------------------

    def on_view(self, view: View) -> None:
        self.view = view
        # planned for every View, not only those a sync picks up: each table is then made
        # from the last per changed service (a skipped View would cost a whole network)
        self.network_tables(view)
        self._has_view.set()
        for sandbox in self.sandboxes.values():
            sandbox.dirty.set()

    def add(self, name: str, netns: str, attached, foreign: bool = False) -> None:
        current = self.sandboxes.get(name)
        if current is None or current.netns != netns:
            if current is not None and current.task is not None:
                current.task.cancel()
            current = self.sandboxes[name] = _Sandbox(name, netns, tuple(attached), foreign)
            if self._running:
                self._start(current)
        else:
            current.attached = tuple(attached)
        current.dirty.set()

    async def drop(self, name: str) -> None:
        sandbox = self.sandboxes.pop(name, None)
        if sandbox is None:
            return
        if sandbox.task is not None:
            sandbox.task.cancel()
        if sandbox.foreign and Path(sandbox.netns).exists():
            try:
                await asyncio.to_thread(self.backend.remove, sandbox.netns)
            except Exception as exc:
                log.warning("cannot remove lb rules netns=%s error=%s", sandbox.netns, exc)
        async with self._synced:
            self._synced.notify_all()

    async def wait_synced(self, name: str, timeout: float = 5.0) -> None:
        """Until ``name`` runs the plan of the current View (so its VIPs work now)."""
        await asyncio.wait_for(self._has_view.wait(), timeout)
        revision = self.view.revision

        def done() -> bool:
            sandbox = self.sandboxes.get(name)
            return sandbox is None or sandbox.revision >= revision

        async def waiter() -> None:
            async with self._synced:
                await self._synced.wait_for(done)
        sandbox = self.sandboxes.get(name)
        if sandbox is not None:
            sandbox.dirty.set()
        await asyncio.wait_for(waiter(), timeout)

    # ---- the loops -------------------------------------------------------------------

    async def run(self) -> None:
        await self._has_view.wait()
        self._running = True
        for sandbox in self.sandboxes.values():
            self._start(sandbox)
        try:
            await asyncio.Event().wait()
        finally:
            self._running = False
            if self._trim is not None:
                self._trim.cancel()
                self._trim = None
            tasks = [s.task for s in self.sandboxes.values() if s.task is not None] + list(self._cleanups)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _start(self, sandbox: _Sandbox) -> None:
        sandbox.task = asyncio.create_task(self._serve(sandbox), name=f"lb-{sandbox.name}")

    async def _serve(self, sandbox: _Sandbox) -> None:
        while True:
            timeout = max(0.0, sandbox.deadline - time.monotonic()) if sandbox.deadline is not None else None
            idle = sandbox.holds_cache and (timeout is None or timeout > IDLE_AFTER)
            try:
                await asyncio.wait_for(sandbox.dirty.wait(), IDLE_AFTER if idle else timeout)
            except TimeoutError:
                if idle:  # quiet for a while: free what only the next change would have replaced
                    await self._release(sandbox)
                    continue
            sandbox.dirty.clear()
            async with self._workers:
                ok = await self.sync_one(sandbox)
            async with self._synced:
                self._synced.notify_all()
            if not ok:
                await asyncio.sleep(0.5)
                sandbox.dirty.set()

    async def _release(self, sandbox: _Sandbox) -> None:
        sandbox.holds_cache = False
        if self._release_caches is None or sandbox.kernel is None:
            return
        async with self._workers:
            await asyncio.to_thread(self._release_caches, sandbox.kernel)
        if self._trim is None:  # once for all the sandboxes that go quiet together
            self._trim = asyncio.get_running_loop().call_later(IDLE_AFTER, self._start_trim)

    def _start_trim(self) -> None:
        async def trim() -> None:
            try:
                await asyncio.to_thread(release_free_memory)
            finally:
                self._trim = None
        self._cleanups.add(task := asyncio.create_task(trim()))
        task.add_done_callback(self._cleanups.discard)

    def network_tables(self, view: View) -> dict[str, VipTable]:
        """The View's VIP tables per network, planned once per View for every sandbox."""
        if self._tables is None or self._tables[0] is not view:
            self._tables = (view, self._plans.network_plans(view))
        return self._tables[1]

    async def sync_one(self, sandbox: _Sandbox) -> bool:
        """Bring one sandbox to the current View; False if the backend failed (retried)."""
        view = self.view
        tables = tuple(self.network_tables(view).get(network, EMPTY_TABLE) for network in sandbox.attached)
        drain_due = sandbox.deadline is not None and sandbox.deadline <= time.monotonic()
        if sandbox.tables is not None and len(tables) == len(sandbox.tables) and not drain_due \
                and all(a is b for a, b in zip(tables, sandbox.tables, strict=True)):
            sandbox.revision = view.revision
            return True
        desired = _merged(tables)
        changed = _changed(sandbox, tables) if sandbox.kernel is not None else None
        if self.backend.name != "nftables":
            self._refuse_flow_timeouts(desired, changed)
        if changed is not None and not changed and not drain_due:  # equal tables, rebuilt: nothing to write
            sandbox.tables, sandbox.plan, sandbox.revision = tables, desired, view.revision
            return True
        started = time.perf_counter()
        try:
            if sandbox.kernel is None and not sandbox.cleared:
                await asyncio.to_thread(clear_other_backends, self.backend.name, sandbox.netns)
                sandbox.cleared = True
            kernel, result = await asyncio.to_thread(self.backend.sync, sandbox.netns, sandbox.kernel, desired,
                                                     changed if not drain_due else None)
            if changed is None and result.rules_written > TRIM_AFTER:
                await asyncio.to_thread(release_free_memory)
        except Exception as exc:
            self.syncs.inc("error")
            log.error("lb sync failed sandbox=%s backend=%s error=%r", sandbox.name, self.backend.name, exc)
            sandbox.kernel = None  # read the kernel again next time
            return False
        lost = lost_backends(sandbox.plan or {}, desired, changed)
        sandbox.tables, sandbox.plan, sandbox.kernel, sandbox.revision = tables, desired, kernel, view.revision
        sandbox.holds_cache = self._release_caches is not None
        sandbox.deadline = self.backend.next_deadline(kernel)
        if lost:  # after the rules, not before the next sandbox: a dump costs ~10 ms in the kernel
            task = asyncio.create_task(self._forget(sandbox, lost))
            self._cleanups.add(task)
            task.add_done_callback(self._cleanups.discard)
        took = time.perf_counter() - started
        self.duration.observe(took)
        self.syncs.inc("ok")
        self.rules_written.inc(amount=result.rules_written)
        self.services_written.inc(amount=result.services_written + result.services_removed)
        if result.services_written or result.services_removed:
            log.info("lb synced sandbox=%s revision=%s vips=%d written=%d removed=%d rules=%d took_ms=%.1f",
                     sandbox.name, view.revision, len(desired), result.services_written, result.services_removed,
                     result.rules_written, took * 1000)
        return True

    def _refuse_flow_timeouts(self, desired: Plan, changed: set | None) -> None:
        """--flow-timeout needs conntrack timeout policies, which svcnet sets with nftables."""
        for vip in changed if changed is not None else desired.keys():
            plan = desired.get(vip)
            if plan is None or plan.flow_timeout == (None, None) or plan.service in self._flow_warned:
                continue
            self._flow_warned.add(plan.service)
            log.error("service %s asks for --flow-timeout, which the %s backend cannot apply: its connections keep "
                      "the kernel's timeouts hint=%r", plan.service, self.backend.name,
                      "run the agent with --lb-backend nftables (apt-get install libnftables1)")

    async def _forget(self, sandbox: _Sandbox, lost: dict) -> None:
        try:
            self.flows_forgotten.inc(amount=await asyncio.to_thread(forget_udp_flows, sandbox.netns, lost))
        except Exception as exc:
            self._conntrack_failed(sandbox.name, exc)

    async def settled(self) -> None:
        """Until the conntrack cleanups started so far are done (tests)."""
        while self._cleanups:
            await asyncio.gather(*list(self._cleanups), return_exceptions=True)

    async def sync_all(self) -> None:
        """Every sandbox, one after another (tests and benchmarks; the agent runs ``run``)."""
        for sandbox in list(self.sandboxes.values()):
            await self.sync_one(sandbox)


def _merged(tables: tuple[VipTable, ...]) -> Plan:
    """A sandbox's plan: its one network's table itself (shared, not copied), or the union
    in attach order (a later network's VIP wins, as ``plan_for`` does)."""
    if len(tables) == 1:
        return tables[0]
    merged: dict = {}
    for table in tables:
        merged.update(table)
    return merged


def _changed(sandbox: _Sandbox, tables: tuple[VipTable, ...]) -> set | None:
    """VIPs that may differ from what the sandbox applied; None: compare everything."""
    if sandbox.tables is None or len(sandbox.tables) != len(tables):
        return None
    changed: set = set()
    for old, new in zip(sandbox.tables, tables, strict=True):
        if old is not new:
            changed |= changed_vips(old, new)
    return changed
