import ipaddress

from discovery.node.health import HealthState
from discovery.state.model import Endpoint, Network, Service
from lb import iptables
from lb.plan import VipPlan, lost_backends, plan_for, rule_count
from tests.unit.test_records import _view

ip = ipaddress.ip_address
FRONT = Network.create("front", "10.1.0.0/24")
BACK = Network.create("back", "10.2.0.0/24")
WEB = Service("web", ("front", "back"), vips={"front": ip("10.1.0.2"), "back": ip("10.2.0.2")})
DB = Service("db", ("back",), vips={"back": ip("10.2.0.9")})
RR = Service("rr", ("front",), "dnsrr")


def _task(name, network, address, service="web", health="healthy"):
    return Endpoint(name, network, ip(address), "n1", service=service, health=health)


def _plan(attached, endpoints=()):
    return plan_for(_view([FRONT, BACK], [WEB, DB, RR], endpoints), attached)


def test_plan_has_each_reachable_vip_with_its_healthy_tasks_on_that_network():
    endpoints = [_task("w2", "front", "10.1.0.7"), _task("w1", "front", "10.1.0.5"),
                 _task("w3", "front", "10.1.0.6", health="unhealthy"), _task("w1b", "back", "10.2.0.5"),
                 _task("r1", "front", "10.1.0.8", service="rr")]
    plan = _plan(["front"], endpoints)
    assert list(plan) == [ip("10.1.0.2")], "dnsrr has no VIP; db is not on front"
    assert plan[ip("10.1.0.2")].backends == (ip("10.1.0.5"), ip("10.1.0.7")), "sorted, healthy only"
    both = _plan(["front", "back"], endpoints)
    assert set(both) == {ip("10.1.0.2"), ip("10.2.0.2"), ip("10.2.0.9")}
    assert both[ip("10.2.0.2")].backends == (ip("10.2.0.5"),)
    assert both[ip("10.2.0.9")].backends == (), "no task: still planned, so the VIP refuses"


def test_equal_plans_compare_and_sign_equal_and_name_lost_backends():
    endpoints = [_task("w1", "front", "10.1.0.5"), _task("w2", "front", "10.1.0.6")]
    first, again = _plan(["front"], endpoints), _plan(["front"], list(reversed(endpoints)))
    assert first == again and first[ip("10.1.0.2")].signature == again[ip("10.1.0.2")].signature
    assert lost_backends(first, again) == {}
    shrunk = _plan(["front"], endpoints[:1])
    assert lost_backends(first, shrunk) == {ip("10.1.0.2"): {ip("10.1.0.6")}}
    assert lost_backends(first, shrunk, vips=[]) == {}, "only the VIPs named may differ"
    assert lost_backends(first, {}) == {ip("10.1.0.2"): {ip("10.1.0.5"), ip("10.1.0.6")}}


def test_iptables_rules_split_evenly_and_refuse_without_backends():
    plan = VipPlan(ip("10.1.0.2"), "web", "front", (ip("10.1.0.5"), ip("10.1.0.6"), ip("10.1.0.7")))
    rules = iptables.service_rules(plan)
    assert [r.get("statistic", {}).get("probability") for r in rules] == ["0.33333333333", "0.50000000000", None]
    assert [r["target"]["DNAT"]["to-destination"] for r in rules] == ["10.1.0.5", "10.1.0.6", "10.1.0.7"]
    assert all(plan.signature in r["comment"]["comment"] for r in rules)
    empty = VipPlan(ip("10.1.0.3"), "none", "front", ())
    assert iptables.service_rules(empty)[0]["target"] == "RETURN"
    assert rule_count([plan, empty]) == 4 + 3


def test_health_state_machine():
    state = HealthState(retries=3)
    assert state.record(False) is None and state.record(False) is None
    assert state.record(False) == "unhealthy"
    assert state.record(False) is None, "only changes are reported"
    assert state.record(True) == "healthy" and state.record(True) is None
    assert state.record(False) is None, "one failure is not enough once healthy"
    assert HealthState(retries=1).record(True) == "healthy", "starting -> healthy on the first pass"
