"""Acceptance on scripts/cluster.sh: three simulated hosts, a 3-member etcd, three agents.

The cluster comes up once for the module (its own state dir) and goes down at the end, and
the last test checks that `down` left nothing. Everything runs through the harness's verbs,
as a user of the harness would.
"""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time
from pathlib import Path

import pytest

from discovery.host.overlay import mac_for
from tests.cluster.harness import CLUSTER, ROOT, TASK_SERVER, cluster_up
from tests.helpers import require_tools, wait


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with cluster_up(tmp_path_factory.mktemp("cluster")) as harness:
        yield harness


def test_three_hosts_three_etcd_members_every_node_ready(cluster):
    addresses = {host: cluster.run("addr", host).stdout.strip() for host in ("h1", "h2", "h3")}
    assert len(set(addresses.values())) == 3
    nodes = {n["name"]: n for n in json.loads(cluster.svcnet("h3", "node", "ls", "--format", "json"))}
    assert {name: (n["status"], n["advertise_addr"]) for name, n in nodes.items()} == \
        {host: ("ready", address) for host, address in addresses.items()}
    members = cluster.on("h2", "etcdctl", "member", "list")  # the host's environment names every member
    assert len(members.strip().splitlines()) == 3, members
    assert cluster.run("client", "--", "ping", "-c1", "-W1", addresses["h1"]).returncode == 0, \
        "the client namespace is on the underlay"


def test_overlay_spans_hosts_names_ping_at_the_overlay_mtu_and_one_vip_balances_all(cluster):
    cluster.svcnet("h1", "network", "create", "front", "--driver", "overlay", "--subnet", "10.61.0.0/24")
    network = json.loads(cluster.svcnet("h2", "network", "inspect", "front", "--format", "json"))
    assert network["driver"] == "overlay" and network["vni"] >= 4096
    cluster.svcnet("h1", "service", "create", "web", "--network", "front")
    for host in ("h1", "h2", "h3"):
        task = "t" + host[1]
        cluster.svcnet(host, "run", "-d", "--name", task, "--network", "front", "--service", "web", "--",
                       "python3", TASK_SERVER, task, "8080")
    cluster.svcnet("h1", "run", "-d", "--name", "a1", "--network", "front", "--", "sleep", "1000")
    cluster.svcnet("h3", "run", "-d", "--name", "c3", "--network", "front", "--", "sleep", "1000")
    address = json.loads(cluster.svcnet("h1", "node", "inspect", "h1", "--format", "json"))["endpoints"]
    assert "front/a1" in address
    assert wait(lambda: len(cluster.dig("h3", "c3", "a1")) == 1, 5)
    # across hosts by name, and at the overlay MTU with DF set: 1450 - 28 bytes of ICMP payload
    ping = cluster.on("h3", "svcnet", "exec", "c3", "--", "ping", "-c2", "-W2", "-M", "do", "-s", "1422", "a1",
                      check=False)
    assert " 0% packet loss" in ping, ping
    too_big = cluster.on("h3", "svcnet", "exec", "c3", "--", "ping", "-c1", "-W2", "-M", "do", "-s", "1423", "a1",
                         check=False)
    assert " 0% packet loss" not in too_big, "the veth's MTU is the underlay's minus 50"
    vxlan = cluster.on("h2", "ip", "-d", "link", "show", "type", "vxlan")
    assert f"vxlan id {network['vni']}" in vxlan and "nolearning" in vxlan and "mtu 1450" in vxlan, vxlan
    assert wait(lambda: len(cluster.dig("h3", "c3", "tasks.web")) == 3, 5)
    vip = json.loads(cluster.svcnet("h1", "service", "inspect", "web", "--format", "json"))["vips"]["front"]
    script = ("import socket, collections\nc = collections.Counter()\nfor _ in range(90):\n"
              f"    s = socket.create_connection(('{vip}', 8080), timeout=2)\n"
              "    c[s.recv(64).split(b'\\n')[0].decode()] += 1\n    s.close()\nprint(sorted(c))")
    for host, sandbox in (("h1", "a1"), ("h3", "c3")):
        seen = cluster.on(host, "svcnet", "exec", sandbox, "--", "python3", "-c", script).strip()
        assert seen == "['t1', 't2', 't3']", (host, seen)


def test_hosts_do_not_track_overlay_packets_but_still_track_what_they_route(cluster):
    """raw NOTRACK for the VXLAN UDP and for frames bridged within a subnet (the overlay
    throughput figure depends on it); traffic to the host's own gateway address stays tracked."""
    require_tools("conntrack")
    c3 = next(r for r in json.loads(cluster.svcnet("h3", "ps", "--format", "json")) if r["name"] == "c3")
    source = c3["endpoints"][0]["ipv4"]
    for host in ("h1", "h3"):
        cluster.on(host, "conntrack", "-F")
    script = ("import socket\nfor _ in range(5):\n"
              "    s = socket.create_connection(('t1', 8080), timeout=2)\n    s.recv(64)\n    s.close()")
    cluster.on("h3", "svcnet", "exec", "c3", "--", "python3", "-c", script)
    cluster.on("h3", "svcnet", "exec", "c3", "--", "ping", "-c1", "-W2", "10.61.0.1")
    for host in ("h1", "h3"):
        inner = cluster.run("on", host, "--", "conntrack", "-L", "-p", "tcp", "--orig-src", source)
        outer = cluster.run("on", host, "--", "conntrack", "-L", "-p", "udp", "--orig-port-dst", "4789")
        assert inner.stdout.strip() == "" and outer.stdout.strip() == "", (host, inner.stdout, outer.stdout)
    routed = cluster.on("h3", "conntrack", "-L", "-p", "icmp", "--orig-src", source, "--orig-dst", "10.61.0.1")
    assert source in routed, "a ping to the host's gateway address is tracked (routed, NAT-able traffic)"


def test_two_overlays_never_see_each_other_and_the_client_reaches_neither(cluster):
    cluster.svcnet("h2", "network", "create", "back", "--driver", "overlay", "--subnet", "10.62.0.0/24")
    cluster.svcnet("h2", "run", "-d", "--name", "b2", "--network", "back", "--", "sleep", "1000")
    cluster.svcnet("h1", "run", "-d", "--name", "b1", "--network", "back", "--", "sleep", "1000")
    assert wait(lambda: len(cluster.dig("h1", "b1", "b2")) == 1, 5)
    assert " 0% packet loss" in cluster.on("h1", "svcnet", "exec", "b1", "--", "ping", "-c1", "-W2", "b2")
    front_a1 = cluster.dig("h3", "c3", "a1")[0]
    assert cluster.dig("h1", "b1", "a1") == [] and cluster.dig("h1", "b1", "web") == [], "no names across"
    crossing = cluster.on("h1", "svcnet", "exec", "b1", "--", "ping", "-c1", "-W1", front_a1, check=False)
    assert " 0% packet loss" not in crossing, "no packets across"
    outside = cluster.run("client", "--", "ping", "-c1", "-W1", front_a1, check=False)
    assert outside.returncode != 0, "the client namespace reaches no overlay address"


def test_dns_answers_every_20ms_while_an_etcd_member_dies_and_returns(cluster):
    """Answers come from memory: an etcd member going away costs no query."""
    failures, answers = [], []
    stop = threading.Event()

    def loop() -> None:
        argv = [CLUSTER, "on", "h3", "--", "svcnet", "exec", "c3", "--", "sh", "-c",
                "end=$(($(date +%s) + 10)); while [ $(date +%s) -lt $end ]; do "
                "dig +short +tries=1 +time=1 a1 || echo FAIL; sleep 0.02; done"]
        out = subprocess.run(argv, env=cluster.env, capture_output=True, text=True, timeout=60).stdout
        for line in out.splitlines():
            (failures if (line == "FAIL" or not line[0].isdigit()) else answers).append(line)
        stop.set()

    digger = threading.Thread(target=loop)
    digger.start()
    time.sleep(2)
    cluster.run("kill", "h2", "etcd")
    time.sleep(3)
    cluster.run("start", "h2", "etcd")
    digger.join(timeout=60)
    assert stop.is_set()
    assert failures == [] and len(answers) > 100, (failures[:5], len(answers))
    cluster.svcnet("h1", "service", "create", "after", "--network", "front")  # the cluster still takes writes


def test_writes_and_the_watch_go_through_an_etcd_member_dying_none_lost_none_twice(cluster):
    """A writer on h1 and a watcher on h3, both on all three endpoints, while h1's member dies."""
    probe = str(ROOT / "tests" / "cluster" / "failover_probe.py")
    prefix = "/failover-probe"
    watcher = subprocess.Popen([CLUSTER, "on", "h3", "--", "python3", probe, "watch", prefix], env=cluster.env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    writer = subprocess.Popen([CLUSTER, "on", "h1", "--", "python3", probe, "write", prefix, "8"], env=cluster.env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(2)
    cluster.run("kill", "h1", "etcd")
    time.sleep(3)
    cluster.run("start", "h1", "etcd")
    written, errors = writer.communicate(timeout=120)
    assert writer.returncode == 0, errors[-2000:]
    acknowledged = json.loads(written)["acknowledged"]
    seen, errors = watcher.communicate(timeout=120)
    assert watcher.returncode == 0, errors[-2000:]
    result = json.loads(seen)
    assert result["services"] == sorted([f"s{i}" for i in range(acknowledged)] + ["done"]), "none lost"
    revisions = result["revisions"]
    assert revisions == sorted(set(revisions)), "no revision published twice or out of order"
    assert acknowledged > 50, acknowledged


def test_a_dead_agents_tasks_leave_answers_within_the_lease_and_return_with_their_addresses(cluster):
    address = cluster.dig("h3", "c3", "a1")
    assert address
    cluster.run("kill", "h1", "agent")
    killed = time.monotonic()
    assert wait(lambda: cluster.dig("h3", "c3", "a1") == [], 15)
    assert time.monotonic() - killed <= 10 + 1 + 2, "lease TTL (10 s) + 1 s, and the dig's own time"
    node = json.loads(cluster.svcnet("h3", "node", "inspect", "h1", "--format", "json"))
    assert node["status"] == "down"
    h1 = cluster.run("addr", "h1").stdout.strip()
    entry = re.compile(rf"^{mac_for(address[0])} dev svvx\S+ dst {h1} ", re.M)  # a1's (h1's own address stays)
    assert wait(lambda: not entry.search(cluster.on("h3", "bridge", "fdb", "show")), 3), "h3 forgot h1's endpoints"
    cluster.run("start", "h1", "agent")
    assert wait(lambda: cluster.dig("h3", "c3", "a1") == address, 5), "back, same address"
    assert wait(lambda: entry.search(cluster.on("h3", "bridge", "fdb", "show")), 3)
    ping = cluster.on("h3", "svcnet", "exec", "c3", "--", "ping", "-c1", "-W2", "a1", check=False)
    assert " 0% packet loss" in ping, ping
    assert json.loads(cluster.svcnet("h2", "node", "inspect", "h1", "--format", "json"))["status"] == "ready"


def test_down_leaves_nothing(cluster):
    cluster.run("down")
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert "svccl-" not in netns and "svcnet-h" not in netns, netns
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert "svccl" not in links, links
    assert not Path(cluster.env["SVCNET_CLUSTER_DIR"]).exists()
    assert str(cluster.env["SVCNET_CLUSTER_DIR"]) not in Path("/proc/self/mounts").read_text()
    leftover = subprocess.run(["pgrep", "-f", cluster.env["SVCNET_CLUSTER_DIR"]], capture_output=True, text=True)
    assert leftover.stdout.strip() == "", leftover.stdout
