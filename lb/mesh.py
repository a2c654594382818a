"""The routing-mesh plan: what this host's kernel does with each published port.

Pure: View in, plain data out (diffed, unit-tested, equal across restarts), as ``plan.py``
is for VIPs. A port published in ``ingress`` mode answers on every address of every node
and goes to the service's healthy tasks wherever they run: on an overlay network every
task, on a bridge network (one host) the tasks of this node. ``host`` mode answers only on
nodes running a task, with their own tasks. Backends are sorted, so equal plans compare
equal and a restarted agent rewrites nothing.

Replies must come back through the node that did the DNAT. With ``source=nat`` (default,
Docker's way) the node masquerades to its own address on the task's network: on an
overlay, the per-node address every peer can reach (``Node.addresses``); on a bridge, the
gateway. With ``source=keep`` it does not, and the task's node sends replies back through
the node the request came from (``ReturnPath``: connmark + policy routing).

Node hops (``node_hops``, where the mesh backend can mark them: nftables): an ingress port
with ``source=nat`` reaches a task on another node not over the overlay but over the
underlay, by DNAT to that node's own published port (its VTEP address), masqueraded to
ours; that node sends connections a peer hopped to it (``MeshPort.local``) to its own tasks
only, so nothing hops twice. A remote node gets one backend per task it runs, so the spread
over tasks stays even. Measured here (short TCP connections through a node without a task,
over straight to a task): 88-91 % with hops, as much as one NAT hop built by hand costs in
the same run, against 85 % over the overlay, whose VXLAN and two bridges each way cost the
difference (bench/cluster_bench.py, bench/cluster_floors.py).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from ipaddress import IPv4Address

from discovery.host.firewall import RETURN_MASK
from discovery.state.model import Endpoint, Node, Service
from discovery.state.view import View

log = logging.getLogger(__name__)


NODE_HOP = "@node"  # Backend.network of a node hop: a peer node's published port, over the underlay


@dataclass(frozen=True, order=True)
class Backend:
    address: IPv4Address
    port: int
    network: str  # the task's network, or NODE_HOP


@dataclass(frozen=True, order=True)
class MeshPort:
    published: int
    protocol: str
    service: str
    mode: str  # ingress | host
    source: str  # nat | keep
    backends: tuple[Backend, ...]
    hops: bool = False  # remote tasks are reached by node hops
    local: tuple[Backend, ...] = ()  # with hops: this node's own tasks, for connections a peer hopped here

    @property
    def signature(self) -> str:
        text = ",".join([str(self.published), self.protocol, self.service, self.mode, self.source,
                         *(f"{b.address}:{b.port}" for b in self.backends),
                         *([f"local={b.address}:{b.port}" for b in self.local] if self.hops else [])])
        return hashlib.sha1(text.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Masquerade:
    """Mesh traffic leaving through ``network``'s bridge takes ``source`` (None: the bridge's
    gateway, for a bridge network whose tasks are all local)."""

    network: str
    source: IPv4Address | None


@dataclass(frozen=True, order=True)
class ReturnPath:
    """Replies of ``source=keep`` flows that came in from ``address`` (another node's own
    address on ``network``) go back to it: the flow is connmarked with ``slot`` (the
    address's offset in the subnet), and a policy route sends marked replies there."""

    network: str
    address: IPv4Address
    slot: int


SLOT_SHIFT = 20  # where a slot sits in RETURN_MASK
MAX_SLOT = RETURN_MASK >> SLOT_SHIFT


@dataclass(frozen=True)
class MeshPlan:
    ports: tuple[MeshPort, ...] = ()
    masquerades: tuple[Masquerade, ...] = ()
    returns: tuple[ReturnPath, ...] = ()
    peers: tuple[IPv4Address, ...] = ()  # with node hops: every other node's VTEP address
    hop_source: IPv4Address | None = None  # with node hops: ours, which hops leave with

    def by_key(self) -> dict[tuple[int, str], MeshPort]:
        return {(p.published, p.protocol): p for p in self.ports}


def mesh_plan(view: View, node: str, node_hops: bool = False) -> MeshPlan:
    """This node's published ports, their backends, and how mesh traffic leaves each network.

    One pass over the endpoints of the networks that carry a published service, whatever the
    number of ports (run off the event loop: the View is immutable)."""
    publishing = sorted(view.published.values(), key=lambda s: s.name)
    if not publishing:
        return MeshPlan()
    tasks = _healthy_tasks(view, {s.name for s in publishing})
    me = view.nodes.get(node)
    hop_source = IPv4Address(me.vtep) if node_hops and me is not None and me.vtep else None
    ports: list[MeshPort] = []
    holders: dict[tuple[int, str], str] = {}
    used_networks: set[str] = set()
    for service in publishing:
        for spec in service.published:
            if spec.key in holders:  # written before ports were claimed: the first by name keeps it
                log.warning("port published twice, ignored port=%s/%s service=%s held_by=%s",
                            spec.published, spec.protocol, service.name, holders[spec.key])
                continue
            hops = hop_source is not None and spec.mode == "ingress" and spec.source == "nat"
            if hops:
                local = _backends(view, node, me, service, tasks.get(service.name, {}), spec.target, local_only=True)
                backends = local + _hops(view, node, service, tasks.get(service.name, {}), spec.published)
            else:
                local = []
                backends = _backends(view, node, me, service, tasks.get(service.name, {}), spec.target,
                                     local_only=spec.mode == "host")
            if spec.mode == "host" and not backends:
                continue  # host mode: a node without a task does not answer
            holders[spec.key] = service.name
            used_networks.update(b.network for b in backends if b.network != NODE_HOP)
            ports.append(MeshPort(spec.published, spec.protocol, service.name, spec.mode, spec.source,
                                  tuple(sorted(backends)), hops, tuple(sorted(local))))
    masquerades = []
    for name in sorted(used_networks):
        network = view.networks.get(name)
        if network is None:
            continue
        if network.driver == "overlay":
            own = me.address_on(name) if me is not None else None
            if own is not None:
                masquerades.append(Masquerade(name, own))
        else:
            masquerades.append(Masquerade(name, None))
    returns = _return_paths(view, node, publishing, tasks)
    peers: tuple[IPv4Address, ...] = ()
    if any(port.hops for port in ports):
        peers = tuple(sorted(IPv4Address(other.vtep) for other in view.nodes.values()
                             if other.name != node and other.vtep))
    else:
        hop_source = None
    return MeshPlan(tuple(sorted(ports)), tuple(masquerades), tuple(sorted(returns)), peers, hop_source)


def _healthy_tasks(view: View, services: set[str]) -> dict[str, dict[str, list[Endpoint]]]:
    """service -> network -> its healthy endpoints there, for ``services`` only."""
    networks = {n for s in services for n in view.services[s].networks}
    found: dict[str, dict[str, list[Endpoint]]] = {}
    for name in networks:
        piece = view.slices.get(name)
        for endpoint in piece.endpoints.values() if piece is not None else ():
            if endpoint.service in services and endpoint.health == "healthy":
                found.setdefault(endpoint.service, {}).setdefault(name, []).append(endpoint)
    return found


def _return_paths(view: View, node: str, publishing: list[Service],
                  tasks: dict[str, dict[str, list[Endpoint]]]) -> list[ReturnPath]:
    """Where this node sends replies of kept-source flows to its own tasks: for every overlay
    network with a local task of such a port, every other node's address there."""
    networks: set[str] = set()
    for service in publishing:
        if any(p.mode == "ingress" and p.source == "keep" for p in service.published):
            for name, endpoints in tasks.get(service.name, {}).items():
                network = view.networks.get(name)
                if network is not None and network.driver == "overlay" and any(e.node == node for e in endpoints):
                    networks.add(name)
    paths = []
    for name in networks:
        subnet = view.networks[name].subnet
        for other in view.nodes.values():
            address = other.address_on(name)
            if other.name == node or address is None or not other.vtep:
                continue
            slot = int(address) - int(subnet.network_address)
            if 0 < slot <= MAX_SLOT:
                paths.append(ReturnPath(name, address, slot))
            else:
                log.error("source=keep: node %s's address %s on %s is beyond the first %d of the subnet; "
                          "its replies cannot be routed back (recreate the network, or publish without "
                          "source=keep)", other.name, address, name, MAX_SLOT)
    return paths


def _backends(view: View, node: str, me: Node | None, service: Service, tasks: dict[str, list[Endpoint]],
              target: int, local_only: bool) -> list[Backend]:
    """One backend per healthy task, on the first of the service's networks this node reaches it by."""
    found: dict[str, Backend] = {}
    for network_name in service.networks:
        network = view.networks.get(network_name)
        if network is None or network.internal:
            continue  # an internal network is sealed from the outside, published or not
        overlay = network.driver == "overlay"
        if overlay and not local_only and (me is None or me.address_on(network_name) is None):
            # no address of our own there yet: remote tasks could not answer us; local ones can
            overlay = False
        for endpoint in tasks.get(network_name, ()):
            if endpoint.container in found:
                continue
            local = endpoint.node == node
            if local or (overlay and not local_only and _reachable(view, endpoint.node)):
                found[endpoint.container] = Backend(endpoint.ipv4, target, network_name)
    return list(found.values())


def _hops(view: View, node: str, service: Service, tasks: dict[str, list[Endpoint]], published: int) -> list[Backend]:
    """One node hop per healthy task of another node on the service's overlay networks (the
    ones whose tasks the overlay would reach): the spread over tasks stays even."""
    found: dict[str, Backend] = {}
    for network_name in service.networks:
        network = view.networks.get(network_name)
        if network is None or network.internal or network.driver != "overlay":
            continue
        for endpoint in tasks.get(network_name, ()):
            peer = view.nodes.get(endpoint.node)
            if endpoint.node == node or endpoint.container in found or peer is None or not peer.vtep:
                continue
            found[endpoint.container] = Backend(IPv4Address(peer.vtep), published, NODE_HOP)
    return list(found.values())


def _reachable(view: View, node: str) -> bool:
    peer = view.nodes.get(node)
    return peer is not None and bool(peer.vtep)
