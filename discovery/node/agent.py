"""`svcnet agent`: the per-host daemon.

It owns this node's sandboxes and the lease their endpoints are written under, keeps one
watch on the registry (the View), converges the host to the View (a bridge per network,
isolation and NAT rules) in a coalescing sync loop, answers DNS on 127.0.0.11:53 inside
every local sandbox from one event loop, serves Prometheus metrics, and serves the CLI's API
on a unix socket. Stopping it leaves sandboxes and their processes running; their endpoints
stay in the registry for one lease TTL and are re-asserted when the agent comes back.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from discovery import __version__
from discovery.dns.resolver import DNAT_HINT, Resolver, ResolverConfig, SandboxServer, Scope
from discovery.errors import EtcdUnavailableError, SvcnetError
from discovery.host import firewall, netlink
from discovery.host.sandbox import SandboxManager, SandboxRecord, SandboxSpec
from discovery.metrics import Metrics, MetricsServer
from discovery.state.etcd import TRANSIENT_ERRORS, connect
from discovery.state.keys import KeyLayout
from discovery.state.lease import LeaseKeeper
from discovery.state.model import HealthSpec, Node
from discovery.state.registry import Registry
from discovery.state.view import View
from discovery.state.watch import ViewWatcher
from lb.sync import LbSync, make_backend

from .api import ApiServer
from .health import HealthChecker

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AgentConfig:
    etcd: str
    prefix: str
    node: str
    state_dir: Path
    lease_ttl: int = 10
    resolver: ResolverConfig = ResolverConfig()
    metrics_addr: tuple[str, int] | None = ("127.0.0.1", 9253)
    metrics_addr_explicit: bool = False  # a busy default port is a warning, a busy chosen one an error
    lb_backend: str = "auto"  # auto | ipvs | iptables
    drain_grace: float = 30.0  # IPVS: seconds a removed task keeps its established connections

    @property
    def socket_path(self) -> Path:
        return self.state_dir / "agent.sock"


class HostSync:
    """Converge bridges and firewall rules to the View's networks, coalescing changes."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self._latest: View | None = None
        self._dirty = asyncio.Event()
        self._applied: dict = {}
        self.syncs = 0
        self.last_duration = 0.0

    def on_view(self, view: View) -> None:
        self._latest = view
        self._dirty.set()

    async def run(self) -> None:
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            view = self._latest
            if view is None or dict(view.networks) == self._applied:
                continue
            started = time.perf_counter()
            try:
                await asyncio.to_thread(self._apply, dict(view.networks))
            except Exception:
                log.exception("host sync failed, retrying revision=%s", view.revision)
                await asyncio.sleep(1)
                self._dirty.set()
                continue
            self.syncs += 1
            self.last_duration = time.perf_counter() - started
            log.info("host synced revision=%s networks=%d took_ms=%.1f",
                     view.revision, len(view.networks), self.last_duration * 1000)

    def _apply(self, networks: dict) -> None:
        present = netlink.list_bridges(self.prefix)
        for name, network in networks.items():
            if name not in present or self._applied.get(name) != network:
                netlink.ensure_bridge(self.prefix, network)
        for name, bridge in present.items():
            if name not in networks:
                netlink.remove_link(bridge.ifname)
                log.info("bridge removed network=%s bridge=%s", name, bridge.ifname)
        firewall.sync(self.prefix, networks.values())
        self._applied = networks


class SandboxResolvers:
    """One resolver listener per local sandbox, in step with the sandbox manager."""

    def __init__(self, resolver: Resolver) -> None:
        self.resolver = resolver
        self.servers: dict[str, SandboxServer] = {}
        self.conflicts = 0

    async def serve(self, record: SandboxRecord) -> None:
        server = self.servers.get(record.name)
        if server is not None:
            if server.scope.attached != tuple(record.networks):
                self.resolver.set_attached(server.scope, record.networks)
            return
        server = SandboxServer(self.resolver, Scope(record.name, record.netns, record.networks))
        await server.start()
        self.servers[record.name] = server
        if not await server.check():
            self.conflicts += 1
            log.error("sandbox resolver is shadowed sandbox=%s netns=%s hint=%r", record.name, record.netns, DNAT_HINT)

    async def drop(self, name: str) -> None:
        server = self.servers.pop(name, None)
        if server is not None:
            await server.close()

    async def sync(self, records: dict[str, SandboxRecord]) -> None:
        for name in set(self.servers) - set(records):
            await self.drop(name)
        for record in list(records.values()):
            try:
                await self.serve(record)
            except Exception as exc:  # one broken sandbox must not stop DNS for the others
                log.error("cannot serve dns sandbox=%s error=%s", record.name, exc)

    async def close(self) -> None:
        for name in list(self.servers):
            await self.drop(name)


def _enable_forwarding() -> None:
    # Sandboxes on non-internal networks reach beyond the host through it, as with Docker.
    try:
        Path("/proc/sys/net/ipv4/ip_forward").write_text("1\n")
    except OSError as exc:
        log.warning("cannot enable ip_forward error=%s", exc)


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.keys = KeyLayout(config.prefix)
        self.started_at = time.time()
        self.metrics_address: tuple[str, int] | None = None

    async def run(self) -> None:
        config = self.config
        config.state_dir.mkdir(parents=True, exist_ok=True)
        client = await self._connect()
        registry = Registry(client, self.keys)
        self.watcher = ViewWatcher(client, self.keys)
        self.sandboxes = SandboxManager(registry, self.keys.prefix, config.node, config.state_dir)
        self.sandboxes.load()
        self.lease = LeaseKeeper(client, config.lease_ttl, self._on_new_lease)
        self.registry = registry
        self.host_sync = HostSync(self.keys.prefix)
        self.watcher.subscribe(self.host_sync.on_view)
        self.metrics = Metrics()
        self.resolver = Resolver(config.resolver, self.metrics)
        self.watcher.subscribe(self.resolver.update)
        self.dns = SandboxResolvers(self.resolver)
        self.lb = LbSync(make_backend(config.lb_backend, config.drain_grace), self.metrics)
        self.watcher.subscribe(self.lb.on_view)
        self.health = HealthChecker(self._report_health)
        self._register_metrics()
        _enable_forwarding()

        api = ApiServer()
        api.route("GET", "/v1/info", self._info)
        api.route("GET", "/v1/sandboxes", self._list)
        api.route("POST", "/v1/sandboxes", self._create)
        api.route("GET", "/v1/sandboxes/(?P<name>[^/]+)", self._get)
        api.route("DELETE", "/v1/sandboxes/(?P<name>[^/]+)", self._remove)

        tasks = [
            asyncio.create_task(self.watcher.run(), name="watch"),
            asyncio.create_task(self.lease.run(), name="lease"),
            asyncio.create_task(self.host_sync.run(), name="host-sync"),
            asyncio.create_task(self.lb.run(), name="lb-sync"),
            asyncio.create_task(self._reap(), name="reap"),
        ]
        await self.lease.current()
        await self.watcher.ready()
        await self.dns.sync(self.sandboxes.records)
        for record in self.sandboxes.records.values():
            self._serve_lb_and_health(record)
        log.info("load balancer backend=%s", self.lb.backend.name)
        metrics_server = await self._start_metrics()
        await api.start(config.socket_path)
        (config.state_dir / "agent.pid").write_text(str(os.getpid()))
        log.info("agent ready node=%s prefix=%s socket=%s sandboxes=%d",
                 config.node, self.keys.prefix, config.socket_path, len(self.sandboxes.records))

        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        crashed = asyncio.ensure_future(asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION))
        await asyncio.wait([crashed, asyncio.ensure_future(stop.wait())], return_when=asyncio.FIRST_COMPLETED)
        await api.close()
        self.health.stop_all()
        await self.dns.close()
        await metrics_server.close()
        for task in tasks:
            if task.done() and not task.cancelled() and task.exception():
                log.error("agent task failed task=%s error=%r", task.get_name(), task.exception())
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await client.close()
        config.socket_path.unlink(missing_ok=True)
        log.info("agent stopped node=%s", config.node)

    async def _start_metrics(self) -> MetricsServer:
        server = MetricsServer(self.metrics)
        address = self.config.metrics_addr
        if address is None:
            return server
        try:
            self.metrics_address = await server.start(*address)
        except OSError as exc:
            if self.config.metrics_addr_explicit:
                raise SvcnetError(f"cannot serve metrics on {address[0]}:{address[1]}: {exc.strerror}; "
                                  f"choose another --metrics-addr (port 0 picks a free one)") from None
            log.warning("metrics disabled: default address busy address=%s:%d error=%s",
                        address[0], address[1], exc.strerror)
            return server
        log.info("metrics serving address=http://%s:%d/metrics", *self.metrics_address)
        return server

    def _register_metrics(self) -> None:
        m = self.metrics
        watcher = self.watcher
        m.gauge("svcnet_etcd_connected", "1 while the registry watch is connected.", lambda: int(watcher.connected))
        m.counter_from("svcnet_watch_relists_total", "Full re-lists of the registry (start, compaction).",
                       lambda: watcher.relists)
        m.counter_from("svcnet_watch_reconnects_total", "Times the registry watch was resumed.",
                       lambda: watcher.reconnects)
        m.counter_from("svcnet_host_syncs_total", "Bridge and firewall syncs applied.", lambda: self.host_sync.syncs)
        m.gauge("svcnet_host_sync_last_seconds", "Duration of the last host sync.",
                lambda: self.host_sync.last_duration)
        m.counter_from("svcnet_dns_shadowed_total", "Sandboxes found with 127.0.0.11:53 answered by someone else.",
                       lambda: self.dns.conflicts)

    def _serve_lb_and_health(self, record: SandboxRecord) -> None:
        self.lb.add(record.name, record.netns, record.networks, foreign=not record.owns_netns)
        if record.health_check:
            spec = HealthSpec(**record.health_check)
            self.health.start(record.name, record.exec_argv(spec.command()), spec, record.health)

    async def _report_health(self, name: str, health: str) -> None:
        await self.sandboxes.set_health(name, health, await self.lease.current())

    async def _connect(self):
        delay = 0.2
        while True:
            try:
                return await connect(self.config.etcd)
            except EtcdUnavailableError as exc:
                log.warning("waiting for etcd retry_in=%.1fs error=%s", delay, str(exc).replace(" ", "_")[:120])
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _on_new_lease(self, lease: int) -> None:
        await self.registry.register_node(Node(self.config.node, self.started_at, __version__), lease)
        await self.sandboxes.reassert(lease)

    async def _reap(self) -> None:
        while True:
            self.sandboxes.reap()
            await asyncio.sleep(0.5)

    # ---- API handlers ---------------------------------------------------------------

    async def _info(self, body, match) -> dict:
        view = self.watcher.view
        return {
            "node": self.config.node, "prefix": self.keys.prefix, "etcd": self.config.etcd,
            "pid": os.getpid(), "version": __version__, "view_revision": view.revision,
            "etcd_connected": self.watcher.connected, "sandboxes": len(self.sandboxes.records),
            "state_dir": str(self.config.state_dir),
            "metrics": f"http://{self.metrics_address[0]}:{self.metrics_address[1]}/metrics"
            if self.metrics_address else None,
            "dns_sandboxes": len(self.dns.servers),
            "lb_backend": self.lb.backend.name,
        }

    async def _list(self, body, match) -> list:
        return [r.to_dict() for r in sorted(self.sandboxes.records.values(), key=lambda r: r.name)]

    async def _get(self, body, match) -> dict:
        return self.sandboxes.get(match["name"]).to_dict()

    async def _create(self, body, match) -> dict:
        spec = SandboxSpec.from_dict(body)
        try:
            record = await self.sandboxes.create(spec, await self.lease.current())
        except TRANSIENT_ERRORS as exc:
            raise EtcdUnavailableError(f"etcd is unreachable, cannot register {spec.name!r}: {type(exc).__name__}") from None
        try:
            await self.dns.serve(record)
        except BaseException:
            await self.sandboxes.remove(record.name)
            raise
        self._serve_lb_and_health(record)
        # its names resolve and its VIPs work by the time the caller hears back
        keys = [(e["network"], record.name) for e in record.endpoints]
        try:
            await self.watcher.wait_for(lambda view: all(k in view.endpoints for k in keys), timeout=5)
            await self.lb.wait_synced(record.name)
        except TimeoutError:
            log.warning("sandbox not yet in the view sandbox=%s", record.name)
        return record.to_dict()

    async def _remove(self, body, match) -> dict:
        name = match["name"].lower()
        self.health.stop(name)
        await self.dns.drop(name)
        await self.lb.drop(name)
        try:
            await self.sandboxes.remove(match["name"])
        except TRANSIENT_ERRORS as exc:
            raise EtcdUnavailableError(f"etcd is unreachable, cannot deregister: {type(exc).__name__}") from None
        return {"removed": match["name"].lower()}
