"""`svcnet sidecar`: DNS (and registration) for one netns made by someone else.

For a compose service or a Kubernetes pod: it attaches the netns to svcnet networks,
registers the endpoints under its *own* lease, answers 127.0.0.11:53 inside that netns with
the same resolver code the agent uses, programs its load balancing (VIPs -> healthy tasks)
with the agent's backend code, and on SIGTERM deregisters and detaches. If it is
killed outright, its lease runs out after ``--lease-ttl`` seconds and the names vanish from
every resolver.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass, field
from pathlib import Path

from discovery.dns.resolver import DNAT_HINT, Resolver, ResolverConfig, SandboxServer, Scope
from discovery.errors import EtcdUnavailableError, SvcnetError
from discovery.host.sandbox import SandboxManager, SandboxSpec
from discovery.metrics import Metrics, MetricsServer
from discovery.state.etcd import connect
from discovery.state.keys import KeyLayout
from discovery.state.lease import LeaseKeeper
from discovery.state.registry import Registry
from discovery.state.watch import ViewWatcher
from lb.sync import LbSync, make_backend

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SidecarConfig:
    etcd: str
    prefix: str
    node: str
    state_dir: Path
    netns: str
    name: str
    networks: tuple[str, ...]
    service: str | None = None
    aliases: tuple[str, ...] = ()
    hostname: str | None = None
    ip: str | None = None
    lease_ttl: int = 10
    resolver: ResolverConfig = field(default_factory=ResolverConfig)
    metrics_addr: tuple[str, int] | None = None
    lb_backend: str = "auto"
    drain_grace: float = 30.0


async def run_sidecar(config: SidecarConfig) -> int:
    try:
        client = await connect(config.etcd)
    except EtcdUnavailableError as exc:
        raise SvcnetError(f"{exc}; the sidecar needs etcd to register {config.name!r}") from None
    keys = KeyLayout(config.prefix)
    registry = Registry(client, keys)
    watcher = ViewWatcher(client, keys)
    metrics = Metrics()
    resolver = Resolver(config.resolver, metrics)
    watcher.subscribe(resolver.update)
    balancer = LbSync(make_backend(config.lb_backend, config.drain_grace), metrics)
    watcher.subscribe(balancer.on_view)
    lease = LeaseKeeper(client, config.lease_ttl)
    manager = SandboxManager(registry, keys.prefix, config.node, config.state_dir / "sidecars" / config.name)
    tasks = [asyncio.create_task(watcher.run(), name="watch"), asyncio.create_task(lease.run(), name="lease"),
             asyncio.create_task(balancer.run(), name="lb-sync")]
    metrics_server = MetricsServer(metrics)
    server: SandboxServer | None = None
    record = None
    try:
        await watcher.ready()
        spec = SandboxSpec(name=config.name, networks=list(config.networks), service=config.service,
                           aliases=list(config.aliases), hostname=config.hostname, ip=config.ip, netns=config.netns)
        record = await manager.create(spec, await lease.current())
        lease.on_new_lease = manager.reassert
        server = SandboxServer(resolver, Scope(record.name, record.netns, record.networks))
        await server.start()
        if not await server.check():
            raise SvcnetError(f"netns {config.netns}: {DNAT_HINT}")
        balancer.add(record.name, record.netns, record.networks, foreign=True)
        await balancer.wait_synced(record.name)
        if config.metrics_addr is not None:
            host, port = await metrics_server.start(*config.metrics_addr)
            log.info("metrics serving address=http://%s:%d/metrics", host, port)
        addresses = " ".join(f"{e['network']}={e['ipv4']}" for e in record.endpoints)
        log.warning("sidecar serving sandbox=%s netns=%s %s", record.name, record.netns, addresses)
        await _until_signalled(tasks)
    finally:
        if server is not None:
            await server.close()
        if record is not None:
            await balancer.drop(record.name)
        await metrics_server.close()
        if record is not None:
            try:
                await manager.remove(record.name)
            except Exception as exc:  # the lease will still expire
                log.error("cannot deregister sandbox=%s error=%s", record.name, exc)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await client.close()
    return 0


async def _until_signalled(tasks: list[asyncio.Task]) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    stopper = asyncio.ensure_future(stop.wait())
    done, _ = await asyncio.wait([stopper, *tasks], return_when=asyncio.FIRST_COMPLETED)
    stopper.cancel()
    for task in done:
        if task is not stopper and not task.cancelled() and task.exception() is not None:
            log.error("sidecar task failed task=%s error=%r", task.get_name(), task.exception())
