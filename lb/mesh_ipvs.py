"""The routing mesh on IPVS, in this host's netns (the agent's ``--lb-backend`` is ipvs).

Per published port (``<t>``: the registry prefix's tag):

    mangle PREROUTING, OUTPUT -j SVCNET-MMARK-<t>
    mangle SVCNET-MMARK-<t>: ! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL -p tcp --dport P
                                 -j MARK --set-xmark M      (the port's fwmark)
                             with source=keep, then the same from a sandbox (-i svbr+) or from this
                             host (--src-type LOCAL): M | MESH_MARK, which could not get replies
                             without SNAT (hairpin)
    IPVS fwmark M (and M|MESH_MARK): rr, masquerade to task:TARGET

M = MESH_FWMARK | (UDP_BIT for udp) | port, with MESH_MARK (``firewall.py``) when the port
masquerades: then ``SVCNET-MPOST-*`` (``mesh_iptables.postrouting_rules``, shared with the
iptables mesh) SNATs it, which ``net.ipv4.vs.conntrack=1`` allows for IPVS connections.
A task that leaves is deleted from the service at once (``expire_nodest_conn`` moves its
flows, TCP and UDP): the mesh does not drain. What is ours after a restart is read back from
our mangle chain's marks, so a restarted agent changes nothing that is right.
"""

from __future__ import annotations

import logging
import socket
from pathlib import Path

import iptc
from iptc import easy

from discovery.host.firewall import MESH_MARK, prefix_tag
from discovery.host.xtables import LOCK, converge_jumped, drop_chain, fresh_table, release, table_in_use, unjump

from . import ipvs as ipvs_backend
from . import mesh_iptables
from .mesh import MeshPlan, MeshPort

log = logging.getLogger(__name__)

MESH_FWMARK = 0x00020000
UDP_BIT = 0x00010000
SYSCTLS = {"conntrack": "1", "expire_nodest_conn": "1", "conn_reuse_mode": "0"}


def chain_name(prefix: str) -> str:
    return "SVCNET-MMARK-" + prefix_tag(prefix)


def fwmark(port: MeshPort) -> int:
    mark = MESH_FWMARK | (UDP_BIT if port.protocol == "udp" else 0) | port.published
    return mark | MESH_MARK if port.mode == "ingress" and port.source == "nat" else mark


def mark_rules(plan: MeshPlan) -> list[dict]:
    rules = []
    for port in plan.ports:
        match = {"dst": "!127.0.0.0/8", "addrtype": {"dst-type": "LOCAL"}, "protocol": port.protocol,
                 port.protocol: {"dport": str(port.published)},
                 "comment": {"comment": f"svcnet {port.published}/{port.protocol} {port.service}"}}
        mark = fwmark(port)
        rules.append({**match, "target": {"MARK": {"set-xmark": f"{mark:#x}/0xffffffff"}}})
        if not mark & MESH_MARK:
            hairpin = {"MARK": {"set-xmark": f"{mark | MESH_MARK:#x}/0xffffffff"}}
            rules.append({**match, "in-interface": "svbr+", "target": hairpin})
            rules.append({**match, "addrtype": {"dst-type": "LOCAL", "src-type": "LOCAL"}, "target": hairpin})
    return rules


def wanted_services(plan: MeshPlan) -> dict[int, set[tuple[str, int]]]:
    """fwmark -> {(task address, target port)}."""
    services = {}
    for port in plan.ports:
        dests = {(str(b.address), b.port) for b in port.backends}
        services[fwmark(port)] = dests
        if not fwmark(port) & MESH_MARK:
            services[fwmark(port) | MESH_MARK] = dests
    return services


def sync(prefix: str, plan: MeshPlan) -> int:
    """Converge the marks, IPVS services and SNAT chain to ``plan``; returns how many changes.

    IPVS services no longer wanted go first, while our chain still names their marks: a
    failure there leaves the ownership readable for the next try."""
    from pyroute2 import IPVS

    chain = chain_name(prefix)
    changes = 0
    if not plan.ports and not table_in_use("mangle"):
        return mesh_iptables.sync_postrouting(prefix, plan)  # nothing of ours can be there
    wanted = wanted_services(plan)
    with LOCK:
        mangle = fresh_table("mangle")
        try:
            owned = _marks_in(mangle, chain)
            if plan.ports:
                ipvs_backend.set_sysctls(SYSCTLS)  # the VIPs' helper, with the mesh's settings
            ipvs = IPVS()
            try:
                present = _services(ipvs, owned | set(wanted))
                for mark in sorted(set(present) - set(wanted)):
                    _service(ipvs, "del", mark)
                    changes += 1
                for mark, dests in sorted(wanted.items()):
                    have = present.get(mark)
                    if have is None:
                        _service(ipvs, "add", mark)
                        have = set()
                        changes += 1
                    for address, port in sorted(have - dests):
                        ipvs_backend.set_dest(ipvs, "del", mark, address, 1, port)
                        changes += 1
                    for address, port in sorted(dests - have):
                        ipvs_backend.set_dest(ipvs, "add", mark, address, 1, port)
                        changes += 1
            finally:
                ipvs.close()
            if converge_jumped(mangle, chain, mark_rules(plan), ("PREROUTING", "OUTPUT")):
                mangle.commit()
                changes += 1
        finally:
            release(mangle)
    changes += mesh_iptables.sync_postrouting(prefix, plan)
    if changes:
        log.info("mesh ipvs synced ports=%d changes=%d", len(plan.ports), changes)
    return changes


def remove(prefix: str) -> None:
    from pyroute2 import IPVS

    chain = chain_name(prefix)
    if not table_in_use("mangle"):
        return
    with LOCK:
        mangle = fresh_table("mangle")
        try:
            owned = _marks_in(mangle, chain)
            if mangle.is_chain(chain):
                unjump(mangle, "OUTPUT", chain)
                drop_chain(mangle, "PREROUTING", chain)
                mangle.commit()
        finally:
            release(mangle)
    if owned and Path("/proc/net/ip_vs").exists():
        ipvs = IPVS()
        try:
            for mark in owned:
                _service(ipvs, "del", mark)
        finally:
            ipvs.close()


def _marks_in(mangle: iptc.Table, chain: str) -> set[int]:
    """The fwmarks our chain sets: what we own in IPVS (read back after a restart)."""
    if not mangle.is_chain(chain):
        return set()
    found = set()
    for rule in iptc.Chain(mangle, chain).rules:
        value = easy.decode_iptc_rule(rule).get("target", {})
        if isinstance(value, dict) and "MARK" in value:
            text = value["MARK"]["set-xmark"]
            text = text[0] if isinstance(text, list) else text  # python-iptables versions differ
            found.add(int(text.split("/")[0], 16))
    return found


def _services(ipvs, marks: set[int]) -> dict[int, set[tuple[str, int]]]:
    from pyroute2 import IPVSDest, IPVSService

    found = {}
    for message in ipvs.service("dump"):
        service = IPVSService.from_message(message)
        mark = service.get("fwmark") or 0
        if mark in marks:
            found[mark] = {(d["addr"], int(d["port"])) for d in
                           (IPVSDest.from_message(m) for m in ipvs.dest("dump", service=service))}
    return found


def _ipvs_service(mark: int):
    from pyroute2 import IPVSService

    return IPVSService(fwmark=mark, af=socket.AF_INET, sched_name="rr", netmask="255.255.255.255")


def _service(ipvs, command: str, mark: int) -> None:
    try:
        ipvs.service(command, service=_ipvs_service(mark))
    except Exception as exc:  # already there / already gone: converged either way
        text = str(exc).lower()
        if not ("exist" in text or "no such" in text or "not found" in text):
            raise
        log.debug("ipvs service %s fwmark=%#x: %s", command, mark, exc)
