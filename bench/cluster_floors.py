#!/usr/bin/env python3
"""Floors under bench/cluster_bench.py's two ratios: what this machine allows without svcnet.

    sudo .venv/bin/python bench/cluster_floors.py [--runs 5] [--seconds 4]

On scripts/cluster.sh's hosts, next to what svcnet builds, the same paths built by hand
with nothing of svcnet on them, measured in alternating runs (medians):

  overlay   iperf3 between two netns joined by a bridge and a VXLAN device on h1 and on h2
            (static FDB and neighbour entries, learning off: what the issue asks svcnet to
            build), against svcnet's overlay and the underlay h1 -> h2
  hops      short TCP connections from the outside client namespace through h1 (no task
            there) to h2: svcnet's mesh; one nftables NAT hop on h1 to h2's host-mode port
            (DNAT + masquerade, no VXLAN); h1 only routing (no NAT) to a plain server on h2;
            against straight to h2's host-mode port and to the plain server

Everything it adds (two netns ``svflr-x1``/``svflr-x2``, links ``svflr*`` in h1 and h2, a
table ``ip svflr`` on h1, routes in the client and h2) goes with ``cluster.sh down``, which it
runs at the end, also after a failure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.cluster_bench import CLUSTER, TASK_SERVER, cluster, connect_script, svcnet  # noqa: E402

NETNS = ("svflr-x1", "svflr-x2")
ADDRESSES = ("10.199.0.1", "10.199.0.2")
MACS = ("02:42:0a:c7:00:01", "02:42:0a:c7:00:02")


def on(host: str, command: str) -> str:
    return subprocess.run([CLUSTER, "on", host, "--", "sh", "-ec", command], capture_output=True, text=True,
                          check=True).stdout


def hand_built_overlay(vteps: tuple[str, str]) -> None:
    """A netns on h1 and one on h2, on a bridge + VXLAN (VNI 999, port 4789) in each host."""
    for index, host in enumerate(("h1", "h2")):
        peer = 1 - index
        subprocess.run(["ip", "netns", "add", NETNS[index]], check=True)
        on(host, f"""
ip link add svflrbr type bridge
ip link add svflrvx type vxlan id 999 local {vteps[index]} dstport 4789 nolearning
ip link set svflrvx mtu 1450 master svflrbr up
ip link set svflrbr mtu 1450 up
ip link add svflrv0 mtu 1450 type veth peer name eth0 netns {NETNS[index]}
ip link set svflrv0 master svflrbr up
bridge fdb append {MACS[peer]} dev svflrvx dst {vteps[peer]} self permanent
""")
        subprocess.run(["ip", "netns", "exec", NETNS[index], "sh", "-ec", f"""
ip link set lo up
ip link set eth0 address {MACS[index]} up
ip addr add {ADDRESSES[index]}/24 dev eth0
ip neigh replace {ADDRESSES[peer]} lladdr {MACS[peer]} dev eth0 nud permanent
"""], check=True)


def remove_hand_built() -> None:
    for name in NETNS:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def iperf(server: list[str], client: list[str], address: str, seconds: int) -> float:
    """Gbit/s; ``server``/``client``: the command prefix that runs in the right netns."""
    listening = subprocess.Popen([*server, "iperf3", "-s", "-1", "-p", "5201", "-A", "0"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.4)
        out = subprocess.run([*client, "iperf3", "-c", address, "-p", "5201", "-t", str(seconds), "-A", "1", "-J"],
                             capture_output=True, text=True, timeout=seconds + 30).stdout
        return json.loads(out)["end"]["sum_received"]["bits_per_second"] / 1e9
    finally:
        listening.kill()
        listening.wait()


def conns(address: str, port: int, seconds: int) -> float:
    return float(cluster("client", "--", "python3", "-c", connect_script(address, port, seconds)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--seconds", type=int, default=4)
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root: the cluster is network namespaces")
    print("setting up: scripts/cluster.sh up 3, svcnet's overlay and mesh, the hand-built paths ...", flush=True)
    cluster("up", "3")
    server = None
    try:
        svcnet("h1", "network", "create", "ov", "--driver", "overlay", "--subnet", "10.77.0.0/16")
        svcnet("h1", "service", "create", "web", "--network", "ov", "--publish", "8080:8080")
        svcnet("h1", "service", "create", "straight", "--network", "ov", "--publish", "8081:8080,mode=host")
        for host, name, service in (("h2", "t2", "web"), ("h3", "t3", "web"), ("h2", "s2", "straight")):
            svcnet(host, "run", "-d", "--name", name, "--network", "ov", "--service", service, "--",
                   "python3", TASK_SERVER, name, "8080")
        for host, name in (("h1", "a1"), ("h2", "b2")):
            svcnet(host, "run", "-d", "--name", name, "--network", "ov", "--", "sleep", "infinity")
        server = subprocess.Popen([CLUSTER, "on", "h2", "--", "python3", TASK_SERVER, "h2", "18080"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        h1, h2 = cluster("addr", "h1").strip(), cluster("addr", "h2").strip()
        client_address = cluster("client", "--", "ip", "-4", "-o", "addr", "show", "scope", "global").split()[3]
        client_address = client_address.split("/")[0]
        hand_built_overlay((h1, h2))
        on("h1", f"""nft -f - <<'X'
table ip svflr {{
  chain pre {{ type nat hook prerouting priority dstnat - 5; tcp dport 9999 meta mark set 0x77 dnat to {h2}:8081; }}
  chain post {{ type nat hook postrouting priority srcnat - 5; meta mark 0x77 masquerade; }}
}}
X
sysctl -qw net.ipv4.conf.all.send_redirects=0 net.ipv4.conf.eth0.send_redirects=0""")
        b2 = next(r for r in json.loads(svcnet("h2", "ps", "--format", "json")) if r["name"] == "b2")
        b2_address = b2["endpoints"][0]["ipv4"]
        time.sleep(1)

        def in_sandbox(host: str, name: str) -> list[str]:
            return [CLUSTER, "on", host, "--", "svcnet", "exec", name, "--"]

        def routed(up: bool) -> None:
            verb = "add" if up else "del"
            cluster("client", "--", "ip", "route", verb, f"{h2}/32", "via", h1)
            on("h2", f"ip route {verb} {client_address}/32 via {h1}")

        found: dict[str, list[float]] = {k: [] for k in ("svcnet", "hand", "underlay", "mesh", "nat_hop", "straight",
                                                          "routed_hop", "plain")}
        for _ in range(args.runs):
            found["svcnet"].append(iperf(in_sandbox("h2", "b2"), in_sandbox("h1", "a1"), b2_address, args.seconds))
            found["hand"].append(iperf(["ip", "netns", "exec", NETNS[1]], ["ip", "netns", "exec", NETNS[0]],
                                       ADDRESSES[1], args.seconds))
            found["underlay"].append(iperf([CLUSTER, "on", "h2", "--"], [CLUSTER, "on", "h1", "--"], h2, args.seconds))
            for key, address, port in (("mesh", h1, 8080), ("nat_hop", h1, 9999), ("straight", h2, 8081),
                                       ("plain", h2, 18080)):
                found[key].append(conns(address, port, args.seconds))
            routed(True)
            try:
                found["routed_hop"].append(conns(h2, 18080, args.seconds))
            finally:
                routed(False)
        med = {key: statistics.median(values) for key, values in found.items()}
        print(f"\nTCP throughput h1 -> h2, iperf3 {args.seconds} s, median of {args.runs}:")
        print(f"  underlay {med['underlay']:.2f} Gbit/s   svcnet's overlay {med['svcnet']:.2f} "
              f"({med['svcnet'] / med['underlay']:.0%})   the same built by hand, nothing of svcnet on it "
              f"{med['hand']:.2f} ({med['hand'] / med['underlay']:.0%})")
        print(f"\nshort TCP connections from the client namespace, {args.seconds} s each, median of {args.runs}:")
        print(f"  svcnet's mesh via h1 {med['mesh']:.0f} conn/s ({med['mesh'] / med['straight']:.0%} of straight)   "
              f"one NAT hop on h1 by hand {med['nat_hop']:.0f} ({med['nat_hop'] / med['straight']:.0%})   "
              f"straight to h2's host-mode port {med['straight']:.0f}")
        print(f"  h1 routing only (no NAT) to a plain server on h2 {med['routed_hop']:.0f} conn/s "
              f"({med['routed_hop'] / med['plain']:.0%} of straight to it, {med['plain']:.0f})")
    finally:
        if server is not None:
            server.kill()
            server.wait()
        remove_hand_built()
        cluster("down", check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
