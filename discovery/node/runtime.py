"""The node runtime: the one place that wires watch -> View -> DNS + LB + health + leases.

`svcnet agent` and `svcnet sidecar` are this runtime with a different source of sandboxes
(``node/agent.py``: every local sandbox, created over the API; ``node/sidecar.py``: one
netns made by someone else). Start-up never waits on etcd:

1. take the state dir's lock (one node per state dir; a second exits naming the first),
2. load the View saved on disk and the sandbox records, open every sandbox's 127.0.0.11
   listeners and program its VIPs from that View: names answer within a second of start,
   etcd up or down,
3. open the API socket and ``/metrics``,
4. then, in the background and with backoff: list + watch etcd (the View catches up),
   take a lease and re-assert every endpoint under it in a few batched transactions.

Everything after that is level-triggered from the View and the sandbox records.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from discovery import __version__, defaults
from discovery.dns.resolver import DNAT_HINT, Resolver, ResolverConfig, SandboxServer
from discovery.errors import EtcdUnavailableError, SvcnetError
from discovery.files import write_atomically
from discovery.gcpause import GcPauses, freeze, share_the_gil
from discovery.host.sandbox import SandboxManager, SandboxRecord, SandboxSpec, restart_delay, should_restart
from discovery.metrics import Metrics
from discovery.procs import pid_alive
from discovery.state import snapshot
from discovery.state.etcd import TRANSIENT_ERRORS, client_for
from discovery.state.keys import KeyLayout
from discovery.state.lease import LeaseKeeper
from discovery.state.model import HealthSpec
from discovery.state.registry import Registry
from discovery.state.view import View
from discovery.state.watch import ViewWatcher

from .api import ApiServer, Text
from .health import HealthChecker

log = logging.getLogger(__name__)

LEASE_WAIT = 10.0  # seconds an API call that needs etcd waits for a lease before 503
EXIT_POLL = 0.1  # seconds between checks for ended commands (a task leaves answers within 1 s)
SNAPSHOT_EVERY = 1.0  # at most one View snapshot written per second
FIRST_LIST_HOLD = 2.0  # seconds the first listing waits for this node's endpoints to be re-registered


@dataclass(frozen=True)
class NodeOptions:
    """What every node takes: etcd, identity, the resolver and the load balancer."""

    etcd: str
    prefix: str
    node: str
    state_dir: Path
    lease_ttl: int = defaults.LEASE_TTL
    resolver: ResolverConfig = field(default_factory=ResolverConfig)
    metrics_addr: tuple[str, int] | None = (defaults.METRICS_HOST, defaults.METRICS_PORT)
    metrics_addr_explicit: bool = False  # a busy default port is a warning, a busy chosen one an error
    lb_backend: str = defaults.LB_BACKEND  # auto | ipvs | nftables | iptables
    drain_grace: float = defaults.DRAIN_GRACE  # IPVS: seconds a removed task keeps its established connections
    docker: str | None = None  # the Docker engine's URL: serve its labelled containers (agent only)
    remove_on_exit: bool = False  # agent: SIGTERM removes its sandboxes, bridges and rules (compose)
    advertise_addr: str | None = None  # agent: the address other hosts reach it on (None: the default route's)
    netns_prefix: str = defaults.NETNS_PREFIX
    vxlan_port: int = defaults.VXLAN_PORT  # agent: UDP port of overlay networks' VXLAN  # /run/netns/<prefix><sandbox>: per agent where several share /run


class SandboxSource(Protocol):
    """Where a node's sandboxes come from: the part that differs between agent and sidecar."""

    kind: str  # "agent" | "sidecar": names the lock, pid file and logs
    home: Path  # state dir of this node: records, snapshot, lock
    socket_path: Path | None  # the API socket, if this node serves the API

    def attach(self, runtime: NodeRuntime) -> None:
        """Add routes, subscribers, tasks and metrics of its own."""

    async def started(self, runtime: NodeRuntime) -> None:
        """Runs once the node serves: e.g. create the sidecar's one sandbox."""

    async def stopping(self, runtime: NodeRuntime) -> None:
        """Runs on SIGTERM before the node closes."""


class NodeLock:
    """One node per state dir: an flock held for the process's life, and a pid file beside it."""

    def __init__(self, home: Path, kind: str) -> None:
        self.path = home / f"{kind}.lock"
        self.pid_path = home / f"{kind}.pid"
        self.kind = kind
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise SvcnetError(f"another svcnet {self.kind} is running on {self.path.parent} "
                              f"({holder_description(self.pid_path)}); stop it first, or give this one "
                              "another --state-dir") from None
        self._fd = fd
        write_atomically(self.pid_path, f"{os.getpid()}\n".encode(), 0o644)

    def release(self) -> None:
        if self._fd is None:
            return
        if read_pid(self.pid_path) == os.getpid():
            self.pid_path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None


def read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def holder_description(pid_path: Path) -> str:
    pid = read_pid(pid_path)
    return f"pid {pid}" if pid and pid_alive(pid) else "pid unknown"


class SandboxResolvers:
    """One resolver listener per local sandbox, in step with the sandbox records."""

    def __init__(self, resolver: Resolver) -> None:
        self.resolver = resolver
        self.servers: dict[str, SandboxServer] = {}
        self.conflicts = 0

    async def serve(self, record: SandboxRecord) -> bool:
        """Listen in the sandbox; False if something else answers its 127.0.0.11:53 (Docker)."""
        server = self.servers.get(record.name)
        if server is not None:
            if server.scope.attached != tuple(record.networks):
                self.resolver.set_attached(server.scope, record.networks)
            return True
        server = SandboxServer(self.resolver, self.resolver.scope(record.name, record.netns, record.networks))
        await server.start()
        self.servers[record.name] = server
        if not await server.check():
            self.conflicts += 1
            log.error("sandbox resolver is shadowed sandbox=%s netns=%s hint=%r", record.name, record.netns, DNAT_HINT)
            return False
        return True

    async def drop(self, name: str) -> None:
        server = self.servers.pop(name, None)
        if server is not None:
            await server.close()

    async def close(self) -> None:
        for name in list(self.servers):
            await self.drop(name)


class SnapshotWriter:
    """Keeps the latest View on disk, at most once a second, off the event loop."""

    def __init__(self, keys: KeyLayout, path: Path) -> None:
        self.keys = keys
        self.path = path
        self.written_revision = -1
        self._latest: View | None = None
        self._dirty = asyncio.Event()
        self._encoder = snapshot.Encoder()

    def on_view(self, view: View) -> None:
        self._latest = view
        self._dirty.set()

    async def run(self) -> None:
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            view = self._latest
            if view is not None and view.revision != self.written_revision:
                try:
                    await asyncio.to_thread(snapshot.save, view, self.keys, self.path, self._encoder)
                    self.written_revision = view.revision
                except OSError as exc:
                    log.warning("cannot save the view snapshot path=%s error=%s", self.path, exc)
            await asyncio.sleep(SNAPSHOT_EVERY)


def _load_lb(choice: str, drain_grace: float):
    from lb.sync import LbSync, make_backend

    return LbSync, make_backend(choice, drain_grace)


class _LbPending:
    """Stands in for the load balancer during the first moments of start-up."""

    async def drop(self, name: str) -> None:
        return None


class NodeRuntime:
    def __init__(self, options: NodeOptions, source: SandboxSource) -> None:
        self.options = options
        self.source = source
        self.keys = KeyLayout(options.prefix)
        self.started_at = time.time()
        self.metrics = Metrics()
        self.api = ApiServer()
        self.metrics_address: tuple[str, int] | None = None
        self.tasks: list[Callable[[], Awaitable[None]]] = []
        self._restarts: dict[str, asyncio.TimerHandle] = {}

    # ---- lifecycle ---------------------------------------------------------------------

    async def _freeze_when_settled(self) -> None:
        """Once the first View from etcd is in and the sandboxes have synced to it, take the
        steady heap out of the collector's reach (see discovery/gcpause.py); never returns."""
        await self.watcher.ready()
        for name in list(self.sandboxes.records):
            with contextlib.suppress(Exception):
                await self.lb.wait_synced(name, timeout=60)
        freeze("first view served")
        await asyncio.Event().wait()

    def run(self) -> int:
        """Run until SIGTERM/SIGINT (blocking; uvloop where installed)."""
        lock = NodeLock(self.source.home, self.source.kind)
        lock.acquire()
        try:
            try:
                import uvloop  # the DNS hot path is ~4x faster on it
            except ImportError:
                return asyncio.run(self._main())
            return uvloop.run(self._main())
        finally:
            lock.release()

    async def _main(self) -> int:
        options, keys = self.options, self.keys
        self.client = client_for(options.etcd)  # connects on first use: nothing here waits on etcd
        self.registry = Registry(self.client, keys)
        self.watcher = ViewWatcher(self.client, keys)
        self.resolver = Resolver(options.resolver, self.metrics)
        self.dns = SandboxResolvers(self.resolver)
        self.lb = _LbPending()
        self.health = HealthChecker(self.report_health)
        self.sandboxes = SandboxManager(self.registry, keys.prefix, options.node, self.source.home,
                                        options.netns_prefix)
        self.lease = LeaseKeeper(self.client, options.lease_ttl, self._on_new_lease)
        self.watcher.hold_first_list(self.lease.reasserted.wait, FIRST_LIST_HOLD)
        self.snapshots = SnapshotWriter(keys, self.source.home / "view.json")
        for subscriber in (self.resolver.update, self.snapshots.on_view):
            self.watcher.subscribe(subscriber)
        saved = await asyncio.to_thread(snapshot.load, keys, self.source.home / "view.json")
        if saved is not None:
            await self.watcher.seed(saved)
            log.info("serving the view saved on disk until etcd answers revision=%s services=%d endpoints=%d",
                     saved.revision, len(saved.services), len(saved.endpoints))
        # DNS first, with nothing heavier loaded than the resolver: names answer within a
        # second of a restart. Then the load balancer (python-iptables, pyroute2).
        self.sandboxes.load()
        for record in list(self.sandboxes.records.values()):
            await self._serve_dns(record)
        # loaded on a worker thread: the loop answers DNS meanwhile (the import and the IPVS
        # probe take ~0.5 s here)
        lb_sync, backend = await asyncio.to_thread(_load_lb, options.lb_backend, options.drain_grace)
        self.lb = lb_sync(backend, self.metrics)
        self.watcher.subscribe(self.lb.on_view)
        if self.watcher.view.revision:
            self.lb.on_view(self.watcher.view)
        for record in list(self.sandboxes.records.values()):
            self._serve_lb_and_health(record)
        self._register_metrics()
        self.gc_pauses = GcPauses(self.metrics)
        share_the_gil()
        self.api.route("GET", "/v1/info", self._info)
        self.api.route("GET", "/metrics", self._metrics)
        self.source.attach(self)
        await self._listen()

        running = [asyncio.create_task(self.watcher.run(), name="watch"),
                   asyncio.create_task(self.lease.run(), name="lease"),
                   asyncio.create_task(self.lb.run(), name="lb-sync"),
                   asyncio.create_task(self.snapshots.run(), name="snapshot"),
                   asyncio.create_task(self._watch_exits(), name="exits"),
                   asyncio.create_task(self._freeze_when_settled(), name="gc-freeze")]
        running += [asyncio.create_task(task(), name=getattr(task, "__name__", "task")) for task in self.tasks]
        log.info("%s serving node=%s prefix=%s sandboxes=%d view_revision=%s lb=%s socket=%s", self.source.kind,
                 options.node, keys.prefix, len(self.sandboxes.records), self.watcher.view.revision,
                 self.lb.backend.name, self.source.socket_path or "-")
        code = 0
        try:
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop.set)
            starter = asyncio.create_task(self.source.started(self), name="started")
            stopper = asyncio.create_task(stop.wait(), name="stop")
            done, _ = await asyncio.wait([stopper, starter, *running], return_when=asyncio.FIRST_COMPLETED)
            while starter in done and stopper not in done and starter.exception() is None:
                done, _ = await asyncio.wait([stopper, *running], return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task is not stopper and not task.cancelled() and task.exception() is not None:
                    error = task.exception()
                    if isinstance(error, SvcnetError):
                        log.error("%s cannot go on error=%r", self.source.kind, str(error))
                        print(f"svcnet: {error}", flush=True)
                    else:
                        log.error("%s task failed task=%s error=%r", self.source.kind, task.get_name(), error)
                    code = 1
            starter.cancel()
            stopper.cancel()
            await self.source.stopping(self)
        finally:
            await self.api.close()
            self.health.stop_all()
            for handle in self._restarts.values():
                handle.cancel()
            await self.dns.close()
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)
            await self.client.close()
            if self.source.socket_path is not None:
                self.source.socket_path.unlink(missing_ok=True)
            log.info("%s stopped node=%s", self.source.kind, options.node)
        return code

    async def _listen(self) -> None:
        if self.source.socket_path is not None:
            await self.api.listen_unix(self.source.socket_path)
        address = self.options.metrics_addr
        if address is None:
            return
        try:
            self.metrics_address = await self.api.listen_tcp(*address, frozenset({"/metrics"}))
        except OSError as exc:
            if self.options.metrics_addr_explicit:
                raise SvcnetError(f"cannot serve metrics on {address[0]}:{address[1]}: {exc.strerror}; "
                                  f"choose another --metrics-addr (port 0 picks a free one)") from None
            log.warning("metrics over tcp disabled: default address busy address=%s:%d error=%s",
                        address[0], address[1], exc.strerror)
            return
        log.info("metrics serving address=http://%s:%d/metrics", *self.metrics_address)

    # ---- sandboxes ---------------------------------------------------------------------

    async def add_sandbox(self, spec: SandboxSpec) -> SandboxRecord:
        """Create and serve a sandbox; return once its names resolve and its VIPs work (the
        one path for the agent's API and the sidecar's own sandbox)."""
        lease = await self.current_lease()
        try:
            record = await self.sandboxes.create(spec, lease)
        except TRANSIENT_ERRORS as exc:
            raise EtcdUnavailableError(f"etcd is unreachable, cannot register {spec.name!r}: "
                                       f"{type(exc).__name__}") from None
        if not await self.serve(record):
            await self.unserve(record.name)
            await self.sandboxes.remove(record.name)
            raise SvcnetError(f"sandbox {record.name!r} (netns {record.source_netns or record.netns}): {DNAT_HINT}")
        keys = [(e["network"], record.name) for e in record.endpoints]
        try:
            await self.watcher.wait_for(lambda view: all(k in view.endpoints for k in keys), timeout=5)
            await self.lb.wait_synced(record.name)
        except TimeoutError:
            log.warning("sandbox not yet in the view sandbox=%s", record.name)
        return record

    async def serve(self, record: SandboxRecord) -> bool:
        """DNS, load balancing and health checks for one sandbox; False if its DNS is shadowed."""
        clear = await self._serve_dns(record)
        self._serve_lb_and_health(record)
        return clear

    async def _serve_dns(self, record: SandboxRecord) -> bool:
        if record.detached:  # a stopped container: no netns to serve until it starts again
            return True
        try:
            return await self.dns.serve(record)
        except Exception as exc:  # one broken sandbox must not stop DNS for the others
            log.error("cannot serve dns sandbox=%s error=%s", record.name, exc)
            return False

    def _serve_lb_and_health(self, record: SandboxRecord) -> None:
        if record.detached:
            return
        self.lb.add(record.name, record.netns, record.networks, foreign=not record.owns_netns)
        if record.health_check and not record.exited:
            spec = HealthSpec(**record.health_check)
            self.health.start(record.name, record.exec_argv(spec.command()), spec, record.health)

    async def unserve(self, name: str) -> None:
        self.health.stop(name)
        handle = self._restarts.pop(name, None)
        if handle is not None:
            handle.cancel()
        await self.dns.drop(name)
        await self.lb.drop(name)

    async def current_lease(self) -> int:
        return await self.lease.current(LEASE_WAIT)

    async def report_health(self, name: str, health: str) -> None:
        await self.sandboxes.set_health(name, health, await self.current_lease())

    async def _on_new_lease(self, lease: int) -> None:
        await self.source_registration(lease)
        await self.sandboxes.reassert(lease)

    async def source_registration(self, lease: int) -> None:
        register = getattr(self.source, "register", None)
        if register is not None:
            await register(self, lease)

    async def publish(self, name: str) -> None:
        """Write a sandbox's state to the registry; with etcd down the next lease re-asserts it."""
        try:
            await self.sandboxes.publish(name, await self.current_lease())
        except (EtcdUnavailableError, *TRANSIENT_ERRORS) as exc:
            log.warning("cannot publish sandbox state now, the next lease re-asserts it sandbox=%s error=%s",
                        name, type(exc).__name__)

    async def _watch_exits(self) -> None:
        """A command that ends leaves answers and VIPs at once; its restart policy may bring it back."""
        while True:
            for record in self.sandboxes.poll_exits():
                self.health.stop(record.name)
                await self.publish(record.name)
                if should_restart(record.restart, record.exit_code, record.restarts):
                    delay = restart_delay(record.restarts)
                    log.info("sandbox restarting sandbox=%s policy=%s in_s=%.1f", record.name, record.restart, delay)
                    loop = asyncio.get_running_loop()
                    self._restarts[record.name] = loop.call_later(
                        delay, lambda name=record.name: asyncio.ensure_future(self._restart(name)))
            await asyncio.sleep(EXIT_POLL)

    async def _restart(self, name: str) -> None:
        self._restarts.pop(name, None)
        record = self.sandboxes.records.get(name)
        if record is None:
            return
        record.health = "starting" if record.health_check else "healthy"
        self.sandboxes.restart(record)
        await self.publish(name)
        await self.serve(record)

    # ---- API and metrics ---------------------------------------------------------------

    def ready(self) -> bool:
        return self.watcher.listed and self.lease.reasserted.is_set()

    async def _info(self, body, match) -> dict:
        view = self.watcher.view
        return {
            "kind": self.source.kind, "node": self.options.node, "prefix": self.keys.prefix,
            "etcd": self.options.etcd, "pid": os.getpid(), "version": __version__,
            "view_revision": view.revision, "etcd_connected": self.watcher.connected, "ready": self.ready(),
            "sandboxes": len(self.sandboxes.records), "state_dir": str(self.options.state_dir),
            "metrics": f"http://{self.metrics_address[0]}:{self.metrics_address[1]}/metrics"
            if self.metrics_address else None,
            "dns_sandboxes": len(self.dns.servers), "lb_backend": self.lb.backend.name,
        }

    async def _metrics(self, body, match) -> Text:
        return Text(self.metrics.render())

    def _register_metrics(self) -> None:
        m, watcher = self.metrics, self.watcher
        m.gauge("svcnet_etcd_connected", "1 while the registry watch is connected.", lambda: int(watcher.connected))
        m.gauge("svcnet_node_ready", "1 once etcd was listed and every endpoint re-asserted under the lease.",
                lambda: int(self.ready()))
        m.counter_from("svcnet_watch_relists_total", "Full re-lists of the registry (start, compaction).",
                       lambda: watcher.relists)
        m.counter_from("svcnet_watch_reconnects_total", "Times the registry watch was resumed.",
                       lambda: watcher.reconnects)
        m.counter_from("svcnet_lease_grants_total", "Leases granted (more than one: a lease was lost).",
                       lambda: self.lease.grants)
        m.counter_from("svcnet_dns_shadowed_total", "Sandboxes found with 127.0.0.11:53 answered by someone else.",
                       lambda: self.dns.conflicts)
        m.gauge("svcnet_sandboxes", "Sandboxes this node owns.", lambda: len(self.sandboxes.records))
