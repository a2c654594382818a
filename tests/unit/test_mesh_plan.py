"""The routing-mesh plan (pure): which tasks a published port reaches from one node, how mesh
traffic leaves each network, and where source=keep replies go back."""

import ipaddress
import json

from discovery.state.keys import KeyLayout
from discovery.state.model import Endpoint, Network, Node, PortSpec, Service
from discovery.state.view import Change, View
from lb import mesh_iptables
from lb.mesh import mesh_plan

ip = ipaddress.ip_address
KEYS = KeyLayout("/t")
OV = Network.create("ov", "10.5.0.0/24", driver="overlay")
LOCAL = Network.create("local", "10.6.0.0/24")
SEALED = Network.create("sealed", "10.7.0.0/24", internal=True)
NODES = [Node("n1", vtep="192.0.2.1", addresses=(("ov", "10.5.0.2"),)),
         Node("n2", vtep="192.0.2.2", addresses=(("ov", "10.5.0.3"),)),
         Node("n3", vtep="192.0.2.3", addresses=(("ov", "10.5.0.4"),))]


def _view(services, endpoints, nodes=NODES):
    changes = [Change(KEYS.network(n.name), json.dumps(n.to_dict()).encode()) for n in (OV, LOCAL, SEALED)]
    changes += [Change(KEYS.node(n.name), json.dumps(n.to_dict()).encode()) for n in nodes]
    changes += [Change(KEYS.service(s.name), json.dumps(s.to_dict()).encode()) for s in services]
    changes += [Change(KEYS.endpoint(e.network, e.container), json.dumps(e.to_dict()).encode()) for e in endpoints]
    return View().apply(changes, 3, KEYS)


def _task(name, network, address, node, service="web", health="healthy"):
    return Endpoint(name, network, ip(address), node, service=service, health=health)


WEB = Service("web", ("ov",), ports=(PortSpec(80, 8080), PortSpec(53, 5353, "udp", source="keep")))
TASKS = [_task("w1", "ov", "10.5.0.10", "n1"), _task("w2", "ov", "10.5.0.11", "n2"),
         _task("w3", "ov", "10.5.0.12", "n2", health="unhealthy")]


def test_ingress_reaches_healthy_tasks_on_every_node_even_from_a_node_without_one():
    plan = mesh_plan(_view([WEB], TASKS), "n3")
    tcp = plan.by_key()[(8080, "tcp")]
    assert [(str(b.address), b.port) for b in tcp.backends] == [("10.5.0.10", 80), ("10.5.0.11", 80)]
    assert plan.masquerades[0].network == "ov" and plan.masquerades[0].source == ip("10.5.0.4"), "n3's own"
    assert plan == mesh_plan(_view([WEB], list(reversed(TASKS))), "n3"), "order-free: equal after a restart"


def test_host_mode_only_where_a_task_runs_with_local_tasks_and_bridge_networks_stay_local():
    svc = Service("hm", ("ov", "local"), ports=(PortSpec(80, 7070, mode="host"),))
    tasks = [_task("h1", "ov", "10.5.0.20", "n1", "hm"), _task("h2", "local", "10.6.0.20", "n2", "hm")]
    assert [str(b.address) for b in mesh_plan(_view([svc], tasks), "n1").ports[0].backends] == ["10.5.0.20"]
    assert mesh_plan(_view([svc], tasks), "n3").ports == (), "no task on n3: it does not answer"
    ingress = Service("lb", ("local",), ports=(PortSpec(80, 7171),))
    far = [_task("l2", "local", "10.6.0.21", "n2", "lb")]
    assert mesh_plan(_view([ingress], far), "n1").ports[0].backends == (), "a bridge network is one host"


def test_internal_networks_are_never_published():
    svc = Service("in", ("sealed",), ports=(PortSpec(80, 7272),))
    plan = mesh_plan(_view([svc], [_task("i1", "sealed", "10.7.0.5", "n1", "in")]), "n1")
    assert plan.ports[0].backends == ()


def test_source_keep_return_paths_on_nodes_with_a_local_task_only():
    with_task = mesh_plan(_view([WEB], TASKS), "n2")
    assert [(r.network, str(r.address), r.slot) for r in with_task.returns] == [("ov", "10.5.0.2", 2),
                                                                                 ("ov", "10.5.0.4", 4)]
    assert mesh_plan(_view([WEB], TASKS), "n3").returns == (), "no local task of a kept port"


def test_rules_mark_for_masquerade_by_mode():
    plan = mesh_plan(_view([WEB], TASKS), "n3").by_key()
    nat = mesh_iptables.port_rules(plan[(8080, "tcp")])
    assert "in-interface" not in nat[0] and nat[0]["target"]["MARK"], "nat: every connection is marked"
    keep = mesh_iptables.port_rules(plan[(5353, "udp")])
    assert keep[0]["in-interface"] == "svbr+" and keep[1]["addrtype"] == {"src-type": "LOCAL"}, \
        "keep: only hairpin (a sandbox) and this host's own connections"
    dnat = [r for r in nat if "DNAT" in str(r["target"])]
    assert [r["target"]["DNAT"]["to-destination"] for r in dnat] == ["10.5.0.10:80", "10.5.0.11:80"]
    assert dnat[0]["statistic"]["probability"] == "0.50000000000" and "statistic" not in dnat[1]


def test_node_hops_reach_remote_tasks_by_their_nodes_published_port_one_backend_per_task():
    tasks = [*TASKS, _task("w4", "ov", "10.5.0.13", "n2"), _task("w5", "ov", "10.5.0.14", "n3")]
    plan = mesh_plan(_view([WEB], tasks), "n3", node_hops=True)
    tcp = plan.by_key()[(8080, "tcp")]
    assert tcp.hops and [(str(b.address), b.port, b.network) for b in tcp.backends] == [
        ("10.5.0.14", 80, "ov"), ("192.0.2.1", 8080, "@node"), ("192.0.2.2", 8080, "@node"),
        ("192.0.2.2", 8080, "@node")], "n2 runs two healthy tasks: two slots, so each task gets a fifth"
    assert [str(b.address) for b in tcp.local] == ["10.5.0.14"], "a hop that lands here: our own task"
    assert plan.peers == (ip("192.0.2.1"), ip("192.0.2.2")) and plan.hop_source == ip("192.0.2.3")
    udp = plan.by_key()[(5353, "udp")]
    assert not udp.hops and all(b.network == "ov" for b in udp.backends), "source=keep stays on the overlay"
    assert mesh_plan(_view([WEB], tasks), "n3") != plan, "without hops (iptables, IPVS): the overlay"
    assert mesh_plan(_view([WEB], list(reversed(tasks))), "n3", node_hops=True) == plan, "order-free"


def test_nftables_port_rules_serve_hops_locally_and_mark_them_where_they_leave():
    from lb import mesh_nftables
    plan = mesh_plan(_view([WEB], TASKS), "n1", node_hops=True)
    rules = mesh_nftables.port_rules(plan.by_key()[(8080, "tcp")], plan.peers)
    assert rules[0] == ("ip saddr { 192.0.2.2, 192.0.2.3 } ip dscp cs1 ip dscp set cs0 "
                        "meta l4proto tcp dnat ip to numgen random mod 1 map { 0 : 10.5.0.10 . 80 }"), rules
    assert rules[-1].endswith("map { 0 : 10.5.0.10 . 80, 1 : 192.0.2.2 . 8080 }"), rules
    bare = mesh_plan(_view([WEB], TASKS), "n3", node_hops=True)
    assert mesh_nftables.port_rules(bare.by_key()[(8080, "tcp")], bare.peers)[0].endswith("cs0 accept"), \
        "no task here: a hop is refused by our own closed port, never sent on"
    post = mesh_nftables.snat_rules("/t", plan)
    assert post[-1] == ("meta mark & 0x00080000 == 0x00080000 ip daddr { 192.0.2.2, 192.0.2.3 } "
                        "ip dscp set cs1 snat to 192.0.2.1"), post
