"""Local sandboxes: a netns with one veth per network, its files, and its registry entries.

The node owns these. Each sandbox's record lives in ``<state-dir>/sandboxes/<name>/``
(``sandbox.json``, ``resolv.conf``, ``hosts``, ``output.log``, ``exit_code``), so a restarted
agent knows what it runs and re-asserts the sandboxes' endpoints under its new lease.

A detached command runs under a small shim (``nsexec --exit-file``) that records its exit
status, and is known by its PID *and* start time, so an agent restarted meanwhile still
learns how it ended and never mistakes a reused PID for it. A netns svcnet did not make is
pinned at once (a bind mount under ``<state-dir>/netns/``): a ``/proc/PID/ns/net`` path
would name someone else's netns once that PID is reused.
"""

from __future__ import annotations

import asyncio
import ctypes
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
from discovery.files import write_atomically
from discovery.procs import pid_alive, start_time
from discovery.state.model import Endpoint, HealthSpec, Network, normalize_name
from discovery.state.registry import Registry, SandboxRequest

from . import netns, nsexec


def _netlink():
    """pyroute2 loads on first use: a restarting node serves DNS before it needs it."""
    from . import netlink
    return netlink

def _overlay():
    from . import overlay
    return overlay


log = logging.getLogger(__name__)

EXIT_UNKNOWN = -1  # the command is gone and left no exit status (killed with its shim)
RESTART_POLICIES = ("no", "on-failure", "always", "unless-stopped")
RESTART_BACKOFF_MAX = 60.0
RESTART_RESET_AFTER = 10.0  # a command that ran this long starts its backoff afresh, as Docker


def parse_restart(text: str) -> tuple[str, int | None]:
    """``on-failure:3`` -> ("on-failure", 3); refuses what Docker would refuse."""
    policy, _, count = (text or "no").partition(":")
    if policy not in RESTART_POLICIES:
        raise ValidationError(f"--restart {text!r}: use one of no, on-failure[:N], always, unless-stopped")
    if count and (policy != "on-failure" or not count.isdigit() or int(count) < 1):
        raise ValidationError(f"--restart {text!r}: only on-failure takes a count, a number of at least 1")
    return policy, int(count) if count else None


def should_restart(policy_text: str, exit_code: int, restarts: int) -> bool:
    policy, limit = parse_restart(policy_text)
    if policy in ("always", "unless-stopped"):
        return True
    if policy == "on-failure":
        return exit_code != 0 and (limit is None or restarts < limit)
    return False


def restart_delay(restarts: int) -> float:
    """Docker's: 100 ms, doubling with every restart in a row, at most a minute."""
    return min(0.1 * (2 ** restarts), RESTART_BACKOFF_MAX)


RESOLV_CONF = "# written by svcnet: the sandbox's resolver answers on 127.0.0.11\nnameserver 127.0.0.11\noptions ndots:0\n"


_SPEC_TYPES = {
    "name": (str, "a string"), "networks": (list, "a list of strings"), "service": (str, "a string"),
    "aliases": (list, "a list of strings"), "hostname": (str, "a string"), "ip": (str, "a string"),
    "netns": (str, "a string"), "command": (list, "a list of strings"), "detach": (bool, "true or false"),
    "health": (dict, "an object with cmd, interval and retries"), "restart": (str, "a string"),
    "docker_id": (str, "a string"), "external_health": (bool, "true or false"),
}


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
    restart: str = "no"  # no | on-failure[:N] | always | unless-stopped, as Docker
    docker_id: str | None = None  # a Docker container's netns: the engine, not svcnet, runs it
    external_health: bool = False  # someone else reports health (Docker's HEALTHCHECK): start "starting"

    @classmethod
    def from_dict(cls, data: dict) -> SandboxSpec:
        if not isinstance(data, dict):
            raise ValidationError("the request body must be a JSON object")
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(data) - known
        if unknown:
            raise ValidationError(f"unknown fields in request: {', '.join(sorted(unknown))}")
        for name, value in data.items():
            kind, what = _SPEC_TYPES[name]
            if value is None and name not in ("name", "networks"):
                continue
            if not isinstance(value, kind) or isinstance(value, list) and not all(isinstance(v, str) for v in value):
                raise ValidationError(f"field {name!r} must be {what}, not {type(value).__name__}")
        if "name" not in data or "networks" not in data:
            raise ValidationError("a sandbox needs 'name' and 'networks'")
        return cls(**data)


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
    started_at: float = 0.0
    files: dict = field(default_factory=dict)
    health_check: dict | None = None  # HealthSpec fields, when the owner checks this sandbox
    health: str = "healthy"
    pid_start: int | None = None  # the command's start time: a PID alone may be reused
    restart: str = "no"
    restarts: int = 0
    source_netns: str | None = None  # the path a foreign netns was given as, before pinning
    docker_id: str | None = None  # the Docker container this sandbox is (pid: its init process)
    external_health: bool = False

    @classmethod
    def from_dict(cls, data: dict) -> SandboxRecord:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    @property
    def exited(self) -> bool:
        """A command (or a Docker container) was started and has ended: its endpoints are
        out of answers and VIPs, its addresses still held."""
        return (bool(self.command) or self.docker_id is not None) and self.exit_code is not None

    @property
    def detached(self) -> bool:
        """A stopped Docker container: its netns is gone, there is nothing to serve until it starts."""
        return self.docker_id is not None and self.exit_code is not None

    def status(self) -> str:
        if self.pid is None:
            return "exited" if self.exit_code is not None else "created"
        if self.exit_code is not None:
            code = "unknown" if self.exit_code == EXIT_UNKNOWN else self.exit_code
            return f"exited ({code})"
        return "running" if pid_alive(self.pid, self.pid_start) else "exited"

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
        self.pins = state_dir / "netns"
        self._early_pins: dict[str, tuple[str, str]] = {}  # name -> (source, pin) pinned before create
        self.netns_prefix = netns_prefix
        self.underlay: str | None = None  # the agent's advertise address: overlay veths get its MTU - 50
        self.records: dict[str, SandboxRecord] = {}
        self._processes: dict[str, subprocess.Popen] = {}
        self._lock = asyncio.Lock()
        self._removing: set[str] = set()

    # ---- state -------------------------------------------------------------------------

    def load(self) -> None:
        for path in sorted(self.root.glob("*/sandbox.json")):
            try:
                record = SandboxRecord.from_dict(json.loads(path.read_text()))
            except (ValueError, TypeError) as exc:
                log.warning("skipping unreadable sandbox record path=%s error=%s", path, exc)
                continue
            if record.docker_id is not None and not self._repin_container(record):
                log.warning("container is gone, dropping its sandbox sandbox=%s", record.name)
                shutil.rmtree(path.parent, ignore_errors=True)
                continue
            if not record.detached and not netns.netns_exists(record.netns):
                log.warning("sandbox netns is gone, dropping it sandbox=%s netns=%s", record.name, record.netns)
                shutil.rmtree(path.parent, ignore_errors=True)
                continue
            self.records[record.name] = record

    def _repin_container(self, record: SandboxRecord) -> bool:
        """A Docker container's pin lives in the mount namespace that made it: an agent that
        runs in a container loses its pins with that container. The init process, known by PID
        and start time, still holds the same netns: pin it again. False if nothing to keep."""
        if record.detached or _pin_alive(record.netns):
            return True
        if record.pid is None or not pid_alive(record.pid, record.pid_start):
            return False
        try:
            pin_netns(f"/proc/{record.pid}/ns/net", record.netns)
        except ValidationError as exc:
            log.warning("cannot pin the container's netns again sandbox=%s error=%s", record.name, exc)
            return False
        return True

    def _save(self, record: SandboxRecord) -> None:
        directory = self.root / record.name
        directory.mkdir(parents=True, exist_ok=True)
        write_atomically(directory / "sandbox.json", json.dumps(asdict(record), indent=1).encode())

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
            addresses=tuple(held), netns=record.netns, health="exited" if record.exited else record.health,
        )

    async def reassert(self, lease: int) -> None:
        """Re-write every local sandbox's endpoints under ``lease`` (after a grant), in batches."""
        async with self._lock:  # never write back a sandbox that is being removed
            records = list(self.records.values())
            failed = await self.registry.reassert_sandboxes([self._request(r) for r in records], lease)
        for name, error in sorted(failed.items()):
            log.error("cannot re-register sandbox sandbox=%s error=%r", name, error)
        log.info("sandboxes re-registered count=%d failed=%d", len(records) - len(failed), len(failed))

    async def publish(self, name: str, lease: int) -> None:
        """Write one sandbox's current state (health, exited or running) to the registry."""
        async with self._lock:
            record = self.records.get(name)
            if record is None or name in self._removing:
                return
            failed = await self.registry.reassert_sandboxes([self._request(record)], lease)
        if failed:
            log.error("cannot update sandbox in the registry sandbox=%s error=%r", name, failed[name])

    async def set_health(self, name: str, health: str, lease: int) -> None:
        """Record a health transition and write it to the registry (answers and VIPs follow)."""
        record = self.records.get(name)
        if record is None or record.health == health:
            return
        record.health = health
        self._save(record)
        await self.publish(name, lease)

    # ---- lifecycle -----------------------------------------------------------------------

    def pin_now(self, name: str, source: str) -> None:
        """Pin ``source`` (e.g. /proc/PID/ns/net) for sandbox ``name`` at once, before the
        registry is reachable: a sidecar does this at start, so a PID reused while it waits
        for etcd cannot hand it someone else's netns. ``create`` then takes this pin."""
        name = normalize_name(name, "container name")
        path = str(self.pins / name)
        pin_netns(source, path)
        self._early_pins[name] = (source, path)

    def release_early_pins(self) -> None:
        """Undo ``pin_now`` pins that no sandbox took (a sidecar stopped before etcd answered)."""
        for _, path in self._early_pins.values():
            unpin_netns(path)
        self._early_pins.clear()

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
            path = netns.netns_path(netns_name) if owns else spec.netns
            if owns and netns.netns_exists(path):
                raise ConflictError(f"network namespace {netns_name!r} already exists; remove it with 'ip netns del {netns_name}'")
            early = self._early_pins.get(name) if not owns else None
            if early is not None and early[0] != path:
                early = None
            if not owns and early is None and not netns.netns_exists(path):
                raise NotFoundError(f"network namespace {path!r} does not exist")
            networks = [n.lower() for n in spec.networks]
            try:
                health_check = HealthSpec(**spec.health).to_dict() if spec.health else None
            except TypeError:
                raise ValidationError("health takes cmd, interval, retries and timeout") from None
            parse_restart(spec.restart)
            if spec.restart != "no" and not spec.command:
                raise ValidationError("--restart needs a COMMAND to restart")
            source = None
            if not owns:
                source, path = path, str(self.pins / name)
                if early is None:
                    await asyncio.to_thread(pin_netns, source, path)
                self._early_pins.pop(name, None)  # the record owns the pin from here
            request = SandboxRequest(
                container=name, networks=tuple(networks), node=self.node,
                hostname=spec.hostname or name, aliases=tuple(spec.aliases), service=spec.service,
                addresses=((networks[0], spec.ip),) if spec.ip else (), netns=path,
                health="starting" if health_check or spec.external_health else "healthy",
            )
            try:
                endpoints = await self.registry.register_sandbox(request, lease)
                network_objects = {n: await self.registry.get_network(n) for n in networks}
            except BaseException:
                if source is not None:
                    await asyncio.to_thread(unpin_netns, path)
                raise
            record = SandboxRecord(
                name=name, netns=path, owns_netns=owns, hostname=request.hostname or name,
                networks=networks, attachments=[], endpoints=[e.to_dict() for e in endpoints],
                service=request.service, aliases=list(request.aliases), command=list(spec.command),
                health_check=health_check, health=request.health, restart=spec.restart, source_netns=source,
                docker_id=spec.docker_id, external_health=spec.external_health,
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
            _netlink().create_netns(os.path.basename(record.netns))
        for index, endpoint in enumerate(endpoints):
            network = networks[endpoint.network]
            bridge = _netlink().ensure_bridge(self.prefix, network)
            inner = _netlink().free_inner_name(record.netns, index if record.owns_netns else 0)
            attachment = _netlink().Attachment(
                network=network.name,
                host_ifname=_netlink().host_veth_name(record.netns, network.name),
                inner_ifname=inner,
                ipv4=str(endpoint.ipv4), prefixlen4=network.subnet.prefixlen,
                ipv6=str(endpoint.ipv6) if endpoint.ipv6 else None,
                prefixlen6=network.subnet6.prefixlen if network.subnet6 else None,
                mtu=_overlay().overlay_mtu(self.underlay) if network.driver == "overlay" else None,
                mac=_overlay().mac_for(endpoint.ipv4) if network.driver == "overlay" else None,
            )
            # the default route: in a netns of our own, or a Docker container's (network_mode
            # none: svcnet is all the network it has); never in someone else's sidecar netns
            first = index == 0 and (record.owns_netns or record.docker_id is not None)
            _netlink().attach(record.netns, bridge, attachment,
                           str(network.gateway) if first and not network.internal else None,
                           str(network.gateway6) if first and network.gateway6 and not network.internal else None)
            record.attachments.append(asdict(attachment))
        directory = self.root / record.name
        directory.mkdir(parents=True, exist_ok=True)
        write_atomically(directory / "resolv.conf", RESOLV_CONF.encode(), 0o644)
        hosts = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
        for endpoint in endpoints:
            names = " ".join(dict.fromkeys([record.hostname, record.name]))
            hosts.append(f"{endpoint.ipv4}\t{names}")
            if endpoint.ipv6:
                hosts.append(f"{endpoint.ipv6}\t{names}")
        write_atomically(directory / "hosts", ("\n".join(hosts) + "\n").encode(), 0o644)
        record.files = {"resolv_conf": str(directory / "resolv.conf"), "hosts": str(directory / "hosts"),
                        "log": str(directory / "output.log"), "exit": str(directory / "exit_code")}

    def _start(self, record: SandboxRecord) -> None:
        exit_file = Path(record.files.get("exit") or self.root / record.name / "exit_code")
        record.files["exit"] = str(exit_file)
        exit_file.unlink(missing_ok=True)
        output = open(record.files["log"], "ab")
        process = subprocess.Popen(
            nsexec.argv(record.netns, record.command, record.files["resolv_conf"],
                        record.files["hosts"], record.hostname, exit_file=str(exit_file)),
            stdin=subprocess.DEVNULL, stdout=output, stderr=output, start_new_session=True,
        )
        output.close()
        record.pid, record.exit_code = process.pid, None
        record.pid_start = start_time(process.pid)
        record.started_at = time.time()
        self._processes[record.name] = process

    def poll_exits(self) -> list[SandboxRecord]:
        """Sandboxes whose command has ended since the last call, with their exit codes recorded.

        Our own children are reaped; a command started by an earlier agent is checked by PID
        and start time, and its status read from the file its shim wrote.
        """
        ended = []
        for record in self.records.values():
            if record.pid is None or record.exit_code is not None or record.name in self._removing:
                continue
            if record.docker_id is not None:  # the engine's events say when a container ends
                continue
            process = self._processes.get(record.name)
            if process is not None:
                if process.poll() is None:
                    continue
                del self._processes[record.name]
            elif pid_alive(record.pid, record.pid_start):
                continue
            record.exit_code = _read_exit(record.files.get("exit"))
            if record.exit_code == EXIT_UNKNOWN and process is not None:
                record.exit_code = process.returncode if process.returncode >= 0 else 128 - process.returncode
            self._save(record)
            log.info("sandbox command exited sandbox=%s code=%s", record.name, record.exit_code)
            ended.append(record)
        return ended

    def restart(self, record: SandboxRecord) -> None:
        """Start the command again (the restart policy said so)."""
        if time.time() - record.started_at >= RESTART_RESET_AFTER + restart_delay(record.restarts):
            record.restarts = 0
        record.restarts += 1
        self._start(record)
        self._save(record)
        log.info("sandbox command restarted sandbox=%s restarts=%d pid=%d", record.name, record.restarts,
                 record.pid)

    async def remove(self, name: str, deregister: bool = True) -> None:
        """Remove a sandbox; ``deregister=False`` leaves its registry keys to their lease."""
        record = self.get(name)
        self._removing.add(record.name)  # its command's exit is not news: no publish, no restart
        try:
            async with self._lock:
                await self._teardown(record, deregister)
                del self.records[record.name]
        finally:
            self._removing.discard(record.name)
            log.info("sandbox removed sandbox=%s", record.name)

    async def _teardown(self, record: SandboxRecord, deregister: bool = True) -> None:
        """Undo everything create() did; safe on a half-built sandbox."""
        if (record.docker_id is None and record.pid is not None and record.exit_code is None
                and pid_alive(record.pid, record.pid_start)):
            await _terminate(record.pid)
        self._processes.pop(record.name, None)
        if deregister:
            await self.registry.deregister_sandbox(record.name, record.networks, self.node)
        await asyncio.to_thread(self._unbuild, record)

    def _unbuild(self, record: SandboxRecord) -> None:
        self._unplug(record)
        shutil.rmtree(self.root / record.name, ignore_errors=True)

    def _unplug(self, record: SandboxRecord) -> None:
        """Remove the sandbox's veths and its netns (ours) or pin (someone else's)."""
        for network in record.networks:
            _netlink().remove_link(_netlink().host_veth_name(record.netns, network))
        if record.owns_netns:
            _netlink().remove_netns(os.path.basename(record.netns))
        elif record.source_netns is not None:
            unpin_netns(record.netns)
        record.attachments = []

    # ---- Docker containers: stopped and started again, same names and addresses ----------

    def note_container(self, name: str, pid: int) -> None:
        """Record the container's init process (``svcnet ps`` shows it running while it lives)."""
        record = self.get(name)
        record.pid, record.pid_start, record.started_at = pid, start_time(pid), time.time()
        self._save(record)

    async def detach(self, name: str, exit_code: int) -> SandboxRecord:
        """The container stopped: unplug it and let its netns go, keep its registration (as
        exited, out of answers and VIPs) so a restart gets the same addresses."""
        async with self._lock:
            record = self.get(name)
            if record.detached:
                return record
            await asyncio.to_thread(self._unplug, record)
            record.exit_code = exit_code
            self._save(record)
        log.info("container stopped, sandbox detached sandbox=%s code=%s", name, exit_code)
        return record

    async def reattach(self, name: str, pid: int, networks: dict[str, Network]) -> SandboxRecord:
        """The container started (again): a new netns, plugged with the addresses it holds."""
        async with self._lock:
            record = self.get(name)
            if record.attachments:
                await asyncio.to_thread(self._unplug, record)
            source = f"/proc/{pid}/ns/net"
            await asyncio.to_thread(pin_netns, source, record.netns)
            record.source_netns = source
            endpoints = [Endpoint.from_dict(e) for e in record.endpoints]
            try:
                await asyncio.to_thread(self._build, record, endpoints, networks)
            except BaseException:
                await asyncio.to_thread(self._unplug, record)
                raise
            record.exit_code = None
            record.health = "starting" if record.external_health else "healthy"
            record.pid, record.pid_start, record.started_at = pid, start_time(pid), time.time()
            self._save(record)
        log.info("container started, sandbox attached sandbox=%s pid=%d", name, pid)
        return record


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


def _read_exit(path: str | None) -> int:
    try:
        return int(Path(path).read_text().strip()) if path else EXIT_UNKNOWN
    except (OSError, ValueError):
        return EXIT_UNKNOWN


# ---- netns pins ------------------------------------------------------------------------

_MS_BIND = 4096
_MNT_DETACH = 2
_libc = ctypes.CDLL(None, use_errno=True)


def pin_netns(source: str, pin: str) -> None:
    """Bind-mount the netns at ``source`` (e.g. /proc/PID/ns/net) on ``pin``: it stays that netns."""
    Path(pin).parent.mkdir(parents=True, exist_ok=True)
    Path(pin).touch(exist_ok=True)
    if _libc.mount(source.encode(), pin.encode(), None, _MS_BIND, None) != 0:
        err = ctypes.get_errno()
        Path(pin).unlink(missing_ok=True)
        raise ValidationError(f"cannot pin network namespace {source!r}: {os.strerror(err)}; "
                              "give /proc/PID/ns/net of a running process or /run/netns/NAME")


def _pin_alive(pin: str) -> bool:
    """True if ``pin`` is a netns bind mount (not the empty file left when the mount is gone)."""
    try:
        return os.stat(pin).st_dev != os.stat(os.path.dirname(pin)).st_dev
    except OSError:
        return False


def unpin_netns(pin: str) -> None:
    _libc.umount2(pin.encode(), _MNT_DETACH)  # EINVAL if it was not mounted: fine
    try:
        Path(pin).unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("cannot remove netns pin path=%s error=%s", pin, exc)
