"""Name tables built from the View: what each name means on each network.

Pure; updated per changed object (the names, task lists and pointers a change touches),
never rebuilt whole for one change, so a DNS query only does map lookups. The
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
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from immutables import Map

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


@dataclass(frozen=True, eq=False)
class NetworkRecords:
    network: str
    names: Map = field(default_factory=Map)  # name -> NameRecord
    services: Map = field(default_factory=Map)  # name -> ServiceRecord
    # reverse name ("3.0.10.10.in-addr.arpa") -> "<name>.<network>."
    pointers: Map = field(default_factory=Map)
    source: NetworkSlice | None = None  # the View's slice these were built from
    index: _Index | None = field(default=None, repr=False)  # who claims what: for per-object updates


class _Index:
    """Who contributes to each name and pointer of one network, so that a change recomputes
    the names its objects touch and nothing else. Owned by the newest NetworkRecords (an
    update moves it along; the older records keep their maps, which never change)."""

    __slots__ = ("endpoint_names", "service_names", "members", "endpoint_pointers", "service_pointers")

    def __init__(self) -> None:
        self.endpoint_names: dict[str, set[str]] = {}  # name -> containers answering to it
        self.service_names: dict[str, set[str]] = {}  # name -> services (attached here) answering to it
        self.members: dict[str, set[str]] = {}  # service -> its tasks' containers (any health)
        self.endpoint_pointers: dict[str, set[str]] = {}  # reverse name -> containers with that address
        self.service_pointers: dict[str, set[str]] = {}  # reverse name -> services with that VIP here

    def endpoint(self, endpoint: Endpoint, add: bool) -> None:
        for name in endpoint.dns_names():
            _mark(self.endpoint_names, name, endpoint.container, add)
        for address in filter(None, (endpoint.ipv4, endpoint.ipv6)):
            _mark(self.endpoint_pointers, address.reverse_pointer, endpoint.container, add)
        if endpoint.service:
            _mark(self.members, endpoint.service, endpoint.container, add)

    def service(self, service: Service, network: str, add: bool) -> None:
        if network not in service.networks:
            return  # holds a VIP here only: nothing to answer until it is attached
        for name in service.dns_names():
            _mark(self.service_names, name, service.name, add)
        vip = service.vips.get(network)
        if vip is not None:
            _mark(self.service_pointers, vip.reverse_pointer, service.name, add)


def _mark(table: dict[str, set[str]], key: str, who: str, add: bool) -> None:
    if add:
        table.setdefault(key, set()).add(who)
    else:
        holders = table.get(key)
        if holders is not None:
            holders.discard(who)
            if not holders:
                del table[key]


@dataclass(frozen=True)
class Records:
    revision: int
    networks: dict[str, NetworkRecords]
    # per network this build changed: the names and reverse names computed again, or None
    # (built whole, or gone): what a reply cache must forget
    changes: dict[str, frozenset[str] | None] = field(default_factory=dict)

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
    """The name tables of ``view``. Against ``previous``: a network whose slice is the one
    its tables were built from keeps them; a slice made from that one is applied per name
    (only the names, task lists and pointers its changed objects touch are computed
    again); any other is built whole."""
    networks: dict[str, NetworkRecords] = {}
    changes: dict[str, frozenset[str] | None] = {}
    for name, piece in view.slices.items():
        done = previous.networks.get(name) if previous is not None else None
        if done is not None and done.source is piece:
            networks[name] = done
        elif done is not None and done.index is not None and piece.derived_from(done.source):
            networks[name], changes[name] = _updated(done, piece)
        else:
            networks[name], changes[name] = _network_records(piece), None
    for name in (previous.networks.keys() - networks.keys()) if previous is not None else ():
        changes[name] = None
    return Records(revision=view.revision, networks=networks, changes=changes)


def _network_records(piece: NetworkSlice) -> NetworkRecords:
    index = _Index()
    for endpoint in piece.endpoints.values():
        index.endpoint(endpoint, True)
    for service in piece.services.values():
        index.service(service, piece.name, True)
    names = set(index.endpoint_names) | set(index.service_names)
    names |= {f"tasks.{s}" for s in index.members} | {f"tasks.{s.name}" for s in piece.services.values()}
    pointers = set(index.endpoint_pointers) | set(index.service_pointers)
    return _recomputed(NetworkRecords(piece.name, source=piece, index=index), piece, names, pointers)


def _updated(done: NetworkRecords, piece: NetworkSlice) -> tuple[NetworkRecords, frozenset[str]]:
    """``done`` with the changes from its slice to ``piece`` applied, name by name; and the
    names and reverse names it computed again."""
    base, index, network = done.source, done.index, piece.name
    names: set[str] = set()
    pointers: set[str] = set()
    services = set(piece.touched_services)
    for container in piece.touched_endpoints:
        for endpoint, add in ((base.endpoints.get(container), False), (piece.endpoints.get(container), True)):
            if endpoint is None:
                continue
            index.endpoint(endpoint, add)
            names.update(endpoint.dns_names())
            pointers.update(a.reverse_pointer for a in (endpoint.ipv4, endpoint.ipv6) if a)
            if endpoint.service:
                services.add(endpoint.service)
    for name in piece.touched_services:
        for service, add in ((base.services.get(name), False), (piece.services.get(name), True)):
            if service is not None:
                index.service(service, network, add)
                names.update(service.dns_names())
                vip = service.vips.get(network)
                if vip is not None:
                    pointers.add(vip.reverse_pointer)
    for name in services:  # a task came, went or changed health: its service's answers change
        names.add(f"tasks.{name}")
        service = piece.services.get(name)
        if service is not None:
            names.update(service.dns_names())
    updated = _recomputed(NetworkRecords(network, done.names, done.services, done.pointers, piece, index),
                          piece, names, pointers)
    return updated, frozenset(names | pointers)


def _recomputed(records: NetworkRecords, piece: NetworkSlice, names: Iterable[str],
                pointers: Iterable[str]) -> NetworkRecords:
    """``records`` with ``names`` and ``pointers`` computed again from the index. Precedence:
    a service's name over a container's, the first container by name among containers; a
    VIP's pointer over a container's."""
    index, network = records.index, piece.name
    name_map, service_map, pointer_map = records.names.mutate(), records.services.mutate(), records.pointers.mutate()
    tasks_cache: dict[str, list[Endpoint]] = {}

    def healthy_tasks(service: str) -> list[Endpoint]:
        if service not in tasks_cache:
            members = sorted(index.members.get(service, ()))
            tasks_cache[service] = [e for e in (piece.endpoints[c] for c in members) if e.health == "healthy"]
        return tasks_cache[service]

    for name in names:
        claimants = index.service_names.get(name)
        owner = piece.services.get(min(claimants)) if claimants else None
        if owner is not None:
            on_network = healthy_tasks(owner.name)
            record = _service_record(owner, network, _task_record(on_network))
            name_map[name] = record
            service_map[name] = _srv_record(owner, network, record, on_network)
            continue
        service_map.pop(name, None)
        containers = index.endpoint_names.get(name)
        if containers:
            name_map[name] = _endpoint_record(piece.endpoints[min(containers)])
        elif name.startswith("tasks.") and _attached_service(piece, name[6:]) is not None:
            name_map[name] = _task_record(healthy_tasks(name[6:]))
        else:
            name_map.pop(name, None)
    for pointer in pointers:
        if index.service_pointers.get(pointer):
            pointer_map[pointer] = f"{min(index.service_pointers[pointer])}.{network}."
        elif index.endpoint_pointers.get(pointer):
            pointer_map[pointer] = f"{max(index.endpoint_pointers[pointer])}.{network}."
        else:
            pointer_map.pop(pointer, None)
    return NetworkRecords(network, name_map.finish(), service_map.finish(), pointer_map.finish(), piece, index)


def _attached_service(piece: NetworkSlice, name: str) -> Service | None:
    service = piece.services.get(name)
    return service if service is not None and piece.name in service.networks else None


def _task_record(tasks: list[Endpoint]) -> NameRecord:
    return NameRecord(tuple(t.ipv4 for t in tasks), tuple(t.ipv6 for t in tasks if t.ipv6),
                      shuffle=True, ttl_class="tasks")


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
