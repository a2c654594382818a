"""Local sandboxes: a netns with one veth per network, its files, and its registry entries.

The agent owns these. Each sandbox's record lives in ``<state-dir>/sandboxes/<name>/``
(``sandbox.json``, ``resolv.conf``, ``hosts``, ``output.log``), so a restarted agent knows
what it runs and re-asserts the sandboxes' endpoints under its new lease.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from discovery.errors import ConflictError, NotFoundError, ValidationError
from discovery.procs import pid_alive
from discovery.state.model import Endpoint, HealthSpec, Network, normalize_name
from discovery.state.registry import Registry, SandboxRequest

from . import netlink

from . import nsexec

log = logging.getLogger(__name__)

RESOLV_CONF = "# written by svcnet: the sandbox's resolver answers on 127.0.0.11\nnameserver 127.0.0.11\noptions ndots:0\n"


@dataclass
class SandboxSpec:
    """What `svcnet run` / `svcnet attach` ask for."""

    name: str
    networks: list[str]
    service: str | None = None
    aliases: list[str] = field(default_factory=list)
    hostname: str | None = None
    ip: str | None = None
    netns: str | None = None  # attach to this existing netns path instead of making one
    command: list[str] = field(default_factory=list)
    detach: bool = False
    health: dict | None = None  # HealthSpec fields: cmd, interval, retries

    @classmethod
    def from_dict(cls, data: dict) -> SandboxSpec:
        if not isinstance(data, dict):
            raise ValidationError("the request body must be a JSON object")
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(data) - known
        if unknown:
            raise ValidationError(f"unknown fields in request: {', '.join(sorted(unknown))}")
        try:
            return cls(**data)
        except TypeError as exc:
            raise ValidationError(f"bad request: {exc}") from None


@dataclass
class SandboxRecord:
    name: str
    netns: str
    owns_netns: bool
    hostname: str
    networks: list[str]
    attachments: list[dict]
    endpoints: list[dict]
    service: str | None = None
    aliases: list[str] = field(default_factory=list)
    command: list[str] = field(default_factory=list)
    pid: int | None = None
    exit_code: int | None = None
    created_at: float = field(default_factory=time.time)
    files: dict = field(default_factory=dict)
    health_check: dict | None = None  # HealthSpec fields, when the owner checks this sandbox
    health: str = "healthy"

    def status(self) -> str:
        if self.pid is None:
            return "exited" if self.exit_code is not None else "created"
        if self.exit_code is not None:
            return f"exited ({self.exit_code})"
        return "running" if pid_alive(self.pid) else "exited"

    def exec_argv(self, command: list[str]) -> list[str]:
        """Run ``command`` inside this sandbox as `svcnet exec` does (its resolv.conf, hosts, hostname)."""
        return nsexec.sandbox_argv(self.to_dict(), command)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["status"] = self.status()
        return data


class SandboxManager:
    def __init__(self, registry: Registry, prefix: str, node: str, state_dir: Path, netns_prefix: str = "svcnet-"):
        self.registry = registry
        self.prefix = prefix
        self.node = node
        self.root = state_dir / "sandboxes"
        self.root.mkdir(parents=True, exist_ok=True)
        self.netns_prefix = netns_prefix
        self.records: dict[str, SandboxRecord] = {}
        self._processes: dict[str, subprocess.Popen] = {}
        self._lock = asyncio.Lock()

    # ---- state -------------------------------------------------------------------------

    def load(self) -> None:
        for path in sorted(self.root.glob("*/sandbox.json")):
            try:
                record = SandboxRecord(**json.loads(path.read_text()))
            except (ValueError, TypeError) as exc:
                log.warning("skipping unreadable sandbox record path=%s error=%s", path, exc)
                continue
            if not netlink.netns_exists(record.netns):
                log.warning("sandbox netns is gone, dropping it sandbox=%s netns=%s", record.name, record.netns)
                shutil.rmtree(path.parent, ignore_errors=True)
                continue
            self.records[record.name] = record

    def _save(self, record: SandboxRecord) -> None:
        directory = self.root / record.name
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / "sandbox.json.tmp"
        tmp.write_text(json.dumps(asdict(record), indent=1))
        tmp.replace(directory / "sandbox.json")

    def get(self, name: str) -> SandboxRecord:
        record = self.records.get(name.lower())
        if record is None:
            raise NotFoundError(f"no sandbox named {name!r} on this node; 'svcnet ps' lists them")
        return record

    def _request(self, record: SandboxRecord) -> SandboxRequest:
        held = []
        for endpoint in record.endpoints:
            held.append((endpoint["network"], endpoint["ipv4"]))
            if endpoint.get("ipv6"):
                held.append((endpoint["network"], endpoint["ipv6"]))
        return SandboxRequest(
            container=record.name, networks=tuple(record.networks), node=self.node,
            hostname=record.hostname, aliases=tuple(record.aliases), service=record.service,
            addresses=tuple(held), netns=record.netns, health=record.health,
        )

    async def reassert(self, lease: int) -> None:
        """Re-write every local sandbox's endpoints under ``lease`` (after a grant)."""
        for record in list(self.records.values()):
            try:
                await self.registry.register_sandbox(self._request(record), lease)
            except (ConflictError, NotFoundError, ValidationError) as exc:
                log.error("cannot re-register sandbox sandbox=%s error=%s", record.name, exc)

    async def set_health(self, name: str, health: str, lease: int) -> None:
        """Record a health transition and write it to the registry (answers and VIPs follow)."""
        record = self.records.get(name)
        if record is None or record.health == health:
            return
        record.health = health
        self._save(record)
        await self.registry.register_sandbox(self._request(record), lease)

    # ---- lifecycle -----------------------------------------------------------------------

    async def create(self, spec: SandboxSpec, lease: int) -> SandboxRecord:
        name = normalize_name(spec.name, "container name")
        if not spec.networks:
            raise ValidationError("give at least one --network")
        if spec.command and not spec.detach:
            raise ValidationError("the agent only starts detached commands; the CLI runs foreground ones")
        async with self._lock:
            if name in self.records:
                raise ConflictError(f"a sandbox named {name!r} already exists on this node; remove it with 'svcnet rm {name}'")
            owns = spec.netns is None
            netns_name = self.netns_prefix + name
            path = netlink.netns_path(netns_name) if owns else spec.netns
            if owns and netlink.netns_exists(path):
                raise ConflictError(f"network namespace {netns_name!r} already exists; remove it with 'ip netns del {netns_name}'")
            if not owns and not netlink.netns_exists(path):
                raise NotFoundError(f"network namespace {path!r} does not exist")
            networks = [n.lower() for n in spec.networks]
            try:
                health_check = HealthSpec(**spec.health).to_dict() if spec.health else None
            except TypeError:
                raise ValidationError("health takes cmd, interval and retries") from None
            request = SandboxRequest(
                container=name, networks=tuple(networks), node=self.node,
                hostname=spec.hostname or name, aliases=tuple(spec.aliases), service=spec.service,
                addresses=((networks[0], spec.ip),) if spec.ip else (), netns=path,
                health="starting" if health_check else "healthy",
            )
            endpoints = await self.registry.register_sandbox(request, lease)
            network_objects = {n: await self.registry.get_network(n) for n in networks}
            record = SandboxRecord(
                name=name, netns=path, owns_netns=owns, hostname=request.hostname or name,
                networks=networks, attachments=[], endpoints=[e.to_dict() for e in endpoints],
                service=request.service, aliases=list(request.aliases), command=list(spec.command),
                health_check=health_check, health=request.health,
            )
            try:
                await asyncio.to_thread(self._build, record, endpoints, network_objects)
                self._save(record)
                if spec.command:
                    self._start(record)
                    self._save(record)
            except BaseException:
                await self._teardown(record)
                raise
            self.records[name] = record
            log.info("sandbox created sandbox=%s netns=%s networks=%s", name, path, ",".join(networks))
            return record

    def _build(self, record: SandboxRecord, endpoints: list[Endpoint], networks: dict[str, Network]) -> None:
        if record.owns_netns:
            netlink.create_netns(os.path.basename(record.netns))
        for index, endpoint in enumerate(endpoints):
            network = networks[endpoint.network]
            bridge = netlink.ensure_bridge(self.prefix, network)
            inner = netlink.free_inner_name(record.netns, index if record.owns_netns else 0)
            attachment = netlink.Attachment(
                network=network.name,
                host_ifname=netlink.host_veth_name(record.netns, network.name),
                inner_ifname=inner,
                ipv4=str(endpoint.ipv4), prefixlen4=network.subnet.prefixlen,
                ipv6=str(endpoint.ipv6) if endpoint.ipv6 else None,
                prefixlen6=network.subnet6.prefixlen if network.subnet6 else None,
            )
            first = index == 0 and record.owns_netns
            netlink.attach(record.netns, bridge, attachment,
                           str(network.gateway) if first and not network.internal else None,
                           str(network.gateway6) if first and network.gateway6 and not network.internal else None)
            record.attachments.append(asdict(attachment))
        directory = self.root / record.name
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "resolv.conf").write_text(RESOLV_CONF)
        hosts = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
        for endpoint in endpoints:
            names = " ".join(dict.fromkeys([record.hostname, record.name]))
            hosts.append(f"{endpoint.ipv4}\t{names}")
            if endpoint.ipv6:
                hosts.append(f"{endpoint.ipv6}\t{names}")
        (directory / "hosts").write_text("\n".join(hosts) + "\n")
        record.files = {"resolv_conf": str(directory / "resolv.conf"), "hosts": str(directory / "hosts"),
                        "log": str(directory / "output.log")}

    def _start(self, record: SandboxRecord) -> None:
        output = open(record.files["log"], "ab")
        process = subprocess.Popen(
            nsexec.argv(record.netns, record.command, record.files["resolv_conf"],
                        record.files["hosts"], record.hostname),
            stdin=subprocess.DEVNULL, stdout=output, stderr=output, start_new_session=True,
        )
        output.close()
        record.pid = process.pid
        self._processes[record.name] = process

    def reap(self) -> None:
        """Record exit codes of detached commands the agent started."""
        for name, process in list(self._processes.items()):
            code = process.poll()
            if code is not None:
                del self._processes[name]
                record = self.records.get(name)
                if record is not None:
                    record.exit_code = code
                    self._save(record)
                    log.info("sandbox command exited sandbox=%s code=%s", name, code)

    async def remove(self, name: str) -> None:
        async with self._lock:
            record = self.get(name)
            await self._teardown(record)
            del self.records[record.name]
            log.info("sandbox removed sandbox=%s", record.name)

    async def _teardown(self, record: SandboxRecord) -> None:
        """Undo everything create() did; safe on a half-built sandbox."""
        if record.pid is not None and record.exit_code is None and pid_alive(record.pid):
            await _terminate(record.pid)
        self._processes.pop(record.name, None)
        await self.registry.deregister_sandbox(record.name, record.networks, self.node)
        await asyncio.to_thread(self._unbuild, record)

    def _unbuild(self, record: SandboxRecord) -> None:
        for network in record.networks:
            netlink.remove_link(netlink.host_veth_name(record.netns, network))
        if record.owns_netns:
            netlink.remove_netns(os.path.basename(record.netns))
        shutil.rmtree(self.root / record.name, ignore_errors=True)


async def _terminate(pid: int, grace: float = 5.0) -> None:
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return
        await asyncio.sleep(0.05)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
