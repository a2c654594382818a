"""Benchmark the load-balancer backends: sync time by size, one change among many, and the
cost of the VIP path for short TCP connections.

    sudo .venv/bin/python bench/lb_bench.py [--sizes 1,100,1000,5000] [--seconds 5]

Sync: a fresh netns, N services x 3 tasks applied from empty (the first sync after a
start), then one service's tasks changed with 1,000 services in place (the common case),
for every backend this kernel can run (IPVS only where the kernel has it). Median of 3.

Throughput: a client netns and a task netns on a bridge; the task runs a one-thread accept
loop that writes one byte and closes; two client processes open short TCP connections for
``--seconds`` straight to the task, then to the VIP (one service), then to a VIP that is
the last of 1,000 in the dispatch chain. Connections per second and the VIP/direct ratio.
"""

from __future__ import annotations

import argparse
import multiprocessing
import secrets
import socket
import statistics
import subprocess
import sys
import time
from ipaddress import IPv4Address
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from discovery.host import netlink  # noqa: E402
from discovery.host.nft import nft_available  # noqa: E402
from lb.iptables import IptablesBackend  # noqa: E402
from lb.ipvs import IpvsBackend, ipvs_available  # noqa: E402
from lb.nftables import NftablesBackend  # noqa: E402
from lb.plan import VipPlan  # noqa: E402

RUN = "lbbench" + secrets.token_hex(2)


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def services(count: int, tasks: int = 3, offset: int = 0) -> dict[IPv4Address, VipPlan]:
    """VIPs in 10.200.0.0/16 (one per service), tasks in 10.201.0.0/16."""
    plan = {}
    for index in range(count):
        vip = IPv4Address(int(IPv4Address("10.200.0.0")) + index + 1)
        backends = tuple(IPv4Address(int(IPv4Address("10.201.0.0")) + (index * tasks + t + offset) % 65000 + 1)
                         for t in range(tasks))
        plan[vip] = VipPlan(vip, f"svc{index}", "bench", tuple(sorted(backends)))
    return plan


def timed_sync(backend, netns: str, current, plan) -> tuple[float, object]:
    started = time.perf_counter()
    state, _ = backend.sync(netns, current, plan)
    return (time.perf_counter() - started) * 1000, state


def bench_sync(backend, sizes: list[int], repeats: int = 3) -> None:
    print(f"\n{backend.name}: sync N services x 3 tasks into one netns (median of {repeats})")
    for size in sizes:
        plan = services(size)
        times = []
        for _ in range(repeats):
            ns = f"{RUN}-sync"
            ip("netns", "add", ns)
            try:
                took, _ = timed_sync(backend, f"/run/netns/{ns}", {} if backend.name == "iptables" else None, plan)
                times.append(took)
            finally:
                ip("netns", "del", ns)
        print(f"  {size:5d} services: {statistics.median(times):9.1f} ms from empty")
    ns = f"{RUN}-change"
    ip("netns", "add", ns)
    try:
        plan = services(1000)
        _, state = timed_sync(backend, f"/run/netns/{ns}", None, plan)
        times = []
        for round_ in range(repeats * 3):
            changed = dict(plan)
            vip = next(iter(sorted(plan)))
            changed[vip] = VipPlan(vip, "svc0", "bench", services(1, offset=100 + round_)[IPv4Address("10.200.0.1")]
                                   .backends)
            took, state = timed_sync(backend, f"/run/netns/{ns}", state, changed)
            times.append(took)
            plan = changed
        print(f"  one service changed among 1000: {statistics.median(times):.1f} ms (target <= 50 ms)")
        if backend.name == "iptables":
            big = services(5000)
            _, state = timed_sync(backend, f"/run/netns/{ns}", state, big)
            vip = IPv4Address("10.200.0.1")
            changed = dict(big)
            changed[vip] = VipPlan(vip, "svc0", "bench", services(1, offset=999)[vip].backends)
            took, _ = timed_sync(backend, f"/run/netns/{ns}", state, changed)
            print(f"  one service changed among 5000: {took:.1f} ms (libiptc rewrites the whole table)")
    finally:
        ip("netns", "del", ns)


# ---- throughput ------------------------------------------------------------------------

def _server(netns: str, ready) -> None:
    with netlink.entered_netns(netns):
        server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("0.0.0.0", 9000))
    server.listen(4096)
    ready.set()
    while True:
        conn, _ = server.accept()
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        conn.send(b"x")
        conn.close()


def _client(netns: str, address: str, seconds: float, results) -> None:
    count = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with netlink.entered_netns(netns):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        try:
            sock.connect((address, 9000))
            sock.recv(1)
            count += 1
        except OSError:
            pass
        finally:
            sock.close()
    results.put(count)


def rate(netns: str, address: str, seconds: float, clients: int = 2) -> float:
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    workers = [ctx.Process(target=_client, args=(netns, address, seconds, results)) for _ in range(clients)]
    for worker in workers:
        worker.start()
    total = sum(results.get() for _ in workers)
    for worker in workers:
        worker.join()
    return total / seconds


def bench_throughput(backend, seconds: float) -> None:
    bridge = f"{RUN}br"
    ip("link", "add", bridge, "type", "bridge")
    ip("link", "set", bridge, "up")
    subprocess.run(["ip", "link", "set", bridge, "type", "bridge", "nf_call_iptables", "0"], capture_output=True)
    made = []
    try:
        for name, address in (("client", "10.202.0.9"), ("task", "10.202.0.10")):
            ns = f"{RUN}-{name}"
            ip("netns", "add", ns)
            made.append(ns)
            ip("link", "add", f"{RUN}{name[0]}", "type", "veth", "peer", "name", "eth0", "netns", ns)
            ip("link", "set", f"{RUN}{name[0]}", "master", bridge, "up")
            ip("-n", ns, "addr", "add", f"{address}/16", "dev", "eth0")
            ip("-n", ns, "link", "set", "eth0", "up")
            ip("-n", ns, "link", "set", "lo", "up")
        client, task = f"/run/netns/{made[0]}", f"/run/netns/{made[1]}"
        ctx = multiprocessing.get_context("fork")
        ready = ctx.Event()
        server = ctx.Process(target=_server, args=(task, ready), daemon=True)
        server.start()
        ready.wait(10)
        subprocess.run(["taskset", "-a", "-p", "-c", "0", str(server.pid)], capture_output=True)
        task_ip = IPv4Address("10.202.0.10")
        vip = IPv4Address("10.202.0.2")
        one = {vip: VipPlan(vip, "web", "bench", (task_ip,))}
        state, _ = backend.sync(client, {} if backend.name == "iptables" else None, one)
        direct = rate(client, str(task_ip), seconds)
        through_vip = rate(client, str(vip), seconds)
        many = services(999)
        many = {v: VipPlan(v, p.service, p.network, (task_ip,)) for v, p in many.items()}
        last = IPv4Address("10.202.0.3")
        many[last] = VipPlan(last, "last", "bench", (task_ip,))
        state, _ = backend.sync(client, state, many)  # 10.202.0.3 sorts after 10.200.x: last in the chain
        through_last = rate(client, str(last), seconds)
        server.terminate()
        print(f"\n{backend.name}: short TCP connections, 2 client processes, {seconds:.0f} s each")
        print(f"  direct to the task:         {direct:8.0f} conn/s")
        print(f"  through the VIP:            {through_vip:8.0f} conn/s  ({through_vip / direct:.0%} of direct; "
              f"target >= 90%)")
        print(f"  VIP last of 1000 services:  {through_last:8.0f} conn/s  ({through_last / direct:.0%} of direct)")
    finally:
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        subprocess.run(["ip", "link", "del", bridge], capture_output=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1,100,1000,5000", help="service counts to sync (default 1,100,1000,5000)")
    parser.add_argument("--seconds", type=float, default=5.0, help="seconds per throughput run (default 5)")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    backends = [IptablesBackend()]
    if nft_available():
        backends.insert(0, NftablesBackend())
    if ipvs_available():
        backends.append(IpvsBackend())
    else:
        print("ipvs: this kernel has no IPVS; run tests/vm/ipvs-lane.sh for its tests")
    for backend in backends:
        bench_sync(backend, sizes)
        bench_throughput(backend, args.seconds)


if __name__ == "__main__":
    main()
