"""`svcnet agent`: the per-host node, as dockerd is.

The node runtime (``runtime.py``) with every local sandbox as its source: sandboxes are
created and removed over the unix-socket API (``<state-dir>/agent.sock``), their records
live under the state dir, and a coalescing host sync keeps a bridge per network and the
isolation and NAT chains in step with the View. The agent registers its node under its
lease. Stopping it leaves sandboxes and their processes running; their endpoints stay in
the registry for one lease TTL and are re-asserted when the agent comes back.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import subprocess
import time
from pathlib import Path

from discovery import __version__
from discovery.errors import EtcdUnavailableError
from discovery.host.sandbox import SandboxSpec
from discovery.state.etcd import TRANSIENT_ERRORS
from discovery.state.model import Node
from discovery.state.view import View
from lb.mesh import MeshPlan, mesh_plan

from .runtime import NodeOptions, NodeRuntime

log = logging.getLogger(__name__)

DOCKER_RECHECK = 10.0  # seconds between checks that dockerd's FORWARD policy lets svcnet through
EXIT_DEREGISTER_WAIT = 2.0  # seconds --remove-on-exit tries etcd per sandbox before leaving it to the lease


class HostSync:
    """Converge bridges, firewall rules and overlay peers to the View, coalescing changes."""

    def __init__(self, prefix: str, node: str = "", vtep: str | None = None, vxlan_port: int = 4789) -> None:
        self.prefix = prefix
        self.node, self.vtep, self.vxlan_port = node, vtep, vxlan_port
        self._latest: View | None = None
        self._dirty = asyncio.Event()
        self._applied: dict = {}
        self._peers_applied: dict = {}  # overlay network -> the peers its VXLAN device holds
        self._mesh_applied: MeshPlan | None = None  # None: converge with the kernel next time
        self._mesh_last: MeshPlan | None = None  # what the last successful sync applied (for UDP cleanup)
        self.mesh_backend = "iptables"  # the agent's load-balancer backend, once it is loaded
        self.syncs = 0
        self.last_duration = 0.0
        self._docker_due = False
        self.closed = False  # set while the agent removes everything: no sync may bring it back

    def recheck_docker(self) -> None:
        """Check dockerd's FORWARD chain now (the Docker engine just appeared)."""
        self._docker_due = True
        self._dirty.set()

    def on_view(self, view: View) -> None:
        self._latest = view
        self._dirty.set()

    async def run(self) -> None:
        while True:
            try:  # now and then even without news: a dockerd started later needs our rules
                await asyncio.wait_for(self._dirty.wait(), DOCKER_RECHECK)
            except TimeoutError:
                self._docker_due = True
            self._dirty.clear()
            view = self._latest
            peers = self.desired_peers(view) if view is not None else {}
            # off the loop: a pass over the published services' endpoints
            # node hops need marks only the nftables mesh writes (lb/mesh.py)
            hops = self.mesh_backend == "nftables"
            mesh = await asyncio.to_thread(mesh_plan, view, self.node, hops) if view is not None else None
            if view is None or (dict(view.networks) == self._applied and peers == self._peers_applied
                                and mesh == self._mesh_applied):
                if self._docker_due and self._applied:
                    self._docker_due = False
                    await asyncio.to_thread(self._apply_docker, self._applied)
                continue
            started = time.perf_counter()
            try:
                await asyncio.to_thread(self._apply, dict(view.networks), peers, mesh)
            except Exception:
                log.exception("host sync failed, retrying revision=%s", view.revision)
                await asyncio.sleep(1)
                self._dirty.set()
                continue
            self.syncs += 1
            self.last_duration = time.perf_counter() - started
            log.info("host synced revision=%s networks=%d took_ms=%.1f",
                     view.revision, len(view.networks), self.last_duration * 1000)

    def remove_all(self) -> None:
        remove_host(self.prefix)

    def desired_peers(self, view: View) -> dict:
        """Overlay network -> (this node's own address on it, the remote endpoints and nodes its
        VXLAN device must know), from the View."""
        if self.vtep is None:
            return {}
        from discovery.host.overlay import Peer, mac_for

        peers: dict[str, set] = {n: set() for n, net in view.networks.items() if net.driver == "overlay"}
        if not peers:
            return {}
        for (network, _), endpoint in view.endpoints.items():
            if network in peers and endpoint.node != self.node:
                node = view.nodes.get(endpoint.node)
                if node is not None and node.vtep:
                    peers[network].add(Peer(str(endpoint.ipv4), mac_for(endpoint.ipv4), node.vtep))
        for name, node in view.nodes.items():
            if name != self.node and node.vtep:
                for network, address in node.addresses:
                    if network in peers:
                        peers[network].add(Peer(str(address), mac_for(address), node.vtep))
        own = view.nodes.get(self.node)
        return {name: (own.address_on(name) if own else None, frozenset(found)) for name, found in peers.items()}

    def _apply(self, networks: dict, peers: dict, mesh: MeshPlan) -> None:
        if self.closed:
            return
        bridges_changed = networks != self._applied
        if bridges_changed:
            self._apply_networks(networks)
        if peers != self._peers_applied or networks != self._applied:
            self._apply_overlay(networks, peers)
        self._applied = networks
        if mesh != self._mesh_applied:
            self._apply_mesh(mesh)
        elif bridges_changed and mesh.returns:
            from lb import mesh_keep  # a bridge made again starts with br_netfilter off, and no routes
            mesh_keep.sync(self.prefix, mesh.returns)

    def _apply_mesh(self, mesh: MeshPlan) -> None:
        from lb import mesh_iptables, mesh_ipvs, mesh_keep, mesh_nftables
        from lb.conntrack import forget_mesh_udp_flows

        before = self._mesh_last.by_key() if self._mesh_last is not None else {}
        first = self._mesh_applied is None and self._mesh_last is None
        self._mesh_applied = None  # until it is in: a failure makes the next sync converge again
        # first sync: what another backend left (an agent restarted with another --lb-backend)
        # would DNAT before ours
        if self.mesh_backend == "ipvs":
            if first:
                mesh_iptables.remove(self.prefix, keep_postrouting=True)
                mesh_nftables.remove(self.prefix)
            mesh_ipvs.sync(self.prefix, mesh)
        elif self.mesh_backend == "nftables":
            if mesh.hop_source is not None:
                _no_redirects(mesh.hop_source)
            if first:
                mesh_iptables.remove(self.prefix)
                mesh_ipvs.remove(self.prefix)
            mesh_nftables.sync(self.prefix, mesh)
        else:
            if first:
                mesh_ipvs.remove(self.prefix)
                mesh_nftables.remove(self.prefix)
            mesh_iptables.sync(self.prefix, mesh)
        mesh_keep.sync(self.prefix, mesh.returns)
        self._mesh_applied = self._mesh_last = mesh
        now = mesh.by_key()
        lost: dict[int, set] = {}
        for (port, protocol), old in before.items():
            if protocol == "udp":
                kept = {b.address for b in now[(port, protocol)].backends} if (port, protocol) in now else set()
                gone = {b.address for b in old.backends} - kept
                if gone:
                    lost[port] = gone
        if lost:
            try:
                log.info("mesh udp flows forgotten count=%d", forget_mesh_udp_flows(None, lost))
            except Exception as exc:
                log.warning("conntrack cleanup failed; UDP flows to removed tasks move when they idle out "
                            "error=%r", exc)

    def _apply_overlay(self, networks: dict, peers: dict) -> None:
        from discovery.host import netlink, overlay

        present = overlay.list_vxlans(self.prefix)
        for name, (address, wanted) in peers.items():
            network = networks[name]
            bridge = netlink.bridge_name(self.prefix, name)
            if name not in present or self._applied.get(name) != network:
                overlay.ensure_vxlan(self.prefix, network, bridge, self.vtep,
                                     self.vxlan_port, overlay.overlay_mtu(self.vtep))
            before = self._peers_applied.get(name)
            if address is not None and (before is None or before[0] != address or name not in present):
                overlay.ensure_node_address(bridge, address, network.subnet)
            if before is None or before[1] != wanted or name not in present:
                added, removed = overlay.sync_peers(overlay.vxlan_name(self.prefix, name), set(wanted))
                log.info("overlay peers synced network=%s peers=%d added=%d removed=%d",
                         name, len(wanted), added, removed)
        for name, ifname in present.items():
            if name not in peers:
                overlay.remove_vxlan(ifname)
                log.info("vxlan removed network=%s vxlan=%s", name, ifname)
        self._peers_applied = peers

    def _apply_networks(self, networks: dict) -> None:
        from discovery.host import firewall, netlink  # pyroute2 and iptc: loaded after DNS is served

        present = netlink.list_bridges(self.prefix)
        for name, network in networks.items():
            if name not in present or self._applied.get(name) != network:
                netlink.ensure_bridge(self.prefix, network)
        for name, bridge in present.items():
            if name not in networks:
                netlink.remove_link(bridge.ifname)
                log.info("bridge removed network=%s bridge=%s", name, bridge.ifname)
        overlays = any(network.driver == "overlay" for network in networks.values())
        firewall.sync(self.prefix, networks.values(), self.vxlan_port if self.vtep and overlays else None)
        self._apply_docker(networks)

    def _apply_docker(self, networks: dict) -> None:
        from discovery.host import docker_forward, firewall

        if self.closed:
            return

        try:
            docker_forward.sync(self.prefix, firewall.chain_names(self.prefix)[0], networks.values())
        except (OSError, subprocess.SubprocessError) as exc:
            log.warning("cannot check dockerd's forward chain error=%s", exc)


def default_advertise_addr() -> str | None:
    """The source address of this netns's default route (a UDP connect sends nothing)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1: only the route lookup matters
        except OSError:
            log.warning("no default route: this node advertises no address; give --advertise-addr")
            return None
        return probe.getsockname()[0]


def _set_sysctl(name: str, value: str) -> OSError | None:
    """``net.ipv4.…`` (dotted) set to ``value`` in this netns unless it already is; the
    error if /proc/sys is read-only here (in a container: dockerd or the host must do it)."""
    path = Path("/proc/sys", *name.split("."))
    try:
        if path.read_text().strip() != value:
            path.write_text(f"{value}\n")
    except OSError as exc:
        return exc
    return None


def _no_redirects(address) -> None:
    """Node hops leave by the interface they came in by: the kernel would tell an on-link
    client, with an ICMP redirect, to reach the hop's node directly, and the client would
    then send to that node what it meant for this one. No redirects from this netns."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        found = ipr.get_addr(address=str(address))
        names = [link.get_attr("IFLA_IFNAME") for found_addr in found for link in ipr.get_links(found_addr["index"])]
    for name in ("all", *names):
        exc = _set_sysctl(f"net.ipv4.conf.{name}.send_redirects", "0")
        if exc is not None:
            log.warning("cannot turn ICMP redirects off: clients on the underlay's subnet may be sent to another "
                        "node for this one's published ports error=%s fix=%r", exc,
                        f"sysctl -w net.ipv4.conf.all.send_redirects=0 net.ipv4.conf.{name}.send_redirects=0")


def _enable_forwarding() -> None:
    # Sandboxes on non-internal networks reach beyond the host through it, as with Docker.
    exc = _set_sysctl("net.ipv4.ip_forward", "1")
    if exc is not None:
        log.warning("cannot enable ip_forward: sandboxes cannot reach beyond this host error=%s "
                    "fix=%r", exc, "sysctl -w net.ipv4.ip_forward=1 on the host")


class AgentSandboxes:
    """Every local sandbox, made and removed over the API."""

    kind = "agent"

    def __init__(self, options: NodeOptions) -> None:
        self.home = options.state_dir
        self.socket_path = options.state_dir / "agent.sock"
        self.docker_url = options.docker
        self.remove_on_exit = options.remove_on_exit
        self.advertise_addr = options.advertise_addr or default_advertise_addr()
        self.host_sync = HostSync(options.prefix, options.node, self.advertise_addr, options.vxlan_port)
        self._addresses_due = asyncio.Event()
        self._view: View | None = None
        self._claimed: dict = {}  # overlay network -> the Network our address was (re)claimed for

    def attach(self, runtime: NodeRuntime) -> None:
        self.runtime = runtime
        runtime.sandboxes.underlay = self.advertise_addr  # overlay veths take its MTU minus 50
        self.host_sync.mesh_backend = runtime.lb.backend.name
        runtime.watcher.subscribe(self.host_sync.on_view)
        runtime.watcher.subscribe(self._on_view)
        runtime.tasks.append(self.host_sync.run)
        runtime.tasks.append(self.claim_node_addresses)
        m = runtime.metrics
        m.counter_from("svcnet_host_syncs_total", "Bridge and firewall syncs applied.", lambda: self.host_sync.syncs)
        m.gauge("svcnet_host_sync_last_seconds", "Duration of the last host sync.",
                lambda: self.host_sync.last_duration)
        api = runtime.api
        api.route("GET", "/v1/sandboxes", self._list)
        api.route("POST", "/v1/sandboxes", self._create)
        api.route("GET", "/v1/sandboxes/(?P<name>[^/]+)", self._get)
        api.route("DELETE", "/v1/sandboxes/(?P<name>[^/]+)", self._remove)
        _enable_forwarding()
        if self.docker_url is not None:
            from .docker import DockerContainers

            DockerContainers(self.docker_url, on_connect=self.host_sync.recheck_docker).attach(runtime)

    async def register(self, runtime: NodeRuntime, lease: int) -> None:
        address = self.advertise_addr
        previous = await runtime.registry.get_node(runtime.options.node)
        held = previous.addresses if previous is not None else ()  # claims outlive the agent
        node = Node(runtime.options.node, runtime.started_at, __version__, address, address, held)
        await runtime.registry.register_node(node, lease)

    def _on_view(self, view: View) -> None:
        self._view = view
        self._addresses_due.set()

    async def claim_node_addresses(self) -> None:
        """Hold one address of our own on every overlay network (the mesh's masquerade source
        and return path), claimed once and kept across restarts, listed in the node record."""
        node_name = self.runtime.options.node
        while True:
            await self._addresses_due.wait()
            self._addresses_due.clear()
            view = self._view
            node = view.nodes.get(node_name) if view is not None else None
            if view is None or node is None or self.advertise_addr is None:
                continue
            overlays = {n: net for n, net in view.networks.items() if net.driver == "overlay"}
            held = dict(node.addresses)
            # each held address still inside its network as it is now (a network removed and
            # made again has lost our claim with it: claim again, which returns a live claim)
            if sorted(held) == sorted(overlays) and all(held[n] in overlays[n].subnet and
                                                        self._claimed.get(n) == overlays[n] for n in held):
                continue
            try:
                wanted = {}
                for net in sorted(overlays):
                    wanted[net] = await self.runtime.registry.claim_node_address(node_name, net)
                    self._claimed[net] = overlays[net]
                if wanted != held:
                    await self.runtime.registry.set_node_addresses(node_name, wanted.items())
                log.info("node addresses set node=%s addresses=%s", node_name,
                         ",".join(f"{n}={a}" for n, a in sorted(wanted.items())) or "-")
            except Exception as exc:  # etcd away, or the network went meanwhile: the next View retries
                log.warning("cannot claim this node's overlay addresses, retrying error=%r", exc)
                await asyncio.sleep(1)
                self._addresses_due.set()

    async def started(self, runtime: NodeRuntime) -> None:
        return None

    async def stopping(self, runtime: NodeRuntime) -> None:
        """With --remove-on-exit and nothing running any more (a compose project going down:
        its containers stop before the agent), leave the host as it was before the agent.
        A sandbox still running means a restart: then, as always, everything stays."""
        if not self.remove_on_exit:
            return
        running = [r.name for r in runtime.sandboxes.records.values() if r.status() == "running"]
        if running:
            log.info("sandboxes still run, leaving everything for the next agent count=%d", len(running))
            return
        self.host_sync.closed = True
        for name in list(runtime.sandboxes.records):
            await runtime.unserve(name)
            try:
                await asyncio.wait_for(runtime.sandboxes.remove(name), EXIT_DEREGISTER_WAIT)
            except Exception as exc:  # etcd gone first: the lease takes the keys
                log.warning("leaving registry keys to the lease sandbox=%s error=%r", name, exc)
                if name in runtime.sandboxes.records:
                    await runtime.sandboxes.remove(name, deregister=False)
        await asyncio.to_thread(self.host_sync.remove_all)
        log.info("removed every sandbox, bridge and rule of this agent prefix=%s", runtime.keys.prefix)

    # ---- API handlers ------------------------------------------------------------------

    async def _list(self, body, match) -> list:
        records = self.runtime.sandboxes.records.values()
        return [r.to_dict() for r in sorted(records, key=lambda r: r.name)]

    async def _get(self, body, match) -> dict:
        return self.runtime.sandboxes.get(match["name"]).to_dict()

    async def _create(self, body, match) -> dict:
        return (await self.runtime.add_sandbox(SandboxSpec.from_dict(body))).to_dict()

    async def _remove(self, body, match) -> dict:
        runtime = self.runtime
        name = match["name"].lower()
        runtime.sandboxes.get(name)  # NotFoundError with a hint
        await runtime.unserve(name)
        try:
            await runtime.sandboxes.remove(name)
        except TRANSIENT_ERRORS as exc:
            raise EtcdUnavailableError(f"etcd is unreachable, cannot deregister: {type(exc).__name__}") from None
        return {"removed": name}


def run_agent(options: NodeOptions) -> int:
    return NodeRuntime(options, AgentSandboxes(options)).run()


def remove_host(prefix: str) -> None:
    """Everything ``prefix`` made in this host's netns: VXLAN ports, bridges, the firewall
    chains, every mesh backend's rules and source=keep's return paths. One piece that fails
    (a sync of a stopping agent racing it, say) is logged and does not keep the others. Used
    by ``--remove-on-exit``, and by the demos, tests and benchmarks to leave nothing behind."""
    from discovery.host import firewall, netlink, overlay
    from lb import mesh_iptables, mesh_ipvs, mesh_keep, mesh_nftables

    def links() -> None:
        for ifname in overlay.list_vxlans(prefix).values():
            overlay.remove_vxlan(ifname)
        for bridge in netlink.list_bridges(prefix).values():
            netlink.remove_link(bridge.ifname)
    for step in (links, lambda: firewall.remove(prefix), lambda: mesh_iptables.remove(prefix),
                 lambda: mesh_ipvs.remove(prefix), lambda: mesh_nftables.remove(prefix),
                 lambda: mesh_keep.remove(prefix)):
        try:
            step()
        except Exception as exc:
            log.error("host cleanup step failed; the rest goes on prefix=%s error=%r", prefix, exc)
