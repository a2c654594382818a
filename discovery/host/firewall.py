"""Host firewall rules for svcnet bridges: isolation between networks and outbound NAT.

svcnet owns two chains per registry prefix, jumped to from FORWARD and nat POSTROUTING.
Each sync computes the rules those chains should hold from the networks in the View and
rewrites a chain only when what is there differs, in one commit; nobody else's rules are
touched. python-iptables drives the legacy tables (see DESIGN.md on legacy vs nft).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable

import iptc
from iptc import easy

from discovery.state.model import Network

from .netlink import bridge_name
from .xtables import LOCK, drop_chain, fresh_table, release

log = logging.getLogger(__name__)

BRIDGE_WILDCARD = "svbr+"


def chain_names(prefix: str) -> tuple[str, str]:
    tag = hashlib.sha1(prefix.encode()).hexdigest()[:6].upper()
    return f"SVCNET-FWD-{tag}", f"SVCNET-NAT-{tag}"


def forward_rules(prefix: str, networks: Iterable[Network]) -> list[dict]:
    rules: list[dict] = []
    for network in sorted(networks, key=lambda n: n.name):
        bridge = bridge_name(prefix, network.name)
        # With net.bridge.bridge-nf-call-iptables=1 (global; the per-bridge switch cannot
        # turn it off) bridged packets pass FORWARD as bridge -> same bridge: let them by.
        rules.append({"in-interface": bridge, "out-interface": bridge, "target": "ACCEPT"})
        if network.internal:
            rules.append({"in-interface": bridge, "out-interface": f"!{bridge}", "target": "DROP"})
            rules.append({"in-interface": f"!{bridge}", "out-interface": bridge, "target": "DROP"})
    # Routed traffic between two svcnet networks is dropped: a sandbox reaches only the
    # networks it is attached to.
    rules.append({"in-interface": BRIDGE_WILDCARD, "out-interface": BRIDGE_WILDCARD, "target": "DROP"})
    return rules


def nat_rules(prefix: str, networks: Iterable[Network]) -> list[dict]:
    rules = []
    for network in sorted(networks, key=lambda n: n.name):
        if not network.internal:
            bridge = bridge_name(prefix, network.name)
            rules.append({"src": str(network.subnet), "out-interface": f"!{bridge}", "target": "MASQUERADE"})
    return rules


def _normalize(rules: list[dict]) -> list[dict]:
    cleaned = []
    for rule in rules:
        rule = {k: v for k, v in rule.items() if k != "counters"}
        if "src" in rule and "/" not in rule["src"]:
            rule["src"] += "/32"
        cleaned.append(rule)
    return cleaned


def _dump(chain: iptc.Chain) -> list[dict]:
    return _normalize([easy.decode_iptc_rule(rule) for rule in chain.rules])


def _sync_chain(table_name: str, parent: str, chain_name: str, rules: list[dict]) -> bool:
    """Make ``chain_name`` hold exactly ``rules``, jumped to from ``parent``; True if changed.

    Everything happens on one table handle and lands in one commit.
    """
    table = fresh_table(table_name)
    changed = False
    if not table.is_chain(chain_name):
        table.create_chain(chain_name)
        changed = True
    chain = iptc.Chain(table, chain_name)
    parent_chain = iptc.Chain(table, parent)
    if {"target": chain_name} not in _dump(parent_chain):
        parent_chain.insert_rule(easy.encode_iptc_rule({"target": chain_name}))
        changed = True
    wanted = _normalize([easy.decode_iptc_rule(easy.encode_iptc_rule(r)) for r in rules])
    if _dump(chain) != wanted:
        chain.flush()
        for rule in rules:
            chain.append_rule(easy.encode_iptc_rule(rule))
        changed = True
    if changed:
        table.commit()
    release(table)
    return changed


def sync(prefix: str, networks: Iterable[Network]) -> bool:
    networks = list(networks)
    forward_chain, nat_chain = chain_names(prefix)
    with LOCK:
        changed = _sync_chain("filter", "FORWARD", forward_chain, forward_rules(prefix, networks))
        changed |= _sync_chain("nat", "POSTROUTING", nat_chain, nat_rules(prefix, networks))
    if changed:
        log.info("firewall rules updated prefix=%s networks=%d", prefix, len(networks))
    return changed


def remove(prefix: str) -> None:
    """Delete svcnet's chains for ``prefix`` and the jumps to them."""
    from . import docker_forward

    docker_forward.remove(chain_names(prefix)[0])
    for table_name, parent, chain_name in zip(("filter", "nat"), ("FORWARD", "POSTROUTING"), chain_names(prefix), strict=False):
        with LOCK:
            table = fresh_table(table_name)
            if table.is_chain(chain_name):
                drop_chain(table, parent, chain_name)
                table.commit()
            release(table)
