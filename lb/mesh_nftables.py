"""The routing mesh on nftables, in this host's netns (the agent's ``--lb-backend`` is nftables).

One table per registry prefix, ``ip svcnet-mesh-<t>`` (``<t>``: the prefix's tag):

    map ports    { meta l4proto . th dport : verdict }              published port -> goto port-<P><T|U>
    chain mesh-pre  nat prerouting (dstnat), chain mesh-out  nat output (-100):
        ip daddr 127.0.0.0/8 return
        fib daddr type local meta l4proto . th dport vmap @ports      one lookup, whatever the ports
    chain port-<P><T|U>:
        [ip saddr <peers> ip dscp cs1 ip dscp set cs0 ... dnat to <local tasks>]   a hop from a peer node:
                                                                      to our own tasks only (none: accept,
                                                                      our own port refuses it)
        meta mark set meta mark | MESH_MARK                           to masquerade: every connection, or
                                                                      with mode=host / source=keep only those
                                                                      from a sandbox (iifname "svbr*") or
                                                                      this host (fib saddr type local)
        meta l4proto tcp dnat ip to numgen random mod N map { 0 : task0 . TARGET, ... }   N = its tasks
                                                                      (a remote task: its node's VTEP . P)
    chain mesh-post  nat postrouting (srcnat):
        oifname <bridge> meta mark & MESH_MARK == MESH_MARK snat to <this node's address> | masquerade
        [meta mark & MESH_MARK == MESH_MARK ip daddr <peers> ip dscp set cs1 snat to <our VTEP>]

Node hops (``lb/mesh.py``) carry DSCP CS1 on their first packet, set here where the hop
leaves and cleared where it lands: that, not the source address alone, tells a hop from a
client that runs on a peer node (which the peer's own port serves like any client). The
nat chains only see a connection's first packet, so nothing else is marked or rewritten.

The same plan (``lb/mesh.py``) and the same marks as the iptables mesh, so the host firewall,
``mesh_keep`` (source=keep) and the conntrack cleanup work unchanged. A port whose tasks are
all gone keeps its port chain without a DNAT rule: the connection reaches this host's own
(closed) port and is refused. The tasks of a port live in its chain's one DNAT rule (an
anonymous map: nft 1.0.6 refuses a rule that reads a named map keyed on ``th dport`` unless
the map is made in the same transaction); a change rewrites the port chains and dispatch
elements it touches, in one transaction; the first sync of a process reads the table back and writes nothing that
is right (a restarted agent leaves the bytes as they were).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from discovery.host.firewall import MESH_MARK, prefix_tag
from discovery.host.netlink import bridge_name
from discovery.host.nft import Nft, chain_rules, nft_available

from .mesh import MeshPlan, MeshPort

log = logging.getLogger(__name__)

MARK = f"{MESH_MARK:#010x}"
BASE_CHAINS = {
    "mesh-pre": "type nat hook prerouting priority dstnat; policy accept;",
    "mesh-out": "type nat hook output priority -100; policy accept;",
    "mesh-post": "type nat hook postrouting priority srcnat; policy accept;",
}
DISPATCH = ["ip daddr 127.0.0.0/8 return", "fib daddr type local meta l4proto . th dport vmap @ports"]


def table_name(prefix: str) -> str:
    return f"ip svcnet-mesh-{prefix_tag(prefix).lower()}"


def port_chain(port: MeshPort) -> str:
    return f"port-{port.published}{port.protocol[0].upper()}"


def addresses(found) -> str:
    """An address match as nft prints it back: one address bare, several as a sorted set."""
    found = sorted(found)
    return str(found[0]) if len(found) == 1 else f"{{ {', '.join(str(a) for a in found)} }}"


def dnat_rule(protocol: str, backends) -> str:
    targets = ", ".join(f"{slot} : {b.address} . {b.port}" for slot, b in enumerate(backends))
    return f"meta l4proto {protocol} dnat ip to numgen random mod {len(backends)} map {{ {targets} }}"


def port_rules(port: MeshPort, peers=()) -> list[str]:
    mark = f"meta mark set meta mark | {MARK}"
    rules = []
    if port.hops and peers:
        hop = f"ip saddr {addresses(peers)} ip dscp cs1 ip dscp set cs0"
        rules.append(f"{hop} {dnat_rule(port.protocol, port.local)}" if port.local else f"{hop} accept")
    if port.mode == "ingress" and port.source == "nat":
        rules.append(mark)
    else:  # the client's address is kept, except where replies could not find their way back
        rules += [f'iifname "svbr*" {mark}', f"fib saddr type local {mark}"]
    if port.backends:
        rules.append(dnat_rule(port.protocol, port.backends))
    return rules


def snat_rules(prefix: str, plan: MeshPlan) -> list[str]:
    rules = []
    for masq in plan.masquerades:
        action = f"snat to {masq.source}" if masq.source else "masquerade"
        rules.append(f'oifname "{bridge_name(prefix, masq.network)}" meta mark & {MARK} == {MARK} {action}')
    if plan.peers and plan.hop_source is not None:
        rules.append(f"meta mark & {MARK} == {MARK} ip daddr {addresses(plan.peers)} ip dscp set cs1 "
                     f"snat to {plan.hop_source}")
    return rules


@dataclass
class Written:
    """What the table holds: chain -> rules, and the dispatch map's elements."""

    chains: dict[str, list[str]] = field(default_factory=dict)
    ports: dict[str, str] = field(default_factory=dict)  # "tcp . 8080" -> "goto port-8080T"


def desired(prefix: str, plan: MeshPlan) -> Written:
    wanted = Written(chains={"mesh-pre": DISPATCH, "mesh-out": DISPATCH, "mesh-post": snat_rules(prefix, plan)})
    for port in plan.ports:
        chain = port_chain(port)
        wanted.chains[chain] = port_rules(port, plan.peers)
        wanted.ports[f"{port.protocol} . {port.published}"] = f"goto {chain}"
    return wanted


_written: dict[str, Written] = {}  # prefix -> what this process last left in the kernel


def forget(prefix: str) -> None:
    _written.pop(prefix, None)


def sync(prefix: str, plan: MeshPlan) -> int:
    """Converge this netns's mesh table to ``plan``; returns how many chains and elements changed."""
    table = table_name(prefix)
    wanted = desired(prefix, plan)
    nft = Nft()
    try:
        held = _written.get(prefix)
        if held is None:
            held = _read(nft, table)
        if held is None and not plan.ports and not plan.masquerades:
            return 0  # nothing published: no table (an empty one per agent would pile up)
        commands, changed = _diff(table, held, wanted)
        if commands:
            try:
                nft.run("\n".join(commands) + "\n")
            except Exception:
                forget(prefix)
                raise
        _written[prefix] = wanted
    finally:
        nft.close()
    if changed:
        log.info("mesh rules synced backend=nftables ports=%d changed=%d", len(plan.ports), changed)
    return changed


def _diff(table: str, held: Written | None, wanted: Written) -> tuple[list[str], int]:
    """The transaction from ``held`` (None: no table) to ``wanted``: new chains, then element
    deletes, rewritten chains, element adds, and chains no longer used last."""
    commands: list[str] = []
    if held is None:
        commands += [f"add table {table}", f"add map {table} ports {{ typeof meta l4proto . th dport : verdict; }}"]
        held = Written()
    changed = 0
    for chain in wanted.chains.keys() - held.chains.keys():
        hook = BASE_CHAINS.get(chain)
        commands.append(f"add chain {table} {chain}" + (f" {{ {hook} }}" if hook else ""))
    gone = [key for key, value in held.ports.items() if wanted.ports.get(key) != value]
    if gone:
        commands.append(f"delete element {table} ports {{ {', '.join(gone)} }}")
        changed += len(gone)
    for chain, rules in wanted.chains.items():
        if held.chains.get(chain) != rules:
            if chain in held.chains:
                commands.append(f"flush chain {table} {chain}")
            commands += [f"add rule {table} {chain} {rule}" for rule in rules]
            changed += 1
    new = [f"{key} : {value}" for key, value in wanted.ports.items() if held.ports.get(key) != value]
    if new:
        commands.append(f"add element {table} ports {{ {', '.join(new)} }}")
        changed += len(new)
    for chain in held.chains.keys() - wanted.chains.keys():
        commands.append(f"delete chain {table} {chain}")
        changed += 1
    return commands, changed


def _read(nft: Nft, table: str) -> Written | None:
    """The table as the kernel holds it, or None; a table not as we write it is deleted (the
    next transaction makes it afresh)."""
    family, name = table.split()
    if not any(line.split()[1:3] == [family, name] for line in nft.run("list tables").splitlines()):
        return None
    held = Written(chains=chain_rules(nft.run_terse(f"list table {table}")))
    try:
        for entry in nft.run_json(f"list table {table}").get("nftables", []):
            found = entry.get("map")
            if not found or found.get("name") != "ports":
                continue
            for key, value in found.get("elem", []):
                held.ports[" . ".join(str(part) for part in key["concat"])] = f"goto {value['goto']['target']}"
    except (KeyError, TypeError, ValueError) as exc:
        log.warning("rebuilding the mesh table: it is not as svcnet writes it table=%r error=%r", table, exc)
        nft.run(f"delete table {table}")
        return None
    return held


def remove(prefix: str) -> None:
    """Take the mesh table out (the agent stops, or switches to another backend); nothing to
    do where nftables is not usable (no such table can exist)."""
    forget(prefix)
    if not nft_available():
        return
    table = table_name(prefix)
    nft = Nft()
    try:
        if _read(nft, table) is not None:
            nft.run(f"delete table {table}")
    finally:
        nft.close()
