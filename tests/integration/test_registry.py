"""The registry against a real etcd."""

import asyncio
import dataclasses
import multiprocessing
import sys

import pytest

from discovery.errors import ConflictError, ExhaustedError, NotFoundError, ValidationError
from discovery.state.etcd import connect
from discovery.state.keys import KeyLayout
from discovery.state.model import Network, Service
from discovery.state.registry import Registry, SandboxRequest


async def _registry(url, prefix):
    client = await connect(url)
    return client, Registry(client, KeyLayout(prefix))


def run(coro):
    return asyncio.run(coro)


def test_networks_refuse_duplicates_and_overlaps(etcd, prefix):
    async def scenario():
        client, reg = await _registry(etcd.url, prefix)
        await reg.create_network(Network.create("front", "10.30.0.0/24"))
        with pytest.raises(ConflictError, match="already exists"):
            await reg.create_network(Network.create("front", "10.31.0.0/24"))
        with pytest.raises(ConflictError, match="overlaps network 'front'"):
            await reg.create_network(Network.create("back", "10.30.0.128/25"))
        with pytest.raises(NotFoundError, match="svcnet network create nope"):
            await reg.get_network("nope")
        await client.close()
    run(scenario())


def test_names_collide_across_containers_services_and_aliases(etcd, prefix):
    async def scenario():
        client, reg = await _registry(etcd.url, prefix)
        await reg.create_network(Network.create("front", "10.32.0.0/24"))
        svc = await reg.create_service(Service("web", ("front",), aliases=("www",)))
        assert str(svc.vips["front"]) == "10.32.0.2"
        lease = (await client.lease(30)).id
        with pytest.raises(ConflictError, match="'www' on network 'front' is already used by service 'web'"):
            await reg.register_sandbox(SandboxRequest("c1", ("front",), "n1", aliases=("www",)), lease)
        [ep] = await reg.register_sandbox(SandboxRequest("c1", ("front",), "n1", service="web", aliases=("db",)), lease)
        assert str(ep.ipv4) == "10.32.0.3"
        with pytest.raises(ConflictError, match="'db' on network 'front' is already used by container 'c1'"):
            await reg.register_sandbox(SandboxRequest("c2", ("front",), "n1", aliases=("DB",)), lease)
        with pytest.raises(ConflictError, match="already used by container 'c1' on node 'n1'"):
            await reg.register_sandbox(SandboxRequest("c1", ("front",), "n2"), lease)
        with pytest.raises(ConflictError, match="already used by service 'web'"):
            await reg.create_service(Service("c1x", ("front",), aliases=("web",)))
        with pytest.raises(ValidationError, match="reserved"):
            await reg.register_sandbox(SandboxRequest("tasks", ("front",), "n1"), lease)
        # Re-registering from the same node is idempotent and keeps the address.
        [again] = await reg.register_sandbox(SandboxRequest("c1", ("front",), "n1", service="web", aliases=("db",)), lease)
        assert again.ipv4 == ep.ipv4
        with pytest.raises(ConflictError, match="still has tasks"):
            await reg.remove_service("web")
        with pytest.raises(ConflictError, match="still has endpoints attached"):
            await reg.remove_network("front")
        await reg.deregister_sandbox("c1", ["front"], "n1")
        await reg.remove_service("web")
        await reg.remove_network("front")
        left = await client.get_prefix(KeyLayout(prefix).root())
        assert [kv.key for kv in left] == []
        await client.close()
    run(scenario())


def test_requested_addresses_and_exhaustion(etcd, prefix):
    async def scenario():
        client, reg = await _registry(etcd.url, prefix)
        await reg.create_network(Network.create("small", "10.33.0.0/29"))
        lease = (await client.lease(30)).id
        with pytest.raises(ValidationError, match="outside network 'small'"):
            await reg.register_sandbox(SandboxRequest("c0", ("small",), "n1", addresses=(("small", "10.34.0.2"),)), lease)
        [ep] = await reg.register_sandbox(SandboxRequest("c0", ("small",), "n1", addresses=(("small", "10.33.0.6"),)), lease)
        assert str(ep.ipv4) == "10.33.0.6"
        with pytest.raises(ConflictError, match="already used by container 'c0'"):
            await reg.register_sandbox(SandboxRequest("c1", ("small",), "n1", addresses=(("small", "10.33.0.6"),)), lease)
        for i in range(1, 5):
            await reg.register_sandbox(SandboxRequest(f"c{i}", ("small",), "n1"), lease)
        with pytest.raises(ExhaustedError, match="no free address left in 10.33.0.0/29"):
            await reg.register_sandbox(SandboxRequest("c9", ("small",), "n1"), lease)
        await reg.deregister_sandbox("c2", ["small"], "n1")
        [reused] = await reg.register_sandbox(SandboxRequest("c9", ("small",), "n1"), lease)
        assert str(reused.ipv4) == "10.33.0.3"  # c2's address, freed on removal
        await client.close()
    run(scenario())


def test_a_freed_address_is_reused_only_after_the_search_wraps(etcd, prefix):
    """Addresses are searched by key from a cursor, not by listing every claim: a freed
    address waits until the search comes round again (its ARP and DNS caches can go)."""
    async def scenario():
        client, reg = await _registry(etcd.url, prefix)
        await reg.create_network(Network.create("cur", "10.37.0.0/29"))  # .2 .. .6 usable
        lease = (await client.lease(30)).id
        got = [str((await reg.register_sandbox(SandboxRequest(f"c{i}", ("cur",), "n1"), lease))[0].ipv4)
               for i in range(3)]
        assert got == ["10.37.0.2", "10.37.0.3", "10.37.0.4"]
        await reg.deregister_sandbox("c0", ["cur"], "n1")
        [next_one] = await reg.register_sandbox(SandboxRequest("c3", ("cur",), "n1"), lease)
        assert str(next_one.ipv4) == "10.37.0.5", "not the address freed a moment ago"
        [last] = await reg.register_sandbox(SandboxRequest("c4", ("cur",), "n1"), lease)
        [wrapped] = await reg.register_sandbox(SandboxRequest("c5", ("cur",), "n1"), lease)
        assert (str(last.ipv4), str(wrapped.ipv4)) == ("10.37.0.6", "10.37.0.2"), "round again: .2 is free"
        await client.close()
    run(scenario())


def test_a_service_knows_its_tasks_by_key_and_a_joining_task_stops_its_removal(etcd, prefix):
    async def scenario():
        client, reg = await _registry(etcd.url, prefix)
        keys = KeyLayout(prefix)
        await reg.create_network(Network.create("mem", "10.38.0.0/24"))
        await reg.create_service(Service("api", ("mem",)))
        lease = (await client.lease(30)).id
        await reg.register_sandbox(SandboxRequest("t1", ("mem",), "n1", service="api"), lease)
        members = [kv.key for kv in await client.get_prefix(keys.kind_prefix("members", "api"))]
        assert members == [keys.member("api", "mem", "t1")]
        with pytest.raises(ConflictError, match=r"still has tasks \(t1\)"):
            await reg.remove_service("api")
        # re-registered without the service: no longer a task
        await reg.register_sandbox(SandboxRequest("t1", ("mem",), "n1"), lease)
        assert list(await client.get_prefix(keys.kind_prefix("members", "api"))) == []
        await reg.remove_service("api")
        await reg.deregister_sandbox("t1", ["mem"], "n1")
        await reg.remove_network("mem")
        assert [kv.key for kv in await client.get_prefix(keys.root())] == []
        await client.close()
    run(scenario())


def _allocate_many(url, prefix, worker, count, queue):
    async def scenario():
        client, reg = await _registry(url, prefix)
        lease = (await client.lease(60)).id
        got = []
        for i in range(count):
            [ep] = await reg.register_sandbox(SandboxRequest(f"w{worker}-{i}", ("race",), f"n{worker}"), lease)
            got.append(str(ep.ipv4))
        await client.close()
        return got
    queue.put(asyncio.run(scenario()))


def test_two_processes_allocating_at_once_never_share_an_address(etcd, prefix):
    async def setup():
        client, reg = await _registry(etcd.url, prefix)
        await reg.create_network(Network.create("race", "10.35.0.0/24"))
        await client.close()
    run(setup())
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    workers = [ctx.Process(target=_allocate_many, args=(etcd.url, prefix, w, 60, queue)) for w in range(2)]
    for w in workers:
        w.start()
    results = [queue.get(timeout=120) for _ in workers]
    for w in workers:
        w.join(timeout=30)
        assert w.exitcode == 0
    addresses = results[0] + results[1]
    assert len(addresses) == 120
    assert len(set(addresses)) == 120, "an address was handed out twice"


def test_an_expired_lease_removes_endpoints_and_claims(etcd, prefix):
    async def scenario():
        client, reg = await _registry(etcd.url, prefix)
        await reg.create_network(Network.create("front", "10.36.0.0/24"))
        lease = (await client.lease(2)).id  # never kept alive
        await reg.register_sandbox(SandboxRequest("gone", ("front",), "n1", aliases=("g",)), lease)
        assert len(await reg.list_endpoints("front")) == 1
        for _ in range(80):
            if not await reg.list_endpoints("front"):
                break
            await asyncio.sleep(0.1)
        assert await reg.list_endpoints("front") == []
        keys = KeyLayout(prefix)
        assert list(await client.get_prefix(keys.kind_prefix("names", "front"))) == []
        assert list(await client.get_prefix(keys.kind_prefix("ipam", "front"))) == []
        await client.close()
    run(scenario())


if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))


def test_overlay_networks_get_a_vni_once_and_unique(etcd, prefix):
    async def scenario():
        client, reg = await _registry(etcd.url, prefix)
        first = await reg.create_network(Network.create("ov1", "10.40.0.0/24", driver="overlay"))
        second = await reg.create_network(Network.create("ov2", "10.41.0.0/24", driver="overlay"))
        local = await reg.create_network(Network.create("local", "10.42.0.0/24"))
        assert (first.vni, second.vni, local.vni) == (4096, 4097, None)
        assert (await reg.get_network("ov1")).vni == 4096, "stored with the network"
        await reg.remove_network("ov1")
        third = await reg.create_network(Network.create("ov3", "10.43.0.0/24", driver="overlay"))
        assert third.vni == 4096, "the lowest free one"
        with pytest.raises(ValidationError, match="overlay driver"):
            dataclasses.replace(Network.create("bad", "10.44.0.0/24"), vni=5000)
        await client.close()
    run(scenario())


def test_published_ports_are_unique_cluster_wide_and_change_live(etcd, prefix):
    from discovery.state.model import PortSpec

    async def scenario():
        client, reg = await _registry(etcd.url, prefix)
        await reg.create_network(Network.create("pub", "10.45.0.0/24"))
        await reg.create_service(Service("web", ("pub",), ports=(PortSpec(80, 8080), PortSpec(53, 53, "udp"))))
        with pytest.raises(ConflictError, match="port 8080/tcp is already published by service 'web'"):
            await reg.create_service(Service("api", ("pub",), ports=(PortSpec(81, 8080),)))
        with pytest.raises(NotFoundError, match="service 'api' does not exist"):
            await reg.get_service("api")  # nothing of the refused service was written
        await reg.create_service(Service("api", ("pub",), ports=(PortSpec(81, 8080, "udp"),)))  # udp: its own
        updated = await reg.update_ports("web", [PortSpec(443, 8443, source="keep")], [(8080, "tcp")])
        assert sorted(str(p) for p in updated.ports) == ["53:53/udp", "8443:443/tcp,source=keep"]
        with pytest.raises(NotFoundError, match="does not publish 8080/tcp"):
            await reg.update_ports("web", [], [(8080, "tcp")])
        with pytest.raises(ConflictError, match="already published by service 'api'"):
            await reg.update_ports("web", [PortSpec(9, 8080, "udp")], [])
        changed = await reg.update_ports("web", [PortSpec(5353, 53, "udp")], [(53, "udp")])  # in place
        assert sorted(str(p) for p in changed.ports) == ["53:5353/udp", "8443:443/tcp,source=keep"]
        with pytest.raises(ConflictError, match="already published by service 'web'"):
            await reg.create_service(Service("dns", ("pub",), ports=(PortSpec(53, 53, "udp"),)))
        await reg.create_service(Service("other", ("pub",), ports=(PortSpec(80, 8080),)))  # freed by --publish-rm
        await reg.remove_service("other")
        await reg.create_service(Service("again", ("pub",), ports=(PortSpec(80, 8080),)))  # freed by rm
        await client.close()
    run(scenario())


def test_a_node_holds_one_address_per_overlay_until_it_is_removed(etcd, prefix):
    async def scenario():
        client, reg = await _registry(etcd.url, prefix)
        await reg.create_network(Network.create("ovn", "10.46.0.0/24", driver="overlay"))
        first = await reg.claim_node_address("h1", "ovn")
        assert await reg.claim_node_address("h1", "ovn") == first, "the same address on every claim"
        second = await reg.claim_node_address("h2", "ovn")
        assert first != second
        endpoints = await reg.register_sandbox(SandboxRequest("c", ("ovn",), "h1"), 0)
        assert endpoints[0].ipv4 not in (first, second)
        await reg.remove_node("h1")
        assert await reg.claim_node_address("h3", "ovn") == first, "h1's address is free again"
        await client.close()
    run(scenario())
