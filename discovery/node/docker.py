"""Docker containers as svcnet sandboxes: what `svcnet agent --docker` adds to the agent.

It follows the engine's event stream. A container labelled ``svcnet.networks`` (and
optionally ``svcnet.service``, ``svcnet.aliases``, ``svcnet.hostname``, ``svcnet.name``)
gets, when it starts, a veth on each of those networks inside its netns
(``/proc/PID/ns/net``, pinned), its endpoints registered under the agent's lease, a
resolver on 127.0.0.11:53 inside it and its VIPs. When it stops it is unplugged and its
endpoints stay registered as ``exited`` (out of answers and VIPs), so ``docker restart``
keeps its names and addresses; when it is removed it is deregistered. Docker's own
HEALTHCHECK status is its svcnet health. At start, after a lost event stream and every
``RESYNC_EVERY`` seconds the list of running containers is compared with the sandboxes:
no container is missed, none is left stale.

For svcnet (not dockerd) to own 127.0.0.11 the container runs with ``network_mode: none``
and ``dns: [127.0.0.11]``: on a Docker network dockerd DNATs 127.0.0.11:53 to its own
resolver inside the netns, and a socket of ours there would never see a query.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from discovery.errors import EtcdUnavailableError, SvcnetError, ValidationError
from discovery.host.sandbox import EXIT_UNKNOWN, SandboxRecord, SandboxSpec
from discovery.state.etcd import TRANSIENT_ERRORS
from discovery.state.model import normalize_name

from .runtime import NodeRuntime

log = logging.getLogger(__name__)

LABEL = "svcnet."
LABEL_NETWORKS = LABEL + "networks"
RESYNC_EVERY = 30.0  # seconds: a backstop for anything the event stream did not say
RETRY_MAX = 2.0  # seconds between tries while the engine or etcd is away
REGISTER_PATIENCE = 120.0  # seconds a starting container waits for etcd before it is left to the resync
DOCKER_HEALTH = ("starting", "healthy", "unhealthy")


@dataclass(frozen=True)
class ContainerSpec:
    """What a running container's labels and state ask of svcnet."""

    id: str
    name: str
    pid: int
    networks: tuple[str, ...]
    service: str | None
    aliases: tuple[str, ...]
    hostname: str | None
    health: str | None  # Docker's health status; None: the image has no HEALTHCHECK

    @classmethod
    def from_inspect(cls, data: dict) -> ContainerSpec:
        """From ``docker inspect``; ValidationError names the label to fix."""
        labels = data.get("Config", {}).get("Labels") or {}
        networks = _split(labels.get(LABEL_NETWORKS, ""))
        if not networks:
            raise ValidationError(f"label {LABEL_NETWORKS} names no network; set it to e.g. 'front' or 'front,back'")
        raw_name = labels.get(LABEL + "name") or data.get("Name", "").lstrip("/").replace("_", "-")
        try:
            name = normalize_name(raw_name, "container name")
        except ValidationError as exc:
            raise ValidationError(f"{exc}; set the label {LABEL}name to a DNS label") from None
        hostname = labels.get(LABEL + "hostname") or data.get("Config", {}).get("Hostname") or None
        health = (data.get("State", {}).get("Health") or {}).get("Status")
        return cls(
            id=data["Id"], name=name, pid=int(data["State"]["Pid"]), networks=networks,
            service=labels.get(LABEL + "service") or None, aliases=_split(labels.get(LABEL + "aliases", "")),
            hostname=hostname, health=health if health in DOCKER_HEALTH else None,
        )

    def sandbox(self) -> SandboxSpec:
        return SandboxSpec(name=self.name, networks=list(self.networks), service=self.service,
                           aliases=list(self.aliases), hostname=self.hostname, netns=f"/proc/{self.pid}/ns/net",
                           docker_id=self.id, external_health=self.health is not None)


def _split(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def engine_url(choice: str) -> str | None:
    """``--docker`` value -> the engine's URL (None: Docker integration off)."""
    if choice in ("", "off", "no", "false"):
        return None
    if choice in ("on", "yes", "true"):
        return "unix:///var/run/docker.sock"
    return choice


class DockerContainers:
    """Keeps the agent's Docker sandboxes in step with the engine's running containers."""

    def __init__(self, url: str, on_connect: Callable[[], None] = lambda: None) -> None:
        self.url = url
        self.on_connect = on_connect  # e.g. re-check dockerd's FORWARD rules
        self.connected = False
        self.events = 0
        self.resyncs = 0
        self.refused = 0  # containers whose labels cannot be served (logged once each)
        self._refused_ids: set[str] = set()
        self._locks: dict[str, asyncio.Lock] = {}  # one per container with events in flight
        self._queued: dict[str, int] = {}
        self._tasks: set[asyncio.Task] = set()

    def attach(self, runtime: NodeRuntime) -> None:
        self.runtime = runtime
        runtime.tasks.append(self.run)
        m = runtime.metrics
        m.gauge("svcnet_docker_connected", "1 while the Docker event stream is followed.", lambda: int(self.connected))
        m.counter_from("svcnet_docker_events_total", "Container events handled.", lambda: self.events)
        m.counter_from("svcnet_docker_resyncs_total", "Full comparisons with the engine's running containers.",
                       lambda: self.resyncs)
        m.gauge("svcnet_docker_containers", "Docker containers this agent serves.",
                lambda: sum(1 for r in runtime.sandboxes.records.values() if r.docker_id and not r.detached))

    # ---- the engine ----------------------------------------------------------------------

    async def run(self) -> None:
        import aiodocker  # aiohttp: loaded once the node serves DNS
        import aiohttp

        delay = 0.2
        while True:
            docker = aiodocker.Docker(url=self.url)
            try:
                await self._follow(docker)
                delay = 0.2  # the stream ended after working: dockerd restarted
            except (TimeoutError, aiodocker.DockerError, aiohttp.ClientError, OSError) as exc:
                if self.connected or delay == 0.2:
                    log.warning("docker engine unreachable, retrying url=%s error=%s", self.url, exc)
                delay = min(delay * 2, RETRY_MAX)
            finally:
                self.connected = False
                await docker.close()
            await asyncio.sleep(delay)

    async def _follow(self, docker) -> None:
        """Subscribe first, then list: an event during the listing waits in the queue. The
        stream asks for events *since* a second before it started, so one that happens before
        its request reaches dockerd is replayed too (handlers are idempotent: twice is fine)."""
        self.docker = docker
        subscriber = docker.events.subscribe(create_task=False)
        stream = asyncio.create_task(docker.events.run(
            since=str(int(time.time()) - 1),
            filters=json.dumps({"type": ["container"], "label": [LABEL_NETWORKS]})), name="docker-events")
        try:
            await docker.version()  # raises at once if the engine is not there
            self.connected = True
            self.on_connect()
            log.info("docker events followed url=%s", self.url)
            await self.resync()
            next_resync = time.monotonic() + RESYNC_EVERY
            while True:
                try:
                    event = await asyncio.wait_for(subscriber.get(), max(0.0, next_resync - time.monotonic()))
                except TimeoutError:
                    await self.resync()
                    next_resync = time.monotonic() + RESYNC_EVERY
                    continue
                if event is None:  # the stream ended
                    if stream.done() and not stream.cancelled() and stream.exception() is not None:
                        raise stream.exception()
                    log.warning("docker event stream ended, re-syncing url=%s", self.url)
                    return
                self._dispatch(event)
        finally:
            stream.cancel()
            await asyncio.gather(stream, return_exceptions=True)
            await docker.events.stop()

    def _dispatch(self, event: dict) -> None:
        action = event.get("Action") or event.get("status") or ""
        container = (event.get("Actor") or {}).get("ID") or event.get("id")
        if not container:
            return
        attributes = (event.get("Actor") or {}).get("Attributes") or {}
        handler: Callable[[], Awaitable[None]] | None = None
        if action == "start":
            handler = lambda: self.started(container)  # noqa: E731
        elif action == "die":
            code = _int(attributes.get("exitCode"), EXIT_UNKNOWN)
            handler = lambda: self.stopped(container, code)  # noqa: E731
        elif action == "destroy":
            handler = lambda: self.removed(container)  # noqa: E731
        elif action.startswith("health_status"):
            status = action.partition(":")[2].strip()
            handler = lambda: self.health(container, status)  # noqa: E731
        if handler is None:
            return
        self.events += 1
        self._in_order(container, handler)

    def _in_order(self, container: str, handler: Callable[[], Awaitable[None]]) -> None:
        """Run ``handler`` after every earlier one for this container; others run meanwhile."""
        lock = self._locks.setdefault(container, asyncio.Lock())
        self._queued[container] = self._queued.get(container, 0) + 1

        async def step() -> None:
            try:
                async with lock:
                    await handler()
            except Exception:
                log.exception("docker event handling failed container=%s", container[:12])
            finally:
                self._queued[container] -= 1
                if not self._queued[container]:
                    del self._queued[container], self._locks[container]

        task = asyncio.create_task(step(), name=f"docker-{container[:12]}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def resync(self) -> None:
        """Serve every running labelled container; detach or drop sandboxes whose container is not."""
        self.resyncs += 1
        running = await self.docker.containers.list(
            filters=json.dumps({"label": [LABEL_NETWORKS], "status": ["running"]}))
        ids = {c["Id"] for c in running}
        served = {r.docker_id for r in self._records() if not r.detached}
        for container in sorted(ids - served):
            self._in_order(container, lambda c=container: self.started(c))
        for record in self._records():
            if record.docker_id in ids:
                continue
            data = await self._inspect(record.docker_id)
            if data is None:
                self._in_order(record.docker_id, lambda c=record.docker_id: self.removed(c))
            elif not record.detached:
                code = _int(data["State"].get("ExitCode"), EXIT_UNKNOWN)
                self._in_order(record.docker_id, lambda c=record.docker_id, code=code: self.stopped(c, code))

    async def _inspect(self, container: str) -> dict | None:
        import aiodocker

        try:
            return (await self.docker.containers.get(container))._container
        except aiodocker.DockerError as exc:
            if exc.status == 404:
                return None
            raise

    # ---- container events ----------------------------------------------------------------

    def _records(self) -> list[SandboxRecord]:
        return [r for r in self.runtime.sandboxes.records.values() if r.docker_id is not None]

    def _record(self, container: str) -> SandboxRecord | None:
        return next((r for r in self._records() if r.docker_id == container), None)

    async def started(self, container: str) -> None:
        data = await self._inspect(container)
        if data is None or not data["State"].get("Running"):
            return  # gone again already: its die/destroy event follows
        try:
            want = ContainerSpec.from_inspect(data)
        except (ValidationError, KeyError, ValueError) as exc:
            if container not in self._refused_ids:
                self._refused_ids.add(container)
                self.refused += 1
                log.error("container not served container=%s name=%s error=%s", container[:12],
                          data.get("Name", "?"), exc)
            return
        runtime = self.runtime
        record = runtime.sandboxes.records.get(want.name)
        if record is not None and record.docker_id != want.id:
            if record.docker_id is None:
                log.error("container not served: a svcnet sandbox has its name container=%s name=%s fix=%r",
                          container[:12], want.name, f"set the label {LABEL}name")
                return
            await self._remove(record)  # an older container of that name, removed while we were away
            record = None
        if record is None:
            record = await self._with_etcd(want.name, lambda: runtime.add_sandbox(want.sandbox()))
            if record is None:
                return
            runtime.sandboxes.note_container(want.name, want.pid)
            log.info("container served container=%s sandbox=%s pid=%d", container[:12], want.name, want.pid)
        elif record.detached or record.pid != want.pid:
            await runtime.unserve(record.name)
            networks = {n: runtime.watcher.view.networks.get(n) for n in record.networks}
            for name, network in networks.items():
                if network is None:
                    networks[name] = await runtime.registry.get_network(name)
            record = await runtime.sandboxes.reattach(record.name, want.pid, networks)
            await runtime.serve(record)
            await runtime.publish(record.name)
            await runtime.lb.wait_synced(record.name)
        if want.health is not None:
            await self.health(container, want.health)

    async def stopped(self, container: str, exit_code: int) -> None:
        record = self._record(container)
        if record is None or record.detached:
            return
        await self.runtime.unserve(record.name)
        await self.runtime.sandboxes.detach(record.name, exit_code)
        await self.runtime.publish(record.name)

    async def removed(self, container: str) -> None:
        self._refused_ids.discard(container)
        record = self._record(container)
        if record is not None:
            await self._remove(record)

    async def _remove(self, record: SandboxRecord) -> None:
        await self.runtime.unserve(record.name)
        await self._with_etcd(record.name, lambda: self.runtime.sandboxes.remove(record.name))
        log.info("container removed, sandbox deregistered sandbox=%s", record.name)

    async def health(self, container: str, status: str) -> None:
        record = self._record(container)
        if record is None or record.detached or not record.external_health or status not in DOCKER_HEALTH:
            return
        if record.health != status:
            log.info("container health sandbox=%s health=%s", record.name, status)
            await self._with_etcd(record.name, lambda: self.runtime.report_health(record.name, status))

    async def _with_etcd(self, name: str, call: Callable[[], Awaitable]):
        """``call()``, tried again while etcd is away (the resync takes over after a while)."""
        delay, deadline = 0.2, time.monotonic() + REGISTER_PATIENCE
        while True:
            try:
                return await call()
            except (EtcdUnavailableError, *TRANSIENT_ERRORS) as exc:
                if time.monotonic() > deadline:
                    log.error("etcd still unreachable, leaving it to the next resync sandbox=%s", name)
                    return None
                log.warning("waiting for etcd sandbox=%s retry_in=%.1fs error=%s", name, delay, type(exc).__name__)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX)
            except SvcnetError as exc:
                log.error("container not served sandbox=%s error=%s", name, exc)
                return None


def _int(value, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default
