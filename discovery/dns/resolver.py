"""The 127.0.0.11 resolver: sockets inside each sandbox's netns, one event loop for all.

A :class:`Scope` is one sandbox as the resolver sees it: the networks it is attached to (in
attach order), whether it may forward, its in-flight forward count, and its reply caches.
Sockets are opened on a worker thread that has entered the sandbox's netns; a socket stays
in the netns it was made in, so one process serves every sandbox, and which sandbox asked
is known from the socket the query came in on.

Hot path (UDP): look the query up, minus its two ID octets, in the scope's reply cache; on
a hit send ID + cached bytes. That cache (``cache.py``) is filled by the slow path (parse,
look the normalized question up, else look up in the View's records and pack); a View
change drops only the entries of the names it touched, so a query never waits on etcd and
answers follow the registry within one View update. Forwarding runs as a task per
query, bounded per sandbox.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import struct
import time
from collections import Counter as Tally
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from discovery import defaults
from discovery.errors import ConflictError, SvcnetError
from discovery.host.netns import entered_netns
from discovery.metrics import Metrics
from discovery.state.view import View

from . import records as records_mod
from . import wire as w
from .answers import INTERNAL_ZONE, PROBE_NAME, PROBE_TEXT, Answers, Entry, Ttls, error_entry, pack
from .cache import Budget, ForwardedEntry, ReplyCache, forwarded_entry, with_question
from .forward import Forwarder, Upstream, truncated

log = logging.getLogger(__name__)

INTERNAL_SUFFIX = "." + INTERNAL_ZONE
LISTEN_ADDRESS = "127.0.0.11"
LISTEN_PORT = 53
TCP_MAX = 65535
# Replies queued for one TCP client beyond what its socket took. asyncio's transport buffers
# whatever is written without limit, so a client that pipelines queries but never reads its
# replies would grow it (and this process) for ever; past this it is closed as a slow reader.
# Well above the transport's pause threshold (64 KiB), so a client that reads, slowly, is
# only held back (we stop reading its queries), and a burst of replies to one read fits.
TCP_WRITE_BUFFER_LIMIT = 256 * 1024


@dataclass(frozen=True)
class ResolverConfig:
    upstreams: tuple[Upstream, ...] = ()
    upstream_timeout: float = defaults.UPSTREAM_TIMEOUT
    max_inflight: int = defaults.MAX_INFLIGHT  # forwards in flight per sandbox, then REFUSED
    tcp_idle_timeout: float = defaults.TCP_IDLE_TIMEOUT
    max_tcp_clients: int = defaults.MAX_TCP_CLIENTS  # per sandbox
    ttls: Ttls = field(default_factory=Ttls)
    cache_bytes: int = defaults.DNS_CACHE_BYTES  # every sandbox's reply caches together


class Scope:
    """One sandbox's view of DNS."""

    __slots__ = ("name", "netns", "attached", "forward", "inflight", "tcp_clients", "udp_cache", "tcp_cache",
                 "generation")

    def __init__(self, name: str, netns: str, attached: Iterable[str], budget: Budget | None = None) -> None:
        self.name = name
        self.netns = netns
        self.attached = tuple(attached)
        self.forward = True
        self.inflight = 0
        self.tcp_clients = 0
        budget = budget if budget is not None else Budget(defaults.DNS_CACHE_BYTES)
        self.udp_cache = ReplyCache(budget)
        self.tcp_cache = ReplyCache(budget)
        self.generation = 0  # bumped whenever its answers or attachments may have changed


class Resolver:
    """Answers queries for any number of scopes from the current View."""

    def __init__(self, config: ResolverConfig, metrics: Metrics) -> None:
        self.config = config
        self.answers = Answers(records_mod.build(View()), config.ttls)
        self.view = View()
        self.view_updated = time.monotonic()
        self.scopes: set[Scope] = set()
        self.forwarder = Forwarder(list(config.upstreams), config.upstream_timeout, metrics)
        self._tasks: set[asyncio.Task] = set()
        self._folded: Tally = Tally()  # (qtype, rcode, truncated) -> hits of dropped cache entries
        self.budget = Budget(config.cache_bytes, on_evict=self._fold)
        self.queries = metrics.counter("svcnet_dns_queries_total", "Queries answered, by type, rcode and source.",
                                       ("qtype", "rcode", "source"))
        self.truncations = metrics.counter("svcnet_dns_truncated_total",
                                           "UDP replies sent with TC set (client should retry over TCP).", ("source",))
        self.malformed = metrics.counter("svcnet_dns_malformed_total", "Malformed packets, by what was done.",
                                         ("action",))
        self.refused_inflight = metrics.counter("svcnet_dns_forward_limit_refused_total",
                                                "Queries REFUSED because a sandbox had too many forwards in flight.")
        self.tcp_timeouts = metrics.counter("svcnet_dns_tcp_idle_timeouts_total",
                                            "TCP clients closed for sending nothing in time.")
        self.tcp_slow_readers = metrics.counter("svcnet_dns_tcp_slow_readers_closed_total",
                                                "TCP clients closed for not reading their replies.")
        metrics.gauge("svcnet_view_revision", "etcd revision of the View answers are built from.",
                      lambda: self.view.revision)
        metrics.gauge("svcnet_view_age_seconds", "Seconds since the View last changed.",
                      lambda: time.monotonic() - self.view_updated)
        metrics.gauge("svcnet_dns_sandboxes", "Sandboxes this process answers for.", lambda: len(self.scopes))
        metrics.gauge("svcnet_dns_forwards_in_flight", "Forwarded queries waiting for an upstream.",
                      lambda: sum(s.inflight for s in self.scopes))
        metrics.gauge("svcnet_dns_cache_bytes", "Bytes held by the reply caches of every sandbox.",
                      lambda: self.budget.used)
        metrics.gauge("svcnet_dns_cache_budget_bytes", "The reply caches' memory budget (--dns-cache-mb).",
                      lambda: self.budget.limit)
        metrics.gauge("svcnet_dns_cache_entries", "Replies memoized, over every sandbox.", lambda: self.budget.entries)
        self.cache_evictions = metrics.counter("svcnet_dns_cache_evictions_total",
                                               "Memoized replies evicted to stay within the budget.")
        self.cache_invalidations = metrics.counter("svcnet_dns_cache_invalidations_total",
                                                   "Memoized replies dropped because their name changed.")
        metrics.on_collect(self._collect)
        if not self.forwarder.upstreams:
            log.warning("no upstream resolvers: names that are not local get SERVFAIL; pass --upstream")

    # ---- state --------------------------------------------------------------------------

    def scope(self, name: str, netns: str, attached: Iterable[str]) -> Scope:
        """A new scope whose caches count against this resolver's budget."""
        return Scope(name, netns, attached, self.budget)

    def update(self, view: View) -> None:
        """Update the answer tables for a new View; forget only the replies it changed."""
        started = time.perf_counter()
        records = records_mod.build(view, self.answers.records)
        self.answers = Answers(records, self.config.ttls)
        self.view = view
        self.view_updated = time.monotonic()
        for scope in self.scopes:
            self._refresh(scope, records.changes)
        log.debug("answers updated revision=%s took_ms=%.2f", view.revision, (time.perf_counter() - started) * 1000)

    def add_scope(self, scope: Scope) -> None:
        self._refresh(scope)
        self.scopes.add(scope)

    def remove_scope(self, scope: Scope) -> None:
        self.scopes.discard(scope)
        self._fold(scope.udp_cache.clear())
        self._fold(scope.tcp_cache.clear())

    def set_attached(self, scope: Scope, attached: Iterable[str]) -> None:
        scope.attached = tuple(attached)
        self._refresh(scope)

    def _refresh(self, scope: Scope, changes: Mapping[str, frozenset[str] | None] | None = None) -> None:
        """``changes``: per network, the names and pointers that changed (None: all of them);
        without it, every reply of the scope goes."""
        scope.generation += 1
        networks = self.view.networks
        known = [networks[n] for n in scope.attached if n in networks]
        # a sandbox only on --internal networks never reaches outside, not even by DNS
        forward = not known or any(not n.internal for n in known)
        touched = [changes[n] for n in scope.attached if n in changes] if changes is not None else [None]
        if forward != scope.forward or any(names is None for names in touched):
            scope.forward = forward
            self._fold(scope.udp_cache.clear())
            self._fold(scope.tcp_cache.clear())
            return
        tags = set().union(*touched) if touched else set()
        if tags:
            for cache in (scope.udp_cache, scope.tcp_cache):
                dropped = cache.drop(tags)
                self.cache_invalidations.inc(amount=len(dropped))
                self._fold(dropped)

    def _fold(self, entries: Iterable[Entry]) -> None:
        seen = set()
        for entry in entries:
            if isinstance(entry, ForwardedEntry):
                continue  # counted when served
            if id(entry) not in seen:  # one entry may sit under a raw and a normalized key
                seen.add(id(entry))
                self._folded[(entry.qtype, entry.rcode, entry.truncated)] += entry.hits

    def _collect(self) -> None:
        totals = Tally(self._folded)
        self.cache_evictions.values[()] = self.budget.evicted
        for scope in self.scopes:
            for cache in (scope.udp_cache, scope.tcp_cache):
                for entry in {id(e): e for e in cache.entries() if not isinstance(e, ForwardedEntry)}.values():
                    totals[(entry.qtype, entry.rcode, entry.truncated)] += entry.hits
        truncated_hits = 0
        local = {}
        for (qtype, rcode, was_truncated), hits in totals.items():
            key = (w.type_name(qtype), w.rcode_name(rcode), "local")
            local[key] = local.get(key, 0) + hits
            if was_truncated:
                truncated_hits += hits
        for key, hits in local.items():
            self.queries.values[key] = hits
        self.truncations.values[("local",)] = truncated_hits

    # ---- queries ------------------------------------------------------------------------

    def slow_path(self, data: bytes, scope: Scope, udp: bool, send: Callable[[bytes], None]) -> None:
        """Everything the cache could not answer: parse, look up, pack, memoize or forward."""
        try:
            query = w.parse_query(data)
        except w.Malformed as exc:
            self.malformed.inc("formerr" if exc.reply is not None else "dropped")
            log.debug("malformed query sandbox=%s reason=%s", scope.name, exc.reason.replace(" ", "_"))
            if exc.reply is not None:
                send(exc.reply)
            return
        cache = scope.udp_cache if udp else scope.tcp_cache
        limit = query.udp_limit() if udp else TCP_MAX
        normal = (b".".join(label.lower() for label in query.labels), query.qtype, query.qclass, query.rd,
                  query.dnssec_ok, query.edns_size is not None, limit)
        tag = _tag(query, scope.attached)
        known = cache.normal.get(normal)
        if isinstance(known, ForwardedEntry):
            now = time.monotonic()
            if known.fresh(now):
                self._send_forwarded(known.reply_now(data[:2], query.question, now), query, udp, send, "cache")
                return
            cache.remove(normal)
            known = None
        if known is not None:  # the same question in another case, ID or EDNS options
            copy = with_question(known, query.question)
            copy.hits = 1
            cache.put(data[2:], copy, tag)
            send(copy.reply(data[:2]))
            return
        local = self.answers.lookup(scope.attached, query)
        if local is None and not scope.forward:
            local_entry = error_entry(query, w.REFUSED)
        elif local is not None:
            local_entry = pack(query, local, limit)
        else:
            self._forward(data, query, scope, udp, send, (normal, tag, scope.generation))
            return
        local_entry.hits = 1
        cache.put(normal, local_entry, tag)
        cache.put(data[2:], local_entry, tag)
        send(local_entry.reply(data[:2]))

    def _forward(self, data: bytes, query: w.Query, scope: Scope, udp: bool, send: Callable[[bytes], None],
                 cache_as: tuple[tuple, str, int]) -> None:
        """``cache_as``: the normalized question, its tag, and the scope's generation when the
        registry had no answer."""
        if scope.inflight >= self.config.max_inflight:
            self.refused_inflight.inc()
            self.queries.inc(w.type_name(query.qtype), "REFUSED", "forwarded")
            send(error_entry(query, w.REFUSED).reply(data[:2]))
            return
        scope.inflight += 1
        task = asyncio.ensure_future(self._forward_one(data, query, scope, udp, send, cache_as))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _forward_one(self, data: bytes, query: w.Query, scope: Scope, udp: bool,
                           send: Callable[[bytes], None], cache_as: tuple[tuple, str, int]) -> None:
        try:
            reply = await self.forwarder.forward(data, query.question)
        finally:
            scope.inflight -= 1
        if scope.generation != cache_as[2] and scope in self.scopes and (
                self.answers.lookup(scope.attached, query) is not None or not scope.forward):
            # the name came to exist (or the sandbox lost its way out) while the query was
            # upstream: the change found nothing to drop, so caching the reply would hide the
            # name for the upstream's TTL (a negative one: up to its SOA minimum)
            self.slow_path(data, scope, udp, send)
            return
        if reply is None:
            reply = error_entry(query, w.SERVFAIL).reply(data[:2])
        elif scope in self.scopes:  # names that do not exist cost nothing the second time either
            entry = forwarded_entry(reply, query.qtype, time.monotonic())
            if entry is not None:
                (scope.udp_cache if udp else scope.tcp_cache).put(cache_as[0], entry, cache_as[1])
        self._send_forwarded(reply, query, udp, send, "forwarded")

    def _send_forwarded(self, reply: bytes, query: w.Query, udp: bool, send: Callable[[bytes], None],
                        source: str) -> None:
        if udp and len(reply) > max(w.MAX_UDP_PLAIN, query.edns_size or 0):
            reply = truncated(reply, query.question)
            self.truncations.inc(source)
        self.queries.inc(w.type_name(query.qtype), w.rcode_name(reply[3] & 0x0F), source)
        send(reply)


def _tag(query: w.Query, attached: tuple[str, ...]) -> str:
    """The name a query is looked up under in the network tables (what a change names):
    ``web``, ``tasks.web``, a reverse name; ``<name>.<network>``, ``<name>.svcnet.internal``
    and an SRV's ``_<port>._<proto>.<svc>`` reduced to it."""
    name = query.name or ""
    if name.endswith(INTERNAL_SUFFIX):
        name = name[: -len(INTERNAL_SUFFIX)]
    if name.startswith("_") and name.count(".") >= 2:
        name = name.split(".", 2)[2]
    head, _, last = name.rpartition(".")
    return head if head and last in attached else name


# ---- transports ---------------------------------------------------------------------------

class UdpServer(asyncio.DatagramProtocol):
    def __init__(self, resolver: Resolver, scope: Scope) -> None:
        self.resolver = resolver
        self.scope = scope
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        entry = self.scope.udp_cache.raw.get(data[2:])
        if entry is not None:
            entry.hits += 1
            static = entry.static
            self.transport.sendto(data[:2] + static if static is not None else entry.reply(data[:2]), addr)
            return
        self.resolver.slow_path(data, self.scope, True, lambda reply: self._send(reply, addr))

    def _send(self, reply: bytes, addr) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.sendto(reply, addr)

    def error_received(self, exc: Exception) -> None:
        log.debug("udp socket error sandbox=%s error=%r", self.scope.name, exc)


class TcpConnection(asyncio.Protocol):
    """RFC 7766: length-prefixed messages, several per connection, replies in any order.

    The idle timer starts at connect and restarts only on a whole message or a reply sent,
    so a client that sends nothing, or half a length prefix, is closed without holding up
    anyone else.

    Flow control: while the transport says its write buffer is full (``pause_writing``) we
    stop reading the client's queries. A client that does not read its replies is closed
    (aborted: a close would wait for a flush that never comes) when the buffer passes
    :data:`TCP_WRITE_BUFFER_LIMIT`, or when the idle timer runs out while still paused.
    """

    def __init__(self, resolver: Resolver, scope: Scope, connections: set | None = None) -> None:
        self.resolver = resolver
        self.scope = scope
        self.connections = connections if connections is not None else set()
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.active = 0.0  # loop time of the last whole message or reply
        self.counted = False
        self.writing_paused = False

    def connection_made(self, transport) -> None:
        self.transport = transport
        if self.scope.tcp_clients >= self.resolver.config.max_tcp_clients:
            log.warning("too many tcp clients, closing sandbox=%s limit=%d",
                        self.scope.name, self.resolver.config.max_tcp_clients)
            transport.close()
            return
        self.scope.tcp_clients += 1
        self.counted = True
        self.connections.add(self)
        self._arm()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def _arm(self) -> None:
        # One timer per connection, moved on when it fires: a new timer per message would
        # make a pipelined burst allocate (and the loop sift) thousands of handles per read.
        loop = asyncio.get_running_loop()
        self.active = loop.time()
        if self.timer is None:
            self.timer = loop.call_at(self.active + self.resolver.config.tcp_idle_timeout, self._idle)

    def _idle(self) -> None:
        self.timer = None
        if self.transport is None:
            return
        due = self.active + self.resolver.config.tcp_idle_timeout
        if asyncio.get_running_loop().time() < due:
            self.timer = asyncio.get_running_loop().call_at(due, self._idle)
            return
        if self.writing_paused:  # replies, not queries, are what it has not taken in time
            self._drop_slow_reader()
            return
        self.resolver.tcp_timeouts.inc()
        self.transport.close()

    def _drop_slow_reader(self) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        self.resolver.tcp_slow_readers.inc()
        log.warning("tcp client does not read its replies, closing sandbox=%s buffered=%d",
                    self.scope.name, self.transport.get_write_buffer_size())
        self.transport.abort()

    def pause_writing(self) -> None:
        self.writing_paused = True
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.writing_paused = False
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while len(self.buffer) >= 2 and self.transport is not None and not self.transport.is_closing():
            length = (self.buffer[0] << 8) | self.buffer[1]
            if len(self.buffer) < 2 + length:
                break
            message = bytes(self.buffer[2:2 + length])
            del self.buffer[:2 + length]
            self._arm()
            entry = self.scope.tcp_cache.raw.get(message[2:])
            if entry is not None:
                entry.hits += 1
                self._send(entry.reply(message[:2]))
            else:
                self.resolver.slow_path(message, self.scope, False, self._send)

    def _send(self, reply: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(struct.pack("!H", len(reply)) + reply)
            if self.transport.get_write_buffer_size() > TCP_WRITE_BUFFER_LIMIT:
                self._drop_slow_reader()
                return
            self._arm()

    def connection_lost(self, exc) -> None:
        if self.timer is not None:
            self.timer.cancel()
        if self.counted:
            self.scope.tcp_clients -= 1
            self.counted = False
        self.connections.discard(self)
        self.transport = None


# ---- sockets inside a netns ----------------------------------------------------------------

def open_sockets(netns: str) -> tuple[socket.socket, socket.socket]:
    """UDP and TCP sockets bound to 127.0.0.11:53 inside ``netns`` (runs on a worker thread)."""
    with entered_netns(netns):
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        for sock in (udp, tcp):
            sock.setblocking(False)
            sock.bind((LISTEN_ADDRESS, LISTEN_PORT))
        tcp.listen(128)
    except OSError as exc:
        udp.close()
        tcp.close()
        if exc.errno == errno.EADDRINUSE:
            raise ConflictError(f"{LISTEN_ADDRESS}:{LISTEN_PORT} is already in use in netns {netns}: another "
                                f"resolver (a second svcnet sidecar, or dnsmasq) serves this sandbox; stop it first") \
                from None
        if exc.errno == errno.EADDRNOTAVAIL:
            raise SvcnetError(f"cannot bind {LISTEN_ADDRESS} in netns {netns}: its loopback is down; "
                              f"run 'ip -n <netns> link set lo up'") from None
        raise
    return udp, tcp


def probe_query(query_id: bytes = b"\x53\x4e") -> bytes:
    return query_id + b"\x01\x00" + struct.pack("!HHHH", 1, 0, 0, 0) + w.encode_name(PROBE_NAME) + struct.pack(
        "!HH", w.TXT, w.CLASS_IN)


def probe(netns: str, timeout: float = 1.0) -> bool:
    """Does *svcnet* answer 127.0.0.11:53 in ``netns``? (blocking; run on a worker thread)

    Docker's embedded DNS DNATs 127.0.0.11:53 to its own port in containers on user-defined
    networks; then our bound socket never sees a query, and this returns False.
    """
    with entered_netns(netns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with sock:
        sock.settimeout(timeout)
        try:
            sock.sendto(probe_query(), (LISTEN_ADDRESS, LISTEN_PORT))
            reply = sock.recv(4096)
        except OSError:
            return False
    return reply[:2] == b"\x53\x4e" and (reply[3] & 0x0F) == w.NOERROR and PROBE_TEXT.encode() in reply[12:]


DNAT_HINT = ("something else answers 127.0.0.11:53 in this netns, most likely Docker's embedded DNS (its NAT "
             "chain DOCKER_OUTPUT or nft table 'ip docker-dns' redirects the port); run the container with "
             "'--network none' and let svcnet attach it, or delete those rules")


class SandboxServer:
    """The UDP and TCP listeners of one scope."""

    def __init__(self, resolver: Resolver, scope: Scope) -> None:
        self.resolver = resolver
        self.scope = scope
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._connections: set[TcpConnection] = set()

    async def start(self) -> None:
        udp, tcp = await asyncio.to_thread(open_sockets, self.scope.netns)
        loop = asyncio.get_running_loop()
        try:
            self._udp, _ = await loop.create_datagram_endpoint(lambda: UdpServer(self.resolver, self.scope), sock=udp)
            self._tcp = await loop.create_server(
                lambda: TcpConnection(self.resolver, self.scope, self._connections), sock=tcp)
        except BaseException:
            udp.close()
            tcp.close()
            raise
        self.resolver.add_scope(self.scope)

    async def check(self) -> bool:
        return await asyncio.to_thread(probe, self.scope.netns)

    async def close(self) -> None:
        self.resolver.remove_scope(self.scope)
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()
            for connection in list(self._connections):  # wait_closed() would wait for them (3.12+)
                connection.close()
            await self._tcp.wait_closed()
