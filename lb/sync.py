"""The load-balancer sync loop: one per process, for every sandbox it serves.

Like kube-proxy's proxier: View and sandbox changes only mark the loop dirty; a sync
computes each sandbox's plan from the latest View, skips sandboxes whose plan did not
change, hands the rest to the backend (which applies only the difference), then deletes
UDP conntrack entries towards backends that left. Changes arriving meanwhile coalesce
into the next sync. A failed sync forgets what it believed the kernel held, so the next one
reads the kernel again and converges.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

from discovery.metrics import Metrics
from discovery.state.view import View

from .conntrack import forget_udp_flows
from .iptables import IptablesBackend
from .ipvs import IpvsBackend, ipvs_available
from .plan import Plan, PlanCache, diff, plan_for, rule_count

log = logging.getLogger(__name__)

BACKENDS = ("auto", "ipvs", "nftables", "iptables")


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
    __slots__ = ("netns", "attached", "foreign", "plan", "kernel", "revision", "deadline", "cleared")

    def __init__(self, netns: str, attached: tuple[str, ...], foreign: bool) -> None:
        self.netns = netns
        self.attached = attached
        self.foreign = foreign  # a netns svcnet did not make: take our rules out when we leave
        self.plan: Plan | None = None  # what the last successful sync applied
        self.kernel = None  # the backend's notion of the kernel state (None: read it)
        self.revision = -1
        self.deadline: float | None = None  # a drain to finish (IPVS)
        self.cleared = False  # other backends' leftovers removed


class LbSync:
    def __init__(self, backend, metrics: Metrics) -> None:
        self.backend = backend
        self.view = View()
        self.sandboxes: dict[str, _Sandbox] = {}
        self._plans = PlanCache()
        self._dirty = asyncio.Event()
        self._synced = asyncio.Condition()
        self._conntrack_warned = False
        # no sync before the first View (from etcd or the snapshot on disk): an empty View
        # would take every VIP out of every sandbox of a restarted node
        self._has_view = asyncio.Event()
        self.syncs = metrics.counter("svcnet_lb_syncs_total", "Load-balancer syncs, by result.", ("result",))
        self.duration = metrics.histogram("svcnet_lb_sync_seconds", "Duration of one load-balancer sync.")
        self.rules_written = metrics.counter("svcnet_lb_rules_written_total",
                                             "Rules and IPVS entries written by syncs.")
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
        self._has_view.set()
        self._dirty.set()

    def add(self, name: str, netns: str, attached, foreign: bool = False) -> None:
        current = self.sandboxes.get(name)
        if current is None or current.netns != netns:
            self.sandboxes[name] = _Sandbox(netns, tuple(attached), foreign)
        else:
            current.attached = tuple(attached)
        self._dirty.set()

    async def drop(self, name: str) -> None:
        sandbox = self.sandboxes.pop(name, None)
        if sandbox is not None and sandbox.foreign and Path(sandbox.netns).exists():
            try:
                await asyncio.to_thread(self.backend.remove, sandbox.netns)
            except Exception as exc:
                log.warning("cannot remove lb rules netns=%s error=%s", sandbox.netns, exc)

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
        self._dirty.set()
        await asyncio.wait_for(waiter(), timeout)

    # ---- the loop --------------------------------------------------------------------

    async def run(self) -> None:
        await self._has_view.wait()
        while True:
            deadlines = [s.deadline for s in self.sandboxes.values() if s.deadline is not None]
            timeout = max(0.0, min(deadlines) - time.monotonic()) if deadlines else None
            try:
                await asyncio.wait_for(self._dirty.wait(), timeout)
            except TimeoutError:
                pass
            self._dirty.clear()
            await self.sync_all()

    async def sync_all(self) -> None:
        view = self.view
        now = time.monotonic()
        by_network = self._plans.network_plans(view)
        for name, sandbox in list(self.sandboxes.items()):
            desired = plan_for(view, sandbox.attached, by_network)
            drain_due = sandbox.deadline is not None and sandbox.deadline <= now
            if desired == sandbox.plan and not drain_due:
                sandbox.revision = view.revision
                continue
            started = time.perf_counter()
            try:
                if sandbox.kernel is None and not sandbox.cleared:
                    await asyncio.to_thread(clear_other_backends, self.backend.name, sandbox.netns)
                    sandbox.cleared = True
                kernel, result = await asyncio.to_thread(self.backend.sync, sandbox.netns, sandbox.kernel, desired)
            except Exception as exc:
                self.syncs.inc("error")
                log.error("lb sync failed sandbox=%s backend=%s error=%r", name, self.backend.name, exc)
                sandbox.kernel = None  # read the kernel again next time
                await asyncio.sleep(0.5)
                self._dirty.set()
                continue
            lost = diff(sandbox.plan or {}, desired).lost_backends()
            sandbox.plan, sandbox.kernel, sandbox.revision = desired, kernel, view.revision
            sandbox.deadline = self.backend.next_deadline(kernel)
            if lost:
                try:
                    self.flows_forgotten.inc(amount=await asyncio.to_thread(forget_udp_flows, sandbox.netns, lost))
                except Exception as exc:
                    self._conntrack_failed(name, exc)
            took = time.perf_counter() - started
            self.duration.observe(took)
            self.syncs.inc("ok")
            self.rules_written.inc(amount=result.rules_written)
            self.services_written.inc(amount=result.services_written + result.services_removed)
            if result.services_written or result.services_removed:
                log.info("lb synced sandbox=%s revision=%s vips=%d written=%d removed=%d rules=%d took_ms=%.1f",
                         name, view.revision, len(desired), result.services_written, result.services_removed,
                         result.rules_written, took * 1000)
        async with self._synced:
            self._synced.notify_all()
