"""The routing mesh in this host's netns with python-iptables (legacy tables, as the rest).

Chains, per registry prefix (``<t>``: the prefix's tag; ``<p>``: a published port's):

    nat PREROUTING, OUTPUT -j SVCNET-MESH-<t>
    nat SVCNET-MESH-<t>:  -d 127.0.0.0/8 -j RETURN; -m addrtype ! --dst-type LOCAL -j RETURN (one
                          route lookup per new connection, not one per port), then
                          -p tcp --dport P -j SVCNET-P<t>-<P><T|U>
    nat SVCNET-P<t>-<p>:  mark for masquerade (every connection, or with source=keep only those from
                          a sandbox or this host, which could not get replies otherwise)
                          then DNAT task:T, spread with -m statistic (as the VIP chains)
    nat POSTROUTING -j SVCNET-MPOST-<t>
    nat SVCNET-MPOST-<t>: -o <bridge> -m mark --mark M/M -j SNAT --to-source <this node's address>
                          (MASQUERADE on a bridge network: its tasks are all local)

Every chain is converged rule by rule against the kernel at the first sync (a restarted agent
writes nothing); after that, chains whose rules are what this process last wrote are not read
back, so a change costs the ports it touches. A port without a healthy task
keeps its dispatch rule and no DNAT: the connection reaches this host's own port (closed: refused).
"""

from __future__ import annotations

import logging

import iptc
from iptc import easy

from discovery.host.firewall import MESH_MARK, prefix_tag
from discovery.host.netlink import bridge_name
from discovery.host.xtables import (
    LOCK,
    converge_chain,
    converge_jumped,
    drop_chain,
    dump,
    fresh_table,
    release,
    unjump,
)

from .mesh import MeshPlan, MeshPort

log = logging.getLogger(__name__)

MARK = f"{MESH_MARK:#x}/{MESH_MARK:#x}"


def chain_names(prefix: str) -> tuple[str, str, str]:
    """(dispatch chain, POSTROUTING chain, the per-port chains' name prefix)."""
    tag = prefix_tag(prefix)
    return f"SVCNET-MESH-{tag}", f"SVCNET-MPOST-{tag}", f"SVCNET-P{tag}-"


def port_chain(prefix: str, port: MeshPort) -> str:
    """``SVCNET-P<t>-8080T``: one name per port and protocol, no hash to collide."""
    return f"{chain_names(prefix)[2]}{port.published}{port.protocol[0].upper()}"


def dispatch_rules(prefix: str, plan: MeshPlan) -> list[dict]:
    if not plan.ports:
        return []
    rules: list[dict] = [{"dst": "127.0.0.0/8", "target": "RETURN"},
                         {"addrtype": {"dst-type": "!LOCAL"}, "target": "RETURN"}]
    rules += [{"protocol": port.protocol, port.protocol: {"dport": str(port.published)},
               "target": port_chain(prefix, port)} for port in plan.ports]
    return rules


def port_rules(port: MeshPort) -> list[dict]:
    comment = {"comment": f"svcnet {port.published}/{port.protocol} {port.service} {port.signature}"}
    mark = {"MARK": {"set-xmark": MARK}}
    if port.mode == "ingress" and port.source == "nat":
        rules = [{"comment": comment, "target": mark}]
    else:  # the client's address is kept, except where replies could not find their way back
        rules = [{"comment": comment, "in-interface": "svbr+", "target": mark},
                 {"comment": comment, "addrtype": {"src-type": "LOCAL"}, "target": mark}]
    count = len(port.backends)
    for index, backend in enumerate(port.backends):
        rule = {"comment": comment, "protocol": port.protocol,
                "target": {"DNAT": {"to-destination": f"{backend.address}:{backend.port}"}}}
        if index < count - 1:
            rule["statistic"] = {"mode": "random", "probability": f"{1.0 / (count - index):.11f}"}
        rules.append(rule)
    return rules


def postrouting_rules(prefix: str, plan: MeshPlan) -> list[dict]:
    rules = []
    for masq in plan.masquerades:
        rule: dict = {"out-interface": bridge_name(prefix, masq.network), "mark": {"mark": MARK}}
        rule["target"] = {"SNAT": {"to-source": str(masq.source)}} if masq.source else "MASQUERADE"
        rules.append(rule)
    return rules


# prefix -> chain -> the rules this process last wrote there (None: read the kernel first)
_written: dict[str, dict[str, list[dict]]] = {}


def forget(prefix: str) -> None:
    """After a failed sync: compare with the kernel again next time."""
    _written.pop(prefix, None)


def _converge(nat: iptc.Table, prefix: str, chain: str, rules: list[dict]) -> int:
    known = _written.setdefault(prefix, {})
    if known.get(chain) == rules:
        return 0
    changed = converge_chain(nat, chain, rules)
    known[chain] = rules
    return int(changed)


def sync(prefix: str, plan: MeshPlan) -> int:
    """Converge this netns's mesh chains to ``plan``; returns how many chains were written."""
    dispatch, post, port_prefix = chain_names(prefix)
    written = 0
    with LOCK:
        nat = fresh_table("nat")
        try:
            first = prefix not in _written
            wanted = {port_chain(prefix, port): port_rules(port) for port in plan.ports}
            for name, rules in wanted.items():
                written += _converge(nat, prefix, name, rules)
            written += _converge(nat, prefix, dispatch, dispatch_rules(prefix, plan))
            written += _converge(nat, prefix, post, postrouting_rules(prefix, plan))
            if first or written:
                for parent, child in (("PREROUTING", dispatch), ("OUTPUT", dispatch), ("POSTROUTING", post)):
                    if {"target": child} not in dump(iptc.Chain(nat, parent)):
                        iptc.Chain(nat, parent).insert_rule(easy.encode_iptc_rule({"target": child}))
                        written += 1
            known = _written[prefix]
            stale = [c.name for c in nat.chains] if first else list(known)
            for name in stale:  # ports no longer published (their dispatch rule went above)
                if name.startswith(port_prefix) and name not in wanted:
                    if nat.is_chain(name):
                        iptc.Chain(nat, name).flush()
                        nat.delete_chain(name)
                        written += 1
                    known.pop(name, None)
            if written:
                nat.commit()
        except Exception:
            forget(prefix)
            raise
        finally:
            release(nat)
    if written:
        log.info("mesh rules synced ports=%d chains_written=%d", len(plan.ports), written)
    return written


def sync_postrouting(prefix: str, plan: MeshPlan) -> int:
    """Only the SNAT chain (the IPVS mesh marks and forwards itself); returns chains written."""
    post = chain_names(prefix)[1]
    written = 0
    with LOCK:
        nat = fresh_table("nat")
        try:
            written = int(converge_jumped(nat, post, postrouting_rules(prefix, plan), ("POSTROUTING",)))
            if written:
                nat.commit()
        finally:
            release(nat)
    return written


def remove(prefix: str, keep_postrouting: bool = False) -> None:
    """Take the mesh's nat chains out; ``keep_postrouting`` for a switch to the IPVS mesh,
    which shares the SNAT chain."""
    forget(prefix)
    dispatch, post, port_prefix = chain_names(prefix)
    with LOCK:
        nat = fresh_table("nat")
        try:
            if nat.is_chain(dispatch):
                unjump(nat, "OUTPUT", dispatch)
                drop_chain(nat, "PREROUTING", dispatch)
            if not keep_postrouting:
                drop_chain(nat, "POSTROUTING", post)
            for chain in list(nat.chains):
                if chain.name.startswith(port_prefix):
                    chain.flush()
                    nat.delete_chain(chain.name)
            nat.commit()
        finally:
            release(nat)
