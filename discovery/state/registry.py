"""The registry: svcnet's objects in etcd, written with transactions.

Every write that must be unique (a network's subnet, a DNS name on a network, an address)
is a transaction whose compares fail if another writer got there first; the loser re-reads
and either picks again (an automatic address) or reports the clash (a requested name or
address). Reads here are for the CLI and the agent's slow paths; the hot paths read the
in-memory View (``view.py``).
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Container, Iterable, Sequence
from dataclasses import dataclass, replace

import aetcd

from discovery.errors import ConflictError, ExhaustedError, NotFoundError, ValidationError

from . import ipam
from .keys import KeyLayout
from .model import VNI_FIRST, VNI_LAST, Endpoint, IPv4Address, Network, Node, PortSpec, Service

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 20
# etcd's default --max-txn-ops: compares and operations per transaction, each
TXN_OPS = 128
ALLOCATE_BATCH = 8  # address candidates read per round trip
MAX_SCAN = 1 << 16  # candidates looked at before calling a network full
# A name that would be ambiguous in DNS: "tasks.<svc>" lists a service's tasks.
RESERVED_NAMES = frozenset({"tasks"})


@dataclass(frozen=True)
class Claim:
    """Who holds a DNS name or an address on a network."""

    kind: str  # "container", "service" or "node"
    owner: str
    role: str  # "name", "hostname", "alias", "address", "vip"
    node: str = ""

    def encode(self) -> bytes:
        return json.dumps(
            {"kind": self.kind, "owner": self.owner, "as": self.role, "node": self.node},
            sort_keys=True,
        ).encode()

    @classmethod
    def decode(cls, raw: bytes) -> Claim | None:
        try:
            data = json.loads(raw)
            return cls(data["kind"], data["owner"], data["as"], data.get("node", ""))
        except (ValueError, KeyError, TypeError):
            return None

    def same_holder(self, other: Claim) -> bool:
        return (self.kind, self.owner, self.node) == (other.kind, other.owner, other.node)

    def describe(self) -> str:
        role = {"name": "its name", "hostname": "its hostname", "alias": "an alias",
                "address": "its address", "vip": "its VIP", "port": "a published port"}.get(self.role, self.role)
        where = f" on node {self.node!r}" if self.node else ""
        return f"{self.kind} {self.owner!r}{where} (as {role})"


@dataclass(frozen=True)
class SandboxRequest:
    """What a sandbox asks of the registry: one endpoint per network, in attach order."""

    container: str
    networks: tuple[str, ...]
    node: str
    hostname: str | None = None
    aliases: tuple[str, ...] = ()
    service: str | None = None
    # Requested addresses as (network, address) pairs, any family: the CLI's --ip for the
    # first network, or every address a sandbox already holds when it is re-registered.
    addresses: tuple[tuple[str, str], ...] = ()
    netns: str = ""
    health: str = "healthy"


class _Claims:
    """Claims read from etcd for one network: names and addresses with their raw values."""

    def __init__(self) -> None:
        self.names: dict[str, tuple[Claim | None, bytes]] = {}
        self.addresses: dict[str, tuple[Claim | None, bytes]] = {}


class Registry:
    def __init__(self, client: aetcd.Client, keys: KeyLayout) -> None:
        self.client = client
        self.keys = keys
        self.txn = client.transactions

    # ---- reads -----------------------------------------------------------------------

    async def _json_values(self, prefix: bytes) -> tuple[int, list[tuple[bytes, dict]]]:
        result = await self.client.get_prefix(prefix)
        values = []
        for kv in result:
            try:
                values.append((kv.key, json.loads(kv.value)))
            except ValueError:
                log.warning("skipping malformed value key=%s", kv.key.decode(errors="replace"))
        return result.header.revision, values

    async def get_network(self, name: str) -> Network:
        got = await self.client.get(self.keys.network(name.lower()))
        if got is None:
            raise NotFoundError(f"network {name!r} does not exist; create it with 'svcnet network create {name} --subnet CIDR'")
        return Network.from_dict(json.loads(got.value))

    async def list_networks(self) -> tuple[int, list[Network]]:
        revision, values = await self._json_values(self.keys.kind_prefix("networks"))
        return revision, _decode_all(Network, values)

    async def get_service(self, name: str) -> Service:
        got = await self.client.get(self.keys.service(name.lower()))
        if got is None:
            raise NotFoundError(f"service {name!r} does not exist; create it with 'svcnet service create {name} --network NET'")
        return Service.from_dict(json.loads(got.value))

    async def list_services(self) -> list[Service]:
        _, values = await self._json_values(self.keys.kind_prefix("services"))
        return _decode_all(Service, values)

    async def list_endpoints(self, network: str | None = None) -> list[Endpoint]:
        prefix = self.keys.kind_prefix("endpoints", network) if network else self.keys.kind_prefix("endpoints")
        _, values = await self._json_values(prefix)
        return _decode_all(Endpoint, values)

    async def _read_claims(self, network: str) -> _Claims:
        claims = _Claims()
        for kind, table in (("names", claims.names), ("ipam", claims.addresses)):
            for kv in await self.client.get_prefix(self.keys.kind_prefix(kind, network)):
                item = kv.key.decode().rsplit("/", 1)[-1]
                table[item] = (Claim.decode(kv.value), kv.value)
        return claims

    async def _claims_by_key(self, network: str, names: Iterable[str], addresses: Iterable[str]) -> _Claims:
        """Only the named claims, read by key in one transaction: the cost does not grow
        with the network (listing every claim cost 274 ms per create at 10,000 services)."""
        name_keys = {n: self.keys.name_claim(network, n) for n in dict.fromkeys(names)}
        address_keys = {a: self.keys.address_claim(network, a) for a in dict.fromkeys(addresses)}
        found = await self._read_keys([*name_keys.values(), *address_keys.values()])
        claims = _Claims()
        for table, keyed in ((claims.names, name_keys), (claims.addresses, address_keys)):
            for item, key in keyed.items():
                raw = found[key]
                if raw is not None:
                    table[item] = (Claim.decode(raw), raw)
        return claims

    async def _allocate(self, network: Network, subnet, avoid: Container = ()) -> tuple[ipam.Address, list]:
        """A free address of ``subnet``, searched by key from the network's cursor (usually
        the first candidate is free); returns it and the cursor's put for the claiming
        transaction, whose ``version == 0`` compare on the address settles any race."""
        cursor = self.keys.ipam_cursor(network.name, subnet.version)
        got = await self.client.get(cursor)
        try:
            start = int(got.value) if got is not None else 1
        except ValueError:
            start = 1
        candidates = (c for c in ipam.candidates(network, subnet, start) if c[1] not in avoid)
        for _ in range(MAX_SCAN // ALLOCATE_BATCH):
            batch = list(itertools.islice(candidates, ALLOCATE_BATCH))
            if not batch:
                break
            found = await self._read_keys([self.keys.address_claim(network.name, a) for _, a in batch])
            for offset, address in batch:
                if found[self.keys.address_claim(network.name, address)] is None:
                    return address, [self.txn.put(cursor, str(offset + 1).encode())]
        raise ipam.exhausted(network, subnet)

    async def _endpoint_record(self, network: str, container: str) -> Endpoint | None:
        got = await self.client.get(self.keys.endpoint(network, container))
        if got is None:
            return None
        try:
            return Endpoint.from_dict(json.loads(got.value))
        except (ValueError, ValidationError, TypeError, KeyError) as exc:
            log.warning("skipping bad endpoint record network=%s container=%s error=%s", network, container, exc)
            return None

    # ---- networks --------------------------------------------------------------------

    async def create_network(self, network: Network) -> Network:
        prefix = self.keys.kind_prefix("networks")
        for _ in range(MAX_ATTEMPTS):
            revision, existing = await self.list_networks()
            for other in existing:
                if other.name == network.name:
                    raise ConflictError(f"network {network.name!r} already exists; pick another name or remove it first")
                if network.overlaps(other):
                    theirs = ", ".join(str(s) for s in (other.subnet, other.subnet6) if s)
                    raise ConflictError(
                        f"subnet of network {network.name!r} overlaps network {other.name!r} ({theirs}); "
                        "choose a subnet that does not overlap"
                    )
            if network.driver == "overlay":
                network = replace(network, vni=_free_vni(existing))
            # no network changed since the listing: the overlap check and the VNI still hold
            ok, _ = await self.client.transaction(
                compare=[self.txn.mod(prefix, _range_end(prefix)) < revision + 1],
                success=[self.txn.put(self.keys.network(network.name), _encode(network))],
                failure=[],
            )
            if ok:
                return network
        raise ConflictError("networks are changing too fast to create this one; try again")

    async def remove_network(self, name: str) -> None:
        name = name.lower()
        await self.get_network(name)  # NotFoundError with a hint if absent
        endpoints = await self.list_endpoints(name)
        if endpoints:
            holders = ", ".join(sorted({e.container for e in endpoints}))
            raise ConflictError(
                f"network {name!r} still has endpoints attached ({holders}); remove them with 'svcnet rm' first"
            )
        service_prefix = self.keys.kind_prefix("services")
        revision, service_values = await self._json_values(service_prefix)
        services = [s.name for s in _decode_all(Service, service_values) if name in s.networks]
        if services:
            raise ConflictError(
                f"network {name!r} is used by services {', '.join(sorted(services))}; remove them first"
            )
        endpoint_prefix = self.keys.kind_prefix("endpoints", name)
        ipam_prefix = self.keys.kind_prefix("ipam", name)
        cursor_prefix = self.keys.kind_prefix("ipam-next", name)
        names_prefix = self.keys.kind_prefix("names", name)
        ok, _ = await self.client.transaction(
            compare=[
                # No endpoint joined and no service was created since we looked.
                self.txn.version(endpoint_prefix, _range_end(endpoint_prefix)) == 0,
                self.txn.mod(service_prefix, _range_end(service_prefix)) < revision + 1,
                self.txn.version(self.keys.network(name)) > 0,
            ],
            success=[
                self.txn.delete(self.keys.network(name)),
                self.txn.delete(ipam_prefix, _range_end(ipam_prefix)),
                self.txn.delete(cursor_prefix, _range_end(cursor_prefix)),
                self.txn.delete(names_prefix, _range_end(names_prefix)),
            ],
            failure=[],
        )
        if not ok:
            raise ConflictError(f"network {name!r} changed while removing it (an endpoint or service joined?); try again")

    # ---- services --------------------------------------------------------------------

    async def _port_ops(self, service: str, ports: Iterable[PortSpec]) -> tuple[list, list]:
        """Compares and puts claiming ``ports`` for ``service``; refuses a port another holds."""
        compares, puts = [], []
        value = Claim("service", service, "port").encode()
        for port in ports:
            key = self.keys.port_claim(port.protocol, port.published)
            held = await self.client.get(key)
            if held is not None:
                claim = Claim.decode(held.value)
                if claim is None or claim.owner != service:
                    who = f"service {claim.owner!r}" if claim else "an unreadable claim"
                    raise ConflictError(
                        f"port {port.published}/{port.protocol} is already published by {who}; "
                        f"pick another published port or remove it there first "
                        f"('svcnet service update {claim.owner if claim else 'NAME'} --publish-rm "
                        f"{port.published}/{port.protocol}')")
                compares.append(self.txn.value(key) == held.value)
            else:
                compares.append(self.txn.version(key) == 0)
            puts.append(self.txn.put(key, value))
        return compares, puts

    async def create_service(self, service: Service) -> Service:
        """Store ``service``, claiming its names, published ports and (mode vip) one VIP per network."""
        if service.name in RESERVED_NAMES:
            raise ValidationError(f"service name {service.name!r} is reserved (tasks.<service> lists tasks)")
        for _ in range(MAX_ATTEMPTS):
            if await self.client.get(self.keys.service(service.name)) is not None:
                raise ConflictError(f"service {service.name!r} already exists; remove it first or pick another name")
            compares, puts = await self._port_ops(service.name, service.published)
            compares.append(self.txn.version(self.keys.service(service.name)) == 0)
            vips = {}
            for net_name in service.networks:
                network = await self.get_network(net_name)
                compares.append(self.txn.version(self.keys.network(net_name)) > 0)
                claims = await self._claims_by_key(net_name, service.dns_names(), ())
                holder = Claim("service", service.name, "name")
                for dns_name in service.dns_names():
                    _refuse_taken_name(claims, dns_name, holder, net_name)
                    compares.append(self.txn.version(self.keys.name_claim(net_name, dns_name)) == 0)
                    role = "name" if dns_name == service.name else "alias"
                    puts.append(self.txn.put(self.keys.name_claim(net_name, dns_name),
                                             Claim("service", service.name, role).encode()))
                if service.endpoint_mode == "vip":
                    vip, cursor_puts = await self._allocate(network, network.subnet)
                    puts += cursor_puts
                    vips[net_name] = vip
                    compares.append(self.txn.version(self.keys.address_claim(net_name, vip)) == 0)
                    puts.append(self.txn.put(self.keys.address_claim(net_name, vip),
                                             Claim("service", service.name, "vip").encode()))
            stored = replace(service, vips=vips)
            puts.append(self.txn.put(self.keys.service(stored.name), _encode(stored)))
            ok, _ = await self.client.transaction(compare=compares, success=puts, failure=[])
            if ok:
                return stored
        raise ConflictError(f"could not create service {service.name!r}: the registry kept changing; try again")

    async def remove_service(self, name: str) -> None:
        name = name.lower()
        got = await self.client.get(self.keys.service(name))
        if got is None:
            raise NotFoundError(f"service {name!r} does not exist")
        service = Service.from_dict(json.loads(got.value))
        members = self.keys.kind_prefix("members", name)
        tasks = sorted({kv.key.decode().rsplit("/", 1)[-1] for kv in await self.client.get_prefix(members)})
        if tasks:
            raise ConflictError(
                f"service {name!r} still has tasks ({', '.join(tasks)}); remove them with 'svcnet rm' first"
            )
        deletes = [self.txn.delete(self.keys.service(name))]
        for port in service.published:  # only claims it holds (a service older than claims may not)
            key = self.keys.port_claim(port.protocol, port.published)
            held = await self.client.get(key)
            claim = Claim.decode(held.value) if held is not None else None
            if claim is not None and claim.kind == "service" and claim.owner == name:
                deletes.append(self.txn.delete(key))
        for net_name in service.networks:
            vip = service.vips.get(net_name)
            claims = await self._claims_by_key(net_name, service.dns_names(), [str(vip)] if vip else [])
            holder = Claim("service", name, "name")
            for table, key_of in ((claims.names, self.keys.name_claim), (claims.addresses, self.keys.address_claim)):
                for item, (claim, _) in table.items():
                    if claim is not None and claim.same_holder(holder):
                        deletes.append(self.txn.delete(key_of(net_name, item)))
        ok, _ = await self.client.transaction(
            compare=[self.txn.mod(self.keys.service(name)) == got.mod_revision,
                     self.txn.version(members, _range_end(members)) == 0],  # no task joined meanwhile
            success=deletes,
            failure=[],
        )
        if not ok:
            raise ConflictError(f"service {name!r} changed while removing it (a task joined?); try again")

    async def update_ports(self, name: str, add: Sequence[PortSpec], remove: Sequence[tuple[int, str]]) -> Service:
        """Publish ``add`` and withdraw ``remove`` ((port, protocol)) on a live service, in one transaction."""
        remove = list(dict.fromkeys(remove))  # `--publish-rm 80 --publish-rm 80/tcp` is one port
        for _ in range(MAX_ATTEMPTS):
            got = await self.client.get(self.keys.service(name.lower()))
            if got is None:
                raise NotFoundError(f"service {name!r} does not exist")
            service = Service.from_dict(json.loads(got.value))
            held = {p.key: p for p in service.published}
            missing = [f"{port}/{protocol}" for port, protocol in remove if (port, protocol) not in held]
            if missing:
                published = ", ".join(f"{p.published}/{p.protocol}" for p in service.published) or "none"
                raise NotFoundError(f"service {service.name!r} does not publish {', '.join(missing)} "
                                    f"(it publishes: {published})")
            kept = [p for p in service.ports if p.published is None or p.key not in set(remove)]
            fresh = [p for p in add if p.published is not None]
            if len(fresh) != len(add):
                raise ValidationError("--publish-add needs PUBLISHED:TARGET, e.g. 8080:80")
            for port in fresh:
                if any(p.key == port.key for p in kept):
                    raise ConflictError(f"service {service.name!r} already publishes {port.published}/{port.protocol}; "
                                        f"--publish-rm it in the same command to change it")
            updated = replace(service, ports=(*kept, *fresh))  # validated again (dnsrr, duplicates)
            compares, puts = await self._port_ops(service.name, fresh)
            compares.append(self.txn.mod(self.keys.service(service.name)) == got.mod_revision)
            readded = {p.key for p in fresh}  # a port changed in place keeps its claim
            puts += [self.txn.delete(self.keys.port_claim(protocol, port))
                     for port, protocol in remove if (port, protocol) not in readded]
            puts.append(self.txn.put(self.keys.service(service.name), _encode(updated)))
            ok, _ = await self.client.transaction(compare=compares, success=puts, failure=[])
            if ok:
                return updated
        raise ConflictError(f"could not update service {name!r}: it kept changing; try again")

    # ---- endpoints -------------------------------------------------------------------

    async def register_sandbox(self, request: SandboxRequest, lease: int) -> list[Endpoint]:
        """Write one endpoint per network, claiming names and addresses, bound to ``lease``.

        Re-registering the same container from the same node is allowed and keeps its
        addresses, so an owner can re-assert its endpoints after a lease loss or restart.
        """
        if not request.networks:
            raise ValidationError(f"container {request.container!r} needs at least one --network")
        if len(set(request.networks)) != len(request.networks):
            raise ValidationError("a network is given twice; attach to each network once")
        for name in (request.container, request.hostname, *request.aliases):
            if name and name.lower() in RESERVED_NAMES:
                raise ValidationError(f"name {name!r} is reserved (tasks.<service> lists tasks); pick another")
        service = await self.get_service(request.service) if request.service else None
        for _ in range(MAX_ATTEMPTS):
            endpoints, compares, puts = [], [], []
            for net_name in request.networks:
                network = await self.get_network(net_name)
                compares.append(self.txn.version(self.keys.network(network.name)) > 0)
                previous = await self._endpoint_record(network.name, request.container.lower())
                names = _dns_names(request) + (list(previous.dns_names()) if previous else [])
                addresses = [text for net, text in request.addresses if net.lower() == network.name]
                addresses += [str(a) for a in (previous.ipv4, previous.ipv6) if a] if previous else []
                claims = await self._claims_by_key(network.name, names, addresses)
                endpoint, cursor_puts = await self._plan_endpoint(request, network, claims)
                endpoints.append(endpoint)
                c, p = self._endpoint_ops(endpoint, claims, lease, previous)
                compares += c
                puts += p + cursor_puts
            if service is not None:
                compares.append(self.txn.version(self.keys.service(service.name)) > 0)
            ok, _ = await self.client.transaction(compare=compares, success=puts, failure=[])
            if ok:
                return endpoints
        raise ConflictError(f"could not register {request.container!r}: the registry kept changing; try again")

    async def _plan_endpoint(self, request: SandboxRequest, network: Network,
                             claims: _Claims) -> tuple[Endpoint, list]:
        holder = Claim("container", request.container.lower(), "name", request.node)
        probe = Endpoint(request.container, network.name, network.gateway, request.node,
                         request.hostname, request.aliases, request.service)
        for dns_name in probe.dns_names():
            _refuse_taken_name(claims, dns_name, holder, network.name)
        mine = {a for a, (c, _) in claims.addresses.items() if c is not None and c.same_holder(holder)}
        owners = {ipam.parse_address(a): (c.describe() if c else "an unreadable claim")
                  for a, (c, _) in claims.addresses.items() if a not in mine}
        ipv4, ipv6 = None, None
        for address in sorted(mine):
            parsed = ipam.parse_address(address)
            if parsed.version == 4 and parsed in network.subnet:
                ipv4 = parsed
            elif network.subnet6 is not None and parsed in network.subnet6:
                ipv6 = parsed
        for net_name, text in request.addresses:
            if net_name.lower() != network.name:
                continue
            wanted = ipam.parse_address(text)
            subnet = network.subnet if wanted.version == 4 else network.subnet6
            if subnet is None:
                raise ValidationError(f"network {network.name!r} has no IPv6 subnet; {wanted} cannot be used on it")
            ipam.check_requested(network, subnet, wanted, owners)
            if wanted.version == 4:
                ipv4 = wanted
            else:
                ipv6 = wanted
        cursor_puts: list = []
        if ipv4 is None:
            ipv4, puts = await self._allocate(network, network.subnet, owners)
            cursor_puts += puts
        if network.subnet6 is not None and ipv6 is None:
            ipv6, puts = await self._allocate(network, network.subnet6, owners)
            cursor_puts += puts
        return Endpoint(
            container=request.container, network=network.name, ipv4=ipv4, ipv6=ipv6,
            node=request.node, hostname=request.hostname, aliases=request.aliases,
            service=request.service, netns=request.netns, health=request.health,
        ), cursor_puts

    def _endpoint_ops(self, endpoint: Endpoint, claims: _Claims, lease: int, previous: Endpoint | None = None):
        """Compares and puts that claim the endpoint's names and addresses atomically (and
        its service membership; ``previous``: the record it replaces)."""
        compares, puts = [], []
        node = endpoint.node

        def claim(key: bytes, table: dict, item: str, role: str) -> None:
            value = Claim("container", endpoint.container, role, node).encode()
            _, raw = table.get(item, (None, None))
            compares.append(self.txn.version(key) == 0 if raw is None else self.txn.value(key) == raw)
            puts.append(self.txn.put(key, value, lease=lease))

        roles = {endpoint.container: "name"}
        if endpoint.hostname:
            roles.setdefault(endpoint.hostname, "hostname")
        for alias in endpoint.aliases:
            roles.setdefault(alias, "alias")
        for dns_name, role in roles.items():
            claim(self.keys.name_claim(endpoint.network, dns_name), claims.names, dns_name, role)
        for address in filter(None, (endpoint.ipv4, endpoint.ipv6)):
            claim(self.keys.address_claim(endpoint.network, address), claims.addresses, str(address), "address")
        # Release names or addresses this container held before but no longer wants.
        holder = Claim("container", endpoint.container, "name", node)
        wanted_names, wanted_addresses = set(roles), {str(a) for a in (endpoint.ipv4, endpoint.ipv6) if a}
        for table, wanted, key_of in ((claims.names, wanted_names, self.keys.name_claim),
                                      (claims.addresses, wanted_addresses, self.keys.address_claim)):
            for item, (held, _) in table.items():
                if held is not None and held.same_holder(holder) and item not in wanted:
                    puts.append(self.txn.delete(key_of(endpoint.network, item)))
        puts.append(self.txn.put(self.keys.endpoint(endpoint.network, endpoint.container),
                                 _encode(endpoint), lease=lease))
        if previous is not None and previous.service and previous.service != endpoint.service:
            puts.append(self.txn.delete(self.keys.member(previous.service, endpoint.network, endpoint.container)))
        if endpoint.service:
            puts.append(self.txn.put(self.keys.member(endpoint.service, endpoint.network, endpoint.container),
                                     b"", lease=lease))
        return compares, puts

    async def reassert_sandboxes(self, requests: Sequence[SandboxRequest], lease: int) -> dict[str, str]:
        """Re-write many sandboxes' endpoints and claims under ``lease`` in a few transactions.

        For an owner that got a new lease (or restarted): every request names the addresses
        it already holds. Claims are read by key (never by listing a network, which costs as
        much as the network is big), then written in transactions of at most ``TXN_OPS``
        operations, each guarded by compares on exactly the keys it writes. A sandbox whose
        name or address someone else holds now is left out; a batch that raced another
        writer is retried sandbox by sandbox. Returns {container: error} for those left out.
        """
        failed: dict[str, str] = {}
        plans = []
        for chunk in _chunks(list(requests), TXN_OPS // 8 or 1):
            keys = [key for request in chunk for key in self._sandbox_keys(request)]
            current = await self._read_keys(keys)
            for request in chunk:
                try:
                    plans.append((request, self._reassert_ops(request, current, lease)))
                except ConflictError as exc:
                    failed[request.container] = str(exc)
        batch: list = []
        for plan in plans + [None]:
            if plan is not None and sum(len(p[1][1]) for p in batch) + len(plan[1][1]) <= TXN_OPS \
                    and sum(len(p[1][0]) for p in batch) + len(plan[1][0]) <= TXN_OPS:
                batch.append(plan)
                continue
            if batch:
                compares = [c for _, (cs, _) in batch for c in cs]
                puts = [o for _, (_, ps) in batch for o in ps]
                ok, _ = await self.client.transaction(compare=compares, success=puts, failure=[])
                if not ok:  # someone wrote one of these keys meanwhile: one at a time, with messages
                    for request, _ in batch:
                        try:
                            await self.register_sandbox(request, lease)
                        except (ConflictError, NotFoundError, ValidationError) as exc:
                            failed[request.container] = str(exc)
            batch = [plan] if plan is not None else []
        return failed

    def _sandbox_keys(self, request: SandboxRequest) -> list[bytes]:
        keys = []
        for network in request.networks:
            keys.append(self.keys.network(network))
            keys += [self.keys.name_claim(network, n) for n in _dns_names(request)]
            keys += [self.keys.address_claim(network, a) for net, a in request.addresses if net == network]
        if request.service:
            keys.append(self.keys.service(request.service))
        return keys

    async def _read_keys(self, keys: list[bytes]) -> dict[bytes, bytes | None]:
        found: dict[bytes, bytes | None] = dict.fromkeys(keys)
        unique = list(dict.fromkeys(keys))
        for chunk in _chunks(unique, TXN_OPS):
            _, responses = await self.client.transaction(
                compare=[], success=[self.txn.get(key) for key in chunk], failure=[])
            for key, response in zip(chunk, responses, strict=True):
                found[key] = response[0][0] if response else None
        return found

    def _reassert_ops(self, request: SandboxRequest, current: dict[bytes, bytes | None], lease: int):
        container = request.container.lower()
        holder = Claim("container", container, "name", request.node)
        compares, puts = [], []
        for network in request.networks:
            network_raw = current.get(self.keys.network(network))
            if network_raw is None:
                raise ConflictError(f"network {network!r} no longer exists")
            compares.append(self.txn.version(self.keys.network(network)) > 0)
            roles = {container: "name"}
            if request.hostname:
                roles.setdefault(request.hostname.lower(), "hostname")
            for alias in request.aliases:
                roles.setdefault(alias.lower(), "alias")
            held = [(self.keys.name_claim(network, n), role, f"name {n!r}") for n, role in roles.items()]
            addresses = {}
            for net, text in request.addresses:
                if net == network:
                    address = ipam.parse_address(text)
                    addresses[address.version] = address
                    held.append((self.keys.address_claim(network, address), "address", f"address {address}"))
            if 4 not in addresses:
                raise ConflictError(f"sandbox {container!r} holds no address on {network!r}; register it afresh")
            for key, role, what in held:
                raw = current.get(key)
                claim = Claim.decode(raw) if raw is not None else None
                if raw is not None and (claim is None or not claim.same_holder(holder)):
                    who = claim.describe() if claim else "an unreadable claim"
                    raise ConflictError(f"{what} on network {network!r} is now held by {who}")
                compares.append(self.txn.version(key) == 0 if raw is None else self.txn.value(key) == raw)
                puts.append(self.txn.put(key, Claim("container", container, role, request.node).encode(),
                                         lease=lease))
            endpoint = Endpoint(
                container=container, network=network, ipv4=addresses[4], ipv6=addresses.get(6),
                node=request.node, hostname=request.hostname, aliases=request.aliases,
                service=request.service, netns=request.netns, health=request.health)
            puts.append(self.txn.put(self.keys.endpoint(network, container), _encode(endpoint), lease=lease))
            if request.service:
                puts.append(self.txn.put(self.keys.member(request.service, network, container), b"", lease=lease))
        if request.service:
            if current.get(self.keys.service(request.service)) is None:
                raise ConflictError(f"service {request.service!r} no longer exists")
            compares.append(self.txn.version(self.keys.service(request.service)) > 0)
        return compares, puts

    async def deregister_sandbox(self, container: str, networks: Iterable[str], node: str) -> None:
        """Delete the container's endpoints and every claim it holds on ``networks``."""
        container = container.lower()
        holder = Claim("container", container, "name", node)
        compares, deletes = [], []
        for net_name in networks:
            record = await self._endpoint_record(net_name, container)
            names = list(record.dns_names()) if record else [container]
            addresses = [str(a) for a in (record.ipv4, record.ipv6) if a] if record else []
            claims = await self._claims_by_key(net_name, [n.lower() for n in names], addresses)
            for table, key_of in ((claims.names, self.keys.name_claim), (claims.addresses, self.keys.address_claim)):
                for item, (held, raw) in table.items():
                    if held is not None and held.same_holder(holder):
                        compares.append(self.txn.value(key_of(net_name, item)) == raw)
                        deletes.append(self.txn.delete(key_of(net_name, item)))
            deletes.append(self.txn.delete(self.keys.endpoint(net_name, container)))
            if record is not None and record.service:
                deletes.append(self.txn.delete(self.keys.member(record.service, net_name, container)))
        for _ in range(MAX_ATTEMPTS):
            ok, _ = await self.client.transaction(compare=compares, success=deletes, failure=[])
            if ok:
                return
        raise ConflictError(f"could not remove the endpoints of {container!r}: the registry kept changing")

    # ---- nodes -----------------------------------------------------------------------

    async def register_node(self, node: Node, lease: int) -> None:
        """The node's record (kept after it dies, so it shows as down) and its leased heartbeat."""
        await self.client.transaction(compare=[], success=[
            self.txn.put(self.keys.node(node.name), _encode(node)),
            self.txn.put(self.keys.alive(node.name), str(lease).encode(), lease=lease)], failure=[])

    async def get_node(self, name: str) -> Node | None:
        got = await self.client.get(self.keys.node(name))
        if got is None:
            return None
        try:
            return Node.from_dict(json.loads(got.value))
        except (ValueError, ValidationError) as exc:
            log.warning("skipping bad node record node=%s error=%s", name, exc)
            return None

    async def set_node_addresses(self, name: str, addresses: Iterable[tuple[str, IPv4Address]]) -> Node:
        """Rewrite the node record with ``addresses`` (its own address per overlay network)."""
        for _ in range(MAX_ATTEMPTS):
            got = await self.client.get(self.keys.node(name))
            if got is None:
                raise NotFoundError(f"node {name!r} is not registered")
            node = replace(Node.from_dict(json.loads(got.value)), addresses=tuple(addresses))
            ok, _ = await self.client.transaction(
                compare=[self.txn.mod(self.keys.node(name)) == got.mod_revision],
                success=[self.txn.put(self.keys.node(name), _encode(node))], failure=[])
            if ok:
                return node
        raise ConflictError(f"node {name!r} kept changing; try again")

    async def list_nodes(self) -> list[tuple[Node, bool]]:
        """Every node with whether its agent is alive (holds its lease)."""
        _, values = await self._json_values(self.keys.kind_prefix("nodes"))
        alive = {kv.key.decode().rsplit("/", 1)[-1]
                 for kv in await self.client.get_prefix(self.keys.kind_prefix("alive"))}
        return [(node, node.name in alive) for node in _decode_all(Node, values)]

    async def claim_node_address(self, node: str, network_name: str) -> IPv4Address:
        """This node's own address on an overlay network (kept, like the node record): the
        one it already holds, else the lowest free one, claimed in a transaction."""
        holder = Claim("node", node, "address")
        for _ in range(MAX_ATTEMPTS):
            network = await self.get_network(network_name)
            claims = await self._read_claims(network.name)
            for address, (claim, _) in claims.addresses.items():
                parsed = ipam.parse_address(address)
                if claim is not None and claim.same_holder(holder) and parsed.version == 4:
                    return parsed
            address = ipam.first_free(network, network.subnet, {ipam.parse_address(a) for a in claims.addresses})
            key = self.keys.address_claim(network.name, address)
            ok, _ = await self.client.transaction(
                compare=[self.txn.version(key) == 0, self.txn.version(self.keys.network(network.name)) > 0],
                success=[self.txn.put(key, holder.encode())], failure=[])
            if ok:
                return address
        raise ConflictError(f"could not claim an address for node {node!r} on {network_name!r}: try again")

    async def remove_node(self, name: str) -> None:
        if await self.client.get(self.keys.alive(name)) is not None:
            raise ConflictError(f"node {name!r} is alive; stop its agent first")
        deletes = [self.txn.delete(self.keys.node(name))]
        _, networks = await self.list_networks()
        holder = Claim("node", name, "address")
        for network in networks:
            for address, (claim, _) in (await self._read_claims(network.name)).addresses.items():
                if claim is not None and claim.same_holder(holder):
                    deletes.append(self.txn.delete(self.keys.address_claim(network.name, address)))
        await self.client.transaction(compare=[], success=deletes, failure=[])


def _free_vni(networks: Iterable[Network]) -> int:
    taken = {n.vni for n in networks if n.vni is not None}
    vni = VNI_FIRST
    while vni in taken:
        vni += 1
    if vni > VNI_LAST:
        raise ExhaustedError("every VXLAN network identifier is taken; remove an overlay network")
    return vni


def _refuse_taken_name(claims: _Claims, dns_name: str, holder: Claim, network: str) -> None:
    held = claims.names.get(dns_name)
    if held is None:
        return
    claim, _ = held
    if claim is not None and claim.same_holder(holder):
        return
    who = claim.describe() if claim else "an unreadable claim"
    raise ConflictError(
        f"name {dns_name!r} on network {network!r} is already used by {who}; choose another name or alias"
    )


def _dns_names(request: SandboxRequest) -> list[str]:
    names = [request.container.lower()]
    for name in (request.hostname, *request.aliases):
        if name and name.lower() not in names:
            names.append(name.lower())
    return names


def _chunks(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def _encode(value: Network | Service | Endpoint | Node) -> bytes:
    return json.dumps(value.to_dict(), sort_keys=True).encode()


def _range_end(prefix: bytes) -> bytes:
    return aetcd.utils.prefix_range_end(prefix)


def _decode_all(cls, values: Sequence[tuple[bytes, dict]]) -> list:
    decoded = []
    for key, data in values:
        try:
            decoded.append(cls.from_dict(data))
        except ValidationError as exc:
            log.warning("skipping bad %s key=%s error=%s", cls.__name__, key.decode(errors="replace"), exc)
    return decoded
