"""Scale: 10,000 services x 3 tasks, 100 sandboxes, through the load balancer's real path.

    sudo .venv/bin/python bench/scale_bench.py [--services 10000] [--sandboxes 100]
    (or: sudo scripts/bench.sh scale)

For each backend this kernel runs (what ``auto`` picks first), with Views built from key
changes as the watcher builds them and the agent's own sync loop (``lb.sync.LbSync``):

  sync_10k_ms          one sandbox netns loaded from empty with every service
  change_10k_ms        one service's tasks changed: View.apply + planning + the backend's
                       transaction, in one sandbox (median of 20)
  change_10k_100sb_ms  the same change until every one of --sandboxes sandboxes holds it
                       (the per-sandbox tasks of LbSync.run; median of 5)
  first_packet_ratio   TCP connect time to the VIP added last over the first one (a task
                       netns answers; 300 connects each, alternating, medians)

Then, with its own etcd and a real agent (``--registry``, on by default): 10,000 services
loaded into etcd in bulk (the registry's own layout), then

  create_10k_ms        one service created through the registry (p50 of 20)
  dns_change_10k_ms    a new service until a query from a sandbox answers it (p99 of 20;
                       a UDP socket in the sandbox asks every millisecond)
  dns_stall_max_ms     the longest wait for an answer in a 1 ms query loop while 100
                       services are created
  dns_stall_control_ms the same loop at the same time against the bench's own upstream, a
                       trivial asyncio UDP server in a process of its own: what the machine
                       alone makes a Python resolver wait (the floor under the figure above)
  agent_rss_mb_100sb   the agent's resident memory with 100 sandboxes among 10,000 services

The last line is one JSON object: ``backend`` (what auto chose) and the figures per
backend. ``nx_mix_qps_ratio``: dnsperf in a sandbox with 10 % names that do not exist (the bench's
upstream on loopback answers NXDOMAIN with an SOA), svcnet over a naive forwarder the bench
provides (Docker is not started here; the reason is printed). iptables is measured at --iptables-services
(default 2,000: at 10,000 one load takes minutes) and only in one sandbox; the JSON says so.
Everything it makes is named after the run (``scb`` and four hex digits) and removed, also after
a crash (``--sweep``); one run at a time (it holds /run/svcnet-scale-bench.lock).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import json
import multiprocessing
import os
import re
import secrets
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from discovery.host import netlink  # noqa: E402
from discovery.metrics import Metrics  # noqa: E402
from discovery.state.keys import KeyLayout  # noqa: E402
from discovery.state.model import Endpoint, Network, Service  # noqa: E402
from discovery.state.view import Change, View  # noqa: E402
from lb.sync import LbSync, make_backend  # noqa: E402

RUN = "scb" + secrets.token_hex(2)  # bridge names hold 15 bytes
KEYS = KeyLayout("/scalebench")
NETWORK = "big"
SUBNET = IPv4Network("10.96.0.0/12")  # VIPs from .0.1 up, tasks from 10.100.0.0 up
TASK_BASE = int(IPv4Address("10.100.0.1"))
SERVER = IPv4Address("10.111.255.10")  # the one real task, in its own netns
CLIENT = IPv4Address("10.111.255.9")
PORT = 9000


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def _json(obj) -> bytes:
    return json.dumps(obj.to_dict()).encode()


def vip_of(index: int) -> IPv4Address:
    return IPv4Address(int(SUBNET.network_address) + index + 1)


def build_view(services: int, tasks: int = 3) -> View:
    """The network, ``services`` vip-mode services, ``tasks`` healthy tasks each; the first
    and the last service's tasks are the real server (for first_packet_ratio)."""
    changes = [Change(KEYS.network(NETWORK), _json(Network.create(NETWORK, str(SUBNET))))]
    for index in range(services):
        name = f"s{index}"
        changes.append(Change(KEYS.service(name), _json(Service(name, (NETWORK,), vips={NETWORK: vip_of(index)}))))
        for task in range(tasks):
            address = SERVER if index in (0, services - 1) else IPv4Address(TASK_BASE + index * tasks + task)
            container = f"{name}-{task}"
            changes.append(Change(KEYS.endpoint(NETWORK, container),
                                  _json(Endpoint(container, NETWORK, address, "bench", service=name))))
    return View().apply(changes, 1, KEYS)


def one_change(view: View, round_: int) -> View:
    """Service s1's first task moves to a new address (a task replaced)."""
    address = IPv4Address(int(IPv4Address("10.110.0.1")) + round_)
    endpoint = Endpoint("s1-0", NETWORK, address, "bench", service="s1")
    return view.apply([Change(KEYS.endpoint(NETWORK, "s1-0"), _json(endpoint))], view.revision + 1, KEYS)


class Loop:
    """An LbSync with its run() on an event loop of its own thread."""

    def __init__(self, backend_name: str) -> None:
        import threading
        self.metrics = Metrics()
        self.lb = LbSync(make_backend(backend_name, drain_grace=5.0), self.metrics)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.task = None

    def call(self, coroutine, timeout: float = 3600):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def start(self) -> None:
        async def spawn():
            return asyncio.create_task(self.lb.run())
        self.task = self.call(spawn())

    def publish(self, view: View, names: list[str]) -> float:
        """Seconds from handing ``view`` over until every sandbox in ``names`` runs it."""
        async def go() -> float:
            started = time.perf_counter()
            self.lb.on_view(view)
            await asyncio.gather(*(self.lb.wait_synced(name, timeout=3600) for name in names))
            return time.perf_counter() - started
        return self.call(go())

    def add(self, name: str, netns: str) -> None:
        async def go():
            self.lb.add(name, netns, [NETWORK])
        self.call(go())

    def close(self) -> None:
        async def stop():
            await self.lb.settled()
            if self.task is not None:
                self.task.cancel()
                await asyncio.gather(self.task, return_exceptions=True)
        self.call(stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def measure_backend(name: str, services: int, sandboxes: int, view_cache: dict) -> dict:
    view = view_cache.get(services) or view_cache.setdefault(services, build_view(services))
    result: dict = {"services": services}
    loop = Loop(name)
    made: list[str] = []
    try:
        first = f"{RUN}-{name[:3]}0"
        ip("netns", "add", first)
        made.append(first)
        loop.add("sb0", f"/run/netns/{first}")
        loop.start()
        result["sync_10k_ms"] = round(loop.publish(view, ["sb0"]) * 1000, 1)
        times = []
        for round_ in range(20):
            started = time.perf_counter()
            view = one_change(view, round_)
            loop.publish(view, ["sb0"])
            times.append((time.perf_counter() - started) * 1000)
        result["change_10k_ms"] = round(statistics.median(times), 2)
        result["first_packet_ratio"] = first_packet_ratio(f"/run/netns/{first}", services)
        if sandboxes > 1:
            names = ["sb0"]
            loaded = time.perf_counter()
            for index in range(1, sandboxes):
                ns = f"{RUN}-{name[:3]}{index}"
                ip("netns", "add", ns)
                made.append(ns)
                loop.add(f"sb{index}", f"/run/netns/{ns}")
                names.append(f"sb{index}")
            loop.publish(view, names)
            print(f"  {name}: {sandboxes} sandboxes loaded in {time.perf_counter() - loaded:.1f} s", file=sys.stderr)
            times = []
            for round_ in range(20, 25):
                started = time.perf_counter()
                view = one_change(view, round_)
                loop.publish(view, names)
                times.append((time.perf_counter() - started) * 1000)
            result["change_10k_100sb_ms"] = round(statistics.median(times), 1)
            result["sandboxes"] = sandboxes
    finally:
        loop.close()
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    return result


# ---- first packet -------------------------------------------------------------------

def _server(netns: str, ready) -> None:
    with netlink.entered_netns(netns):
        server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("0.0.0.0", PORT))
    server.listen(4096)
    ready.set()
    while True:
        conn, _ = server.accept()
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        conn.close()


def _connect_time(netns: str, address: IPv4Address) -> float:
    with netlink.entered_netns(netns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    try:
        started = time.perf_counter()
        sock.connect((str(address), PORT))
        return time.perf_counter() - started
    finally:
        sock.close()


def first_packet_ratio(client: str, services: int, samples: int = 300) -> float:
    """The client sandbox is wired to a task netns on a bridge; connect to VIP 1 and to the
    last VIP in turn (both served by the one server)."""
    bridge, task = f"{RUN}br", f"{RUN}-task"
    ip("link", "add", bridge, "type", "bridge")
    ip("link", "set", bridge, "up")
    subprocess.run(["ip", "link", "set", bridge, "type", "bridge", "nf_call_iptables", "0"], capture_output=True)
    ip("netns", "add", task)
    server = None
    try:
        for ns, address, veth in ((client, CLIENT, f"{RUN}c"), (f"/run/netns/{task}", SERVER, f"{RUN}t")):
            ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns.rsplit("/", 1)[-1])
            ip("link", "set", veth, "master", bridge, "up")
            ip("-n", ns.rsplit("/", 1)[-1], "addr", "add", f"{address}/12", "dev", "eth0")
            ip("-n", ns.rsplit("/", 1)[-1], "link", "set", "eth0", "up")
            ip("-n", ns.rsplit("/", 1)[-1], "link", "set", "lo", "up")
        ctx = multiprocessing.get_context("fork")
        ready = ctx.Event()
        server = ctx.Process(target=_server, args=(f"/run/netns/{task}", ready), daemon=True)
        server.start()
        ready.wait(10)
        first, last = vip_of(0), vip_of(services - 1)
        for _ in range(20):  # warm up ARP and caches
            _connect_time(client, first)
            _connect_time(client, last)
        to_first, to_last = [], []
        for _ in range(samples):
            to_first.append(_connect_time(client, first))
            to_last.append(_connect_time(client, last))
        return round(statistics.median(to_last) / statistics.median(to_first), 3)
    finally:
        if server is not None:
            server.terminate()
        subprocess.run(["ip", "netns", "del", task], capture_output=True)
        subprocess.run(["ip", "link", "del", bridge], capture_output=True)
        subprocess.run(["ip", "-n", client.rsplit("/", 1)[-1], "link", "del", "eth0"], capture_output=True)


# ---- registry and DNS, with a real agent --------------------------------------------

def _query(name: str, query_id: int) -> bytes:
    header = struct.pack("!HHHHHH", query_id, 0x0100, 1, 0, 0, 0)
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    return header + labels + struct.pack("!HH", 1, 1)


def _answered(reply: bytes) -> bool:
    """NOERROR with at least one answer."""
    return len(reply) >= 12 and reply[3] & 0x0F == 0 and struct.unpack("!H", reply[6:8])[0] > 0


class Prober:
    """A UDP socket inside a sandbox asking 127.0.0.11 (or ``target``; netns None: this one)."""

    def __init__(self, netns: str | None, target: tuple[str, int] = ("127.0.0.11", 53)) -> None:
        with netlink.entered_netns(netns) if netns else contextlib.nullcontext():
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.settimeout(1.0)
        self.sock.connect(target)
        self.next_id = 1

    def ask(self, name: str) -> bool:
        self.next_id = (self.next_id + 1) & 0xFFFF
        self.sock.send(_query(name, self.next_id))
        while True:
            reply = self.sock.recv(4096)
            if reply[:2] == struct.pack("!H", self.next_id):
                return _answered(reply)

    def close(self) -> None:
        self.sock.close()


# ---- the 10 % unknown names mix ---------------------------------------------------------

def upstream_server(port: int) -> None:
    """The bench's upstream on 127.0.0.1: NXDOMAIN with an SOA (negative TTL 60 s) for every
    name, as a real resolver says of names that do not exist."""
    soa = (b"\x00" + struct.pack("!HHIH", 6, 1, 60, 22) + b"\x00\x00" + struct.pack("!IIIII", 1, 3600, 600, 86400, 60))

    class Upstream(asyncio.DatagramProtocol):
        def connection_made(self, transport) -> None:
            self.transport = transport

        def datagram_received(self, data: bytes, addr) -> None:
            end = 12
            while end < len(data) and data[end]:
                end += data[end] + 1
            question = data[12:end + 5]
            flags = bytes((0x80 | (data[2] & 0x01), 0x83))  # QR, RD copied, RA, NXDOMAIN
            self.transport.sendto(data[:2] + flags + struct.pack("!HHHH", 1, 0, 1, 0) + question + soa, addr)

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        await loop.create_datagram_endpoint(Upstream, local_addr=("127.0.0.1", port))
        await asyncio.Event().wait()
    asyncio.run(serve())


def naive_forwarder(netns: str, address: str, upstream_port: int, names_json: str) -> None:
    """The baseline: answers the local names from a dict (an A record packed per query) and
    forwards every other query to the upstream, every time (no cache), from inside the
    sandbox's netns like svcnet; the upstream is reached from the host's netns."""
    local = {name.encode(): socket.inet_aton(ip) for name, ip in json.loads(names_json).items()}
    with netlink.entered_netns(netns):
        listen = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    listen.bind((address, 53))

    class Forward(asyncio.DatagramProtocol):
        def __init__(self, query: bytes, client) -> None:
            self.query, self.client = query, client

        def connection_made(self, transport) -> None:
            self.transport = transport
            transport.sendto(self.query)

        def datagram_received(self, data: bytes, addr) -> None:
            listener.sendto(data, self.client)
            self.transport.close()

    class Server(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr) -> None:
            labels, end = [], 12
            while end < len(data) and data[end]:
                labels.append(data[end + 1:end + 1 + data[end]])
                end += data[end] + 1
            name = b".".join(labels).lower()
            if name in local:
                question = data[12:end + 5]
                answer = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 600, 4) + local[name]
                listener.sendto(data[:2] + bytes((0x84 | (data[2] & 0x01), 0x80)) + struct.pack("!HHHH", 1, 1, 0, 0)
                                + question + answer, addr)
                return
            asyncio.ensure_future(loop.create_datagram_endpoint(lambda: Forward(data, addr),
                                                                 remote_addr=("127.0.0.1", upstream_port)))

    async def serve() -> None:
        nonlocal listener, loop
        loop = asyncio.get_running_loop()
        listener, _ = await loop.create_datagram_endpoint(Server, sock=listen)
        await asyncio.Event().wait()
    listener = loop = None
    asyncio.run(serve())


def nx_mix(netns: str, services: int, upstream_port: int, home: Path) -> dict:
    """dnsperf with 90 % service names and 10 % names that do not exist, against svcnet and
    against the naive forwarder, in the same sandbox; qps of each and the ratio."""
    import random
    rng = random.Random(7)
    known = rng.sample(range(services), 900)
    lines = [f"s{i} A" for i in known] + [f"nx{i}.example A" for i in range(100)]
    rng.shuffle(lines)
    queries = home / "nx-mix.txt"
    queries.write_text("\n".join(lines) + "\n")
    ours = dnsperf_qps(netns, "127.0.0.11", queries)
    names = {f"s{i}": str(IPv4Network("10.64.0.0/16").network_address + 2 + i) for i in known}
    baseline = subprocess.Popen([sys.executable, __file__, "--naive-forwarder", netns, "127.0.0.12",
                                 str(upstream_port), json.dumps(names)])
    try:
        time.sleep(1.0)
        theirs = dnsperf_qps(netns, "127.0.0.12", queries)
    finally:
        baseline.terminate()
        baseline.wait(10)
    print(f"  nx mix (10 % unknown names): svcnet {ours:.0f} qps, naive forwarder {theirs:.0f} qps; Docker is "
          "not run by this bench (bench/dns_bench.py compares it on local names): the baseline is a forwarder in "
          "Python that answers local names from a dict and forwards every unknown name, as Docker's embedded "
          "DNS does (it caches nothing)", file=sys.stderr)
    return {"nx_mix_qps": round(ours), "nx_mix_baseline_qps": round(theirs),
            "nx_mix_qps_ratio": round(ours / theirs, 2) if theirs else None}


def dnsperf_qps(netns: str, server: str, query_file: Path, seconds: int = 5) -> float:
    result = subprocess.run(["nsenter", f"--net={netns}", "dnsperf", "-s", server, "-d", str(query_file),
                             "-l", str(seconds), "-c", "4", "-q", "100"], capture_output=True, text=True, check=True)
    match = next(line for line in result.stdout.splitlines() if "Queries per second" in line)
    return float(match.split(":")[1])


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        return round(next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024, 1)


def agent_metrics(socket_path: Path) -> str:
    """The agent's /metrics text, over its API socket."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(socket_path))
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: svcnet\r\nConnection: close\r\n\r\n")
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks).partition(b"\r\n\r\n")[2].decode()


def probe_loop(netns: str, name: str, target: str = "127.0.0.11:53") -> None:
    """Ask ``name`` of ``target`` in ``netns`` ("-": this one) every millisecond until SIGTERM;
    print the gaps (ms) between answers as JSON: the longest is how long the resolver stalled."""
    import signal
    # The prober is the instrument, not the subject: at normal priority on two cores it
    # was itself kept off the CPU for 20-30 ms now and then (etcd, this bench's client and
    # the agent all busy at the end of the creates), and counted that as the resolver's
    # stall while the agent's event loop was never more than 3 ms late (measured with a
    # 1 ms timer on the agent's loop). Real-time priority takes the prober's own
    # scheduling out of the figure; it sleeps between queries, so it starves nobody.
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))
    except (AttributeError, PermissionError, OSError) as exc:
        print(f"  the DNS prober runs at normal priority ({exc}): its own scheduling adds to the gaps",
              file=sys.stderr)
    host, port = target.rsplit(":", 1)
    prober = Prober(None if netns == "-" else netns, (host, int(port)))
    gaps: list[float] = []
    stopped = []
    signal.signal(signal.SIGTERM, lambda *_: stopped.append(True))
    last = time.perf_counter()
    while not stopped:
        try:
            prober.ask(name)
        except OSError:
            continue
        now = time.perf_counter()
        gaps.append(((now - last) * 1000, time.monotonic()))
        last = now
        time.sleep(0.001)
    print(json.dumps(gaps))


def measure_registry_dns(services: int, sandboxes: int, profile: Path | None = None) -> dict:
    from discovery.node.client import ApiClient
    from discovery.state.etcd import connect
    from discovery.state.etcd_local import EtcdProcess, free_port
    from discovery.state.registry import Claim, Registry

    figures: dict = {}
    home = Path(tempfile.mkdtemp(prefix="svcnet-scale-"))
    member = EtcdProcess(home / "etcd", free_port(), free_port())
    member.start()
    prefix, node = f"/svcnet-scale-{RUN}", f"node-{RUN}"
    keys = KeyLayout(prefix)
    upstream_port = free_port()
    upstream = subprocess.Popen([sys.executable, __file__, "--upstream-server", str(upstream_port)])
    env = dict(os.environ, SVCNET_ETCD=member.url, SVCNET_PREFIX=prefix, SVCNET_STATE_DIR=str(home / "state"),
               SVCNET_NODE=node, SVCNET_UPSTREAM=f"127.0.0.1:{upstream_port}")
    network = "scale"
    subnet = IPv4Network("10.64.0.0/16")
    agent_pid = None
    created: list[str] = []
    probes: list[subprocess.Popen] = []  # the 1 ms loops: stopped by the finally below if the run fails

    def svcnet(*argv: str) -> None:
        subprocess.run([sys.executable, "-m", "discovery.cli", *argv], env=env, check=True, capture_output=True)

    async def bulk_load() -> None:
        client = await connect(member.url)
        txn = client.transactions
        ops = []
        for index in range(services):
            name, vip = f"s{index}", subnet.network_address + 2 + index
            service = Service(name, (network,), vips={network: vip})
            ops += [txn.put(keys.service(name), _json(service)),
                    txn.put(keys.name_claim(network, name), Claim("service", name, "name").encode()),
                    txn.put(keys.address_claim(network, vip), Claim("service", name, "vip").encode())]
            if len(ops) >= 120:
                await client.transaction(compare=[], success=ops, failure=[])
                ops = []
        ops.append(txn.put(keys.ipam_cursor(network, 4), str(services + 2).encode()))
        await client.transaction(compare=[], success=ops, failure=[])
        await client.close()

    async def timed_creates(names: list[str]) -> list[float]:
        client = await connect(member.url)
        registry = Registry(client, keys)
        times = []
        for name in names:
            started = time.perf_counter()
            await registry.create_service(Service(name, (network,)))
            times.append((time.perf_counter() - started) * 1000)
        await client.close()
        return times

    try:
        svcnet("network", "create", network, "--subnet", str(subnet))
        loaded = time.perf_counter()
        asyncio.run(bulk_load())
        print(f"  {services} services loaded into etcd in {time.perf_counter() - loaded:.1f} s", file=sys.stderr)
        svcnet("ps")  # starts the agent
        agent_pid = int((home / "state" / "agent.pid").read_text())
        api = ApiClient(home / "state" / "agent.sock", timeout=600)
        first = api.call("POST", "/v1/sandboxes", {"name": f"{RUN}-sb0", "networks": [network]})
        created.append(f"{RUN}-sb0")
        prober = Prober(first["netns"])
        deadline = time.monotonic() + 120
        while not prober.ask(f"s{services - 1}") and time.monotonic() < deadline:
            time.sleep(0.1)
        names = [f"new{i}" for i in range(20)]
        figures["create_10k_ms"] = round(statistics.median(asyncio.run(timed_creates(names))), 2)
        waits = []
        for i in range(20):
            name = f"dns{i}"
            started = time.perf_counter()
            asyncio.run(timed_creates([name]))
            while not prober.ask(name):
                time.sleep(0.001)
            waits.append((time.perf_counter() - started) * 1000)
        figures["dns_change_10k_ms"] = round(sorted(waits)[int(0.99 * (len(waits) - 1))], 1)
        prober.close()
        # the loop runs in a process of its own: in this one it would wait on our own GIL
        loop = subprocess.Popen([sys.executable, __file__, "--probe-loop", first["netns"], "s1"],
                                stdout=subprocess.PIPE, text=True)
        # the control: the same loop, at the same time, against the bench's own upstream (a
        # trivial asyncio UDP server in a process of its own, no registry, no GIL shared with
        # anything): its longest wait is what this machine alone costs a Python resolver
        control = subprocess.Popen([sys.executable, __file__, "--probe-loop", "-", "control", "--probe-target",
                                    f"127.0.0.1:{upstream_port}"], stdout=subprocess.PIPE, text=True)
        probes += [loop, control]
        spy = None
        if profile is not None:  # where the agent spends the changes (py-spy, pip install py-spy)
            tool = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
            if not Path(tool).exists():
                raise SystemExit("--profile needs py-spy: .venv/bin/pip install -e '.[bench]' (scripts/bench.sh does)")
            spy = subprocess.Popen([tool, "record", "-p", str(agent_pid), "-d", "8", "-r", "250", "-f", "raw",
                                    "-o", str(profile)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.0)
        creates_at = time.monotonic()
        asyncio.run(timed_creates([f"stall{i}" for i in range(100)]))
        creates_took = time.monotonic() - creates_at
        if spy is not None:
            spy.wait(timeout=30)
        time.sleep(0.5)
        loop.terminate()
        control.terminate()
        timed_gaps = json.loads(loop.communicate(timeout=10)[0])
        control_timed = json.loads(control.communicate(timeout=10)[0])
        control_gaps = [gap for gap, _ in control_timed]
        gaps = [gap for gap, _ in timed_gaps]
        worst = sorted(timed_gaps, reverse=True)[:3]
        print("  longest waits (ms, seconds after the first of 100 creates, which took "
              f"{creates_took:.2f} s): " + ", ".join(f"{gap:.1f} at {at - creates_at:+.2f}" for gap, at in worst),
              file=sys.stderr)
        figures["dns_stall_max_ms"] = round(max(gaps), 2)
        figures["dns_stall_control_ms"] = round(max(control_gaps), 2)
        print("  the control (the same loop against a trivial asyncio server, at the same time): longest waits "
              + ", ".join(f"{gap:.1f} at {at - creates_at:+.2f}" for gap, at in sorted(control_timed, reverse=True)[:3])
              + f"; median {statistics.median(control_gaps):.2f} ms", file=sys.stderr)
        pauses = [line for line in agent_metrics(home / "state" / "agent.sock").splitlines()
                  if line.startswith("svcnet_gc_pause_seconds_") and ("_sum" in line or "_count" in line)]
        print("  agent GC pauses: " + "; ".join(pauses), file=sys.stderr)
        figures["dns_loop_p50_ms"] = round(statistics.median(gaps), 2)
        figures.update(nx_mix(first["netns"], services, upstream_port, home))
        one_sandbox_mb = rss_mb(agent_pid)
        made = time.perf_counter()
        for index in range(1, sandboxes):
            api.call("POST", "/v1/sandboxes", {"name": f"{RUN}-sb{index}", "networks": [network]})
            created.append(f"{RUN}-sb{index}")
        print(f"  {sandboxes} sandboxes made in {time.perf_counter() - made:.1f} s", file=sys.stderr)
        time.sleep(3)  # at rest: a sandbox's LB lets go of its nft cache after a second without changes
        figures["agent_rss_mb_100sb"] = rss_mb(agent_pid)
        print(f"  agent RSS: {one_sandbox_mb} MB with one sandbox, {figures['agent_rss_mb_100sb']} MB with "
              f"{sandboxes} ({(figures['agent_rss_mb_100sb'] - one_sandbox_mb) / max(1, sandboxes - 1):.2f} MB each); "
              f"{len(os.listdir(f'/proc/{agent_pid}/task'))} threads", file=sys.stderr)
    finally:
        log_path = home / "state" / "agent.log"
        if log_path.exists():  # what the agent said about its pauses, before the directory goes
            for line in log_path.read_text(errors="replace").splitlines():
                if "garbage collection" in line or "heap frozen" in line:
                    print(f"  agent: {line}", file=sys.stderr)
        for name in created:
            subprocess.run([sys.executable, "-m", "discovery.cli", "rm", name], env=env, capture_output=True)
        if agent_pid is not None:
            try:
                os.kill(agent_pid, 15)
            except ProcessLookupError:
                pass
            time.sleep(1)
        from discovery.node.agent import remove_host
        remove_host(prefix)
        for probe in probes:
            if probe.poll() is None:
                probe.kill()
                probe.wait()
        upstream.terminate()
        upstream.wait(10)
        member.stop()
        shutil.rmtree(home, ignore_errors=True)
    return figures


LOCK = Path("/run/svcnet-scale-bench.lock")  # one run at a time: the sweep may then take all it finds
OURS = re.compile(r"^(svcnet-)?scb[0-9a-f]{4}(-|br$|[ct]$)")  # netns and links a run names after RUN


def _kill(pid: str) -> None:
    try:
        os.kill(int(pid), 9)
    except (ProcessLookupError, ValueError):
        pass


def sweep() -> None:
    """Remove what a crashed or killed run left (call it holding ``LOCK``): its agent and etcd
    (processes of discovery.cli or etcd whose command line names a ``svcnet-scale-*`` state
    dir), helper processes of this script, netns and links named after a run, bridges owned
    by a ``/svcnet-scale-scb*`` prefix with that prefix's host rules, and the state dirs."""
    homes = [str(home) for home in Path(tempfile.gettempdir()).glob("svcnet-scale-*")]
    helpers = ("--upstream-server", "--probe-loop", "--naive-forwarder")
    me = os.getpid()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == me:
            continue
        try:
            argv = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        ours = ("discovery.cli" in argv or Path(argv[0]).name == "etcd") and any(
            home in arg for arg in argv for home in homes)
        helper = any(a.endswith("scale_bench.py") for a in argv) and any(h in argv for h in helpers)
        if ours or helper:
            _kill(proc.name)
    for line in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.splitlines():
        name = line.split()[0]
        if OURS.match(name):
            for pid in subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout.split():
                _kill(pid)
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
    prefixes = set()
    for link in json.loads(subprocess.run(["ip", "-j", "link", "show"], capture_output=True,
                                          text=True).stdout or "[]"):
        name, alias = link.get("ifname", ""), link.get("ifalias", "")
        owner = alias.split(":")[1] if alias.startswith("svcnet:") and alias.count(":") >= 2 else ""
        owned = re.fullmatch(r"/svcnet-scale-scb[0-9a-f]{4}", owner) is not None
        if OURS.match(name) or owned:
            subprocess.run(["ip", "link", "del", name], capture_output=True)
            if owned:
                prefixes.add(owner)
    from discovery.node.agent import remove_host
    for prefix in prefixes:
        remove_host(prefix)
    for home in homes:
        shutil.rmtree(home, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--services", type=int, default=10_000)
    parser.add_argument("--sandboxes", type=int, default=100)
    parser.add_argument("--iptables-services", type=int, default=2_000,
                        help="services for the iptables backend (default 2,000; 0 leaves it out)")
    parser.add_argument("--no-registry", action="store_true", help="leave out the etcd, agent and DNS figures")
    parser.add_argument("--profile", type=Path, metavar="FILE",
                        help="record the agent with py-spy (raw, collapsed stacks) while the 100 services are created")
    parser.add_argument("--probe-loop", nargs=2, metavar=("NETNS", "NAME"), help=argparse.SUPPRESS)
    parser.add_argument("--probe-target", default="127.0.0.11:53", help=argparse.SUPPRESS)
    parser.add_argument("--upstream-server", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--naive-forwarder", nargs=4, metavar=("NETNS", "ADDRESS", "PORT", "NAMES"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--sweep", action="store_true", help="only remove what a crashed run left")
    args = parser.parse_args()
    if args.probe_loop:
        return probe_loop(*args.probe_loop, args.probe_target)
    if args.upstream_server:
        return upstream_server(args.upstream_server)
    if args.naive_forwarder:
        netns, address, port, names = args.naive_forwarder
        return naive_forwarder(netns, address, int(port), names)
    lock = LOCK.open("w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise SystemExit(f"another scale bench runs (it holds {LOCK}): wait for it to end") from None
    # killed (timeout, ^C from another shell): unwind, so every finally removes what it made
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sweep()
    if args.sweep:
        return
    chosen = make_backend("auto", drain_grace=5.0).name
    figures: dict = {"backend": chosen}
    views: dict = {}
    print(f"building a View of {args.services} services x 3 tasks ...", file=sys.stderr)
    figures.update(measure_backend(chosen, args.services, args.sandboxes, views))
    print(f"{chosen}: {json.dumps(figures)}", file=sys.stderr)
    if not args.no_registry:
        print(f"registry and DNS: {args.services} services, a real agent, {args.sandboxes} sandboxes ...",
              file=sys.stderr)
        figures.update(measure_registry_dns(args.services, args.sandboxes, args.profile))
    if chosen != "iptables" and args.iptables_services:
        print(f"iptables at {args.iptables_services} services, one sandbox ...", file=sys.stderr)
        figures["iptables"] = measure_backend("iptables", args.iptables_services, 1, views)
        figures["iptables"]["note"] = (f"measured at {args.iptables_services} services in one sandbox: "
                                       "a 10,000-service load takes minutes per sandbox")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
