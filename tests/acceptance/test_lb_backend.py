"""Acceptance for a load-balancer backend alone: real traffic through the rules it writes.

No etcd, no agent: a bridge, a client netns and five task netns made with `ip`, task
servers as threads whose sockets live in the task netns, and the backend applying plans
to the client netns. It runs with the backend SVCNET_LB_BACKEND names (default: what
`auto` picks, iptables on this kernel); the IPVS lane (tests/vm/ipvs-lane.sh) runs it in a
VM whose kernel has IPVS, where the full agent is too slow to start under emulation.
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import threading
import time
from collections import Counter
from ipaddress import IPv4Address

import pytest

from discovery.host import netlink
from lb.conntrack import forget_udp_flows
from lb.plan import VipPlan, diff
from lb.sync import make_backend
from tests.helpers import require_root, require_tools
from tests.taskserver import echo

PORT = 8080
SUBNET = "10.140.0"
VIP = IPv4Address(f"{SUBNET}.2")
EMPTY_VIP = IPv4Address(f"{SUBNET}.3")


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


class Topology:
    """client + t1..t5 on one bridge; tasks answer with their name (TCP then echo; UDP)."""

    def __init__(self) -> None:
        self.run_id = "lbb" + secrets.token_hex(2)
        self.bridge = f"{self.run_id}br"
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{SUBNET}.1/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        self.tasks = {f"t{i}": IPv4Address(f"{SUBNET}.{10 + i}") for i in range(1, 6)}
        self.client = self._netns("client", IPv4Address(f"{SUBNET}.9"))
        self.sockets: list[socket.socket] = []
        for name, address in self.tasks.items():
            self._serve(name, self._netns(name, address))

    def _netns(self, name: str, address: IPv4Address) -> str:
        ns = f"{self.run_id}-{name}"
        host_end, inner = f"{self.run_id}{name}", "eth0"
        _ip("netns", "add", ns)
        _ip("link", "add", host_end, "type", "veth", "peer", "name", inner, "netns", ns)
        _ip("link", "set", host_end, "master", self.bridge, "up")
        _ip("-n", ns, "addr", "add", f"{address}/24", "dev", inner)
        _ip("-n", ns, "link", "set", inner, "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        # bridged packets pass the host's iptables (bridge-nf-call-iptables=1); keep ours out of it
        subprocess.run(["ip", "link", "set", self.bridge, "type", "bridge", "nf_call_iptables", "0"],
                       capture_output=True)
        return f"/run/netns/{ns}"

    def _serve(self, name: str, netns: str) -> None:
        with netlink.entered_netns(netns):
            tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        tcp.bind(("0.0.0.0", PORT))
        tcp.listen(256)
        udp.bind(("0.0.0.0", PORT))
        self.sockets += [tcp, udp]
        threading.Thread(target=self._accept, args=(tcp, name.encode()), daemon=True).start()
        threading.Thread(target=self._answer, args=(udp, name.encode()), daemon=True).start()

    @staticmethod
    def _accept(server: socket.socket, name: bytes) -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=echo, args=(conn, name), daemon=True).start()

    @staticmethod
    def _answer(sock: socket.socket, name: bytes) -> None:
        while True:
            try:
                _, addr = sock.recvfrom(512)
                sock.sendto(name, addr)
            except OSError:
                return

    def socket(self, kind: int) -> socket.socket:
        with netlink.entered_netns(self.client):
            sock = socket.socket(socket.AF_INET, kind)
        sock.settimeout(3)
        return sock

    def tcp_name(self) -> str:
        with self.socket(socket.SOCK_STREAM) as sock:
            sock.connect((str(VIP), PORT))
            return sock.recv(64).split(b"\n")[0].decode()

    def udp_name(self) -> str:
        with self.socket(socket.SOCK_DGRAM) as sock:
            sock.sendto(b"?", (str(VIP), PORT))
            return sock.recv(64).decode()

    def plan(self, *names: str) -> dict[IPv4Address, VipPlan]:
        return {VIP: VipPlan(VIP, "web", "front", tuple(sorted(self.tasks[n] for n in names))),
                EMPTY_VIP: VipPlan(EMPTY_VIP, "empty", "front", ())}

    def rules(self) -> str:
        text = subprocess.run(["nsenter", f"--net={self.client}", "iptables-legacy-save"], capture_output=True,
                              text=True, check=True).stdout
        lines = [line.split(" [")[0] for line in text.splitlines() if not line.startswith("#")]
        ipvs = subprocess.run(["nsenter", f"--net={self.client}", "ipvsadm", "-Sn"], capture_output=True, text=True)
        return "\n".join(lines) + (ipvs.stdout if ipvs.returncode == 0 else "")

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()
        for name in ["client", *self.tasks]:
            subprocess.run(["ip", "netns", "del", f"{self.run_id}-{name}"], capture_output=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)


@pytest.fixture
def topology():
    require_root()
    require_tools("ip", "nsenter", "iptables-legacy-save")
    world = Topology()
    yield world
    world.close()


@pytest.fixture
def backend():
    return make_backend(os.environ.get("SVCNET_LB_BACKEND", "auto"), drain_grace=1.0)


class Applier:
    """What the agent's sync loop does for one sandbox: sync, then forget stale UDP flows."""

    def __init__(self, backend, netns: str) -> None:
        self.backend, self.netns = backend, netns
        self.kernel, self.plan = None, {}

    def apply(self, plan) -> object:
        self.kernel, result = self.backend.sync(self.netns, self.kernel, plan)
        forget_udp_flows(self.netns, diff(self.plan, plan).lost_backends())
        self.plan = plan
        return result


def _wait(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def test_spreads_tcp_and_udp_and_follows_scaling(topology, backend):
    applier = Applier(backend, topology.client)
    applier.apply(topology.plan("t1", "t2", "t3"))
    tcp = Counter(topology.tcp_name() for _ in range(300))
    assert set(tcp) == {"t1", "t2", "t3"} and all(60 <= n <= 140 for n in tcp.values()), tcp
    udp = Counter(topology.udp_name() for _ in range(300))
    assert set(udp) == {"t1", "t2", "t3"} and all(60 <= n <= 140 for n in udp.values()), udp
    applier.apply(topology.plan("t1", "t2", "t3", "t4", "t5"))
    scaled = Counter(topology.tcp_name() for _ in range(500))
    assert set(scaled) == set(topology.tasks) and all(50 <= n <= 150 for n in scaled.values()), scaled


def test_a_task_that_leaves_gets_nothing_new_its_tcp_finishes_its_udp_moves(topology, backend):
    applier = Applier(backend, topology.client)
    applier.apply(topology.plan("t1", "t2", "t3"))
    held = None
    while held is None:
        sock = topology.socket(socket.SOCK_STREAM)
        sock.connect((str(VIP), PORT))
        if sock.recv(64).startswith(b"t1"):
            held = sock
        else:
            sock.close()
    flow = topology.socket(socket.SOCK_DGRAM)  # one source port: one flow
    flow.settimeout(0.2)
    first = None
    while first != "t1":  # a flow that lands on t1 (new source port each try)
        flow.close()
        flow = topology.socket(socket.SOCK_DGRAM)
        flow.settimeout(0.2)
        flow.sendto(b"?", (str(VIP), PORT))
        first = flow.recv(64).decode()

    applier.apply(topology.plan("t2", "t3"))
    left_at = time.monotonic()
    moved = None
    while moved is None and time.monotonic() - left_at < 3:
        flow.sendto(b"?", (str(VIP), PORT))
        try:
            answer = flow.recv(64).decode()
        except (TimeoutError, ConnectionRefusedError):
            continue
        if answer != "t1":
            moved = answer
    assert moved in ("t2", "t3") and time.monotonic() - left_at < 1.0, "the UDP flow moved within 1 s"
    spread = Counter(topology.tcp_name() for _ in range(150))
    assert set(spread) == {"t2", "t3"}, spread
    held.sendall(b"still here\n")
    assert held.recv(64) == b"still here\n", "the established TCP connection finishes on t1"
    held.close()
    flow.close()
    time.sleep(1.1)  # past the drain grace: the next sync drops what was draining
    applier.apply(topology.plan("t2", "t3"))
    assert str(topology.tasks["t1"]) not in topology.rules()


def test_a_vip_without_tasks_refuses(topology, backend):
    Applier(backend, topology.client).apply(topology.plan())
    started = time.monotonic()
    with pytest.raises(ConnectionRefusedError):
        topology.tcp_name()
    with pytest.raises((ConnectionRefusedError, PermissionError)):
        with topology.socket(socket.SOCK_DGRAM) as sock:
            sock.connect((str(EMPTY_VIP), PORT))
            sock.send(b"?")
            sock.recv(64)
    assert time.monotonic() - started < 2, "refused, not timed out"


def test_same_plan_again_or_after_a_restart_writes_nothing(topology, backend):
    applier = Applier(backend, topology.client)
    first = applier.apply(topology.plan("t1", "t2", "t3"))
    assert first.services_written == 2
    before = topology.rules()
    assert f"{VIP}" in before
    again = applier.apply(topology.plan("t1", "t2", "t3"))
    assert (again.services_written, again.services_removed, again.rules_written) == (0, 0, 0)
    restarted = make_backend(os.environ.get("SVCNET_LB_BACKEND", "auto"), drain_grace=1.0)
    _, fresh = restarted.sync(topology.client, None, topology.plan("t1", "t2", "t3"))
    assert (fresh.services_written, fresh.services_removed, fresh.rules_written) == (0, 0, 0)
    assert topology.rules() == before
    # a VIP that vanished while we were down is removed on the first sync
    _, gone = restarted.sync(topology.client, None, {VIP: topology.plan("t1")[VIP]})
    assert gone.services_removed == 1 and f"{EMPTY_VIP}" not in topology.rules()
    assert _wait(lambda: topology.tcp_name() == "t1", 2)


def test_an_iptables_chain_edited_behind_our_back_is_rewritten_on_the_next_read(topology):
    backend = make_backend("iptables", drain_grace=1.0)  # service chains are this backend's alone
    Applier(backend, topology.client).apply(topology.plan("t1", "t2"))
    before = topology.rules()
    chain = "SVCNET-S-" + topology.plan()[VIP].tag
    subprocess.run(["nsenter", f"--net={topology.client}", "iptables-legacy", "-t", "nat", "-F", chain], check=True)
    assert topology.rules() != before
    restarted = make_backend("iptables", drain_grace=1.0)
    _, result = restarted.sync(topology.client, None, topology.plan("t1", "t2"))
    # the same rules again (the repaired VIP's dispatch rule now comes last in its chain)
    assert result.services_written == 1 and sorted(topology.rules().splitlines()) == sorted(before.splitlines())
    assert {topology.tcp_name() for _ in range(30)} == {"t1", "t2"}
