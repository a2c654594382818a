"""Per-network slices of the View, and the consumers that rebuild only what changed.

A consumer that reuses a network's tables whenever its slice is the same object must end
up exactly where a full rebuild would: checked over random batches of changes against a
rebuild from scratch, and for identity (an untouched network keeps its tables).
"""

from __future__ import annotations

import ipaddress
import json
import random

from discovery.dns import records
from discovery.state import snapshot
from discovery.state.keys import KeyLayout
from discovery.state.model import Endpoint, Network, Service
from discovery.state.view import Change, View
from lb.plan import PlanCache, changed_vips, network_plans

KEYS = KeyLayout("/t")
NETWORKS = {name: Network.create(name, f"10.{i}.0.0/24") for i, name in enumerate(("a", "b", "c"), start=1)}


def _put(key: bytes, obj) -> Change:
    return Change(key, json.dumps(obj.to_dict()).encode())


def _random_change(rng: random.Random) -> Change:
    kind = rng.random()
    if kind < 0.1:
        name = rng.choice(list(NETWORKS))
        return _put(KEYS.network(name), NETWORKS[name]) if rng.random() < 0.8 else Change(KEYS.network(name), None)
    if kind < 0.45:
        name = f"s{rng.randrange(6)}"
        if rng.random() < 0.2:
            return Change(KEYS.service(name), None)
        nets = tuple(rng.sample(list(NETWORKS), rng.randint(1, 2)))
        mode = rng.choice(("vip", "dnsrr"))
        vips = {n: ipaddress.ip_address(int(NETWORKS[n].subnet.network_address) + 200 + int(name[1:]))
                for n in nets} if mode == "vip" else {}
        return _put(KEYS.service(name), Service(name, nets, mode, aliases=(f"{name}-alias",), vips=vips))
    if kind < 0.55:
        return Change(KEYS.service(f"s{rng.randrange(6)}"), b"{not json")  # the last good version stays
    network, container = rng.choice(list(NETWORKS)), f"c{rng.randrange(10)}"
    if rng.random() < 0.2:
        return Change(KEYS.endpoint(network, container), None)
    address = ipaddress.ip_address(int(NETWORKS[network].subnet.network_address) + 2 + int(container[1:]))
    endpoint = Endpoint(container, network, address, "n1", service=rng.choice((None, "s0", "s1", "s2")),
                        health=rng.choice(("healthy", "healthy", "unhealthy")))
    return _put(KEYS.endpoint(network, container), endpoint)


def test_incremental_records_and_plans_equal_a_full_rebuild_over_random_batches():
    rng = random.Random(7)
    view, built, plans = View(), records.build(View()), PlanCache()
    applied: dict = {}
    for revision in range(1, 400):
        view = view.apply([_random_change(rng) for _ in range(rng.randint(1, 4))], revision, KEYS)
        built = records.build(view, built)
        full = records.build(view)
        assert built.networks.keys() == full.networks.keys()
        for name, tables in full.networks.items():
            mine = built.networks[name]
            assert (mine.names, mine.services, mine.pointers) == (tables.names, tables.services, tables.pointers), \
                f"revision {revision}, network {name}"
        tables = plans.network_plans(view)
        assert tables == network_plans(view), f"revision {revision}"
        for name, table in tables.items():  # what a sandbox that applied the last table rewrites
            old = applied.get(name, {})
            # every VIP that differs (a VIP changed and changed back may be named too: rewritten
            # to what it was, harmless)
            assert changed_vips(old, table) >= {v for v in old.keys() | table.keys() if old.get(v) != table.get(v)}
        if rng.random() < 0.7:  # sometimes a sandbox skips a table (coalesced changes)
            applied = dict(tables)


def test_untouched_networks_keep_their_slice_and_their_tables():
    web = Service("web", ("a",), vips={"a": ipaddress.ip_address("10.1.0.200")})
    view = View().apply([_put(KEYS.network(n.name), n) for n in NETWORKS.values()] + [_put(KEYS.service("web"), web)],
                        1, KEYS)
    built, plans = records.build(view), PlanCache()
    before = plans.network_plans(view)
    task = Endpoint("t1", "b", ipaddress.ip_address("10.2.0.5"), "n1")
    later = view.apply([_put(KEYS.endpoint("b", "t1"), task)], 2, KEYS)
    assert later.slices["a"] is view.slices["a"] and later.slices["c"] is view.slices["c"]
    assert later.slices["b"] is not view.slices["b"] and dict(later.slices["b"].endpoints) == {"t1": task}
    rebuilt = records.build(later, built)
    assert rebuilt.networks["a"] is built.networks["a"] and rebuilt.networks["b"] is not built.networks["b"]
    assert plans.network_plans(later)["a"] is before["a"]


def test_a_service_that_leaves_a_network_leaves_its_slice():
    both = Service("web", ("a", "b"), vips={"a": ipaddress.ip_address("10.1.0.200"),
                                           "b": ipaddress.ip_address("10.2.0.200")})
    view = View().apply([_put(KEYS.network("a"), NETWORKS["a"]), _put(KEYS.service("web"), both)], 1, KEYS)
    assert set(view.slices) == {"a", "b"} and view.slices["b"].network is None  # b not created (yet)
    one = Service("web", ("a",), vips={"a": ipaddress.ip_address("10.1.0.200")})
    later = view.apply([_put(KEYS.service("web"), one)], 2, KEYS)
    assert set(later.slices) == {"a"}, "nothing is left on b: its slice goes"
    assert dict(later.slices["a"].services) == {"web": one}
    gone = later.apply([Change(KEYS.service("web"), None), Change(KEYS.network("a"), None)], 3, KEYS)
    assert not gone.slices


def test_snapshot_encoder_reencodes_only_changed_objects_and_round_trips(tmp_path, monkeypatch):
    view = View().apply([_put(KEYS.network(n.name), n) for n in NETWORKS.values()], 1, KEYS)
    encoder, path = snapshot.Encoder(), tmp_path / "view.json"
    snapshot.save(view, KEYS, path, encoder)
    encoded = []
    original = snapshot.canonical
    monkeypatch.setattr(snapshot, "canonical", lambda value: encoded.append(value) or original(value))
    task = Endpoint("t1", "b", ipaddress.ip_address("10.2.0.5"), "n1")
    later = view.apply([_put(KEYS.endpoint("b", "t1"), task)], 2, KEYS)
    snapshot.save(later, KEYS, path, encoder)
    assert [value["container"] for value in encoded] == ["t1"], "only the new endpoint was encoded"
    monkeypatch.setattr(snapshot, "canonical", original)
    loaded = snapshot.load(KEYS, path)
    assert loaded.revision == 2 and dict(loaded.networks) == dict(later.networks)
    assert dict(loaded.endpoints) == dict(later.endpoints)
    document = json.loads(path.read_text())
    document["objects"][0][1]["subnet"] = "10.99.0.0/24"
    path.write_text(json.dumps(document))
    assert snapshot.load(KEYS, path) is None, "an edited object fails the digest"
