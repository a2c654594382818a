import ipaddress
import json

from discovery.dns import records
from discovery.state.keys import KeyLayout
from discovery.state.model import Endpoint, Network, Service
from discovery.state.view import Change, View

KEYS = KeyLayout("/t")
ip = ipaddress.ip_address


def _view(networks=(), services=(), endpoints=()) -> View:
    changes = [Change(KEYS.network(n.name), json.dumps(n.to_dict()).encode()) for n in networks]
    changes += [Change(KEYS.service(s.name), json.dumps(s.to_dict()).encode()) for s in services]
    changes += [Change(KEYS.endpoint(e.network, e.container), json.dumps(e.to_dict()).encode()) for e in endpoints]
    return View().apply(changes, 7, KEYS)


FRONT = Network.create("front", "10.1.0.0/24", "fd00:1::/64")
BACK = Network.create("back", "10.2.0.0/24")


def _ep(name, network, address, **kw):
    return Endpoint(name, network, ip(address), "n1", **kw)


def test_containers_resolve_by_name_hostname_and_alias_on_their_network_only():
    view = _view([FRONT, BACK], endpoints=[
        _ep("a1", "front", "10.1.0.3", hostname="host-a", aliases=("db",), ipv6=ip("fd00:1::3")),
        _ep("b1", "back", "10.2.0.3"),
    ])
    recs = records.build(view)
    for name in ("a1", "host-a", "db"):
        record = recs.lookup(["front"], name)
        assert record.ipv4 == (ip("10.1.0.3"),) and record.ipv6 == (ip("fd00:1::3"),)
    assert recs.lookup(["front"], "b1") is None
    assert recs.lookup(["back"], "a1") is None
    assert recs.lookup(["front", "back"], "b1").ipv4 == (ip("10.2.0.3"),)
    assert recs.lookup(["front"], "a1.front").ipv4 == (ip("10.1.0.3"),)
    assert recs.lookup(["back"], "a1.front") is None, "only networks the sandbox is attached to"


def test_first_attached_network_wins_a_clash():
    view = _view([FRONT, BACK], endpoints=[_ep("x", "front", "10.1.0.9"), _ep("x", "back", "10.2.0.9")])
    recs = records.build(view)
    assert recs.lookup(["back", "front"], "x").ipv4 == (ip("10.2.0.9"),)
    assert recs.lookup(["front", "back"], "x").ipv4 == (ip("10.1.0.9"),)


def test_vip_and_dnsrr_services_and_tasks():
    web = Service("web", ("front",), aliases=("www",), vips={"front": ip("10.1.0.2")})
    rr = Service("rr", ("front",), "dnsrr")
    view = _view([FRONT], [web, rr], [
        _ep("w1", "front", "10.1.0.3", service="web"),
        _ep("w2", "front", "10.1.0.4", service="web", health="unhealthy"),
        _ep("r1", "front", "10.1.0.5", service="rr"),
        _ep("r2", "front", "10.1.0.6", service="rr"),
    ])
    recs = records.build(view)
    assert recs.lookup(["front"], "web") == records.NameRecord((ip("10.1.0.2"),), ttl_class="vip")
    assert recs.lookup(["front"], "www").ipv4 == (ip("10.1.0.2"),)
    tasks = recs.lookup(["front"], "tasks.web")
    assert tasks.ipv4 == (ip("10.1.0.3"),) and tasks.shuffle, "the unhealthy task is in no answer"
    assert set(recs.lookup(["front"], "rr").ipv4) == {ip("10.1.0.5"), ip("10.1.0.6")}
    assert recs.lookup(["front"], "w2") == records.NameRecord(), "known name, no address: NODATA"


def test_pointers_for_endpoints_and_vips_are_scoped():
    web = Service("web", ("front",), vips={"front": ip("10.1.0.2")})
    view = _view([FRONT, BACK], [web], [_ep("a1", "front", "10.1.0.3", ipv6=ip("fd00:1::3"))])
    recs = records.build(view)
    assert recs.pointer(["front"], "3.0.1.10.in-addr.arpa") == "a1.front."
    assert recs.pointer(["front"], ip("fd00:1::3").reverse_pointer) == "a1.front."
    assert recs.pointer(["front"], "2.0.1.10.in-addr.arpa") == "web.front."
    assert recs.pointer(["back"], "3.0.1.10.in-addr.arpa") is None
