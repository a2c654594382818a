"""Acceptance: the whole agent's load balancing through one agent's life, with real traffic.

This is the agent-level file the IPVS lane (tests/vm/ipvs-lane.sh) runs in a VM whose kernel
has IPVS, under emulation, where an agent takes ~60 s to start and a CLI call ~5 s: so one
agent serves the whole module, sandboxes are made through the API client from this process,
and connections are counted in tens. On this machine (no IPVS) the same checks run against
the iptables backend that ``auto`` picks. What only IPVS has is asserted when it is the
backend: the sysctls in each netns, the fwmark services and their destinations, a draining
task at weight 0 for ``--drain-grace`` and then removed. The even spread itself is checked
with a chi-square test in test_lb.py and test_lb_backend.py.
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import time
from collections import Counter
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from discovery.host import netlink
from discovery.node.client import ApiClient
from lb.ipvs import marks
from tests.helpers import (
    Cli,
    expected_lb_backend,
    ipvs_sysctls,
    ipvs_table,
    ipvs_tcp_timeouts,
    lb_backends,
    lb_rules,
    metric_value,
    nat_rules,
    require_root,
    require_tools,
    time_scale,
    wait,
)

TASK_SERVER = str(Path(__file__).resolve().parent.parent / "taskserver.py")
PORT = 8080
DRAIN_GRACE = 8.0  # the agent's --drain-grace: long enough for the checks made while draining
SUBNET = "10.127.0"


class Node:
    """One agent, a network, service ``web`` with tasks t1..t3 and a client sandbox; t1 has a
    health check on a flag file (one only: under emulation each check is a slow process)."""

    def __init__(self, cli: Cli, flags: Path) -> None:
        self.cli, self.flags = cli, flags
        self.agent = cli.start_agent("--drain-grace", str(DRAIN_GRACE))
        self.api = ApiClient(cli.state_dir / "agent.sock", timeout=120 * time_scale())
        self.net = cli.name("lba")
        cli.run("network", "create", self.net, "--subnet", f"{SUBNET}.0/24")
        cli.run("service", "create", "web", "--network", self.net, "--publish", str(PORT))
        self.client = cli.name("client")
        self.api.call("POST", "/v1/sandboxes", {"name": self.client, "networks": [self.net]})
        self.tasks: dict[str, str] = {}
        for index in range(1, 4):
            name = cli.name(f"t{index}")
            (flags / name).touch()
            spec = {"name": name, "networks": [self.net], "service": "web", "detach": True,
                    "command": [sys.executable, TASK_SERVER, name, str(PORT)]}
            if index == 1:
                # 3 failures in a row, as Docker's default: under emulation a lone check was
                # seen failing now and then (cause not found; the agent logs each change)
                spec["health"] = {"cmd": f"test -e {flags}/{name}", "interval": 0.5, "retries": 3,
                                  "timeout": 5 * time_scale()}
            record = self.api.call("POST", "/v1/sandboxes", spec)
            self.tasks[name] = record["endpoints"][0]["ipv4"]
        self.vip = cli.json("service", "inspect", "web")["vips"][self.net]
        self.backend = cli.info()["lb_backend"]
        assert wait(lambda: all(r["health"] == "healthy" for r in self.records() if r["name"] in self.tasks), 30), \
            f"every task passes its check\n{self.diagnosis()}"
        assert wait(lambda: self.names_seen(9) == set(self.tasks), 30), f"every task serves\n{self.diagnosis()}"

    def records(self) -> list[dict]:
        return self.api.call("GET", "/v1/sandboxes")

    def diagnosis(self) -> str:
        """What a failure in the VM lane needs to be understood: sandboxes, kernel state, log."""
        rows = [f"{r['name']} {r['status']} {r.get('health')} {r['endpoints'][0]['ipv4']}" for r in self.records()]
        kernel = subprocess.run(["nsenter", f"--net={self.cli.netns(self.client)}", "sh", "-c",
                                 "iptables-legacy-save; ipvsadm -Ln 2>&1; ip -4 addr; ip route"],
                                capture_output=True, text=True).stdout
        log = (self.cli.state_dir / "agent.log").read_text()[-4000:]
        return "\n".join(["sandboxes:", *rows, "client netns:", kernel, "agent log (tail):", log])

    def socket(self, kind: int = socket.SOCK_STREAM) -> socket.socket:
        with netlink.entered_netns(self.cli.netns(self.client)):
            sock = socket.socket(socket.AF_INET, kind)
        sock.settimeout(2 * time_scale())
        return sock

    def tcp_name(self) -> str:
        with self.socket() as sock:
            sock.connect((self.vip, PORT))
            return sock.recv(64).split(b"\n")[0].decode()

    def names_seen(self, count: int) -> set[str]:
        seen = set()
        for _ in range(count):
            try:
                seen.add(self.tcp_name())
            except OSError:
                pass
        return seen

    def ipvs(self) -> dict[int, dict[str, int]]:
        return ipvs_table(self.cli.netns(self.client))

    def dnat_rules(self) -> str:
        return lb_rules(self.cli.netns(self.client), self.backend)

    def programmed(self, address: str) -> bool:
        """Is ``address`` a destination of the client's VIP rules (iptables or nftables)?"""
        rules = self.dnat_rules()
        return f"--to-destination {address}" in rules if self.backend == "iptables" else f": {address}" in rules


@pytest.fixture(scope="module", params=lb_backends())
def node(etcd, upstream, tmp_path_factory, request):
    """One agent for the module, on each backend of ``lb_backends()``: what ``auto`` picks here
    (left to ``auto``, so its choice is tested) and the others named with --lb-backend."""
    require_root()
    require_tools("ip", "nsenter", "etcd", "iptables-legacy-save")
    home = tmp_path_factory.mktemp("lbagent")
    flags = home / "health"
    flags.mkdir()
    cli = Cli(etcd.url, "t" + secrets.token_hex(3), home / "state", upstream.address)
    if request.param != expected_lb_backend():
        cli.env["SVCNET_LB_BACKEND"] = request.param
    try:
        yield Node(cli, flags)
    finally:
        cli.cleanup()


def test_auto_picks_the_kernel_backend_with_its_settings_and_metrics(node):
    backend = node.cli.env.get("SVCNET_LB_BACKEND") or expected_lb_backend()
    assert node.backend == backend, "--lb-backend auto, or the one named"
    assert all(r["health"] == "healthy" for r in node.records()), node.diagnosis()
    metrics = node.cli.metrics()
    assert metric_value(metrics, "svcnet_lb_backend_info", backend=backend) == 1
    assert metric_value(metrics, "svcnet_lb_vips") == 4, "one VIP in each of four sandboxes"
    assert metric_value(metrics, "svcnet_lb_syncs_total", result="ok") >= 4
    assert metric_value(metrics, "svcnet_lb_syncs_total", result="error", default=0) == 0
    assert metric_value(metrics, "svcnet_lb_rules_written_total") > 0
    if backend == "ipvs":
        for sandbox in (node.client, *node.tasks):
            assert ipvs_sysctls(node.cli.netns(sandbox)) == {
                "conn_reuse_mode": "0", "expire_nodest_conn": "1", "expire_quiescent_template": "1"}, sandbox
            ipvs_tcp, conntrack_tcp = ipvs_tcp_timeouts(node.cli.netns(sandbox))
            # IPVS's own 900 s would cut an idle connection through the VIP (moby#37822)
            assert ipvs_tcp == conntrack_tcp > 900, (sandbox, ipvs_tcp, conntrack_tcp)
        tcp_mark, udp_mark = marks(IPv4Address(node.vip))
        every_task = dict.fromkeys(node.tasks.values(), 1)
        table = node.ipvs()
        assert table.get(tcp_mark) == every_task and table.get(udp_mark) == every_task, node.diagnosis()
    else:
        assert all(node.programmed(address) for address in node.tasks.values()), node.dnat_rules()
    spread = Counter(node.tcp_name() for _ in range(60))
    assert set(spread) == set(node.tasks), f"{spread}\n{node.diagnosis()}"


def test_an_unhealthy_task_drains_for_the_grace_then_leaves(node):
    sick = node.cli.name("t1")
    address = node.tasks[sick]
    held = None
    for _ in range(60):  # a connection that landed on the task about to fail its check
        sock = node.socket()
        sock.connect((node.vip, PORT))
        if sock.recv(64).split(b"\n")[0].decode() == sick:
            held = sock
            break
        sock.close()
    assert held is not None
    (node.flags / sick).unlink()
    tcp_mark, udp_mark = marks(IPv4Address(node.vip))

    def drained() -> bool:
        if node.backend == "ipvs":  # TCP: weight 0 while the grace runs; UDP: out at once
            table = node.ipvs()
            return table.get(tcp_mark, {}).get(address) == 0 and address not in table.get(udp_mark, {})
        return not node.programmed(address)
    # by the rules, then by traffic: 20 connections that all missed a task still programmed
    # (one in 3,500) once passed for "drained" and the rules said otherwise
    assert wait(drained, 15), node.diagnosis()
    drained_at = time.monotonic()
    seen = node.names_seen(30)
    assert seen and sick not in seen, f"unhealthy: no new connection; seen {seen}"
    held.sendall(b"still there\n")
    assert held.recv(64) == b"still there\n", "the established connection goes on while it drains"
    held.close()
    if node.backend == "ipvs":  # the agent removes the destination once --drain-grace is over
        assert wait(lambda: address not in node.ipvs()[tcp_mark], DRAIN_GRACE + 5), node.ipvs()
        waited = time.monotonic() - drained_at
        assert waited >= DRAIN_GRACE - 1, f"the destination went after {waited:.1f}s, before the grace"
    (node.flags / sick).touch()
    assert wait(lambda: sick in node.names_seen(30), 15), "healthy again: back in the VIP"
    if node.backend == "ipvs":
        assert node.ipvs()[marks(IPv4Address(node.vip))[0]].get(address) == 1


def test_a_removed_task_leaves_the_vip(node):
    gone = node.cli.name("t3")
    address = node.tasks.pop(gone)
    node.api.call("DELETE", f"/v1/sandboxes/{gone}")
    if node.backend == "ipvs":
        tcp_mark, udp_mark = marks(IPv4Address(node.vip))
        assert wait(lambda: address not in node.ipvs().get(udp_mark, {}), 5), node.ipvs()
        assert node.ipvs()[tcp_mark].get(address, 0) == 0, "no new connection to a removed task"
    else:
        assert wait(lambda: not node.programmed(address), 5), node.dnat_rules()
    seen: Counter = Counter()

    def both_serve() -> bool:
        seen.update(node.tcp_name() for _ in range(20))
        return set(node.tasks) <= set(seen)
    assert wait(both_serve, 10), f"the two tasks left serve: {seen}\n{node.diagnosis()}"
    assert gone not in seen, f"a removed task got a new connection: {seen}"
    assert metric_value(node.cli.metrics(), "svcnet_lb_services_written_total") >= 3


def test_a_published_port_answers_on_this_host_and_follows_its_tasks(node):
    """The routing mesh on one node, with the agent's backend (IPVS fwmark services in the
    VM lane, the nftables mesh table here): this host's address on the network, from the host itself and
    from a sandbox (hairpin), TCP and UDP; a removed task leaves at once."""
    from lb.mesh import Backend, MeshPort
    from lb.mesh_ipvs import fwmark

    node.cli.run("service", "create", "pub", "--network", node.net, "--publish", "18080:8080",
                 "--publish", "18081:8080/udp")
    tasks = {}
    for index in (1, 2):
        name = node.cli.name(f"p{index}")
        record = node.api.call("POST", "/v1/sandboxes", {
            "name": name, "networks": [node.net], "service": "pub", "detach": True,
            "command": [sys.executable, TASK_SERVER, name, str(PORT)]})
        tasks[name] = record["endpoints"][0]["ipv4"]
    gateway = f"{SUBNET}.1"  # an address of this host

    def names(inside: str | None, count: int, kind: int = socket.SOCK_STREAM) -> set[str]:
        seen = set()
        for _ in range(count):
            sock = node.socket(kind) if inside else socket.socket(socket.AF_INET, kind)
            sock.settimeout(2 * time_scale())
            try:
                if kind == socket.SOCK_STREAM:
                    sock.connect((gateway, 18080))
                    seen.add(sock.recv(64).split(b"\n")[0].decode())
                else:
                    sock.sendto(b"x", (gateway, 18081))
                    seen.add(sock.recv(64).decode().strip())
            except OSError:
                pass
            finally:
                sock.close()
        return seen

    assert wait(lambda: names(None, 12) == set(tasks), 20 * time_scale()), node.diagnosis()
    assert names("client", 12) == set(tasks), "hairpin: a sandbox through this host's port"
    assert names(None, 12, socket.SOCK_DGRAM) == set(tasks), "UDP"
    here = f"/proc/{os.getpid()}/ns/net"
    if node.backend == "ipvs":
        tcp = fwmark(MeshPort(18080, "tcp", "pub", "ingress", "nat", (Backend(IPv4Address(gateway), 8080, ""),)))
        assert set(ipvs_table(here).get(tcp, {})) == set(tasks.values()), ipvs_table(here)
    elif node.backend == "nftables":  # the port's chain in the mesh table: its tasks as "address . port"
        ruleset = subprocess.run(["nft", "list", "ruleset"], capture_output=True, text=True, check=True).stdout
        assert "table ip svcnet-mesh-" in ruleset and all(f"{a} . 8080" in ruleset for a in tasks.values()), ruleset
    else:
        assert all(f"--to-destination {a}:8080" in nat_rules(here) for a in tasks.values())
    gone = sorted(tasks)[1]
    node.api.call("DELETE", f"/v1/sandboxes/{gone}")
    assert wait(lambda: names(None, 10) == {sorted(tasks)[0]}, 10 * time_scale()), "a removed task leaves"
    node.api.call("DELETE", f"/v1/sandboxes/{sorted(tasks)[0]}")
    node.cli.run("service", "rm", "pub")
