"""The resolver's reply cache: one entry per question as DNS means it, dropped per changed
name, bounded by one memory budget; forwarded and negative answers kept for their TTLs. Driven through ``Resolver.slow_path`` and the cache
the UDP hot path reads (no sockets: the wire bytes are the whole interface)."""

from __future__ import annotations

import asyncio
import ipaddress
import json

from dnslib import EDNS0, DNSRecord, EDNSOption

from discovery.dns.cache import ForwardedEntry
from discovery.dns.forward import Upstream
from discovery.dns.resolver import Resolver, ResolverConfig
from discovery.metrics import Metrics
from discovery.state.keys import KeyLayout
from discovery.state.model import Endpoint, Network, Service
from discovery.state.view import Change, View
from tests.dnsupstream import TestUpstream

KEYS = KeyLayout("/t")
FRONT = Network.create("front", "10.1.0.0/24", internal=True)  # nothing is forwarded: unknown names are REFUSED
ip = ipaddress.ip_address


def _put(key: bytes, obj) -> Change:
    return Change(key, json.dumps(obj.to_dict()).encode())


def _view() -> View:
    return View().apply([
        _put(KEYS.network("front"), FRONT),
        _put(KEYS.service("web"), Service("web", ("front",), vips={"front": ip("10.1.0.2")})),
        _put(KEYS.endpoint("front", "db"), Endpoint("db", "front", ip("10.1.0.3"), "n1")),
    ], 1, KEYS)


def _query(name: str, query_id: int, cookie: bytes | None = None) -> bytes:
    question = DNSRecord.question(name, "A")
    question.header.id = query_id
    if cookie is not None:
        question.add_ar(EDNS0(udp_len=1232, opts=[EDNSOption(10, cookie)]))
    return bytes(question.pack())


class Harness:
    def __init__(self, cache_bytes: int = 1 << 20) -> None:
        self.metrics = Metrics()
        self.resolver = Resolver(ResolverConfig(cache_bytes=cache_bytes), self.metrics)
        self.view = _view()
        self.resolver.update(self.view)
        self.scope = self.resolver.scope("client", "/nonexistent", ["front"])
        self.resolver.add_scope(self.scope)
        assert not self.scope.forward

    def ask(self, data: bytes) -> DNSRecord:
        """As the UDP server does: the raw-key hot path first, else the slow path."""
        entry = self.scope.udp_cache.raw.get(data[2:])
        if entry is not None:
            entry.hits += 1
            return DNSRecord.parse(entry.reply(data[:2]))
        sent: list[bytes] = []
        self.resolver.slow_path(data, self.scope, True, sent.append)
        assert len(sent) == 1
        return DNSRecord.parse(sent[0])

    def change(self, *changes: Change) -> None:
        self.view = self.view.apply(list(changes), self.view.revision + 1, KEYS)
        self.resolver.update(self.view)


def test_queries_differing_in_id_case_and_cookie_share_one_entry_and_echo_their_case():
    world = Harness()
    first = world.ask(_query("web", 1))
    assert [str(r.rdata) for r in first.rr] == ["10.1.0.2"]
    assert len(world.scope.udp_cache.normal) == 1
    spellings = ((2, "WeB", None), (3, "wEb", b"\x01" * 8), (4, "web", b"\x02" * 8), (5, "WEB", b"\x03" * 8))
    for query_id, name, cookie in spellings:
        reply = world.ask(_query(name, query_id, cookie))
        assert reply.header.id == query_id
        assert str(reply.q.qname) == f"{name}.", "the question comes back in the case it was asked"
        assert [str(r.rdata) for r in reply.rr] == ["10.1.0.2"]
        assert str(reply.rr[0].rname).lower() == "web."
    # with EDNS the reply differs (an OPT record, a larger size): one entry for all the
    # queries without, one for all those with, whatever their case, ID or client cookie
    assert len(world.scope.udp_cache.normal) == 2, list(world.scope.udp_cache.normal)
    again = world.ask(_query("WeB", 9))
    assert str(again.q.qname) == "WeB." and again.header.id == 9  # now from the raw-key hot path


def test_a_change_drops_only_the_entries_of_the_names_it_touched():
    world = Harness()
    world.ask(_query("web", 1))
    world.ask(_query("DB", 2))
    world.ask(_query("nothing-here", 3))
    db_entries = {id(e) for k, e in world.scope.udp_cache.normal.items() if k[0] == b"db"}
    assert db_entries
    world.change(_put(KEYS.service("web"), Service("web", ("front",), aliases=("www",),
                                                  vips={"front": ip("10.1.0.2")})))
    names = {key[0] for key in world.scope.udp_cache.normal}
    assert b"web" not in names, "web changed: its entries went"
    assert b"db" in names and b"nothing-here" in names, "the others stay"
    assert {id(e) for k, e in world.scope.udp_cache.normal.items() if k[0] == b"db"} == db_entries
    assert [str(r.rdata) for r in world.ask(_query("www", 4)).rr] == ["10.1.0.2"]
    # a name that was unknown and now exists: its negative entry goes with the change
    world.change(_put(KEYS.endpoint("front", "nothing-here"), Endpoint("nothing-here", "front", ip("10.1.0.9"), "n1")))
    assert [str(r.rdata) for r in world.ask(_query("nothing-here", 5)).rr] == ["10.1.0.9"]
    assert b"db" in {key[0] for key in world.scope.udp_cache.normal}


def test_a_cache_filled_past_its_budget_stays_within_it():
    budget = 64 * 1024
    world = Harness(cache_bytes=budget)
    for index in range(3000):
        world.ask(_query(f"name-{index}.example", index & 0xFFFF))
        assert world.resolver.budget.used <= budget
    assert world.resolver.budget.evicted > 0
    assert 0 < world.resolver.budget.entries < 3000
    text = world.metrics.render()
    asked = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                if line.startswith("svcnet_dns_queries_total{") and 'source="local"' in line)
    assert asked == 3000, "every answer counted once, evicted or not (a counter never goes back)"
    assert f"svcnet_dns_cache_budget_bytes {budget}" in text
    assert "svcnet_dns_cache_evictions_total 0" not in text
    # what stays still answers right
    assert [str(r.rdata) for r in world.ask(_query("web", 1)).rr] == ["10.1.0.2"]


def test_forwarded_answers_and_negatives_are_kept_for_their_ttl_counted_down():
    """An upstream on loopback (tests/dnsupstream.py): an answer with TTL 2, an NXDOMAIN
    whose SOA says 3 s with MINIMUM 1 (RFC 2308: the lower, 1 s)."""
    upstream = TestUpstream({"far.example": "198.51.100.7"}, ttl=2, negative_soa=(3, 1))
    resolver = Resolver(ResolverConfig(upstreams=(Upstream.parse(upstream.address),)), Metrics())
    view = View().apply([_put(KEYS.network("open"), Network.create("open", "10.2.0.0/24"))], 1, KEYS)
    resolver.update(view)
    scope = resolver.scope("client", "/nonexistent", ["open"])
    resolver.add_scope(scope)
    assert scope.forward

    async def ask(name: str, query_id: int) -> DNSRecord:
        sent: list[bytes] = []
        resolver.slow_path(_query(name, query_id), scope, True, sent.append)
        for _ in range(200):
            if sent:
                return DNSRecord.parse(sent[0])
            await asyncio.sleep(0.01)
        raise AssertionError(f"no reply to {name}")

    async def scenario() -> None:
        first = await ask("far.example", 1)
        assert [(str(r.rdata), r.ttl) for r in first.rr] == [("198.51.100.7", 2)]
        assert upstream.names_seen() == ["far.example"]
        await asyncio.sleep(1.05)
        cached = await ask("FAR.example", 2)
        assert upstream.names_seen() == ["far.example"], "answered from the cache"
        assert str(cached.q.qname) == "FAR.example." and cached.header.id == 2
        assert [(str(r.rdata), r.ttl) for r in cached.rr] == [("198.51.100.7", 1)], "the TTL counts down"
        await asyncio.sleep(1.0)
        await ask("far.example", 3)
        assert upstream.names_seen() == ["far.example"] * 2, "expired after 2 s: asked again"
        missing = await ask("nope.example", 4)
        assert missing.header.rcode == 3
        await ask("Nope.Example", 5)
        assert upstream.names_seen().count("nope.example") == 1, "a name that does not exist costs nothing twice"
        await asyncio.sleep(1.05)
        await ask("nope.example", 6)
        assert upstream.names_seen().count("nope.example") == 2, "negative answers live min(SOA TTL, MINIMUM)"

    try:
        asyncio.run(scenario())
    finally:
        upstream.close()


def test_a_name_that_comes_to_exist_while_its_query_is_upstream_is_answered_from_the_registry():
    """The change lands while the forward is in flight: it finds no reply to drop, and the
    upstream's reply, cached, would hide the new name for its TTL (the scale bench once
    waited 60 s, a negative TTL, for a service it had just created)."""
    upstream = TestUpstream(slow_delay=0.3)  # answers slow.* with 198.51.100.200 after 0.3 s
    resolver = Resolver(ResolverConfig(upstreams=(Upstream.parse(upstream.address),)), Metrics())
    view = View().apply([_put(KEYS.network("open"), Network.create("open", "10.2.0.0/24"))], 1, KEYS)
    resolver.update(view)
    scope = resolver.scope("client", "/nonexistent", ["open"])
    resolver.add_scope(scope)

    async def ask(query_id: int) -> DNSRecord:
        sent: list[bytes] = []
        resolver.slow_path(_query("slow.open", query_id), scope, True, sent.append)
        for _ in range(200):
            if sent:
                return DNSRecord.parse(sent[0])
            await asyncio.sleep(0.01)
        raise AssertionError("no reply")

    async def scenario() -> None:
        pending = asyncio.ensure_future(ask(1))
        await asyncio.sleep(0.1)
        assert upstream.names_seen() == ["slow.open"], "not a local name yet: forwarded"
        resolver.update(view.apply([_put(KEYS.service("slow"), Service("slow", ("open",),
                                                                       vips={"open": ip("10.2.0.9")}))], 2, KEYS))
        first = await pending
        assert [str(r.rdata) for r in first.rr] == ["10.2.0.9"], "the registry's answer, not the upstream's"
        again = await ask(2)
        assert [str(r.rdata) for r in again.rr] == ["10.2.0.9"]
        assert upstream.names_seen() == ["slow.open"], "nothing asked upstream again"

    try:
        asyncio.run(scenario())
    finally:
        upstream.close()


def test_a_sandbox_sealed_while_its_query_is_upstream_gets_refused_and_caches_nothing():
    """Attached to --internal networks only while the forward is in flight: no registry
    change happened, only the sandbox's attachments did."""
    upstream = TestUpstream(slow_delay=0.3)
    resolver = Resolver(ResolverConfig(upstreams=(Upstream.parse(upstream.address),)), Metrics())
    resolver.update(View().apply([_put(KEYS.network("open"), Network.create("open", "10.2.0.0/24")),
                                  _put(KEYS.network("front"), FRONT)], 1, KEYS))
    scope = resolver.scope("client", "/nonexistent", ["open"])
    resolver.add_scope(scope)

    async def scenario() -> DNSRecord:
        sent: list[bytes] = []
        resolver.slow_path(_query("slow.example", 1), scope, True, sent.append)
        await asyncio.sleep(0.1)
        resolver.set_attached(scope, ["front"])  # internal: never forwards
        for _ in range(100):
            if sent:
                return DNSRecord.parse(sent[0])
            await asyncio.sleep(0.01)
        raise AssertionError("no reply")

    try:
        reply = asyncio.run(scenario())
    finally:
        upstream.close()
    assert reply.header.rcode == 5 and not reply.rr, "REFUSED: the sandbox has no way out any more"
    kept = list(scope.udp_cache.normal.values())
    assert kept and not any(isinstance(entry, ForwardedEntry) for entry in kept), "the upstream's reply was not kept"
