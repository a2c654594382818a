"""The View follows etcd: in order, through outages, partitions and compactions."""

import asyncio
import json
from contextlib import asynccontextmanager
from itertools import pairwise

import pytest

from discovery.state.etcd import connect
from discovery.state.keys import KeyLayout
from discovery.state.model import Network
from discovery.state.view import View
from discovery.state.watch import ViewWatcher
from tests.helpers import TcpProxy


def _network(name: str, third_octet: int) -> bytes:
    return json.dumps(Network.create(name, f"10.40.{third_octet}.0/24").to_dict()).encode()


async def _start_watcher(url: str, keys: KeyLayout, **kwargs):
    client = await connect(url)
    watcher = ViewWatcher(client, keys, **kwargs)
    task = asyncio.create_task(watcher.run())
    await asyncio.wait_for(watcher.ready(), 10)
    return client, watcher, task


async def _stop(client, task):
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await client.close()


def _subnets(view) -> dict[str, str]:
    return {name: str(network.subnet) for name, network in view.networks.items()}


def test_view_follows_puts_and_deletes_in_order(etcd, prefix, monkeypatch):
    keys = KeyLayout(prefix)
    batches: list[tuple[int, list[tuple[bytes, bytes | None]]]] = []  # what the watcher applied, per View
    apply = View.apply

    def recording_apply(self, changes, revision, layout):
        changes = list(changes)
        batches.append((revision, [(change.key, change.value) for change in changes]))
        return apply(self, changes, revision, layout)

    async def scenario():
        client, watcher, task = await _start_watcher(etcd.url, keys)
        monkeypatch.setattr(View, "apply", recording_apply)  # after the listing: the watch's batches only
        seen = []
        watcher.subscribe(lambda view: seen.append((view.revision, _subnets(view))))
        writer = await connect(etcd.url)
        writes: list[tuple[bytes, bytes | None]] = []
        state: dict[str, str] = {}
        at_revision = {watcher.view.revision: {}}  # revision -> every network and its subnet then

        async def put(name: str, octet: int) -> None:
            value = _network(name, octet)
            revision = (await writer.put(keys.network(name), value)).header.revision
            writes.append((keys.network(name), value))
            state[name] = f"10.40.{octet}.0/24"
            at_revision[revision] = dict(state)

        async def delete(name: str) -> None:
            revision = (await writer.delete(keys.network(name))).header.revision
            writes.append((keys.network(name), None))
            del state[name]
            at_revision[revision] = dict(state)

        for i in range(30):
            await put(f"n{i}", i)
            if i % 3 == 2:
                await delete(f"n{i - 1}")
            if i % 5 == 4:  # a new value for an older name (n10 and n25 were deleted: created again)
                await put(f"n{i - 4}", 100 + i)
        final_rev = max(at_revision)
        view = await watcher.wait_for(lambda v: v.revision >= final_rev, timeout=10)
        await asyncio.sleep(0.2)  # a change applied late or twice would show up meanwhile
        assert view.revision == final_rev and _subnets(watcher.view) == state
        assert len(state) == 22 and state["n0"] == "10.40.104.0/24" and state["n10"] == "10.40.114.0/24"

        # every write reached the View exactly once, in order: no change missed, none twice
        applied = [change for _, batch in batches for change in batch]
        assert len(applied) == len(writes) == 46
        assert applied == writes
        # one View per batch, in revision order, each at the revision of its batch's last write
        assert [revision for revision, _ in seen] == [revision for revision, _ in batches]
        assert all(a < b for (a, _), (b, _) in pairwise(seen)), [revision for revision, _ in seen]
        ordered = sorted(at_revision)
        position = 0
        for (revision, _), (_, batch) in zip(seen, batches, strict=True):
            position += len(batch)
            assert revision == ordered[position], f"a View of {len(batch)} changes is stamped {revision}"
        # and each View holds exactly the networks (and values) of the writes up to its revision
        for revision, subnets in seen:
            assert subnets == at_revision[revision], f"View at revision {revision}"
        await writer.close()
        await _stop(client, task)

    asyncio.run(scenario())


def test_malformed_values_are_skipped_and_the_watch_goes_on(etcd, prefix, caplog):
    keys = KeyLayout(prefix)

    async def scenario():
        client, watcher, task = await _start_watcher(etcd.url, keys)
        writer = await connect(etcd.url)
        await writer.put(keys.network("bad"), b"{this is not json")
        await writer.put(keys.network("good"), _network("good", 1))
        view = await watcher.wait_for(lambda v: "good" in v.networks, timeout=10)
        assert "bad" not in view.networks
        await writer.close()
        await _stop(client, task)

    asyncio.run(scenario())
    assert f"{prefix}/networks/bad" in caplog.text


def test_stopping_etcd_keeps_the_view_and_restarting_resumes(own_etcd, prefix):
    keys = KeyLayout(prefix)

    async def scenario():
        client, watcher, task = await _start_watcher(own_etcd.url, keys)
        writer = await connect(own_etcd.url)
        await writer.put(keys.network("kept"), _network("kept", 2))
        await watcher.wait_for(lambda v: "kept" in v.networks, timeout=10)
        await writer.close()
        own_etcd.stop()
        await asyncio.sleep(1.5)
        assert not watcher.connected
        assert "kept" in watcher.view.networks  # the last View is still served
        await asyncio.to_thread(own_etcd.start)
        writer = await connect(own_etcd.url, timeout=15)  # gRPC may still be backing off from the outage
        await writer.put(keys.network("after"), _network("after", 3))
        view = await watcher.wait_for(lambda v: "after" in v.networks, timeout=15)
        assert "kept" in view.networks
        assert watcher.relists == 0 and watcher.reconnects >= 1
        await writer.close()
        await _stop(client, task)

    asyncio.run(scenario())


@asynccontextmanager
async def _watcher_behind_proxy(member, keys: KeyLayout):
    """A watcher that reaches etcd through a proxy the test can cut, and a direct writer."""
    proxy = TcpProxy(member.client_port)
    await proxy.start()
    client, watcher, task = await _start_watcher(f"http://127.0.0.1:{proxy.port}", keys)
    writer = await connect(member.url)
    try:
        yield proxy, watcher, writer
    finally:
        await writer.close()
        await _stop(client, task)
        await proxy.cut()


def test_changes_made_while_partitioned_are_not_missed(own_etcd, prefix):
    keys = KeyLayout(prefix)

    async def scenario():
        async with _watcher_behind_proxy(own_etcd, keys) as (proxy, watcher, writer):
            await writer.put(keys.network("before"), _network("before", 4))
            await watcher.wait_for(lambda v: "before" in v.networks, timeout=10)
            await proxy.cut()
            for i in range(5):
                await writer.put(keys.network(f"during{i}"), _network(f"during{i}", 10 + i))
            await writer.delete(keys.network("before"))
            await asyncio.sleep(1)
            assert "before" in watcher.view.networks  # nothing reached the watcher yet
            await proxy.restore()
            want = {f"during{i}" for i in range(5)}
            view = await watcher.wait_for(lambda v: set(v.networks) == want, timeout=20)
            assert watcher.relists == 0, "resumed from the revision, not re-listed"
            assert view.revision == (await writer.get_prefix(keys.root())).header.revision

    asyncio.run(scenario())


def test_a_compaction_past_the_watch_revision_triggers_a_relist(own_etcd, prefix):
    keys = KeyLayout(prefix)

    async def scenario():
        async with _watcher_behind_proxy(own_etcd, keys) as (proxy, watcher, writer):
            await writer.put(keys.network("old"), _network("old", 20))
            await watcher.wait_for(lambda v: "old" in v.networks, timeout=10)
            await proxy.cut()
            await writer.delete(keys.network("old"))
            for i in range(3):
                await writer.put(keys.network(f"new{i}"), _network(f"new{i}", 21 + i))
            revision = (await writer.get_prefix(keys.root())).header.revision
            await writer.compact(revision)
            await proxy.restore()
            view = await watcher.wait_for(lambda v: v.revision >= revision, timeout=20)
            assert set(view.networks) == {"new0", "new1", "new2"}
            assert watcher.relists == 1

    asyncio.run(scenario())


if __name__ == "__main__":
    pytest.main([__file__])
