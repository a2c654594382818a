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

The last line is one JSON object: ``backend`` (what auto chose) and the figures per
backend. Fields of the issue's list that belong to parts not built yet (the registry and
DNS figures) are left out, not guessed. iptables is measured at --iptables-services
(default 2,000: at 10,000 one load takes minutes) and only in one sandbox; the JSON says so.
Everything it makes is named ``scb*`` and removed, also after a crash (``--sweep``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import secrets
import socket
import statistics
import subprocess
import sys
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


def sweep() -> None:
    """Remove what a crashed run left (namespaces and bridges named scb*)."""
    for line in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.splitlines():
        if line.startswith("scb"):
            subprocess.run(["ip", "netns", "del", line.split()[0]], capture_output=True)
    for line in subprocess.run(["ip", "-o", "link", "show", "type", "bridge"], capture_output=True,
                               text=True).stdout.splitlines():
        name = line.split(": ")[1].split("@")[0]
        if name.startswith("scb"):
            subprocess.run(["ip", "link", "del", name], capture_output=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--services", type=int, default=10_000)
    parser.add_argument("--sandboxes", type=int, default=100)
    parser.add_argument("--iptables-services", type=int, default=2_000,
                        help="services for the iptables backend (default 2,000; 0 leaves it out)")
    parser.add_argument("--sweep", action="store_true", help="only remove what a crashed run left")
    args = parser.parse_args()
    sweep()
    if args.sweep:
        return
    chosen = make_backend("auto", drain_grace=5.0).name
    figures: dict = {"backend": chosen}
    views: dict = {}
    print(f"building a View of {args.services} services x 3 tasks ...", file=sys.stderr)
    figures.update(measure_backend(chosen, args.services, args.sandboxes, views))
    print(f"{chosen}: {json.dumps(figures)}", file=sys.stderr)
    if chosen != "iptables" and args.iptables_services:
        print(f"iptables at {args.iptables_services} services, one sandbox ...", file=sys.stderr)
        figures["iptables"] = measure_backend("iptables", args.iptables_services, 1, views)
        figures["iptables"]["note"] = (f"measured at {args.iptables_services} services in one sandbox: "
                                       "a 10,000-service load takes minutes per sandbox")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
