"""Benchmark svcnet's resolver against Docker's embedded DNS, and registry -> DNS convergence.

    sudo .venv/bin/python bench/dns_bench.py [--seconds 10] [--runs 3] [--names 20] [--no-docker]

Both servers get the same treatment: 20 containers on one user-defined network, a query
file of their names (``n00 A`` ...), and dnsperf (``-l 10 -c 8 -q 200``) run inside one
more container's netns against 127.0.0.11. The server is pinned to CPU 0 and dnsperf to
CPU 1 (``taskset``), runs alternate svcnet / Docker, and each figure is the median of
``--runs``. Server CPU seconds come from /proc/PID/stat (utime + stime, all threads) of the
svcnet agent and of dockerd (whose goroutines serve Docker's embedded DNS).

Docker: starts its own dockerd (data and sockets under a temp dir, ``--dns`` set to an
unused loopback address so nothing is ever forwarded off the machine), imports a tiny
image made from this host's /bin/sleep with ``docker import``, and on exit removes the
containers, network and image, stops dockerd and puts the nft tables back as it found
them, since dockerd leaves its chains behind (``--bridge none``: no docker0 either).

Convergence: a writer registers an endpoint as a remote node's agent would; a client in a
sandbox queries the name over and over; latency = first positive answer - just before the
write. Names are asked under ``svcnet.internal`` so a miss is a local NXDOMAIN, never a
forward.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import secrets
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from discovery.host import netlink  # noqa: E402
from discovery.node.client import ApiClient  # noqa: E402
from discovery.state.etcd import connect  # noqa: E402
from discovery.state.etcd_local import EtcdProcess, free_port  # noqa: E402
from discovery.state.keys import KeyLayout  # noqa: E402
from discovery.state.registry import Registry, SandboxRequest  # noqa: E402

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
SERVER_CPU, LOAD_CPU = "0", "1"


@dataclass
class Run:
    qps: float
    latency_ms: float
    cpu_seconds: float
    lost: int

    @property
    def answers_per_cpu_second(self) -> float:
        return self.qps * self._seconds / self.cpu_seconds if self.cpu_seconds else float("inf")

    _seconds: float = 10.0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime (fields 14, 15)


def pin(pid: int, cpu: str) -> None:
    subprocess.run(["taskset", "-a", "-p", "-c", cpu, str(pid)], check=True, capture_output=True)


def dnsperf(netns: str, query_file: Path, seconds: int, clients: int, outstanding: int, server_pid: int) -> Run:
    before = cpu_seconds(server_pid)
    result = subprocess.run(
        ["taskset", "-c", LOAD_CPU, "nsenter", f"--net={netns}", "dnsperf", "-s", "127.0.0.11", "-d",
         str(query_file), "-l", str(seconds), "-c", str(clients), "-q", str(outstanding)],
        capture_output=True, text=True, check=True)
    used = cpu_seconds(server_pid) - before
    out = result.stdout

    def figure(label: str) -> float:
        match = re.search(rf"{label}:\s+([\d.]+)", out)
        if not match:
            raise SystemExit(f"dnsperf printed no '{label}':\n{out}\n{result.stderr}")
        return float(match.group(1))

    answered = re.search(r"NOERROR (\d+)", out)
    if not answered or int(answered.group(1)) == 0:
        raise SystemExit(f"no NOERROR answers: the names did not resolve\n{out}")
    run = Run(figure("Queries per second"), figure("Average Latency \\(s\\)") * 1000, used,
              int(figure("Queries lost")))
    run._seconds = seconds
    return run


# ---- svcnet ------------------------------------------------------------------------------

class SvcnetSide:
    def __init__(self, etcd_url: str, names: list[str]) -> None:
        self.run_id = "b" + secrets.token_hex(3)
        self.state = Path(tempfile.mkdtemp(prefix="svcnet-dnsbench-"))
        self.prefix = f"/svcnet-bench-{self.run_id}"
        self.blackhole = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.blackhole.bind(("127.0.0.1", 0))  # upstream that never answers: nothing leaves
        self.env = dict(os.environ, SVCNET_ETCD=etcd_url, SVCNET_PREFIX=self.prefix, SVCNET_STATE_DIR=str(self.state),
                        SVCNET_NODE=f"node-{self.run_id}", SVCNET_METRICS_ADDR="127.0.0.1:0",
                        SVCNET_UPSTREAM=f"127.0.0.1:{self.blackhole.getsockname()[1]}")
        self.names = names
        self.network = f"{self.run_id}-net"
        self.client = f"{self.run_id}-client"

    def svcnet(self, *args: str) -> str:
        return subprocess.run([sys.executable, "-m", "discovery.cli", *args], env=self.env, check=True,
                              capture_output=True, text=True).stdout

    def start(self) -> None:
        self.svcnet("network", "create", self.network, "--subnet", "10.250.0.0/24")
        self.svcnet("ps")  # starts the agent
        api = ApiClient(self.state / "agent.sock")
        for name in self.names:
            api.call("POST", "/v1/sandboxes", {"name": name, "networks": [self.network]})
        api.call("POST", "/v1/sandboxes", {"name": self.client, "networks": [self.network]})
        self.pid = int((self.state / "agent.pid").read_text())
        pin(self.pid, SERVER_CPU)

    @property
    def netns(self) -> str:
        return netlink.netns_path(f"svcnet-{self.client}")

    def stop(self) -> None:
        api = ApiClient(self.state / "agent.sock")
        for name in [*self.names, self.client]:
            try:
                api.call("DELETE", f"/v1/sandboxes/{name}")
            except Exception:
                pass
        subprocess.run([sys.executable, "-m", "discovery.cli", "network", "rm", self.network], env=self.env,
                       capture_output=True)
        time.sleep(0.5)
        try:
            os.kill(self.pid, 15)
        except (ProcessLookupError, AttributeError):
            pass
        time.sleep(0.5)
        from discovery.host import firewall
        firewall.remove(self.prefix)
        self.blackhole.close()
        shutil.rmtree(self.state, ignore_errors=True)


# ---- Docker ------------------------------------------------------------------------------

def nft_tables() -> dict[str, str]:
    """Every nft table ("ip filter") with its full text, to put back what dockerd changes."""
    listing = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True, check=True).stdout
    tables = {}
    for line in listing.splitlines():
        name = line.removeprefix("table ").strip()
        tables[name] = subprocess.run(["nft", "list", "table", *name.split()], capture_output=True, text=True,
                                      check=True).stdout
    return tables


def restore_nft_tables(before: dict[str, str]) -> None:
    """Drop the tables that appeared, and rewrite the ones that changed, as they were."""
    for name, text in nft_tables().items():
        if before.get(name) == text:
            continue
        subprocess.run(["nft", "delete", "table", *name.split()], check=True)
        if name in before:
            subprocess.run(["nft", "-f", "-"], input=before[name], text=True, check=True)

class DockerSide:
    IMAGE = "svcnet-bench-sleeper:latest"

    def __init__(self, names: list[str]) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="svcnet-dockerbench-"))
        self.sock = f"unix://{self.dir}/docker.sock"
        self.names = names
        self.network = "svcnetbench"
        self.client = "svcnetbench-client"
        self.process: subprocess.Popen | None = None
        self.saved_tables: dict[str, str] = {}

    def docker(self, *args: str, check: bool = True) -> str:
        return subprocess.run(["docker", "-H", self.sock, *args], check=check, capture_output=True,
                              text=True).stdout.strip()

    def start(self) -> None:
        for tool, package in (("dockerd", "docker.io"), ("nft", "nftables")):
            if shutil.which(tool) is None:
                raise SystemExit(f"{tool} is missing: apt-get install {package} (or pass --no-docker)")
        self.saved_tables = nft_tables()
        log = open(self.dir / "dockerd.log", "wb")
        self.process = subprocess.Popen(
            ["dockerd", "--data-root", str(self.dir / "data"), "--exec-root", str(self.dir / "exec"),
             "--pidfile", str(self.dir / "docker.pid"), "-H", self.sock, "--dns", "127.0.0.153", "--bridge", "none",
             "--log-level", "warn"], stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + 60
        while subprocess.run(["docker", "-H", self.sock, "info"], capture_output=True).returncode != 0:
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise SystemExit(f"dockerd did not start; see {self.dir / 'dockerd.log'}")
            time.sleep(0.5)
        self._import_image()
        self.docker("network", "create", "--subnet", "10.251.0.0/24", self.network)
        for name in [*self.names, self.client]:
            self.docker("run", "-d", "--name", name, "--network", self.network, self.IMAGE, "/bin/sleep", "infinity")
        self.pid = self.process.pid
        pin(self.pid, SERVER_CPU)
        self.netns = f"/proc/{self.docker('inspect', '-f', '{{.State.Pid}}', self.client)}/ns/net"

    def _import_image(self) -> None:
        """A rootfs of /bin/sleep and the libraries it links: enough to keep a netns alive."""
        root = self.dir / "rootfs"
        files = {"/bin/sleep"}
        ldd = subprocess.run(["ldd", "/bin/sleep"], capture_output=True, text=True, check=True).stdout
        files |= set(re.findall(r"(/\S+\.so[.\d]*)", ldd))
        for path in files:
            target = root / path.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(os.path.realpath(path), target)
        tar = self.dir / "rootfs.tar"
        subprocess.run(["tar", "-C", str(root), "-cf", str(tar), "."], check=True)
        self.docker("import", str(tar), self.IMAGE)

    def stop(self) -> None:
        if self.process is None:
            return
        self.docker("rm", "-f", *self.names, self.client, check=False)
        self.docker("network", "rm", self.network, check=False)
        self.docker("rmi", self.IMAGE, check=False)
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
        restore_nft_tables(self.saved_tables)
        shutil.rmtree(self.dir, ignore_errors=True)


# ---- convergence -------------------------------------------------------------------------

def _query(name: str, query_id: int) -> bytes:
    labels = b"".join(bytes((len(p),)) + p.encode() for p in name.split("."))
    return struct.pack("!HHHHHH", query_id, 0x0100, 1, 0, 0, 0) + labels + b"\x00\x00\x01\x00\x01"


def convergence(side: SvcnetSide, etcd_url: str, count: int) -> list[float]:
    with netlink.entered_netns(side.netns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(0.2)
    sock.connect(("127.0.0.11", 53))

    async def run() -> list[float]:
        client = await connect(etcd_url)
        registry = Registry(client, KeyLayout(side.prefix))
        lease = await client.lease(60)
        latencies = []
        for index in range(count):
            name = f"conv-{index}"
            packet = _query(f"{name}.svcnet.internal", index)
            started = time.perf_counter()
            await registry.register_sandbox(
                SandboxRequest(container=name, networks=(side.network,), node="remote-node"), lease.id)
            while True:
                sock.send(packet)
                try:
                    reply = sock.recv(512)
                except TimeoutError:
                    continue
                if reply[:2] == packet[:2] and struct.unpack("!H", reply[6:8])[0] > 0:
                    break
            latencies.append((time.perf_counter() - started) * 1000)
        await client.revoke_lease(lease.id)
        await client.close()
        return latencies

    try:
        return asyncio.run(run())
    finally:
        sock.close()


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(pct / 100 * (len(ordered) - 1))))]


def median_run(runs: list[Run]) -> Run:
    result = Run(statistics.median(r.qps for r in runs), statistics.median(r.latency_ms for r in runs),
                 statistics.median(r.cpu_seconds for r in runs), int(statistics.median(r.lost for r in runs)))
    result._seconds = runs[0]._seconds
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=10, help="dnsperf -l (default 10)")
    parser.add_argument("--runs", type=int, default=3, help="runs per server; medians are printed (default 3)")
    parser.add_argument("--names", type=int, default=20, help="containers, and names in the query file (default 20)")
    parser.add_argument("--clients", type=int, default=8, help="dnsperf -c (default 8)")
    parser.add_argument("--outstanding", type=int, default=200, help="dnsperf -q (default 200)")
    parser.add_argument("--convergence", type=int, default=200, help="registry writes to time (default 200)")
    parser.add_argument("--no-docker", action="store_true", help="measure svcnet only")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root: the benchmark makes network namespaces (and starts dockerd)")
    for tool in ("dnsperf", "taskset", "nsenter", "etcd"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is missing: apt-get install dnsperf util-linux etcd-server")

    names = [f"n{i:02d}" for i in range(args.names)]
    work = Path(tempfile.mkdtemp(prefix="svcnet-dnsbench-q-"))
    query_file = work / "queries.txt"
    query_file.write_text("".join(f"{name} A\n" for name in names))
    member = EtcdProcess(work / "etcd", free_port(), free_port())
    member.start()
    svcnet = SvcnetSide(member.url, [f"{name}" for name in names])
    docker = None if args.no_docker else DockerSide(names)
    results: dict[str, list[Run]] = {"svcnet": [], "docker": []}
    try:
        print(f"setting up: svcnet agent with {len(names)} sandboxes ...", flush=True)
        svcnet.start()
        if docker is not None:
            print(f"setting up: dockerd with {len(names)} containers ...", flush=True)
            docker.start()
        for index in range(args.runs):
            for label, side in (("svcnet", svcnet), ("docker", docker)):
                if side is None:
                    continue
                print(f"run {index + 1}/{args.runs}: {label} ...", flush=True)
                results[label].append(dnsperf(side.netns, query_file, args.seconds, args.clients,
                                              args.outstanding, side.pid))
        latencies = convergence(svcnet, member.url, args.convergence) if args.convergence else []
    finally:
        if docker is not None:
            docker.stop()
        svcnet.stop()
        member.stop()
        shutil.rmtree(work, ignore_errors=True)

    print(f"\ndnsperf -l {args.seconds} -c {args.clients} -q {args.outstanding}, {len(names)} names, "
          f"server on CPU {SERVER_CPU}, dnsperf on CPU {LOAD_CPU}, median of {args.runs}:")
    print(f"  {'server':8} {'qps':>10} {'avg latency':>12} {'server CPU-s':>13} {'answers/CPU-s':>14} {'lost':>6}")
    medians = {label: median_run(runs) for label, runs in results.items() if runs}
    for label, run in medians.items():
        print(f"  {label:8} {run.qps:10.0f} {run.latency_ms:9.3f} ms {run.cpu_seconds:13.2f} "
              f"{run.answers_per_cpu_second:14.0f} {run.lost:6d}")
    if "docker" in medians:
        ours, theirs = medians["svcnet"], medians["docker"]
        print(f"  ratio svcnet/docker: qps {ours.qps / theirs.qps:.2f}x (target >= 1.5x), answers per CPU-s "
              f"{ours.answers_per_cpu_second / theirs.answers_per_cpu_second:.2f}x (target >= 2x)")
    if latencies:
        print(f"\nconvergence over {len(latencies)} registry writes (write -> positive answer in another sandbox):")
        print(f"  p50 {percentile(latencies, 50):.2f} ms   p99 {percentile(latencies, 99):.2f} ms   "
              f"max {max(latencies):.2f} ms   (target p99 <= 50 ms)")


if __name__ == "__main__":
    main()
