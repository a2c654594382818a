"""Host firewall rules for svcnet bridges: isolation between networks, outbound NAT, no conntrack
where nothing needs it.

svcnet owns three chains per registry prefix, jumped to from FORWARD, nat POSTROUTING and raw
PREROUTING + OUTPUT.
Each sync computes the rules those chains should hold from the networks in the View and
rewrites a chain only when what is there differs, in one commit; nobody else's rules are
touched. python-iptables drives the legacy tables (see DESIGN.md on legacy vs nft).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable

from discovery.state.model import Network

from .netlink import bridge_name
from .xtables import LOCK, converge_jumped, drop_chain, fresh_table, release, unjump

log = logging.getLogger(__name__)

BRIDGE_WILDCARD = "svbr+"
# Set by the routing mesh (lb/mesh_iptables.py) on a connection's first packet when it must
# be masqueraded to this node's own address on the task's network; our outbound NAT leaves
# such packets to the mesh's SNAT.
MESH_MARK = 0x00080000
# Connection marks of source=keep flows: which node's address replies go back to (bits 20-30).
RETURN_MASK = 0x7FF00000


def prefix_tag(prefix: str) -> str:
    """The registry prefix as six hex digits: the name part of every chain svcnet owns on a host."""
    return hashlib.sha1(prefix.encode()).hexdigest()[:6].upper()


def chain_names(prefix: str) -> tuple[str, str]:
    tag = prefix_tag(prefix)
    return f"SVCNET-FWD-{tag}", f"SVCNET-NAT-{tag}"


def raw_chain_name(prefix: str) -> str:
    return chain_names(prefix)[0].replace("-FWD-", "-RAW-")


NOTRACK = {"CT": {"notrack": ""}}


def raw_rules(prefix: str, networks: Iterable[Network], vxlan_port: int | None) -> list[dict]:
    """Skip conntrack for packets no host rule rewrites: ~10 % more overlay throughput here.

    With br_netfilter loaded (Docker loads it) every bridged frame is tracked by the host, and
    VXLAN adds the outer UDP flow on both ends: four lookups per packet on top of the
    sandboxes' own. Frames between two addresses of one svcnet subnet are bridged (a task's
    peer, a remote task behind the VXLAN port): never NATed by the host, accepted in FORWARD
    by interface. Traffic to an address of this host (the gateway) stays tracked: routed and
    NATed traffic starts there. The VXLAN tunnel is stateless UDP (Calico does the same).
    """
    rules: list[dict] = []
    if vxlan_port is not None:
        rules.append({"protocol": "udp", "udp": {"dport": str(vxlan_port)}, "target": NOTRACK})
    for network in sorted(networks, key=lambda n: n.name):
        bridge = bridge_name(prefix, network.name)
        subnet = str(network.subnet)
        rules.append({"in-interface": bridge, "addrtype": {"dst-type": "LOCAL"}, "target": "RETURN"})
        rules.append({"src": subnet, "dst": subnet, "in-interface": bridge, "target": NOTRACK})
    return rules


def forward_rules(prefix: str, networks: Iterable[Network]) -> list[dict]:
    rules: list[dict] = []
    networks = sorted(networks, key=lambda n: n.name)
    for network in networks:  # sealed first: nothing, not even the mesh, crosses these
        if network.internal:
            bridge = bridge_name(prefix, network.name)
            rules.append({"in-interface": bridge, "out-interface": f"!{bridge}", "target": "DROP"})
            rules.append({"in-interface": f"!{bridge}", "out-interface": bridge, "target": "DROP"})
    # The routing mesh's connections (DNATed by this host to a published port's task), both ways.
    rules.append({"conntrack": {"ctstate": "DNAT"}, "target": "ACCEPT"})
    for network in networks:
        bridge = bridge_name(prefix, network.name)
        # With net.bridge.bridge-nf-call-iptables=1 (global; the per-bridge switch cannot
        # turn it off) bridged packets pass FORWARD as bridge -> same bridge: let them by.
        rules.append({"in-interface": bridge, "out-interface": bridge, "target": "ACCEPT"})
        if not network.internal and network.driver == "overlay":
            # from the underlay only what is published (DNAT, above) and replies get in
            rules.append({"in-interface": f"!{BRIDGE_WILDCARD}", "out-interface": bridge,
                          "conntrack": {"ctstate": "NEW,INVALID"}, "target": "DROP"})
    # Routed traffic between two svcnet networks is dropped: a sandbox reaches only the
    # networks it is attached to.
    rules.append({"in-interface": BRIDGE_WILDCARD, "out-interface": BRIDGE_WILDCARD, "target": "DROP"})
    return rules


def nat_rules(prefix: str, networks: Iterable[Network]) -> list[dict]:
    rules: list[dict] = [{"mark": {"mark": f"{MESH_MARK:#x}/{MESH_MARK:#x}"}, "target": "RETURN"}]
    for network in sorted(networks, key=lambda n: n.name):
        if not network.internal:
            bridge = bridge_name(prefix, network.name)
            rules.append({"src": str(network.subnet), "out-interface": f"!{bridge}", "target": "MASQUERADE"})
    return rules


def _sync_chain(table_name: str, parents: tuple[str, ...], chain_name: str, rules: list[dict]) -> bool:
    """Make ``chain_name`` hold exactly ``rules``, jumped to from each of ``parents``; True if changed.

    Everything happens on one table handle and lands in one commit.
    """
    table = fresh_table(table_name)
    changed = converge_jumped(table, chain_name, rules, parents)
    if changed:
        table.commit()
    release(table)
    return changed


def sync(prefix: str, networks: Iterable[Network], vxlan_port: int | None = None) -> bool:
    """Converge the chains to ``networks``; ``vxlan_port`` when this host runs overlay VXLAN ports."""
    networks = list(networks)
    forward_chain, nat_chain = chain_names(prefix)
    with LOCK:
        changed = _sync_chain("filter", ("FORWARD",), forward_chain, forward_rules(prefix, networks))
        changed |= _sync_chain("nat", ("POSTROUTING",), nat_chain, nat_rules(prefix, networks))
        changed |= _sync_chain("raw", ("PREROUTING", "OUTPUT"), raw_chain_name(prefix),
                               raw_rules(prefix, networks, vxlan_port))
    if changed:
        log.info("firewall rules updated prefix=%s networks=%d", prefix, len(networks))
    return changed


def remove(prefix: str) -> None:
    """Delete svcnet's chains for ``prefix`` and the jumps to them."""
    from . import docker_forward

    docker_forward.remove(chain_names(prefix)[0])
    forward_chain, nat_chain = chain_names(prefix)
    owned = (("filter", ("FORWARD",), forward_chain), ("nat", ("POSTROUTING",), nat_chain),
             ("raw", ("PREROUTING", "OUTPUT"), raw_chain_name(prefix)))
    for table_name, parents, chain_name in owned:
        with LOCK:
            table = fresh_table(table_name)
            if table.is_chain(chain_name):
                for parent in parents[1:]:
                    unjump(table, parent, chain_name)
                drop_chain(table, parents[0], chain_name)
                table.commit()
            release(table)
