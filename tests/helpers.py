"""Test helpers: a cuttable TCP proxy, a CLI runner and sweeping of what a run made."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from discovery.procs import pid_alive


class TcpProxy:
    """Forwards 127.0.0.1:<port> to a target; ``cut()`` drops every connection and stops
    listening (a network partition as the client sees it), ``restore()`` listens again."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self._server: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _handle(self, reader, writer) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, up_writer}

        async def pipe(src, dst):
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    async def cut(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def restore(self) -> None:
        await self.start()


def require_root() -> None:
    """Tests of the kernel need root; say so instead of skipping."""
    if os.geteuid() != 0:
        raise AssertionError("this test needs root (network namespaces, bridges, iptables): run it as root")


def require_tools(*names: str) -> None:
    missing = [name for name in names if shutil.which(name) is None]
    if missing:
        raise AssertionError(f"missing tools {missing}: install them (scripts/install-deps.sh does)")


class Cli:
    """Runs `svcnet` as a user would, with its own prefix, state dir and node name."""

    def __init__(self, etcd_url: str, run_id: str, state_dir: Path, upstream: str) -> None:
        self.run_id = run_id
        self.prefix = f"/svcnet-test-{run_id}"
        self.state_dir = state_dir
        # never the host's resolver: every forwarded query goes to the test's own upstream
        self.env = dict(os.environ, SVCNET_ETCD=etcd_url, SVCNET_PREFIX=self.prefix,
                        SVCNET_STATE_DIR=str(state_dir), SVCNET_NODE=f"node-{run_id}",
                        SVCNET_UPSTREAM=upstream, SVCNET_METRICS_ADDR="127.0.0.1:0")

    def name(self, suffix: str) -> str:
        return f"{self.run_id}-{suffix}"

    def run(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        result = subprocess.run([sys.executable, "-m", "discovery.cli", *args], env=self.env,
                                capture_output=True, text=True, timeout=timeout * time_scale())
        if check and result.returncode != 0:
            raise AssertionError(f"svcnet {' '.join(args)} exited {result.returncode}: {result.stderr}")
        return result

    def json(self, *args: str):
        return json.loads(self.run(*args, "--format", "json").stdout)

    def dig(self, sandbox: str, *args: str) -> str:
        """Real dig inside the sandbox, through `svcnet exec` and the sandbox's resolv.conf."""
        result = self.run("exec", sandbox, "--", "dig", "@127.0.0.11", "+tries=1", "+time=3", *args, timeout=30)
        return result.stdout

    def short(self, sandbox: str, name: str, qtype: str = "A", *args: str) -> list[str]:
        return sorted(line for line in self.dig(sandbox, "+short", name, qtype, *args).splitlines() if line)

    def with_etcd(self, action):
        """Run ``await action(client)`` with an etcd client on this run's etcd; return its result."""
        import asyncio

        async def run():
            from discovery.state.etcd import connect
            client = await connect(self.env["SVCNET_ETCD"])
            try:
                return await action(client)
            finally:
                await client.close()
        return asyncio.run(run())

    def netns(self, sandbox: str) -> str:
        return f"/run/netns/svcnet-{sandbox}"

    def ns_dig(self, sandbox: str, *args: str) -> subprocess.Popen:
        """dig in the sandbox's netns without the CLI round trip (for timing and fan-out)."""
        return subprocess.Popen(["nsenter", f"--net={self.netns(sandbox)}", "dig", "@127.0.0.11", "+tries=1",
                                 "+time=3", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def start_agent(self, *flags: str) -> subprocess.Popen:
        """Start the agent ourselves, with resolver flags the on-demand start would not pass.

        It must answer within 30 s times SVCNET_TEST_TIME_SCALE (the IPVS lane's emulated
        VM runs ~35x slower than this machine)."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.state_dir / "agent.log", "ab")
        process = subprocess.Popen([sys.executable, "-m", "discovery.cli", "--log-level", "info", "agent", *flags],
                                   env=self.env, stdout=log, stderr=log, start_new_session=True)
        log.close()
        deadline = time.monotonic() + 30 * time_scale()
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise AssertionError(f"agent exited {process.returncode}: {(self.state_dir / 'agent.log').read_text()}")
            try:
                self.info()
                return process
            except Exception:
                time.sleep(0.1)
        raise AssertionError("agent did not start")

    def registry_items(self) -> dict[str, bytes]:
        """Every key of this run's prefix in etcd, with its value."""
        async def read(client):
            return {kv.key.decode(): kv.value for kv in await client.get_prefix(f"{self.prefix}/".encode())}
        return self.with_etcd(read)

    def info(self) -> dict:
        from discovery.node.client import ApiClient
        return ApiClient(self.state_dir / "agent.sock").call("GET", "/v1/info")

    def metrics(self) -> str:
        import urllib.request
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(self.info()["metrics"], timeout=5) as response:
            return response.read().decode()

    def agent_pid(self) -> int | None:
        try:
            return int((self.state_dir / "agent.pid").read_text())
        except (OSError, ValueError):
            return None

    def stop_agent(self, sig: int = signal.SIGTERM) -> None:
        pid = self.agent_pid()
        if pid is None:
            return
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if not pid_alive(pid):
                return
            time.sleep(0.05)
        os.kill(pid, signal.SIGKILL)

    def cleanup(self) -> None:
        """Remove everything this run made: sandboxes, services, networks, agent, rules."""
        if (self.state_dir / "agent.sock").exists():
            from discovery.errors import SvcnetError
            from discovery.node.client import ApiClient
            api = ApiClient(self.state_dir / "agent.sock")
            try:
                for record in api.call("GET", "/v1/sandboxes"):
                    api.call("DELETE", f"/v1/sandboxes/{record['name']}")
            except SvcnetError:
                pass
            services = self.run("service", "ls", "--format", "json", check=False)
            if services.returncode == 0:
                for service in json.loads(services.stdout):
                    self.run("service", "rm", service["name"], check=False)
            networks = self.run("network", "ls", "--format", "json", check=False)
            if networks.returncode == 0:
                for network in json.loads(networks.stdout):
                    self.run("network", "rm", network["name"], check=False)
            time.sleep(0.3)  # the agent removes bridges on the View change
        self.stop_agent()
        sweep(self.run_id, self.prefix, self.state_dir)


def sweep(run_id: str, prefix: str, state_dir: Path | None = None) -> None:
    """Delete namespaces, links, chains and netns pins of this run, whatever state it left."""
    if state_dir is not None:  # pins of attached netns (a killed sidecar leaves its own)
        with open("/proc/self/mounts") as mounts:
            pins = [line.split()[1] for line in mounts if line.split()[1].startswith(str(state_dir) + "/")]
        for pin in pins:
            subprocess.run(["umount", "-l", pin], capture_output=True)
    for name in os.listdir("/run/netns") if os.path.isdir("/run/netns") else []:
        if run_id in name:
            # commands the run started there (e.g. after its agent was killed) go with it
            pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
    from discovery.node.agent import remove_host
    remove_host(prefix)


def time_scale() -> float:
    """How much slower than this machine the tests run (SVCNET_TEST_TIME_SCALE, default 1)."""
    return float(os.environ.get("SVCNET_TEST_TIME_SCALE", "1"))


def wait(predicate, timeout: float, step: float = 0.05):
    """Poll ``predicate`` until it returns something true or ``timeout`` (times
    SVCNET_TEST_TIME_SCALE) passes; return its last value."""
    deadline = time.monotonic() + timeout * time_scale()
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    return predicate()


def metric_value(text: str, name: str, default: float | None = None, **labels: str) -> float:
    """The value of the sample ``name{labels}`` in Prometheus text (exactly those labels).

    A metric's name is printed (in ``# HELP``) even when nothing was counted, so tests read
    the number instead of looking for the name. No such sample: ``default`` if given, else
    an AssertionError listing the samples of that name that there are.
    """
    import re

    sample = re.compile(r'^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+\d+)?$')
    pair = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"')
    wanted = sorted(labels.items())
    seen = []
    for line in text.splitlines():
        match = sample.match(line.strip())
        if match is None or line.startswith("#") or match.group(1) != name:
            continue
        found = sorted((key, re.sub(r'\\(.)', lambda m: {"n": "\n"}.get(m.group(1), m.group(1)), value))
                       for key, value in pair.findall(match.group(2) or ""))
        if found == wanted:
            return float(match.group(3))
        seen.append(line)
    if default is not None:
        return default
    raise AssertionError(f"no sample {name}{dict(wanted) or ''} in the metrics; samples of {name}: {seen or 'none'}")


def nat_rules(netns: str) -> str:
    """`iptables-legacy-save -t nat` inside ``netns`` (a path: /run/netns/NAME, a pin): the
    table svcnet's iptables backend writes its VIP rules to."""
    return subprocess.run(["nsenter", f"--net={netns}", "iptables-legacy-save", "-t", "nat"],
                          capture_output=True, text=True, check=True).stdout


def ipvs_table(netns: str) -> dict[int, dict[str, int]]:
    """fwmark -> destination address -> weight, from `ipvsadm -Sn` inside ``netns``.

    ipvsadm must be there and must succeed: an unreadable table is a failure, never an
    empty one."""
    ipvsadm = shutil.which("ipvsadm")
    assert ipvsadm is not None, "the ipvs backend runs, but ipvsadm is missing: apt-get install ipvsadm"
    result = subprocess.run(["nsenter", f"--net={netns}", ipvsadm, "-Sn"], capture_output=True, text=True)
    assert result.returncode == 0, f"ipvsadm -Sn exited {result.returncode}: {result.stderr.strip()}"
    table: dict[int, dict[str, int]] = {}
    for line in result.stdout.splitlines():
        words = line.split()
        if "-f" not in words:
            continue
        mark = int(words[words.index("-f") + 1]) & 0xFFFFFFFF  # printed with %d: may be negative
        dests = table.setdefault(mark, {})
        if words[0] == "-a":
            dests[words[words.index("-r") + 1].rsplit(":", 1)[0]] = int(words[words.index("-w") + 1])
    return table


def ipvs_sysctls(netns: str) -> dict[str, str]:
    """The IPVS sysctls svcnet sets, as read inside ``netns``."""
    names = ("conn_reuse_mode", "expire_nodest_conn", "expire_quiescent_template")
    result = subprocess.run(["nsenter", f"--net={netns}", "sh", "-c",
                             " ; ".join(f"cat /proc/sys/net/ipv4/vs/{name}" for name in names)],
                            capture_output=True, text=True)
    assert result.returncode == 0, f"cannot read the IPVS sysctls: {result.stderr.strip()}"
    return dict(zip(names, result.stdout.split(), strict=True))


def ipvs_tcp_timeouts(netns: str) -> tuple[int, int]:
    """IPVS's idle timeout for established TCP (``ipvsadm -L --timeout``) and conntrack's, in ``netns``."""
    result = subprocess.run(["nsenter", f"--net={netns}", "sh", "-c",
                             "ipvsadm -L --timeout; cat /proc/sys/net/netfilter/nf_conntrack_tcp_timeout_established"],
                            capture_output=True, text=True)
    assert result.returncode == 0, f"cannot read the IPVS timeouts: {result.stderr.strip()}"
    ipvs_line, conntrack = result.stdout.splitlines()[-2:]  # "Timeout (tcp tcpfin udp): 900 120 300"
    return int(ipvs_line.split(":")[1].split()[0]), int(conntrack)


def expected_lb_backend() -> str:
    """What ``--lb-backend auto`` must pick here: SVCNET_EXPECT_LB_BACKEND if set (the IPVS
    lane sets ipvs, so a silent fallback fails), else ipvs exactly when the kernel has it,
    else nftables (scripts/install-deps.sh installs libnftables: a fallback to iptables fails)."""
    return os.environ.get("SVCNET_EXPECT_LB_BACKEND") or ("ipvs" if Path("/proc/net/ip_vs").exists() else "nftables")


def lb_backends() -> list[str]:
    """The backends the LB acceptance tests run on: SVCNET_TEST_LB_BACKENDS (comma-separated;
    the IPVS lane names ipvs alone) or what ``auto`` picks here and iptables, the fallback
    every kernel has."""
    named = [name for name in os.environ.get("SVCNET_TEST_LB_BACKENDS", "").split(",") if name]
    return named or list(dict.fromkeys([expected_lb_backend(), "iptables"]))


def lb_state(netns: str) -> tuple[set[str], set[str]]:
    """(VIPs, DNAT targets) of svcnet's VIP rules in ``netns``, whichever backend wrote them:
    iptables' ``-d VIP/32 -j SVCNET-S-*`` and ``--to-destination`` rules, and the keys of
    nftables' ``services`` map (a VIP without tasks goes to ``refuse`` there) and values of its
    ``backends`` map."""
    import re
    nat = nat_rules(netns)
    vips = set(re.findall(r"-A SVCNET-VIPS -d ([\d.]+)/32", nat))
    targets = set(re.findall(r"--to-destination ([\d.]+)\b(?!:)", nat))
    listing = subprocess.run(["nsenter", f"--net={netns}", "nft", "-j", "list", "table", "ip", "svcnet"],
                             capture_output=True, text=True)
    if listing.returncode == 0:
        for entry in json.loads(listing.stdout)["nftables"]:
            found = entry.get("map") or entry.get("set") or {}
            for element in found.get("elem", []):
                if found["name"] == "services":
                    vips.add(element[0])
                elif found["name"] == "backends":
                    targets.add(element[1])
    return vips, targets


def lb_rules(netns: str, backend: str) -> str:
    """What svcnet's load balancer holds in ``netns``, without counters: the legacy iptables
    rules, plus IPVS's table (ipvs) or svcnet's nftables table (nftables). Reading the
    backend's own state must work: a failure is an AssertionError."""
    def read(*argv: str) -> str:
        result = subprocess.run(["nsenter", f"--net={netns}", *argv], capture_output=True, text=True)
        assert result.returncode == 0, f"{' '.join(argv)} failed in {netns}: {result.stderr.strip()}"
        return result.stdout
    lines = [line.split(" [")[0] for line in read("iptables-legacy-save").splitlines() if not line.startswith("#")]
    if backend == "ipvs":
        lines.append(read("ipvsadm", "-Sn"))
    if backend == "nftables":
        lines.append(read("nft", "list", "table", "ip", "svcnet"))
    return "\n".join(lines)
