"""Acceptance for a load-balancer backend alone: real traffic through the rules it writes.

No etcd, no agent: a bridge, a client netns and five task netns made with `ip`, task
servers as threads whose sockets live in the task netns, and the agent's own sync loop
(``lb.sync.LbSync``) fed Views and programming the client netns. Every test runs on each
backend of ``tests.helpers.lb_backends()``: here nftables (what `auto` picks on this kernel)
and iptables; the IPVS lane (tests/vm/ipvs-lane.sh) runs it on IPVS in a VM whose kernel has
it, where the full agent is too slow to start under emulation.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import socket
import subprocess
import threading
import time
from collections import Counter
from ipaddress import IPv4Address

import pytest

from discovery.host import netlink
from discovery.metrics import Metrics
from discovery.state.keys import KeyLayout
from discovery.state.model import Endpoint, FlowTimeout, Network, Service
from discovery.state.view import Change, View
from lb import sync as lb_sync
from lb.ipvs import marks
from lb.nftables import NftablesBackend
from lb.plan import VipPlan
from lb.sync import LbSync, make_backend
from tests.helpers import (
    expected_lb_backend,
    ipvs_table,
    lb_backends,
    lb_rules,
    metric_value,
    require_root,
    require_tools,
)
from tests.stats import assert_uniform
from tests.taskserver import echo

PORT = 8080
SUBNET = "10.140.0"
NETWORK = "front"
VIP = IPv4Address(f"{SUBNET}.2")
EMPTY_VIP = IPv4Address(f"{SUBNET}.3")
DRAIN_GRACE = 5.0  # long enough for the checks in between, under emulation too (the IPVS lane)
SANDBOX = "client"
KEYS = KeyLayout("/svcnet-lbb")
THREE_TASKS = 750  # connections: enough for the chi-square check to catch an uneven split (tests/stats.py)
FIVE_TASKS = 500


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def _in_client(netns: str, *command: str) -> str:
    """stdout of ``command`` in the client netns; its failure is the test's failure."""
    result = subprocess.run(["nsenter", f"--net={netns}", *command], capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(command)} exited {result.returncode}: {result.stderr.strip()}"
    return result.stdout


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

    def view(self, revision: int, *names: str, unhealthy: tuple[str, ...] = (), empty: bool = True,
             flow_timeout: FlowTimeout | None = None) -> View:
        """A View as the watcher builds one (from key changes): the network, service ``web``
        (VIP, ``flow_timeout``) with tasks ``names`` healthy and ``unhealthy`` not, and
        (``empty``) service ``empty`` with none."""
        services = [Service("web", (NETWORK,), vips={NETWORK: VIP}, flow_timeout=flow_timeout)]
        if empty:
            services.append(Service("empty", (NETWORK,), vips={NETWORK: EMPTY_VIP}))
        endpoints = [Endpoint(name, NETWORK, self.tasks[name], "node-lbb", service="web",
                              health="unhealthy" if name in unhealthy else "healthy")
                     for name in (*names, *unhealthy)]
        changes = [Change(KEYS.network(NETWORK), _json(Network.create(NETWORK, f"{SUBNET}.0/24")))]
        changes += [Change(KEYS.service(s.name), _json(s)) for s in services]
        changes += [Change(KEYS.endpoint(NETWORK, e.container), _json(e)) for e in endpoints]
        return View().apply(changes, revision, KEYS)

    def rules(self, backend: str) -> str:
        return lb_rules(self.client, backend)

    def ipvs_dests(self) -> dict[int, dict[IPv4Address, int]]:
        """fwmark -> destination -> weight, from `ipvsadm -Sn` in the client netns."""
        return {mark: {IPv4Address(a): w for a, w in dests.items()} for mark, dests in ipvs_table(self.client).items()}

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()
        for name in ["client", *self.tasks]:
            subprocess.run(["ip", "netns", "del", f"{self.run_id}-{name}"], capture_output=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)


def _json(obj) -> bytes:
    return json.dumps(obj.to_dict()).encode()


@pytest.fixture
def topology():
    require_root()
    require_tools("ip", "nsenter", "iptables-legacy-save")
    world = Topology()
    yield world
    world.close()


class Synced:
    """The agent's load-balancer loop, ``lb.sync.LbSync``, serving the client netns: its
    ``run()`` on an event loop of its own thread, fed Views as the watcher would feed them."""

    def __init__(self, topology: Topology, choice: str) -> None:
        self.topology = topology
        self.metrics = Metrics()
        self.lb = LbSync(make_backend(choice, drain_grace=DRAIN_GRACE), self.metrics)
        self.backend = self.lb.backend.name
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.revision = 0
        self._call(self._add())
        self.task = self._call(self._spawn())

    async def _spawn(self) -> asyncio.Task:
        return asyncio.create_task(self.lb.run())

    async def _stop(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)

    async def _add(self) -> None:
        self.lb.add(SANDBOX, self.topology.client, [NETWORK])

    def _call(self, coroutine, timeout: float = 30):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def apply(self, *names: str, **kwargs) -> None:
        """Publish a View with ``names`` as web's healthy tasks; return once the loop has
        synced the client netns to it (``wait_synced``), failing on a sync error."""
        self.revision += 1
        view = self.topology.view(self.revision, *names, **kwargs)
        errors = self.value("svcnet_lb_syncs_total", result="error")

        async def publish() -> None:
            self.lb.on_view(view)
            await self.lb.wait_synced(SANDBOX, timeout=20)
            await self.lb.settled()  # and the UDP flows of tasks that left are forgotten
        try:
            self._call(publish())
        except TimeoutError:
            pass  # reported below with what the loop knows
        if self.task.done():
            raise AssertionError(f"LbSync.run() ended: {self.task.exception()!r}")
        assert self.value("svcnet_lb_syncs_total", result="error") == errors, "a sync failed (see the log)"
        assert self.lb.sandboxes[SANDBOX].revision >= view.revision, "the sandbox never synced to the View"

    def value(self, name: str, **labels: str) -> float:
        return metric_value(self.metrics.render(), name, default=0.0, **labels)

    def written(self) -> tuple[float, float, float]:
        """(ok syncs, VIPs (re)programmed or removed, rules written) so far, from /metrics."""
        return (self.value("svcnet_lb_syncs_total", result="ok"), self.value("svcnet_lb_services_written_total"),
                self.value("svcnet_lb_rules_written_total"))

    def close(self) -> None:
        if self.loop.is_closed():
            return
        self._call(self._stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture(params=lb_backends())
def start_lb(topology, request):
    """``start_lb(choice=...)``: a fresh LbSync (a fresh agent, as after a restart), on each
    backend of ``lb_backends()`` in turn."""
    started: list[Synced] = []

    def start(choice: str | None = None) -> Synced:
        synced = Synced(topology, choice or request.param)
        if synced.backend == "ipvs":
            ipvs_table(topology.client)  # ipvsadm is there and reads the table
        started.append(synced)
        return synced
    yield start
    for synced in started:
        synced.close()


def _wait(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def test_auto_picks_ipvs_then_nftables_then_iptables():
    assert make_backend("auto", drain_grace=DRAIN_GRACE).name == expected_lb_backend()


def test_spreads_tcp_and_udp_and_follows_scaling(topology, start_lb):
    lb = start_lb()
    assert lb.value("svcnet_lb_backend_info", backend=lb.backend) == 1
    lb.apply("t1", "t2", "t3", unhealthy=("t4",))
    healthy = ["t1", "t2", "t3"]
    assert_uniform(Counter(topology.tcp_name() for _ in range(THREE_TASKS)), healthy, "TCP over 3 tasks")
    assert_uniform(Counter(topology.udp_name() for _ in range(THREE_TASKS)), healthy, "UDP over 3 tasks")
    assert lb.value("svcnet_lb_vips") == 2, "web and empty are programmed"
    lb.apply("t1", "t2", "t3", "t4", "t5")
    assert_uniform(Counter(topology.tcp_name() for _ in range(FIVE_TASKS)), list(topology.tasks), "TCP over 5 tasks")


def _dests_of_t1(topology: Topology) -> tuple[int | None, int | None]:
    """t1's weight in the VIP's TCP and UDP IPVS services (None: not a destination)."""
    table = topology.ipvs_dests()
    tcp, udp = marks(VIP)
    t1 = topology.tasks["t1"]
    return table.get(tcp, {}).get(t1), table.get(udp, {}).get(t1)


def test_a_task_that_leaves_gets_nothing_new_its_tcp_finishes_its_udp_moves(topology, start_lb):
    lb = start_lb()
    lb.apply("t1", "t2", "t3")
    if lb.backend == "ipvs":
        assert _dests_of_t1(topology) == (1, 1), topology.ipvs_dests()
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

    lb.apply("t2", "t3")
    left_at = time.monotonic()
    t1 = str(topology.tasks["t1"])
    if lb.backend == "ipvs":  # TCP: weight 0 until the drain grace is over; UDP: gone at once
        assert _dests_of_t1(topology) == (0, None), topology.ipvs_dests()
    else:
        assert t1 not in topology.rules(lb.backend), "iptables: the task leaves the rules at once"
        assert lb.value("svcnet_lb_conntrack_deleted_total") >= 1, "t1's UDP flows were forgotten"
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
    # no new View: the loop's own drain deadline takes t1 out once the grace is over
    assert _wait(lambda: t1 not in topology.rules(lb.backend), DRAIN_GRACE + 3), topology.rules(lb.backend)
    if lb.backend == "ipvs":
        assert _dests_of_t1(topology) == (None, None)


def test_a_vip_without_tasks_refuses(topology, start_lb):
    start_lb().apply()
    started = time.monotonic()
    with pytest.raises(ConnectionRefusedError):
        topology.tcp_name()
    with pytest.raises((ConnectionRefusedError, PermissionError)):
        with topology.socket(socket.SOCK_DGRAM) as sock:
            sock.connect((str(EMPTY_VIP), PORT))
            sock.send(b"?")
            sock.recv(64)
    assert time.monotonic() - started < 2, "refused, not timed out"


def test_a_vip_that_loses_its_last_task_refuses_new_connections_but_not_open_ones(topology, start_lb):
    """Its last task gone (or an agent that restarted after its lease ran out and has not
    written its tasks again yet): new connections are refused, an open one goes on."""
    lb = start_lb()
    lb.apply("t1")
    with topology.socket(socket.SOCK_STREAM) as held:
        held.connect((str(VIP), PORT))
        assert held.recv(64) == b"t1\n"
        lb.apply()
        with pytest.raises(ConnectionRefusedError):
            topology.tcp_name()
        held.sendall(b"still here\n")
        assert held.recv(64) == b"still here\n", "the open connection was reset"
    lb.apply("t1")
    assert topology.tcp_name() == "t1"


def test_same_view_again_or_after_a_restart_writes_nothing(topology, start_lb):
    lb = start_lb()
    lb.apply("t1", "t2", "t3")
    syncs, services, rules = lb.written()
    assert (syncs, services) == (1, 2) and rules > 0, lb.written()
    before = topology.rules(lb.backend)
    assert f"{VIP}" in before and f"{EMPTY_VIP}" in before
    if lb.backend == "ipvs":
        assert str(marks(VIP)[0]) in before and str(topology.tasks["t3"]) in before, before
    lb.apply("t1", "t2", "t3")
    assert lb.written() == (syncs, services, rules), "the same plan again: no sync at all"
    lb.close()

    restarted = start_lb()
    restarted.apply("t1", "t2", "t3")
    assert restarted.written() == (1, 0, 0), "a restart reads the kernel back and writes nothing"
    assert topology.rules(lb.backend) == before
    restarted.close()
    # a VIP that vanished while we were down is removed on the first sync
    again = start_lb()
    again.apply("t1", empty=False)
    assert again.written()[:2] == (1, 2), "web rewritten, empty removed"
    assert f"{EMPTY_VIP}" not in topology.rules(lb.backend)
    assert again.value("svcnet_lb_vips") == 1
    assert _wait(lambda: topology.tcp_name() == "t1", 2)
    assert {topology.tcp_name() for _ in range(30)} == {"t1"}


@pytest.mark.parametrize("start_lb", ["iptables"], indirect=True)
def test_an_iptables_chain_edited_behind_our_back_is_rewritten_on_the_next_read(topology, start_lb):
    lb = start_lb("iptables")  # service chains are this backend's alone
    lb.apply("t1", "t2")
    before = topology.rules("iptables")
    chain = "SVCNET-S-" + VipPlan(VIP, "web", NETWORK, ()).tag
    _in_client(topology.client, "iptables-legacy", "-t", "nat", "-F", chain)
    assert topology.rules("iptables") != before
    lb.close()
    restarted = start_lb("iptables")
    restarted.apply("t1", "t2")
    # the same rules again (the repaired VIP's dispatch rule now comes last in its chain)
    assert restarted.written()[:2] == (1, 1)
    assert sorted(topology.rules("iptables").splitlines()) == sorted(before.splitlines())
    assert {topology.tcp_name() for _ in range(30)} == {"t1", "t2"}


@pytest.mark.parametrize("start_lb", ["nftables"], indirect=True)
def test_an_nftables_table_edited_behind_our_back_is_repaired_on_the_next_read(topology, start_lb):
    lb = start_lb("nftables")
    lb.apply("t1", "t2")
    before = topology.rules("nftables")
    # a lost slot: the VIP's elements are rewritten; a flushed chain: the table is rebuilt
    _in_client(topology.client, "nft", "delete", "element", "ip", "svcnet", "backends", f"{{ {VIP} . 1 }}")
    assert topology.rules("nftables") != before
    lb.close()
    restarted = start_lb("nftables")
    restarted.apply("t1", "t2")
    assert restarted.written()[:2] == (1, 1), "only web is rewritten"
    assert topology.rules("nftables") == before
    assert {topology.tcp_name() for _ in range(30)} == {"t1", "t2"}
    restarted.close()
    _in_client(topology.client, "nft", "flush", "chain", "ip", "svcnet", "vips")
    again = start_lb("nftables")
    again.apply("t1", "t2")
    assert again.written()[:2] == (1, 2), "the table is rebuilt: both VIPs written"
    assert {topology.tcp_name() for _ in range(30)} == {"t1", "t2"}


@pytest.mark.parametrize("start_lb", ["nftables"], indirect=True)
def test_switching_between_iptables_and_nftables_leaves_no_rules_of_the_other(topology, start_lb):
    """An agent restarted with another --lb-backend: the old backend's rules would catch VIP
    traffic first; they are taken out on the first sync."""
    first = start_lb("iptables")
    first.apply("t1")
    first.close()
    second = start_lb("nftables")
    second.apply("t2")
    assert "SVCNET" not in topology.rules("iptables"), "the iptables chains are gone"
    assert {topology.tcp_name() for _ in range(20)} == {"t2"}
    second.close()
    third = start_lb("iptables")
    third.apply("t3")
    assert "table ip svcnet" not in _in_client(topology.client, "nft", "list", "tables")
    assert {topology.tcp_name() for _ in range(20)} == {"t3"}


def _conntrack_timeouts(netns: str, protocol: str) -> list[int]:
    """Seconds left on each ``protocol`` entry towards the VIP's port in ``netns``."""
    listing = _in_client(netns, "conntrack", "-L", "-p", protocol, "--dport", str(PORT))
    return [int(line.split()[2]) for line in listing.splitlines() if f"dst={VIP}" in line]


@pytest.mark.parametrize("start_lb", ["nftables"], indirect=True)
def test_a_flow_timeout_is_the_conntrack_timeout_of_connections_through_the_vip(topology, start_lb):
    """Established TCP keeps the kernel's 5 days unless the service says otherwise (IPVS cut
    idle connections at 900 s in Docker, moby#37822); UDP flows get theirs too."""
    lb = start_lb()
    lb.apply("t1", flow_timeout=FlowTimeout(tcp=7200, udp=45))
    with topology.socket(socket.SOCK_STREAM) as held:
        held.connect((str(VIP), PORT))
        assert held.recv(64) == b"t1\n"
        assert topology.udp_name() == "t1"
        (tcp,) = _conntrack_timeouts(topology.client, "tcp")
        assert 7000 < tcp <= 7200, tcp
        assert all(30 < udp <= 45 for udp in _conntrack_timeouts(topology.client, "udp"))
        before = topology.rules("nftables")
        lb.close()
        restarted = start_lb()
        restarted.apply("t1", flow_timeout=FlowTimeout(tcp=7200, udp=45))
        assert restarted.written() == (1, 0, 0) and topology.rules("nftables") == before, "a restart writes nothing"
        restarted.apply("t1")  # the timeout withdrawn: new connections get the kernel's again
    assert "ft-tcp-7200" not in topology.rules("nftables"), "its policy and set went with the last user"
    with topology.socket(socket.SOCK_STREAM) as fresh:
        fresh.connect((str(VIP), PORT))
        fresh.recv(64)
        assert max(_conntrack_timeouts(topology.client, "tcp")) > 400000, "the kernel's 5 days"


@pytest.mark.parametrize("start_lb", ["nftables"], indirect=True)
def test_a_quiet_sandbox_lets_go_of_the_nft_cache_and_the_next_change_still_applies(topology, start_lb,
                                                                                   monkeypatch):
    """libnftables keeps the ruleset copy its last command fetched (~0.7 MB per sandbox at
    10,000 services); a sandbox quiet for IDLE_AFTER lets it go, once, and its context still
    writes the next change."""
    monkeypatch.setattr(lb_sync, "IDLE_AFTER", 0.2)
    released = []
    original = NftablesBackend.release

    def release(self, state) -> None:
        released.append(state)
        original(self, state)
    monkeypatch.setattr(NftablesBackend, "release", release)
    lb = start_lb()
    lb.apply("t1", "t2", "t3")
    assert _wait(lambda: len(released) == 1, 3), "the quiet sandbox never let go"
    time.sleep(0.5)
    assert len(released) == 1, "let go once per quiet spell, not on every tick"
    lb.apply("t2")
    assert _wait(lambda: topology.tcp_name() == "t2", 2)
    assert {topology.tcp_name() for _ in range(30)} == {"t2"}
    assert _wait(lambda: len(released) == 2, 3), "quiet again after the change: let go again"
