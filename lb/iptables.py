"""The iptables backend: DNAT to a VIP's tasks with python-iptables, inside a sandbox netns.

Chains svcnet owns in the sandbox's netns (legacy tables, as python-iptables drives):

    nat    OUTPUT -j SVCNET-VIPS                      one jump, inserted once
    nat    SVCNET-VIPS:  -d VIP -j SVCNET-S-<tag>     one rule per VIP
    nat    SVCNET-S-<tag>: -m statistic --mode random --probability 1/(n-i) -j DNAT --to B_i
                           (last rule unconditional), every rule commented
                           "svcnet <vip> <service>.<network> <signature>"
    filter OUTPUT -j SVCNET-VIP-REJECT
    filter SVCNET-VIP-REJECT: -d VIP -p tcp --ctstate NEW -j REJECT --reject-with tcp-reset
                              -d VIP --ctstate NEW -j REJECT  (icmp port unreachable)
                              for VIPs with no task

DNAT happens in nat OUTPUT, before filter OUTPUT sees the packet, so a reject rule only ever
matches a VIP that has no task to go to. Only *new* connections are refused: a connection
already open to a task goes on while the VIP is briefly empty (an agent restarted after its
lease ran out sees its tasks gone until it has registered them again, and a reject without
``--ctstate NEW`` was seen here resetting such a connection). A change rewrites only the chains of the VIPs that
changed; everything lands in one commit per table. The first sync of a netns reads the
signatures back from the kernel, so a restarted agent rewrites nothing that is already right
and removes chains of VIPs that no longer exist.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address

import iptc
from iptc import easy

from discovery.host import netlink
from discovery.host.xtables import LOCK, delete_rules, drop_chain, ensure_jump, fresh_table, release

from .plan import Plan, VipPlan

log = logging.getLogger(__name__)

DISPATCH_CHAIN = "SVCNET-VIPS"
REJECT_CHAIN = "SVCNET-VIP-REJECT"
SERVICE_CHAIN_PREFIX = "SVCNET-S-"


@dataclass
class SyncResult:
    services_written: int = 0
    services_removed: int = 0
    rules_written: int = 0

    def __iadd__(self, other: SyncResult) -> SyncResult:
        self.services_written += other.services_written
        self.services_removed += other.services_removed
        self.rules_written += other.rules_written
        return self


def comment(plan: VipPlan) -> str:
    return f"svcnet {plan.vip} {plan.service}.{plan.network} {plan.signature}"


def service_rules(plan: VipPlan) -> list[dict]:
    """DNAT rules spreading new connections evenly: rule i takes 1/(n-i) of what reaches it."""
    text = {"comment": comment(plan)}
    if not plan.backends:
        return [{"comment": text, "target": "RETURN"}]  # keeps the signature; rejects do the work
    rules = []
    count = len(plan.backends)
    for index, backend in enumerate(plan.backends):
        rule: dict = {"comment": text, "target": {"DNAT": {"to-destination": str(backend)}}}
        if index < count - 1:
            rule["statistic"] = {"mode": "random", "probability": f"{1.0 / (count - index):.11f}"}
        rules.append(rule)
    return rules


def dispatch_rule(plan: VipPlan) -> dict:
    return {"dst": f"{plan.vip}/32", "target": SERVICE_CHAIN_PREFIX + plan.tag}


def reject_rules(vip: IPv4Address) -> list[dict]:
    return [
        {"dst": f"{vip}/32", "protocol": "tcp", "conntrack": {"ctstate": "NEW"},
         "target": {"REJECT": {"reject-with": "tcp-reset"}}},
        {"dst": f"{vip}/32", "conntrack": {"ctstate": "NEW"},
         "target": {"REJECT": {"reject-with": "icmp-port-unreachable"}}},
    ]


class IptablesBackend:
    name = "iptables"

    def sync(self, netns: str, current: dict[IPv4Address, str] | None, desired: Plan,
             changed: Iterable[IPv4Address] | None = None) -> tuple[dict, SyncResult]:
        """Make ``netns`` hold ``desired``; ``current`` is what the last sync left (None: read it);
        ``changed`` (optional) names the only VIPs that may differ from it.

        Returns the new VIP -> signature map to pass as ``current`` next time.
        """
        result = SyncResult()
        only = set(changed) if changed is not None else None
        with LOCK, netlink.entered_netns(netns):
            nat, filt = fresh_table("nat"), fresh_table("filter")
            try:
                jumps_written = ensure_jump(nat, "OUTPUT", DISPATCH_CHAIN) | ensure_jump(filt, "OUTPUT", REJECT_CHAIN)
                dispatch = iptc.Chain(nat, DISPATCH_CHAIN)
                if current is None:
                    current, unreadable = _observe(nat)
                    jumps_written |= _drop_unreadable(nat, dispatch, unreadable)
                    only = None
                current = dict(current)
                rejects = iptc.Chain(filt, REJECT_CHAIN)
                reject_changed = jumps_written
                candidates = current.keys() if only is None else only
                for vip in sorted((current.keys() - desired.keys()) & candidates):
                    _remove_vip(nat, dispatch, rejects, vip)
                    del current[vip]
                    result.services_removed += 1
                    reject_changed = True
                for vip in sorted(desired.keys() if only is None else only & desired.keys()):
                    plan = desired[vip]
                    if current.get(vip) == plan.signature:
                        continue
                    result += _write_vip(nat, dispatch, rejects, plan, vip in current)
                    current[vip] = plan.signature
                    reject_changed = True
                if result.services_written or result.services_removed or jumps_written:
                    nat.commit()
                if reject_changed:
                    filt.commit()
            finally:
                release(nat)
                release(filt)
        return current, result

    def next_deadline(self, state) -> float | None:
        return None  # removed backends leave at once; conntrack keeps established TCP going

    def remove(self, netns: str) -> None:
        """Take every svcnet rule and chain out of ``netns`` (a foreign netns we detach from)."""
        with LOCK, netlink.entered_netns(netns):
            nat, filt = fresh_table("nat"), fresh_table("filter")
            try:
                for table, parent, chain_name in ((nat, "OUTPUT", DISPATCH_CHAIN), (filt, "OUTPUT", REJECT_CHAIN)):
                    drop_chain(table, parent, chain_name)
                for chain in list(nat.chains):
                    if chain.name.startswith(SERVICE_CHAIN_PREFIX):
                        chain.flush()
                        nat.delete_chain(chain.name)
                nat.commit()
                filt.commit()
            finally:
                release(nat)
                release(filt)


def _observe(nat: iptc.Table) -> tuple[dict[IPv4Address, str], list[str]]:
    """VIP -> signature of the service chains in the kernel, and chains we cannot read back."""
    found: dict[IPv4Address, str] = {}
    unreadable: list[str] = []
    for chain in nat.chains:
        if not chain.name.startswith(SERVICE_CHAIN_PREFIX):
            continue
        rules = chain.rules
        words = _comment_of(rules[0]).split() if rules else []
        try:
            if len(words) != 4 or words[0] != "svcnet":
                raise ValueError(chain.name)
            found[IPv4Address(words[1])] = words[3]
        except ValueError:
            unreadable.append(chain.name)
    return found, unreadable


def _drop_unreadable(nat: iptc.Table, dispatch: iptc.Chain, names: list[str]) -> bool:
    """Chains named like ours that say nothing we wrote (someone edited them): remove them;
    the VIP they served, if still wanted, is written afresh."""
    for rule in list(dispatch.rules) if names else []:
        if rule.target.name in names:
            dispatch.delete_rule(rule)
    for name in names:
        log.warning("removing unreadable svcnet chain chain=%s", name)
        iptc.Chain(nat, name).flush()
        nat.delete_chain(name)
    return bool(names)


def _comment_of(rule: iptc.Rule) -> str:
    for match in rule.matches:
        if match.name == "comment":
            return match.comment or ""
    return ""


def _remove_vip(nat: iptc.Table, dispatch: iptc.Chain, rejects: iptc.Chain, vip: IPv4Address) -> None:
    gone = VipPlan(vip, "", "", ())  # the chain name and dispatch rule depend on the VIP alone
    delete_rules(rejects, reject_rules(vip))
    delete_rules(dispatch, [dispatch_rule(gone)])
    name = SERVICE_CHAIN_PREFIX + gone.tag
    if nat.is_chain(name):
        iptc.Chain(nat, name).flush()
        nat.delete_chain(name)


def _write_vip(nat: iptc.Table, dispatch: iptc.Chain, rejects: iptc.Chain, plan: VipPlan, existed: bool) -> SyncResult:
    chain_name = SERVICE_CHAIN_PREFIX + plan.tag
    if nat.is_chain(chain_name):
        chain = iptc.Chain(nat, chain_name)
        chain.flush()
    else:
        chain = nat.create_chain(chain_name)
    rules = service_rules(plan)
    for rule in rules:
        chain.append_rule(easy.encode_iptc_rule(rule))
    written = len(rules)
    if not existed:  # chain and dispatch rule always land in the same commit
        dispatch.append_rule(easy.encode_iptc_rule(dispatch_rule(plan)))
        written += 1
    delete_rules(rejects, reject_rules(plan.vip))
    if not plan.backends:
        for rule in reject_rules(plan.vip):
            rejects.append_rule(easy.encode_iptc_rule(rule))
            written += 1
    return SyncResult(services_written=1, rules_written=written)
