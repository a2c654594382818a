"""The data model: networks, services, endpoints and nodes.

Every type is a frozen dataclass that validates itself on creation, so a value that exists
is a valid value. Each has ``to_dict``/``from_dict`` for its JSON form in etcd; decoding
runs the same validation, so bad data found in etcd raises ``ValidationError`` with a
message that names the field.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from types import MappingProxyType
from typing import Any

from discovery.errors import ValidationError

IPv4Address = ipaddress.IPv4Address
IPv6Address = ipaddress.IPv6Address
IPv4Network = ipaddress.IPv4Network
IPv6Network = ipaddress.IPv6Network

_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")

SUPPORTED_DRIVERS = ("bridge", "overlay")  # overlay: one L2 segment across hosts, over VXLAN
VNI_FIRST, VNI_LAST = 4096, (1 << 24) - 1  # as Docker: VNIs below 4096 are left to the operator
ENDPOINT_MODES = ("vip", "dnsrr")
PROTOCOLS = ("tcp", "udp")
PUBLISH_MODES = ("ingress", "host")
SOURCE_MODES = ("nat", "keep")  # nat: the mesh masquerades (Docker's way); keep: tasks see the client
HEALTH_STATES = ("starting", "healthy", "unhealthy", "exited")  # exited: its command ended


def normalize_name(name: str, what: str = "name") -> str:
    """Return ``name`` lower-cased if it is an RFC 1123 label, else raise.

    DNS matching is case-insensitive (RFC 4343), so names are stored lower-case and two
    names that differ only in case are the same name.
    """
    if not isinstance(name, str) or not name:
        raise ValidationError(f"{what} must not be empty")
    lowered = name.lower()
    if len(lowered) > 63:
        raise ValidationError(
            f"{what} {name!r} is {len(lowered)} characters; a DNS label holds at most 63"
        )
    if not _LABEL.match(lowered):
        raise ValidationError(
            f"{what} {name!r} is not a valid DNS label: use letters, digits and '-', "
            "starting and ending with a letter or digit (RFC 1123)"
        )
    return lowered


def _names(values: Iterable[str], what: str) -> tuple[str, ...]:
    seen: list[str] = []
    for value in values:
        name = normalize_name(value, what)
        if name not in seen:
            seen.append(name)
    return tuple(seen)


def _parse_subnet(text: str, version: int, flag: str, example: str, max_prefix: int):
    try:
        iface = ipaddress.ip_interface(text)
    except ValueError:
        raise ValidationError(f"{flag} {text!r} is not a CIDR such as {example}") from None
    if "/" not in text:
        raise ValidationError(f"{flag} {text!r} needs a prefix length, such as {example}")
    if iface.version != version:
        other = "--subnet6" if version == 4 else "--subnet"
        raise ValidationError(f"{flag} {text!r} is IPv{iface.version}; pass it with {other}")
    net = iface.network
    if iface.ip != net.network_address:
        raise ValidationError(f"{flag} {text!r} has host bits set; did you mean {net}?")
    if net.prefixlen > max_prefix:
        raise ValidationError(
            f"{flag} {net} is too small: use a /{max_prefix} or larger "
            "(a gateway and some endpoints must fit)"
        )
    return net


def parse_ipv4_subnet(text: str) -> IPv4Network:
    return _parse_subnet(text, 4, "subnet", "10.10.0.0/24", 29)


def parse_ipv6_subnet(text: str) -> IPv6Network:
    return _parse_subnet(text, 6, "subnet6", "fd00:10::/64", 120)


def first_host(net: IPv4Network | IPv6Network) -> IPv4Address | IPv6Address:
    return net.network_address + 1


@dataclass(frozen=True)
class Network:
    name: str
    subnet: IPv4Network
    gateway: IPv4Address
    subnet6: IPv6Network | None = None
    gateway6: IPv6Address | None = None
    driver: str = "bridge"
    internal: bool = False
    vni: int | None = None  # overlay: its VXLAN network identifier, allocated by the registry

    def __post_init__(self) -> None:
        object.__setattr__(self, "name", normalize_name(self.name, "network name"))
        if self.driver not in SUPPORTED_DRIVERS:
            raise ValidationError(
                f"network driver {self.driver!r} is not supported; use one of {', '.join(SUPPORTED_DRIVERS)}"
            )
        if self.vni is not None and (self.driver != "overlay" or not VNI_FIRST <= self.vni <= VNI_LAST):
            raise ValidationError(f"vni {self.vni} needs the overlay driver and {VNI_FIRST}..{VNI_LAST}")
        _check_gateway(self.subnet, self.gateway, "gateway")
        if (self.subnet6 is None) != (self.gateway6 is None):
            raise ValidationError("an IPv6 subnet needs an IPv6 gateway and the other way round")
        if self.subnet6 is not None:
            _check_gateway(self.subnet6, self.gateway6, "gateway6")

    @classmethod
    def create(
        cls,
        name: str,
        subnet: str,
        subnet6: str | None = None,
        gateway: str | None = None,
        internal: bool = False,
        driver: str = "bridge",
    ) -> Network:
        """Build a network from user input; the gateway defaults to the first host address."""
        net4 = parse_ipv4_subnet(subnet)
        gw4 = _parse_address(gateway, "gateway") if gateway else first_host(net4)
        net6 = parse_ipv6_subnet(subnet6) if subnet6 else None
        gw6 = first_host(net6) if net6 else None
        return cls(name, net4, gw4, net6, gw6, driver, internal)

    def overlaps(self, other: Network) -> bool:
        if self.subnet.overlaps(other.subnet):
            return True
        return bool(self.subnet6 and other.subnet6 and self.subnet6.overlaps(other.subnet6))

    def reserved(self) -> frozenset:
        """Addresses IPAM never hands out: network, broadcast and gateways."""
        addrs = {self.subnet.network_address, self.subnet.broadcast_address, self.gateway}
        if self.subnet6 is not None:
            addrs |= {self.subnet6.network_address, self.gateway6}
        return frozenset(addrs)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "subnet": str(self.subnet),
            "gateway": str(self.gateway),
            "subnet6": str(self.subnet6) if self.subnet6 else None,
            "gateway6": str(self.gateway6) if self.gateway6 else None,
            "driver": self.driver,
            "internal": self.internal,
            "vni": self.vni,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Network:
        return _decode(cls, data, lambda d: cls(
            name=d["name"],
            subnet=IPv4Network(d["subnet"]),
            gateway=IPv4Address(d["gateway"]),
            subnet6=IPv6Network(d["subnet6"]) if d.get("subnet6") else None,
            gateway6=IPv6Address(d["gateway6"]) if d.get("gateway6") else None,
            driver=d.get("driver", "bridge"),
            internal=bool(d.get("internal", False)),
            vni=int(d["vni"]) if d.get("vni") is not None else None,
        ))


def _check_gateway(net, gateway, what: str) -> None:
    if gateway not in net:
        raise ValidationError(f"{what} {gateway} is outside the subnet {net}")
    if gateway == net.network_address or (net.version == 4 and gateway == net.broadcast_address):
        raise ValidationError(f"{what} {gateway} is the network or broadcast address of {net}")


def _parse_address(text: str, what: str):
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise ValidationError(f"{what} {text!r} is not an IP address") from None


@dataclass(frozen=True)
class PortSpec:
    target: int
    published: int | None = None
    protocol: str = "tcp"
    mode: str = "ingress"
    source: str = "nat"

    def __post_init__(self) -> None:
        for what, port in (("target port", self.target), ("published port", self.published)):
            if port is not None and not (isinstance(port, int) and 1 <= port <= 65535):
                raise ValidationError(f"{what} {port!r} must be a number from 1 to 65535")
        if self.protocol not in PROTOCOLS:
            raise ValidationError(f"protocol {self.protocol!r} must be tcp or udp")
        if self.mode not in PUBLISH_MODES:
            raise ValidationError(f"publish mode {self.mode!r} must be ingress or host")
        if self.source not in SOURCE_MODES:
            raise ValidationError(f"publish source {self.source!r} must be keep or nat")
        if self.source == "keep" and self.published is None:
            raise ValidationError(f"port {self.target}: source=keep needs a published port, e.g. 8080:{self.target}")

    @property
    def key(self) -> tuple[int, str]:
        """What must be unique cluster-wide: the published port and its protocol."""
        return (self.published or 0, self.protocol)

    @classmethod
    def parse(cls, text: str) -> PortSpec:
        """Parse ``[PUBLISHED:]TARGET[/udp|/tcp][,mode=host|ingress][,source=keep|nat]``."""
        usage = (f"port {text!r} is not PUBLISHED:TARGET[/udp][,mode=host][,source=keep], "
                 "e.g. 8080:80, 53:53/udp or 8080:80,source=keep")
        spec, *options = text.split(",")
        settings = {"mode": "ingress", "source": "nat"}
        for option in options:
            key, _, value = option.partition("=")
            key, value = key.strip(), value.strip()
            if key not in settings or not value:
                raise ValidationError(usage)
            settings[key] = value
        ports, _, protocol = spec.partition("/")
        protocol = (protocol or "tcp").lower()
        published_text, sep, target_text = ports.rpartition(":")
        try:
            target = int(target_text)
            published = int(published_text) if sep else None
        except ValueError:
            raise ValidationError(usage) from None
        return cls(target, published, protocol, settings["mode"], settings["source"])

    @classmethod
    def parse_published(cls, text: str) -> tuple[int, str]:
        """``PORT[/udp]`` (as ``--publish-rm`` takes it) -> (port, protocol)."""
        port, _, protocol = text.partition("/")
        spec = cls.parse(f"{port}:{port}/{protocol or 'tcp'}")
        return spec.key

    def __str__(self) -> str:
        text = f"{self.target}/{self.protocol}"
        if self.published is not None:
            text = f"{self.published}:{text}"
            if self.mode == "host":
                text += ",mode=host"
            if self.source == "keep":
                text += ",source=keep"
        return text

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target, "published": self.published,
                "protocol": self.protocol, "mode": self.mode, "source": self.source}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PortSpec:
        return _decode(cls, data, lambda d: cls(
            int(d["target"]), d.get("published"), d.get("protocol", "tcp"), d.get("mode", "ingress"),
            d.get("source", "nat")))


MAX_FLOW_TIMEOUT = 30 * 24 * 3600  # seconds: a month of idleness is the most a flow may keep


@dataclass(frozen=True)
class FlowTimeout:
    """How long an idle connection through a service's VIP keeps its conntrack entry (and so
    its task): ``tcp`` for established TCP, ``udp`` for a UDP flow. None: the kernel's default
    (5 days for established TCP, 120 s for a UDP stream)."""

    tcp: int | None = None
    udp: int | None = None

    def __post_init__(self) -> None:
        for protocol, seconds in (("tcp", self.tcp), ("udp", self.udp)):
            if seconds is not None and not 1 <= seconds <= MAX_FLOW_TIMEOUT:
                raise ValidationError(f"flow timeout {protocol}={seconds} must be 1 to {MAX_FLOW_TIMEOUT} seconds")
        if self.tcp is None and self.udp is None:
            raise ValidationError("a flow timeout needs tcp=SECONDS, udp=SECONDS or both")

    @classmethod
    def parse(cls, text: str) -> FlowTimeout:
        """Parse ``tcp=SECONDS,udp=SECONDS`` (either part may be left out)."""
        usage = f"flow timeout {text!r} is not tcp=SECONDS,udp=SECONDS, e.g. tcp=86400 or tcp=3600,udp=60"
        found: dict[str, int] = {}
        for part in text.split(","):
            key, sep, value = part.partition("=")
            key = key.strip().lower()
            if not sep or key not in ("tcp", "udp") or key in found:
                raise ValidationError(usage)
            try:
                found[key] = int(value)
            except ValueError:
                raise ValidationError(usage) from None
        return cls(found.get("tcp"), found.get("udp"))

    def __str__(self) -> str:
        return ",".join(f"{k}={v}" for k, v in (("tcp", self.tcp), ("udp", self.udp)) if v is not None)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in (("tcp", self.tcp), ("udp", self.udp)) if v is not None}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FlowTimeout:
        return _decode(cls, data, lambda d: cls(d.get("tcp"), d.get("udp")))


@dataclass(frozen=True)
class Service:
    name: str
    networks: tuple[str, ...]
    endpoint_mode: str = "vip"
    aliases: tuple[str, ...] = ()
    ports: tuple[PortSpec, ...] = ()
    vips: Mapping[str, IPv4Address] = field(default_factory=dict)
    flow_timeout: FlowTimeout | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "name", normalize_name(self.name, "service name"))
        networks = _names(self.networks, "network name")
        if not networks:
            raise ValidationError(f"service {self.name!r} needs at least one --network")
        object.__setattr__(self, "networks", networks)
        aliases = tuple(a for a in _names(self.aliases, "alias") if a != self.name)
        object.__setattr__(self, "aliases", aliases)
        object.__setattr__(self, "ports", tuple(self.ports))
        if self.endpoint_mode not in ENDPOINT_MODES:
            raise ValidationError(
                f"endpoint mode {self.endpoint_mode!r} must be vip or dnsrr"
            )
        if self.endpoint_mode == "dnsrr" and self.vips:
            raise ValidationError(f"service {self.name!r} is dnsrr and cannot hold VIPs")
        if self.endpoint_mode == "dnsrr" and self.flow_timeout is not None:
            raise ValidationError(f"service {self.name!r}: --flow-timeout applies to connections through a VIP; "
                                  "use --endpoint-mode vip")
        if self.endpoint_mode == "dnsrr" and any(
            p.published is not None and p.mode == "ingress" for p in self.ports
        ):
            raise ValidationError(
                f"service {self.name!r}: a port published in ingress mode needs a VIP; "
                "use --endpoint-mode vip or publish with mode=host"
            )
        seen: set[tuple[int, str]] = set()
        for port in self.ports:
            if port.published is not None:
                if port.key in seen:
                    raise ValidationError(f"published port {port.published}/{port.protocol} is given twice")
                seen.add(port.key)
        stray = set(self.vips) - set(networks)
        if stray:
            raise ValidationError(f"service {self.name!r} has VIPs on networks it is not on: {sorted(stray)}")
        object.__setattr__(self, "vips", MappingProxyType(dict(self.vips)))

    def dns_names(self) -> tuple[str, ...]:
        return (self.name, *self.aliases)

    @property
    def published(self) -> tuple[PortSpec, ...]:
        return tuple(p for p in self.ports if p.published is not None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "networks": list(self.networks),
            "endpoint_mode": self.endpoint_mode,
            "aliases": list(self.aliases),
            "ports": [p.to_dict() for p in self.ports],
            "vips": {net: str(ip) for net, ip in self.vips.items()},
            **({"flow_timeout": self.flow_timeout.to_dict()} if self.flow_timeout is not None else {}),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Service:
        return _decode(cls, data, lambda d: cls(
            name=d["name"],
            networks=tuple(d["networks"]),
            endpoint_mode=d.get("endpoint_mode", "vip"),
            aliases=tuple(d.get("aliases", ())),
            ports=tuple(PortSpec.from_dict(p) for p in d.get("ports", ())),
            vips={net: IPv4Address(ip) for net, ip in d.get("vips", {}).items()},
            flow_timeout=FlowTimeout.from_dict(d["flow_timeout"]) if d.get("flow_timeout") else None,
        ))


@dataclass(frozen=True)
class Endpoint:
    """One container's attachment to one network."""

    container: str
    network: str
    ipv4: IPv4Address
    node: str
    hostname: str | None = None
    aliases: tuple[str, ...] = ()
    service: str | None = None
    ipv6: IPv6Address | None = None
    netns: str = ""
    health: str = "healthy"

    def __post_init__(self) -> None:
        object.__setattr__(self, "container", normalize_name(self.container, "container name"))
        object.__setattr__(self, "network", normalize_name(self.network, "network name"))
        if self.hostname is not None:
            object.__setattr__(self, "hostname", normalize_name(self.hostname, "hostname"))
        object.__setattr__(self, "aliases", _names(self.aliases, "alias"))
        if self.service is not None:
            object.__setattr__(self, "service", normalize_name(self.service, "service name"))
        if not self.node:
            raise ValidationError("endpoint node must not be empty")
        if self.health not in HEALTH_STATES:
            raise ValidationError(f"health {self.health!r} must be one of {', '.join(HEALTH_STATES)}")

    @property
    def key(self) -> tuple[str, str]:
        return (self.network, self.container)

    def dns_names(self) -> tuple[str, ...]:
        """Names this endpoint answers to on its network, in order of precedence."""
        names = [self.container]
        if self.hostname and self.hostname not in names:
            names.append(self.hostname)
        names.extend(a for a in self.aliases if a not in names)
        return tuple(names)

    def to_dict(self) -> dict[str, Any]:
        return {
            "container": self.container,
            "network": self.network,
            "ipv4": str(self.ipv4),
            "ipv6": str(self.ipv6) if self.ipv6 else None,
            "node": self.node,
            "hostname": self.hostname,
            "aliases": list(self.aliases),
            "service": self.service,
            "netns": self.netns,
            "health": self.health,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Endpoint:
        return _decode(cls, data, lambda d: cls(
            container=d["container"],
            network=d["network"],
            ipv4=IPv4Address(d["ipv4"]),
            ipv6=IPv6Address(d["ipv6"]) if d.get("ipv6") else None,
            node=d["node"],
            hostname=d.get("hostname"),
            aliases=tuple(d.get("aliases", ())),
            service=d.get("service"),
            netns=d.get("netns", ""),
            health=d.get("health", "healthy"),
        ))


@dataclass(frozen=True)
class Node:
    """A host with an agent: where its tasks are reached (advertise) and its VXLAN endpoint."""

    name: str
    started_at: float = 0.0
    version: str = ""
    advertise_addr: str | None = None
    vtep: str | None = None
    # (overlay network, this node's own address on it), sorted: where the routing mesh
    # masquerades to and replies come back to (Docker's per-node "lb" endpoint)
    addresses: tuple[tuple[str, IPv4Address], ...] = ()

    def __post_init__(self) -> None:
        if not self.name:
            raise ValidationError("node name must not be empty")
        for field_name in ("advertise_addr", "vtep"):
            value = getattr(self, field_name)
            if value is not None:
                _parse_address(value, field_name)
        addresses = tuple(sorted((str(net), IPv4Address(ip)) for net, ip in self.addresses))
        object.__setattr__(self, "addresses", addresses)

    def address_on(self, network: str) -> IPv4Address | None:
        return next((ip for net, ip in self.addresses if net == network), None)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "started_at": self.started_at, "version": self.version,
                "advertise_addr": self.advertise_addr, "vtep": self.vtep,
                "addresses": {net: str(ip) for net, ip in self.addresses}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Node:
        return _decode(cls, data, lambda d: cls(d["name"], float(d.get("started_at", 0)), d.get("version", ""),
                                                d.get("advertise_addr"), d.get("vtep"),
                                                tuple(dict(d.get("addresses") or {}).items())))


def _decode(cls, data: Mapping[str, Any], build):
    """Run ``build(data)``, turning any shape error into a ValidationError naming the type."""
    if not isinstance(data, Mapping):
        raise ValidationError(f"{cls.__name__} must be a JSON object, got {type(data).__name__}")
    try:
        return build(data)
    except ValidationError:
        raise
    except KeyError as exc:
        raise ValidationError(f"{cls.__name__} is missing field {exc.args[0]!r}") from None
    except (TypeError, ValueError, AttributeError) as exc:
        raise ValidationError(f"{cls.__name__} has a bad field: {exc}") from None


@dataclass(frozen=True)
class HealthSpec:
    """A sandbox's health check (`svcnet run --health-cmd`), kept in its record and run by its owner."""

    cmd: str
    interval: float = 5.0
    retries: int = 3
    timeout: float | None = None  # a check running longer fails (None: the interval, at least 1 s)

    def __post_init__(self) -> None:
        if not self.cmd.strip():
            raise ValidationError("--health-cmd must not be empty")
        if self.interval <= 0:
            raise ValidationError("--health-interval must be more than 0 seconds")
        if self.timeout is not None and self.timeout <= 0:
            raise ValidationError("--health-timeout must be more than 0 seconds")
        if self.retries < 1:
            raise ValidationError("--health-retries must be at least 1")

    def to_dict(self) -> dict:
        return asdict(self)

    def command(self) -> list[str]:
        return ["sh", "-c", self.cmd]

    def time_limit(self) -> float:
        """Seconds one check may run before it fails and is killed (Docker's --health-timeout)."""
        return self.timeout if self.timeout is not None else max(self.interval, 1.0)
