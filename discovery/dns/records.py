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
from discovery.state.view import View

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


@dataclass(frozen=True)
class Records:
    revision: int
    networks: dict[str, NetworkRecords]
    # reverse name ("3.0.10.10.in-addr.arpa") -> (network, "<name>.<network>.")
    pointers: dict[str, tuple[str, str]]

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
        found = self.pointers.get(reverse_name)
        if found is not None and found[0] in attached:
            return found[1]
        return None


def build(view: View) -> Records:
    by_network: dict[str, dict[str, NameRecord]] = {name: {} for name in view.networks}
    services_by_network: dict[str, dict[str, ServiceRecord]] = {}
    pointers: dict[str, tuple[str, str]] = {}
    endpoints_by_network: dict[str, list[Endpoint]] = {}
    healthy_tasks: dict[tuple[str, str], list[Endpoint]] = {}  # (service, network) -> tasks
    for endpoint in view.endpoints.values():
        endpoints_by_network.setdefault(endpoint.network, []).append(endpoint)
        if endpoint.service and endpoint.health == "healthy":
            healthy_tasks.setdefault((endpoint.service, endpoint.network), []).append(endpoint)

    for network, endpoints in endpoints_by_network.items():
        names = by_network.setdefault(network, {})
        for endpoint in sorted(endpoints, key=lambda e: e.container):
            record = _endpoint_record(endpoint)
            for name in endpoint.dns_names():
                names.setdefault(name, record)
            for address in filter(None, (endpoint.ipv4, endpoint.ipv6)):
                pointers[address.reverse_pointer] = (network, f"{endpoint.container}.{network}.")

    for service in view.services.values():
        for network in service.networks:
            names = by_network.setdefault(network, {})
            on_network = sorted(healthy_tasks.get((service.name, network), ()), key=lambda e: e.container)
            task_record = NameRecord(
                tuple(t.ipv4 for t in on_network), tuple(t.ipv6 for t in on_network if t.ipv6),
                shuffle=True, ttl_class="tasks",
            )
            names[f"tasks.{service.name}"] = task_record
            record = _service_record(service, network, task_record)
            srv = _srv_record(service, network, record, on_network)
            for name in service.dns_names():
                names[name] = record
                services_by_network.setdefault(network, {})[name] = srv
            vip = service.vips.get(network)
            if vip is not None:
                pointers[vip.reverse_pointer] = (network, f"{service.name}.{network}.")

    return Records(
        revision=view.revision,
        networks={net: NetworkRecords(net, names, services_by_network.get(net, {}))
                  for net, names in by_network.items()},
        pointers=pointers,
    )


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
