"""The load-balancing plan: what a sandbox's kernel should do with each VIP it can reach.

Pure: View in, plain data out, so it can be diffed, unit-tested and compared across
restarts. For every ``vip``-mode service on a network the sandbox is attached to, the
plan holds that network's VIP and the addresses of the service's *healthy* tasks on the
same network (sorted, so equal plans compare equal). A service with no healthy task stays
in the plan with no backends: its VIP must refuse connections, not swallow them.
"""

from __future__ import annotations

import hashlib
import weakref
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address

from immutables import Map

from discovery.state.view import NetworkSlice, View


@dataclass(frozen=True, order=True)
class VipPlan:
    vip: IPv4Address
    service: str
    network: str
    backends: tuple[IPv4Address, ...]
    # (tcp, udp) idle timeouts in seconds, None: the kernel's. Not in ``signature``: only
    # nftables applies them, and iptables' rules must not change with them.
    flow_timeout: tuple[int | None, int | None] = (None, None)

    @property
    def signature(self) -> str:
        """A short digest of everything that shapes the rules; equal plans, equal signatures."""
        text = ",".join([str(self.vip), self.service, self.network, *map(str, self.backends)])
        return hashlib.sha1(text.encode()).hexdigest()[:12]

    @property
    def tag(self) -> str:
        """Stable per-VIP name part for chains (``SVCNET-S-<tag>``)."""
        return hashlib.sha1(str(self.vip).encode()).hexdigest()[:10].upper()


Plan = Mapping[IPv4Address, VipPlan]


class VipTable(Mapping):
    """One network's VIP -> VipPlan, remembering the table it was made from (weakly) and the
    VIPs that differ from it: a sandbox that applied an older table learns what to rewrite
    by following ``base`` links instead of comparing every VIP. A persistent map inside, so
    a change costs O(log n) and the tables kept for the history share their structure."""

    __slots__ = ("_map", "base", "changed", "__weakref__")

    def __init__(self, entries: Map | None = None, base: VipTable | None = None,
                 changed: frozenset[IPv4Address] = frozenset()) -> None:
        self._map = entries if entries is not None else Map()
        self.base = weakref.ref(base) if base is not None else None
        self.changed = changed

    def __getitem__(self, vip: IPv4Address) -> VipPlan:
        return self._map[vip]

    def get(self, vip, default=None):
        return self._map.get(vip, default)

    def __contains__(self, vip) -> bool:
        return vip in self._map

    def __iter__(self):
        return iter(self._map)

    def __len__(self) -> int:
        return len(self._map)

    def evolved(self, updates: Mapping[IPv4Address, VipPlan | None]) -> VipTable:
        """A new table with ``updates`` applied (None: the VIP goes), based on this one."""
        changing = self._map.mutate()
        for vip, plan in updates.items():
            if plan is None:
                changing.pop(vip, None)
            else:
                changing[vip] = plan
        return VipTable(changing.finish(), base=self, changed=frozenset(updates))


EMPTY_TABLE = VipTable()


def changed_vips(old: Mapping[IPv4Address, VipPlan], new: VipTable) -> set[IPv4Address]:
    """The VIPs whose plan may differ between ``old`` and ``new`` (a VIP in one only counts):
    the union of the steps' changes when ``new`` descends from ``old``, else a full compare."""
    found: set[IPv4Address] = set()
    table: VipTable | None = new
    for _ in range(HISTORY):
        if table is old:
            return found
        if table is None or table.base is None:
            break
        found |= table.changed
        table = table.base()
    return {vip for vip in old.keys() | new.keys() if old.get(vip) != new.get(vip)}


HISTORY = 64  # tables kept alive per network (they share structure), so a lagging sandbox follows links


def network_plans(view: View) -> dict[str, dict[IPv4Address, VipPlan]]:
    """Every network's VIPs with their healthy backends: computed once per View, shared by
    every sandbox (a sandbox's plan is the union over the networks it is attached to)."""
    return PlanCache().network_plans(view)


class _Built:
    """What the cache knows of one network: the slice it read, its table, and indexes to
    update both per object."""

    __slots__ = ("piece", "table", "members", "history")

    def __init__(self, piece: NetworkSlice, table: VipTable, members: dict[str, set[str]]) -> None:
        self.piece, self.table, self.members = piece, table, members
        self.history: deque[VipTable] = deque(maxlen=HISTORY)


class PlanCache:
    """``network_plans`` for a stream of Views: a network whose View slice is unchanged
    (the same object) keeps its table; a slice made from the one last read is applied per
    service (only services it touched, directly or through their tasks, are planned
    again), so a change costs its services, not the network."""

    def __init__(self) -> None:
        self._built: dict[str, _Built] = {}

    def network_plans(self, view: View) -> dict[str, VipTable]:
        built: dict[str, _Built] = {}
        for name, piece in view.slices.items():
            done = self._built.get(name)
            if done is not None and done.piece is piece:
                built[name] = done
            elif done is not None and piece.derived_from(done.piece):
                built[name] = _update(done, piece)
            else:
                built[name] = _build(piece)
        self._built = built
        return {name: done.table for name, done in built.items() if done.table}


def _build(piece: NetworkSlice) -> _Built:
    members: dict[str, set[str]] = {}
    for container, endpoint in piece.endpoints.items():
        if endpoint.service:
            members.setdefault(endpoint.service, set()).add(container)
    plans = {}
    for service in piece.services.values():
        plan = _plan(piece, service, members)
        if plan is not None:
            plans[plan.vip] = plan
    return _Built(piece, VipTable(Map(plans)), members)


def _plan(piece: NetworkSlice, service, members: Mapping[str, set[str]]) -> VipPlan | None:
    vip = service.vips.get(piece.name)
    if service.endpoint_mode != "vip" or vip is None:
        return None
    healthy = sorted(piece.endpoints[c].ipv4 for c in members.get(service.name, ())
                     if piece.endpoints[c].health == "healthy")
    timeout = service.flow_timeout
    return VipPlan(vip, service.name, piece.name, tuple(healthy),
                   (timeout.tcp, timeout.udp) if timeout is not None else (None, None))


def _update(done: _Built, piece: NetworkSlice) -> _Built:
    old = done.piece
    members = done.members
    touched = set(piece.touched_services)
    for container in piece.touched_endpoints:
        before, after = old.endpoints.get(container), piece.endpoints.get(container)
        if before is not None and before.service:
            touched.add(before.service)
            members.get(before.service, set()).discard(container)
        if after is not None and after.service:
            touched.add(after.service)
            members.setdefault(after.service, set()).add(container)
    current = done.table
    updates: dict[IPv4Address, VipPlan | None] = {}

    def now(vip: IPv4Address) -> VipPlan | None:
        return updates[vip] if vip in updates else current.get(vip)

    for name in touched:
        if not members.get(name):
            members.pop(name, None)
        before_service, after_service = old.services.get(name), piece.services.get(name)
        previous = now(before_service.vips.get(piece.name)) if before_service is not None else None
        plan = _plan(piece, after_service, members) if after_service is not None else None
        if previous is not None and previous.service == name and (plan is None or plan.vip != previous.vip):
            updates[previous.vip] = None
        if plan is not None and now(plan.vip) != plan:
            updates[plan.vip] = plan
    updates = {vip: plan for vip, plan in updates.items() if plan != current.get(vip)}
    if updates:
        table = current.evolved(updates)
        done.history.append(current)
    else:  # no VIP moved: the same table, so sandboxes see nothing to do
        table = current
    updated = _Built(piece, table, members)
    updated.history = done.history
    return updated


def plan_for(view: View, attached: Sequence[str],
             by_network: Mapping[str, Mapping[IPv4Address, VipPlan]] | None = None) -> dict[IPv4Address, VipPlan]:
    """The desired VIPs for a sandbox attached to ``attached`` networks."""
    if by_network is None:
        by_network = network_plans(view)
    plan: dict[IPv4Address, VipPlan] = {}
    for network in attached:
        plan.update(by_network.get(network, {}))
    return plan


def lost_backends(old: Plan, new: Plan, vips: Iterable[IPv4Address] | None = None) -> dict[IPv4Address, set[IPv4Address]]:
    """VIP -> backends that stopped serving it from ``old`` to ``new`` (for conntrack cleanup);
    ``vips``: the only VIPs that may differ (None: all of ``old``)."""
    lost = {}
    for vip in vips if vips is not None else old.keys():
        before = old.get(vip)
        if before is None:
            continue
        after = new.get(vip)
        gone = set(before.backends) - set(after.backends if after is not None else ())
        if gone:
            lost[vip] = gone
    return lost


def rule_count(plans: Iterable[VipPlan]) -> int:
    """Rules the iptables backend keeps for these plans (one dispatch rule + one per backend,
    or two reject rules when a VIP has no backend)."""
    return sum(1 + (len(p.backends) if p.backends else 2) for p in plans)
