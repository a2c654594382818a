"""Acceptance: the routing mesh on scripts/cluster.sh, driven from the outside client namespace.

Service `web` on overlay `mesh` has tasks w1 (on h1) and w2 (on h2); h3 runs none. A port
published in ingress mode answers on every host and spreads over both tasks.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time

import pytest

from tests.cluster.harness import CLUSTER, TASK_SERVER, cluster_up
from tests.helpers import expected_lb_backend, wait

HOSTS = ("h1", "h2", "h3")

CONNECT = """
import collections, socket, sys
address, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
seen = collections.Counter()
for _ in range(count):
    try:
        s = socket.create_connection((address, port), timeout=2)
        seen[s.recv(64).split(b"\\n")[0].decode() or "closed"] += 1
        s.close()
    except OSError as exc:
        seen[type(exc).__name__] += 1
print(dict(seen))
"""

DATAGRAMS = """
import collections, socket, sys
address, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
seen = collections.Counter()
for _ in range(count):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # a new source port: a new flow each time
    s.settimeout(2)
    s.sendto(b"x", (address, port))
    try:
        seen[s.recv(64).decode().strip()] += 1
    except OSError as exc:
        seen[type(exc).__name__] += 1
    s.close()
print(dict(seen))
"""


ALTERNATING = """
import socket, struct, sys
targets, port, count = sys.argv[1].split(","), int(sys.argv[2]), int(sys.argv[3])
names, retransmitted = set(), 0
for target in targets:  # a batch per node: client ports come back through another node
    for _ in range(count):
        s = socket.create_connection((target, port), timeout=5)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close with RST
        names.add(s.recv(64).split()[0].decode())
        info = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
        retransmitted += struct.unpack_from("I", info, 100)[0] > 0  # tcpi_total_retrans
        s.close()
print(" ".join(sorted(names)), retransmitted)
"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with cluster_up(tmp_path_factory.mktemp("mesh")) as harness:
        harness.svcnet("h1", "network", "create", "mesh", "--driver", "overlay", "--subnet", "10.64.0.0/24")
        harness.svcnet("h1", "service", "create", "web", "--network", "mesh",
                       "--publish", "8080:8080", "--publish", "9053:8080/udp")
        for host, task in (("h1", "w1"), ("h2", "w2")):
            harness.svcnet(host, "run", "-d", "--name", task, "--network", "mesh", "--service", "web", "--",
                           "python3", TASK_SERVER, task, "8080")
        harness.svcnet("h1", "service", "create", "kept", "--network", "mesh", "--publish", "8090:8080,source=keep",
                       "--publish", "9090:8080/udp,source=keep")
        for host, task in (("h1", "k1"), ("h2", "k2")):
            harness.svcnet(host, "run", "-d", "--name", task, "--network", "mesh", "--service", "kept", "--",
                           "python3", TASK_SERVER, task, "8080", "--peer")
        harness.addresses = {host: harness.run("addr", host).stdout.strip() for host in HOSTS}
        assert wait(lambda: tcp(harness, "h3", 8080, 10).keys() == {"w1", "w2"}, 10), "the mesh came up"
        yield harness


def tcp(cluster, host: str, port: int, count: int) -> dict:
    out = cluster.run("client", "--", "python3", "-c", CONNECT, cluster.addresses[host], str(port), str(count))
    return eval(out.stdout)  # a dict literal printed by the script above


def udp(cluster, host: str, port: int, count: int) -> dict:
    out = cluster.run("client", "--", "python3", "-c", DATAGRAMS, cluster.addresses[host], str(port), str(count))
    return eval(out.stdout)


def test_tcp_and_udp_to_every_host_spread_over_the_tasks_on_h1_and_h2(cluster):
    for host in HOSTS:  # h3 runs no task: it still answers
        for seen in (tcp(cluster, host, 8080, 90), udp(cluster, host, 9053, 90)):
            assert set(seen) == {"w1", "w2"} and sum(seen.values()) == 90, (host, seen)
            # binomial(90, 1/2): fewer than 25 on one side happens with p < 1e-5
            assert min(seen.values()) >= 25, (host, seen)


def test_source_keep_tasks_see_the_client_wherever_the_client_came_in(cluster):
    client = cluster.run("client", "--", "ip", "-4", "-o", "addr", "show", "scope", "global").stdout.split()[3]
    client = client.split("/")[0]
    for host in HOSTS:
        for seen in (tcp(cluster, host, 8090, 40), udp(cluster, host, 9090, 40)):
            assert set(seen) == {f"k1 {client}", f"k2 {client}"}, (host, seen)
    # Client ports reused at once through another node (RST closes, batches via h1, h3, h1, h3):
    # on the task's node both flows are one tuple, and replies must follow the newest entry
    # node. Marking only new flows there sent some replies to the old node (a 1 s SYN retry each).
    batches = ",".join(cluster.addresses[h] for h in ("h1", "h3", "h1", "h3"))
    out = cluster.run("client", "--", "python3", "-c", ALTERNATING, batches, "8090", "2000", timeout=180)
    *names, retransmitted = out.stdout.split()
    assert names == ["k1", "k2"], out.stdout
    assert int(retransmitted) <= 1, f"{retransmitted} of 8000 connections needed a retransmission"
    h3 = json.loads(cluster.svcnet("h3", "node", "inspect", "h3", "--format", "json"))
    # masqueraded to h3's own address: its VTEP where remote tasks are reached by node hops over the
    # underlay (the nftables mesh), else its address on the overlay
    nat = h3["vtep"] if expected_lb_backend() == "nftables" else h3["addresses"]["mesh"]
    plain = cluster.run("client", "--", "python3", "-c", CONNECT, cluster.addresses["h3"], "8091", "1", check=False)
    assert "ConnectionRefusedError" in plain.stdout, "nothing on a port nobody published"
    cluster.svcnet("h2", "service", "update", "kept", "--publish-add", "8091:8080")  # default: masquerade
    assert wait(lambda: tcp(cluster, "h3", 8091, 10).keys() == {f"k1 {nat}", f"k2 {nat}"}, 5), \
        "without source=keep tasks see h3's own address"


def bridge_netfilter(cluster, host: str) -> dict[str, int]:
    """svcnet's bridges on ``host`` by network, with their br_netfilter switch (nf_call_iptables)."""
    links = json.loads(cluster.on(host, "ip", "-d", "-j", "link", "show", "type", "bridge"))
    return {link["ifalias"].rsplit(":", 1)[1]: link["linkinfo"]["info_data"]["nf_call_iptables"]
            for link in links if link.get("ifalias", "").startswith("svcnet:")}


def test_br_netfilter_sees_only_the_bridges_that_carry_kept_flows(cluster):
    # the hosts' netns-wide switch is off (cluster.sh): what keeps source=keep working on h2 is
    # its own bridge's switch, which the agent turns on; h3 runs no kept task and keeps it off
    for host in HOSTS:
        assert cluster.on(host, "cat", "/proc/sys/net/bridge/bridge-nf-call-iptables").strip() == "0", host
    assert bridge_netfilter(cluster, "h2") == {"mesh": 1}
    assert bridge_netfilter(cluster, "h3") == {"mesh": 0}


def test_hairpin_from_a_sandbox_and_from_a_host(cluster):
    cluster.svcnet("h1", "run", "-d", "--name", "c1", "--network", "mesh", "--", "sleep", "1000")
    for host in ("h1", "h3"):
        out = cluster.on("h1", "svcnet", "exec", "c1", "--", "python3", "-c", CONNECT,
                         cluster.addresses[host], "8080", "20")
        assert set(eval(out)) == {"w1", "w2"}, (host, out)
    out = cluster.on("h3", "python3", "-c", CONNECT, cluster.addresses["h3"], "8080", "20")
    assert set(eval(out)) == {"w1", "w2"}, ("from h3 itself", out)
    # a client on a peer node (its source: a node's own address) is a client like any other, not
    # a node hop to be served by h1's own task alone
    out = cluster.on("h3", "python3", "-c", CONNECT, cluster.addresses["h1"], "8080", "40")
    assert set(eval(out)) == {"w1", "w2"}, ("from h3 to h1", out)
    if expected_lb_backend() == "nftables":  # node hops leave by the interface they came in by
        for host in HOSTS:
            for conf in ("all", "eth0"):  # the kernel sends them if either says so; a new device says 1
                assert cluster.on(host, "cat", f"/proc/sys/net/ipv4/conf/{conf}/send_redirects").strip() == "0", \
                    f"{host} would send ICMP redirects to on-link clients ({conf})"


def test_only_what_is_published_is_reachable_from_the_underlay(cluster):
    w1 = next(r for r in json.loads(cluster.svcnet("h1", "ps", "--format", "json")) if r["name"] == "w1")
    address = w1["endpoints"][0]["ipv4"]
    cluster.run("client", "--", "ip", "route", "replace", "10.64.0.0/24", "via", cluster.addresses["h1"])
    try:
        direct = cluster.run("client", "--", "python3", "-c", CONNECT.replace("timeout=2", "timeout=1"),
                             address, "8080", "1")
        assert eval(direct.stdout) == {"TimeoutError": 1}, direct.stdout
        assert set(tcp(cluster, "h1", 8080, 10)) <= {"w1", "w2"}
    finally:
        cluster.run("client", "--", "ip", "route", "del", "10.64.0.0/24", check=False)


def test_a_published_port_is_refused_to_a_second_service_and_changes_live(cluster):
    refused = cluster.run("on", "h2", "--", "svcnet", "service", "create", "api", "--network", "mesh",
                          "--publish", "8080:80", check=False)
    assert refused.returncode != 0 and "already published by service 'web'" in refused.stderr, refused.stderr
    cluster.svcnet("h2", "service", "update", "web", "--publish-add", "8081:8080")
    started = time.monotonic()
    assert wait(lambda: set(tcp(cluster, "h3", 8081, 6)) == {"w1", "w2"}, 5)
    assert time.monotonic() - started < 3
    cluster.svcnet("h3", "service", "update", "web", "--publish-rm", "8081")
    assert wait(lambda: tcp(cluster, "h3", 8081, 1) == {"ConnectionRefusedError": 1}, 2)


def test_host_mode_answers_only_where_a_task_runs_with_its_own_task(cluster):
    cluster.svcnet("h1", "service", "create", "local", "--network", "mesh", "--publish", "7070:8080,mode=host")
    cluster.svcnet("h2", "run", "-d", "--name", "l2", "--network", "mesh", "--service", "local", "--",
                   "python3", TASK_SERVER, "l2", "8080")
    assert wait(lambda: tcp(cluster, "h2", 7070, 10) == {"l2": 10}, 5)
    for host in ("h1", "h3"):
        assert tcp(cluster, host, 7070, 3) == {"ConnectionRefusedError": 3}, host


def test_an_agent_restart_leaves_the_rules_byte_identical(cluster):
    before = {host: rules(cluster, host) for host in ("h2", "h3")}
    mesh = ("table ip svcnet-mesh-", "dnat ip to") if "table ip svcnet-mesh-" in before["h3"] else ("SVCNET-MESH-", "DNAT")
    assert all(part in before["h3"] for part in mesh), before["h3"]
    assert "SVCNET-KEEP-" in before["h2"] and "lookup" in before["h2"], "h2 runs a source=keep task"
    for host in ("h2", "h3"):
        cluster.run("kill", host, "agent")
        cluster.run("start", host, "agent")
    time.sleep(2)  # a restarted agent syncs within ms; give it time to (wrongly) write anything
    for host in ("h2", "h3"):
        assert rules(cluster, host) == before[host], host
    assert set(tcp(cluster, "h3", 8080, 10)) == {"w1", "w2"}


def test_an_unhealthy_task_gets_no_new_connection_within_1s(cluster):
    flag = f"{cluster.env['SVCNET_CLUSTER_DIR']}/w3-healthy"
    open(flag, "w").close()
    cluster.svcnet("h3", "run", "-d", "--name", "w3", "--network", "mesh", "--service", "web",
                   "--health-cmd", f"test -e {flag}", "--health-interval", "0.5", "--health-retries", "1",
                   "--", "python3", TASK_SERVER, "w3", "8080")
    assert wait(lambda: "w3" in tcp(cluster, "h1", 8080, 12), 15), "healthy: in the mesh"

    def health() -> str:
        return next(r for r in json.loads(cluster.svcnet("h3", "ps", "--format", "json")) if r["name"] == "w3")["health"]
    os.remove(flag)
    assert wait(lambda: health() == "unhealthy", 10)
    time.sleep(1)
    for host in HOSTS:
        seen = tcp(cluster, host, 8080, 30)
        assert "w3" not in seen and set(seen) == {"w1", "w2"}, (host, seen)


STICKY_FLOW = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # one socket: one conntrack flow throughout
s.settimeout(0.5)
def ask():
    s.sendto(b"x", (sys.argv[1], int(sys.argv[2])))
    try:
        return s.recv(64).decode().strip()
    except OSError:
        return "timeout"
for _ in range(200):
    if ask() == "w2":
        break
    s.close()
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(0.5)
print("on-w2", flush=True)
sys.stdin.readline()  # the test stopped w2
stopped = time.monotonic()
while time.monotonic() - stopped < 3:
    print(f"{time.monotonic() - stopped:.2f} {ask()}", flush=True)
    time.sleep(0.1)
"""


def test_a_stopped_task_gets_no_new_connection_after_1s_and_its_udp_flow_moves(cluster):
    w2 = next(r for r in json.loads(cluster.svcnet("h2", "ps", "--format", "json")) if r["name"] == "w2")
    flow = subprocess.Popen([CLUSTER, "client", "--", "python3", "-c", STICKY_FLOW, cluster.addresses["h3"], "9053"],
                            env=cluster.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert flow.stdout.readline().strip() == "on-w2"
        os.kill(w2["pid"], signal.SIGKILL)  # the task's process dies: its endpoint turns exited
        flow.stdin.write("\n")
        flow.stdin.flush()
        answers = [line.split() for line in flow.communicate(timeout=30)[0].splitlines()]
    finally:
        flow.kill()
    late = [who for at, who in answers if float(at) >= 1.0]
    assert late and set(late) == {"w1"}, answers
    assert tcp(cluster, "h3", 8080, 30) == {"w1": 30}
    assert tcp(cluster, "h1", 8080, 30) == {"w1": 30}


def rules(cluster, host: str) -> str:
    """The host's nat, filter, raw and mangle tables without counters, its nftables ruleset
    (the mesh with the nftables backend), and its ip rules and tables."""
    text = "".join(cluster.on(host, "iptables-legacy-save", "-t", table)
                   for table in ("nat", "filter", "raw", "mangle"))
    text += cluster.on(host, "nft", "list", "ruleset")
    text += cluster.on(host, "ip", "-4", "rule") + cluster.on(host, "ip", "-4", "route", "show", "table", "all")
    return re.sub(r"\[\d+:\d+\]", "", "\n".join(line for line in text.splitlines() if not line.startswith("#")))
