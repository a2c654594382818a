"""The load-balancing plan: what a sandbox's kernel should do with each VIP it can reach.

Pure: View in, plain data out, so it can be diffed, unit-tested and compared across
restarts. For every ``vip``-mode service on a network the sandbox is attached to, the
plan holds that network's VIP and the addresses of the service's *healthy* tasks on the
same network (sorted, so equal plans compare equal). A service with no healthy task stays
in the plan with no backends: its VIP must refuse connections, not swallow them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address

from discovery.state.view import NetworkSlice, View


@dataclass(frozen=True, order=True)
class VipPlan:
    vip: IPv4Address
    service: str
    network: str
    backends: tuple[IPv4Address, ...]

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


def network_plans(view: View) -> dict[str, dict[IPv4Address, VipPlan]]:
    """Every network's VIPs with their healthy backends: computed once per View, shared by
    every sandbox (a sandbox's plan is the union over the networks it is attached to)."""
    return PlanCache().network_plans(view)


class PlanCache:
    """``network_plans`` for a stream of Views: a network whose View slice is unchanged
    (the same object) keeps the plans computed for it, so a change costs its network only."""

    def __init__(self) -> None:
        self._built: dict[str, tuple[NetworkSlice, dict[IPv4Address, VipPlan]]] = {}

    def network_plans(self, view: View) -> dict[str, dict[IPv4Address, VipPlan]]:
        built = {}
        for name, piece in view.slices.items():
            done = self._built.get(name)
            built[name] = done if done is not None and done[0] is piece else (piece, _plans_on(piece))
        self._built = built
        return {name: plans for name, (_, plans) in built.items() if plans}


def _plans_on(piece: NetworkSlice) -> dict[IPv4Address, VipPlan]:
    healthy: dict[str, list[IPv4Address]] = {}
    for endpoint in piece.endpoints.values():
        if endpoint.service and endpoint.health == "healthy":
            healthy.setdefault(endpoint.service, []).append(endpoint.ipv4)
    plans = {}
    for service in piece.services.values():
        vip = service.vips.get(piece.name)
        if service.endpoint_mode == "vip" and vip is not None:
            plans[vip] = VipPlan(vip, service.name, piece.name, tuple(sorted(healthy.get(service.name, ()))))
    return plans


def plan_for(view: View, attached: Sequence[str],
             by_network: Mapping[str, Mapping[IPv4Address, VipPlan]] | None = None) -> dict[IPv4Address, VipPlan]:
    """The desired VIPs for a sandbox attached to ``attached`` networks."""
    if by_network is None:
        by_network = network_plans(view)
    plan: dict[IPv4Address, VipPlan] = {}
    for network in attached:
        plan.update(by_network.get(network, {}))
    return plan


@dataclass(frozen=True)
class PlanDiff:
    added: tuple[VipPlan, ...]
    changed: tuple[tuple[VipPlan, VipPlan], ...]  # (old, new)
    removed: tuple[VipPlan, ...]

    @property
    def empty(self) -> bool:
        return not (self.added or self.changed or self.removed)

    def lost_backends(self) -> dict[IPv4Address, set[IPv4Address]]:
        """VIP -> backends that stopped serving it (for conntrack cleanup and draining)."""
        lost = {old.vip: set(old.backends) - set(new.backends) for old, new in self.changed}
        lost.update({old.vip: set(old.backends) for old in self.removed})
        return {vip: gone for vip, gone in lost.items() if gone}


def diff(current: Plan, desired: Plan) -> PlanDiff:
    added = tuple(desired[v] for v in sorted(desired.keys() - current.keys()))
    removed = tuple(current[v] for v in sorted(current.keys() - desired.keys()))
    changed = tuple((current[v], desired[v]) for v in sorted(current.keys() & desired.keys())
                    if current[v] != desired[v])
    return PlanDiff(added, changed, removed)


def rule_count(plans: Iterable[VipPlan]) -> int:
    """Rules the iptables backend keeps for these plans (one dispatch rule + one per backend,
    or two reject rules when a VIP has no backend)."""
    return sum(1 + (len(p.backends) if p.backends else 2) for p in plans)
