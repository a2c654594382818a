"""`svcnet sidecar`: the node runtime for one netns made by someone else.

For a compose service or a Kubernetes pod: it pins the netns, attaches it to svcnet
networks, registers the endpoints under its *own* lease, answers 127.0.0.11:53 inside it
and programs its VIPs with the same runtime the agent uses, and on SIGTERM deregisters and
detaches. If it is killed outright, its lease runs out after ``--lease-ttl`` seconds and
the names vanish from every resolver; started again, it picks up its record and serves
the same sandbox. Its state lives in ``<state-dir>/sidecars/<name>/``.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from discovery.errors import EtcdUnavailableError
from discovery.host.sandbox import SandboxSpec
from discovery.state.etcd import TRANSIENT_ERRORS

from .runtime import NodeOptions, NodeRuntime

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SidecarSpec:
    netns: str
    name: str
    networks: tuple[str, ...]
    service: str | None = None
    aliases: tuple[str, ...] = ()
    hostname: str | None = None
    ip: str | None = None


class OneNetns:
    """The sidecar's one sandbox, made at start and removed at SIGTERM."""

    kind = "sidecar"
    socket_path = None

    def __init__(self, options: NodeOptions, spec: SidecarSpec) -> None:
        self.spec = spec
        self.home = options.state_dir / "sidecars" / spec.name.lower()

    def attach(self, runtime: NodeRuntime) -> None:
        # pin the netns we were given now, not once etcd answers: a /proc/PID/ns/net path
        # names someone else's netns as soon as that PID is reused
        if self.spec.name.lower() not in runtime.sandboxes.records:
            runtime.sandboxes.pin_now(self.spec.name, self.spec.netns)

    async def started(self, runtime: NodeRuntime) -> None:
        spec = self.spec
        record = runtime.sandboxes.records.get(spec.name.lower())
        if record is None:
            record = await self._create(runtime)
        else:  # our own sandbox from before a restart, served from its record
            await runtime.lb.wait_synced(record.name)
        addresses = " ".join(f"{e['network']}={e['ipv4']}" for e in record.endpoints)
        log.warning("sidecar serving sandbox=%s netns=%s %s", record.name, record.netns, addresses)

    async def _create(self, runtime: NodeRuntime):
        spec = self.spec
        request = SandboxSpec(name=spec.name, networks=list(spec.networks), service=spec.service,
                              aliases=list(spec.aliases), hostname=spec.hostname, ip=spec.ip, netns=spec.netns)
        delay = 0.2
        while True:
            try:
                return await runtime.add_sandbox(request)
            except (EtcdUnavailableError, *TRANSIENT_ERRORS) as exc:
                log.warning("waiting for etcd to register sandbox=%s retry_in=%.1fs error=%s",
                            spec.name, delay, type(exc).__name__)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def stopping(self, runtime: NodeRuntime) -> None:
        for name in list(runtime.sandboxes.records):
            await runtime.unserve(name)
            try:
                await runtime.sandboxes.remove(name)
            except Exception as exc:  # the lease will still expire
                log.error("cannot deregister sandbox=%s error=%s", name, exc)
        runtime.sandboxes.release_early_pins()


def run_sidecar(options: NodeOptions, spec: SidecarSpec) -> int:
    return NodeRuntime(options, OneNetns(options, spec)).run()
