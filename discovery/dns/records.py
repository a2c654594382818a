"""Name tables built from the View: what each name means on each network.

Pure and rebuilt on every View change, so a DNS query only does dictionary lookups. The
resolver (next) pre-packs wire answers from these tables. Rules, as Docker's embedded DNS
and beyond it (see shared/REFERENCE.md):

- container name, hostname and aliases -> that endpoint's addresses on the network;
- ``<svc>`` (and its aliases) -> the VIP (mode vip) or every healthy task (mode dnsrr);
- ``tasks.<svc>`` -> every healthy task;
- ``<name>.<network>`` -> ``<name>`` on that network, for sandboxes attached to it;
- a sandbox on several networks sees them all; the first network in attach order wins;
- an endpoint that is not healthy is in no answer (its names stay known: NODATA, not
  NXDOMAIN, so clients do not cache a negative for a name that will come back);
- PTR for every endpoint address and VIP -> ``<name>.<network>.``;
- SRV ``_<port>._<proto>.<svc>`` -> the VIP's name (mode vip) or each healthy task's name.

Each record says which TTL class it belongs to (``vip``, ``name`` or ``tasks``): a VIP lives
as long as its service, a container can be re-created at a new address, a task list changes
whenever a task starts, stops or fails its health check.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, field

from discovery.state.model import Endpoint, Service
from discovery.state.view import NetworkSlice, View

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class NameRecord:
    """What one name resolves to on one network."""

    ipv4: tuple[ipaddress.IPv4Address, ...] = ()
    ipv6: tuple[ipaddress.IPv6Address, ...] = ()
    shuffle: bool = False  # task lists change per reply; a VIP or one container does not
    ttl_class: str = "name"  # "vip" | "name" | "tasks"


@dataclass(frozen=True)
class ServiceRecord:
    """What SRV queries for one service on one network resolve to."""

    ports: frozenset[tuple[str, int]]  # (protocol, target port)
    targets: tuple[tuple[str, NameRecord], ...]  # ("<name>.<network>.", its addresses)
    ttl_class: str


@dataclass(frozen=True)
class NetworkRecords:
    network: str
    names: dict[str, NameRecord] = field(default_factory=dict)
    services: dict[str, ServiceRecord] = field(default_factory=dict)
    # reverse name ("3.0.10.10.in-addr.arpa") -> "<name>.<network>."
    pointers: dict[str, str] = field(default_factory=dict)
    source: NetworkSlice | None = None  # the View's slice these were built from


@dataclass(frozen=True)
class Records:
    revision: int
    networks: dict[str, NetworkRecords]

    def lookup(self, attached: Sequence[str], qname: str) -> NameRecord | None:
        """Resolve ``qname`` (lower-case, no trailing dot) for a sandbox on ``attached``."""
        return self._scoped(attached, qname, "names")

    def service(self, attached: Sequence[str], qname: str) -> ServiceRecord | None:
        """The service named ``qname`` (or ``<svc>.<network>``) as seen from ``attached``."""
        return self._scoped(attached, qname, "services")

    def _scoped(self, attached: Sequence[str], qname: str, kind: str):
        """First attached network that has ``qname``; else ``<name>.<network>`` if attached."""
        for network in attached:
            table = self.networks.get(network)
            if table is not None and qname in getattr(table, kind):
                return getattr(table, kind)[qname]
        name, _, network = qname.rpartition(".")
        if name and network in attached:
            table = self.networks.get(network)
            if table is not None:
                return getattr(table, kind).get(name)
        return None

    def pointer(self, attached: Sequence[str], reverse_name: str) -> str | None:
        for network in attached:
            table = self.networks.get(network)
            if table is not None and reverse_name in table.pointers:
                return table.pointers[reverse_name]
        return None


def build(view: View, previous: Records | None = None) -> Records:
    """The name tables of ``view``; a network whose slice is the one ``previous`` was built
    from keeps its tables (so a change costs the networks it touched, not the registry)."""
    networks = {}
    for name, piece in view.slices.items():
        done = previous.networks.get(name) if previous is not None else None
        networks[name] = done if done is not None and done.source is piece else _network_records(piece)
    return Records(revision=view.revision, networks=networks)


def _network_records(piece: NetworkSlice) -> NetworkRecords:
    network = piece.name
    names: dict[str, NameRecord] = {}
    services: dict[str, ServiceRecord] = {}
    pointers: dict[str, str] = {}
    healthy_tasks: dict[str, list[Endpoint]] = {}  # service -> its healthy tasks here, by container
    for container in sorted(piece.endpoints):
        endpoint = piece.endpoints[container]
        if endpoint.service and endpoint.health == "healthy":
            healthy_tasks.setdefault(endpoint.service, []).append(endpoint)
        record = _endpoint_record(endpoint)
        for name in endpoint.dns_names():
            names.setdefault(name, record)
        for address in filter(None, (endpoint.ipv4, endpoint.ipv6)):
            pointers[address.reverse_pointer] = f"{endpoint.container}.{network}."

    for service in piece.services.values():
        if network not in service.networks:
            continue  # holds a VIP here only: nothing to answer until it is attached
        on_network = healthy_tasks.get(service.name, [])
        task_record = NameRecord(
            tuple(t.ipv4 for t in on_network), tuple(t.ipv6 for t in on_network if t.ipv6),
            shuffle=True, ttl_class="tasks",
        )
        names[f"tasks.{service.name}"] = task_record
        record = _service_record(service, network, task_record)
        srv = _srv_record(service, network, record, on_network)
        for name in service.dns_names():
            names[name] = record
            services[name] = srv
        vip = service.vips.get(network)
        if vip is not None:
            pointers[vip.reverse_pointer] = f"{service.name}.{network}."
    return NetworkRecords(network, names, services, pointers, piece)


def _endpoint_record(endpoint: Endpoint) -> NameRecord:
    if endpoint.health != "healthy":
        return NameRecord()
    return NameRecord((endpoint.ipv4,), (endpoint.ipv6,) if endpoint.ipv6 else ())


def _service_record(service: Service, network: str, tasks: NameRecord) -> NameRecord:
    if service.endpoint_mode == "dnsrr":
        return tasks
    vip = service.vips.get(network)
    return NameRecord((vip,) if vip else (), ttl_class="vip")


def _srv_record(service: Service, network: str, record: NameRecord, tasks: list[Endpoint]) -> ServiceRecord:
    ports = frozenset((p.protocol, p.target) for p in service.ports)
    if service.endpoint_mode == "dnsrr":
        targets = tuple((f"{t.container}.{network}.", _endpoint_record(t)) for t in tasks)
        return ServiceRecord(ports, targets, "tasks")
    return ServiceRecord(ports, ((f"{service.name}.{network}.", record),), "vip")
