"""The View follows etcd: in order, through outages, partitions and compactions."""

import asyncio
import json
from contextlib import asynccontextmanager

import pytest

from discovery.state.etcd import connect
from discovery.state.keys import KeyLayout
from discovery.state.model import Network
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


def test_view_follows_puts_and_deletes_in_order(etcd, prefix):
    keys = KeyLayout(prefix)

    async def scenario():
        client, watcher, task = await _start_watcher(etcd.url, keys)
        seen = []
        watcher.subscribe(lambda view: seen.append((view.revision, tuple(sorted(view.networks)))))
        writer = await connect(etcd.url)
        for i in range(30):
            await writer.put(keys.network(f"n{i}"), _network(f"n{i}", i))
            if i % 3 == 2:
                await writer.delete(keys.network(f"n{i - 1}"))
        final_rev = (await writer.get_prefix(keys.root())).header.revision
        view = await watcher.wait_for(lambda v: v.revision >= final_rev, timeout=10)
        expected = {f"n{i}" for i in range(30)} - {f"n{i - 1}" for i in range(30) if i % 3 == 2}
        assert set(view.networks) == expected
        revisions = [rev for rev, _ in seen]
        assert revisions == sorted(revisions) and len(set(revisions)) == len(revisions)
        # Every intermediate View is consistent with some prefix of the writes.
        for _, names in seen:
            assert all(name.startswith("n") for name in names)
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
        writer = await connect(own_etcd.url)
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
