"""Acceptance: a node that keeps serving (issue: 'a node that survives').

Real parts only: a real etcd stopped and started (or cut off behind a proxy), the agent
killed with SIGKILL and restarted, commands that exit, values written with etcdctl, two
agents on one state dir, a PID reused after its process exited.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from discovery.procs import pid_alive
from discovery.state import snapshot
from discovery.state.model import Network, Service
from tests.helpers import Cli, TcpProxy, lb_state, require_root, require_tools, wait


@pytest.fixture(autouse=True)
def _tools():
    require_root()
    require_tools("ip", "dig", "nsenter", "etcd", "etcdctl")


@pytest.fixture
def own_cli(own_etcd, tmp_path, upstream) -> Cli:
    """A CLI on an etcd this test may stop."""
    runner = Cli(own_etcd.url, "t" + secrets.token_hex(3), tmp_path / "state", upstream.address)
    yield runner
    if own_etcd.pid is None:
        own_etcd.start()
    runner.cleanup()


def wait_until(predicate, timeout: float, what: str, every: float = 0.05) -> float:
    started = time.monotonic()
    while True:
        if predicate():
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(every)


def dig_short(cli: Cli, sandbox: str, name: str, qtype: str = "A", wait: int = 1) -> list[str]:
    return dig_short_in(cli.netns(sandbox), name, qtype, wait)


def dig_short_in(netns: str | Path, name: str, qtype: str = "A", wait: int = 1) -> list[str]:
    """The answers of `dig +short` at 127.0.0.11 inside ``netns`` (a path), sorted."""
    result = subprocess.run(["nsenter", f"--net={netns}", "dig", "@127.0.0.11", "+tries=1", f"+time={wait}",
                             "+short", name, qtype], capture_output=True, text=True, timeout=10)
    return sorted(line for line in result.stdout.splitlines() if line and not line.startswith(";"))


def etcdctl(cli: Cli, *args: str) -> str:
    result = subprocess.run(["etcdctl", "--endpoints", cli.env["SVCNET_ETCD"], *args], capture_output=True,
                            text=True, env=dict(os.environ, ETCDCTL_API="3"), timeout=20)
    assert result.returncode == 0, result.stderr
    return result.stdout


def agent_log(cli: Cli) -> str:
    return (cli.state_dir / "agent.log").read_text()


def start_agent_timed(cli: Cli, *flags: str) -> tuple[subprocess.Popen, float]:
    """Start the agent and return it with the monotonic time its process was started."""
    cli.state_dir.mkdir(parents=True, exist_ok=True)
    log = open(cli.state_dir / "agent.log", "ab")
    started = time.monotonic()
    process = subprocess.Popen([sys.executable, "-m", "discovery.cli", "--log-level", "info", "agent", *flags],
                               env=cli.env, stdout=log, stderr=log, start_new_session=True)
    log.close()
    return process, started


def _answers_now(netns: str, name: str, timeout: float = 0.1) -> list[str]:
    """The A records of one query to 127.0.0.11 from a socket in ``netns``, waiting ``timeout``.
    Polling with dig, a query that reached the resolver's socket before it served lost dig's
    whole second of patience, and the gap measured that instead of the agent."""
    from dnslib import QTYPE, DNSRecord

    from discovery.host.netns import entered_netns
    with entered_netns(netns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(timeout)
    try:
        sock.sendto(DNSRecord.question(name).pack(), ("127.0.0.11", 53))
        reply = DNSRecord.parse(sock.recv(4096))
    except OSError:
        return []
    finally:
        sock.close()
    return [str(rr.rdata) for rr in reply.rr if rr.rtype == QTYPE.A]


def kill_agent(cli: Cli) -> None:
    pid = cli.agent_pid()
    assert pid is not None and pid_alive(pid)
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not pid_alive(pid), 5, "the agent died")


# ---- etcd down while the agent (re)starts ----------------------------------------------


@pytest.mark.parametrize("etcd_state", ["up", "down"])
def test_killed_agent_answers_dns_within_a_second_of_restart(own_cli, own_etcd, etcd_state):
    cli = own_cli
    cli.start_agent()
    net, web, client = cli.name("n"), cli.name("web"), cli.name("c")
    cli.run("network", "create", net, "--subnet", "10.171.0.0/24")
    cli.run("service", "create", "web", "--network", net)
    cli.run("run", "-d", "--name", web, "--network", net, "--service", "web", "--", "sleep", "300")
    cli.run("run", "-d", "--name", client, "--network", net)
    vip = cli.json("service", "inspect", "web")["vips"][net]
    assert dig_short(cli, client, "web") == [vip]
    time.sleep(1.2)  # the view snapshot is written at most once a second
    kill_agent(cli)
    if etcd_state == "down":
        own_etcd.stop()
    process, started = start_agent_timed(cli)
    try:
        netns = cli.netns(client)
        wait_until(lambda: _answers_now(netns, "web") == [vip], 5, "VIP answered after restart", every=0.01)
        gap = time.monotonic() - started
        assert dig_short(cli, client, "web") == [vip] and dig_short(cli, client, web) != [], "and to dig"
        assert gap <= 1.0, f"DNS answered {gap:.2f}s after the agent started (etcd {etcd_state})"
        wait_until(lambda: _info_or_none(cli) is not None, 2, "API socket open")  # after the LB loads
        info = cli.info()
        assert info["pid"] == process.pid
        if etcd_state == "down":
            assert info["etcd_connected"] is False and info["ready"] is False
            assert [r["name"] for r in cli.json("ps")] == sorted([web, client])
            refused = cli.run("run", "-d", "--name", cli.name("late"), "--network", net, check=False, timeout=30)
            assert refused.returncode != 0 and "etcd is unreachable" in refused.stderr, refused.stderr
            own_etcd.start()
        wait_until(lambda: cli.info()["ready"], 10, "agent ready once etcd answers")
        # the watch resumed: a change made now reaches the sandbox's DNS
        cli.run("service", "create", "api", "--network", net)
        api_vip = cli.json("service", "inspect", "api")["vips"][net]
        wait_until(lambda: dig_short(cli, client, "api") == [api_vip], 3, "new service answered")
    finally:
        if own_etcd.pid is None:
            own_etcd.start()


def test_snapshot_on_disk_is_checked_before_use(own_cli, own_etcd):
    """A torn or foreign snapshot is ignored with a log line, never half-used."""
    cli = own_cli
    cli.start_agent()
    net, client = cli.name("n"), cli.name("c")
    cli.run("network", "create", net, "--subnet", "10.172.0.0/24")
    cli.run("run", "-d", "--name", client, "--network", net)
    time.sleep(1.2)
    kill_agent(cli)
    path = cli.state_dir / "view.json"
    document = json.loads(path.read_text())
    assert document["format"] == snapshot.FORMAT and document["prefix"] == cli.prefix
    document["objects"][0][1]["subnet"] = "10.99.0.0/24"  # edited without its digest
    path.write_text(json.dumps(document))
    own_etcd.stop()
    cli.start_agent()
    wait_until(lambda: "digest does not match" in agent_log(cli), 5, "the bad snapshot was reported")
    assert dig_short(cli, client, client) == []  # nothing known: nothing half-loaded
    own_etcd.start()
    wait_until(lambda: dig_short(cli, client, client) != [], 10, "names back once etcd answers")


# ---- one agent per state dir --------------------------------------------------------------


def test_second_agent_on_one_state_dir_exits_and_leaves_the_first_alone(cli):
    first = cli.start_agent()
    socket_path = cli.state_dir / "agent.sock"
    inode = socket_path.stat().st_ino
    second = subprocess.run([sys.executable, "-m", "discovery.cli", "agent"], env=cli.env, capture_output=True,
                            text=True, timeout=30)
    assert second.returncode != 0
    assert f"pid {first.pid}" in second.stderr, second.stderr
    assert socket_path.stat().st_ino == inode, "the first agent's socket was replaced"
    assert cli.agent_pid() == first.pid
    assert cli.info()["pid"] == first.pid
    assert first.poll() is None


def test_cli_waits_for_an_agent_that_holds_the_lock_and_starts_no_other(cli):
    """An agent that runs but does not serve yet: the CLI waits for it, never starts a second."""
    cli.state_dir.mkdir(parents=True, exist_ok=True)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({str(cli.state_dir / 'agent.lock')!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        f"open({str(cli.state_dir / 'agent.pid')!r}, 'w').write(str(os.getpid()))\n"
        "print('locked', flush=True); time.sleep(2)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        started = time.monotonic()
        result = cli.run("ps", check=False, timeout=40)
        assert result.returncode != 0
        assert f"waiting for the agent (pid {holder.pid})" in result.stderr, result.stderr
        assert "stopped before serving" in result.stderr, result.stderr
        assert time.monotonic() - started >= 1.0, "the CLI did not wait for the lock holder"
        assert "started the agent" not in result.stderr
        assert not (cli.state_dir / "agent.sock").exists()
    finally:
        holder.kill()
        holder.wait()


# ---- re-registration in batches, with 10,000 services ---------------------------------------


class _ProxyThread:
    """The TCP proxy of tests.helpers on a loop of its own, cut and restored from the test."""

    def __init__(self, target_port: int) -> None:
        self.proxy = TcpProxy(target_port)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.call(self.proxy.start())

    def call(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(10)

    def close(self) -> None:
        self.call(self.proxy.cut())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def _put_services(cli: Cli, network: Network, count: int) -> None:
    async def write(client):
        base = int(network.subnet.network_address) + 2
        for start in range(0, count, 128):
            puts = []
            for i in range(start, min(start + 128, count)):
                service = Service(f"bulk{i}", (network.name,), "vip", (), (),
                                  {network.name: str(network.subnet.network_address.__class__(base + i))})
                puts.append(client.transactions.put(f"{cli.prefix}/services/{service.name}".encode(),
                                                    json.dumps(service.to_dict()).encode()))
            await client.transaction(compare=[], success=puts, failure=[])
    cli.with_etcd(write)


def _endpoint_count(cli: Cli) -> int:
    async def count(client):
        return len(list(await client.get_prefix(f"{cli.prefix}/endpoints/".encode(), keys_only=True)))
    return cli.with_etcd(count)


def test_101_sandboxes_are_back_within_2s_of_etcd_returning_with_10000_services(own_cli, own_etcd):
    cli = own_cli
    proxy = _ProxyThread(own_etcd.client_port)
    try:
        agent_env = dict(cli.env, SVCNET_ETCD=f"http://127.0.0.1:{proxy.proxy.port}")
        cli.state_dir.mkdir(parents=True, exist_ok=True)
        log = open(cli.state_dir / "agent.log", "ab")
        agent = subprocess.Popen([sys.executable, "-m", "discovery.cli", "--log-level", "info", "agent",
                                  "--lease-ttl", "3"], env=agent_env, stdout=log, stderr=log,
                                 start_new_session=True)
        wait_until(lambda: _info_or_none(cli) is not None, 30, "agent up")
        net = cli.name("n")
        cli.run("network", "create", net, "--subnet", "10.173.0.0/24")
        from discovery.node.client import ApiClient
        api = ApiClient(cli.state_dir / "agent.sock")
        names = [cli.name(f"s{i}") for i in range(101)]
        for name in names:
            api.call("POST", "/v1/sandboxes", {"name": name, "networks": [net]})
        bulk = Network.create(cli.name("bulk"), "10.174.0.0/16")
        cli.run("network", "create", bulk.name, "--subnet", str(bulk.subnet))
        _put_services(cli, bulk, 10_000)
        wait_until(lambda: len(cli.json("service", "ls")) == 10_000, 60, "10,000 services listed")
        assert _endpoint_count(cli) == 101
        proxy.call(proxy.proxy.cut())  # etcd unreachable for longer than the lease TTL
        wait_until(lambda: _endpoint_count(cli) == 0, 10, "the lost lease took the endpoints", every=0.2)
        time.sleep(0.5)
        proxy.call(proxy.proxy.restore())
        back = wait_until(lambda: _endpoint_count(cli) == 101, 10, "all 101 endpoints back", every=0.05)
        assert back <= 2.0, f"101 sandboxes took {back:.2f}s to come back"
        # and they stay: the new lease is kept alive through the View rebuilds that follow
        for _ in range(8):
            time.sleep(1)
            assert _endpoint_count(cli) == 101
        assert 'msg="sandboxes re-registered" count=101 failed=0' in agent_log(cli)
        for name in names:
            api.call("DELETE", f"/v1/sandboxes/{name}")
        agent.send_signal(signal.SIGTERM)
        agent.wait(30)
    finally:
        async def drop_bulk(client):  # one range delete; the fixture's cleanup removes one at a time
            await client.delete_prefix(f"{cli.prefix}/services/bulk".encode())
        cli.with_etcd(drop_bulk)
        proxy.close()


def _info_or_none(cli: Cli):
    try:
        return cli.info()
    except Exception:
        return None


# ---- netns pins and reused PIDs -------------------------------------------------------------


def _process_in_new_netns() -> subprocess.Popen:
    process = subprocess.Popen(["unshare", "--net", "sh", "-c", "ip link set lo up; exec sleep 300"])
    wait_until(lambda: os.readlink(f"/proc/{process.pid}/ns/net") != os.readlink("/proc/self/ns/net"), 5,
               "the process entered its own netns")
    return process


def _take_pid(pid: int) -> subprocess.Popen | None:
    """Make the kernel hand ``pid`` to a new process in the host netns (PID reuse, on purpose)."""
    for _ in range(20):
        Path("/proc/sys/kernel/ns_last_pid").write_text(str(pid - 1))
        process = subprocess.Popen(["sleep", "300"])
        if process.pid == pid:
            return process
        process.kill()
        process.wait()
    return None


def test_attached_netns_is_pinned_and_a_reused_pid_changes_nothing(cli):
    net, name = cli.name("n"), cli.name("att")
    cli.run("network", "create", net, "--subnet", "10.175.0.0/24")
    owner = _process_in_new_netns()
    original = os.readlink(f"/proc/{owner.pid}/ns/net")
    cli.run("attach", "--netns", f"/proc/{owner.pid}/ns/net", "--name", name, "--network", net)
    record = cli.json("ps")[0]
    assert record["netns"].startswith(str(cli.state_dir / "netns")), record["netns"]
    assert record["source_netns"] == f"/proc/{owner.pid}/ns/net"
    pid = owner.pid
    owner.kill()
    owner.wait()
    impostor = _take_pid(pid)
    assert impostor is not None, "could not reuse the PID for the test"
    try:
        assert os.readlink(f"/proc/{pid}/ns/net") != original  # /proc/PID/ns/net now names the host's netns
        cli.stop_agent(signal.SIGKILL)
        cli.run("ps")  # a new agent, reading the record
        inside = subprocess.run(["nsenter", f"--net={record['netns']}", "ip", "-4", "-o", "addr"],
                                capture_output=True, text=True, check=True).stdout
        assert "10.175.0.2/24" in inside, "the pinned netns lost its address"
        host = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True, check=True).stdout
        assert "10.175.0.2/24" not in host
        cli.run("rm", name)
        assert not Path(record["netns"]).exists(), "the pin outlived the sandbox"
    finally:
        impostor.kill()
        impostor.wait()


def _mounted(path: Path) -> bool:
    return any(line.split()[4] == str(path) for line in Path("/proc/self/mountinfo").read_text().splitlines())


def test_sidecar_pins_its_netns_at_once_even_with_etcd_down(own_cli, own_etcd):
    """Given /proc/PID/ns/net while etcd is down, the sidecar pins it before anything else:
    the owner exits and its PID is reused meanwhile, and when etcd answers the sidecar still
    serves the netns it was given, not the impostor's."""
    cli = own_cli
    net, name = cli.name("n"), cli.name("side")
    cli.run("network", "create", net, "--subnet", "10.183.0.0/24")
    owner = _process_in_new_netns()
    original = os.readlink(f"/proc/{owner.pid}/ns/net")
    own_etcd.stop()
    pin = cli.state_dir / "sidecars" / name / "netns" / name
    log = open(cli.state_dir.parent / "sidecar.log", "wb")
    sidecar = subprocess.Popen([sys.executable, "-m", "discovery.cli", "sidecar", "--netns", f"/proc/{owner.pid}/ns/net",
                                "--name", name, "--network", net], env=cli.env, stdout=log, stderr=subprocess.STDOUT)
    impostor = None
    try:
        wait_until(lambda: _mounted(pin), 5, "the netns pinned while etcd is down")
        pid = owner.pid
        owner.kill()
        owner.wait()
        impostor = _take_pid(pid)
        assert impostor is not None, "could not reuse the PID for the test"
        own_etcd.start()
        wait_until(lambda: "10.183.0.2/24" in subprocess.run(
            ["nsenter", f"--net={pin}", "ip", "-4", "-o", "addr"], capture_output=True, text=True).stdout,
            20, "the sidecar attached the pinned netns once etcd answered")
        inside = subprocess.run(["nsenter", f"--net={pin}", "readlink", "/proc/self/ns/net"], capture_output=True,
                                text=True, check=True).stdout.strip()
        assert inside == original, "the pin holds the netns the sidecar was given"
        host = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True, check=True).stdout
        assert "10.183.0.2/24" not in host, "the impostor's (the host's) netns got the address"
        wait_until(lambda: dig_short_in(pin, name) == ["10.183.0.2"], 10, "the sidecar answers in its netns")
    finally:
        sidecar.send_signal(signal.SIGTERM)
        sidecar.wait(20)
        if impostor is not None:
            impostor.kill()
            impostor.wait()
        if owner.poll() is None:
            owner.kill()
            owner.wait()
    assert not _mounted(pin), "SIGTERM released the pin"


# ---- commands that exit, and restart policies -------------------------------------------------


def test_exited_task_leaves_answers_and_vip_within_a_second_and_ps_shows_its_code(cli, tmp_path):
    net, task, client = cli.name("n"), cli.name("t"), cli.name("c")
    cli.run("network", "create", net, "--subnet", "10.176.0.0/24")
    cli.run("service", "create", "job", "--network", net)
    stamp = tmp_path / "ended"
    cli.run("run", "-d", "--name", task, "--network", net, "--service", "job", "--",
            "sh", "-c", f"sleep 1.5; date +%s.%N > {stamp}; exit 3")
    cli.run("run", "-d", "--name", client, "--network", net)
    address = cli.json("ps")[[r["name"] for r in cli.json("ps")].index(task)]["endpoints"][0]["ipv4"]
    assert dig_short(cli, client, "tasks.job") == [address]
    assert address in lb_state(cli.netns(client))[1], "the task is a VIP backend"
    wait_until(lambda: dig_short(cli, client, "tasks.job") == [] and
               address not in lb_state(cli.netns(client))[1], 10,
               "task out of answers and VIP backends", every=0.02)
    gone_at = time.time()
    took = gone_at - float(stamp.read_text())
    assert took <= 1.0, f"answers or the VIP kept the task {took:.2f}s"
    row = [r for r in cli.json("ps") if r["name"] == task][0]
    assert row["status"] == "exited (3)", row["status"]
    assert "exited (3)" in cli.run("ps").stdout


def test_restart_policies_follow_docker(cli, tmp_path):
    net = cli.name("n")
    cli.run("network", "create", net, "--subnet", "10.177.0.0/24")
    counter = tmp_path / "runs"
    failing = ["sh", "-c", f"echo x >> {counter}; exit 4"]
    cli.run("run", "-d", "--name", cli.name("onf"), "--network", net, "--restart", "on-failure:2", "--", *failing)
    wait_until(lambda: counter.exists() and len(counter.read_text().split()) == 3, 10, "first run + 2 restarts")
    time.sleep(1.5)  # the backoff after the 2nd restart would have allowed a 4th run by now
    assert len(counter.read_text().split()) == 3
    row = [r for r in cli.json("ps") if r["name"] == cli.name("onf")][0]
    assert row["status"] == "exited (4)" and row["restarts"] == 2

    always = tmp_path / "always"
    cli.run("run", "-d", "--name", cli.name("alw"), "--network", net, "--restart", "always", "--",
            "sh", "-c", f"echo x >> {always}; sleep 0.2; exit 0")
    wait_until(lambda: always.exists() and len(always.read_text().split()) >= 3, 10, "always restarts clean exits")

    once = tmp_path / "once"
    cli.run("run", "-d", "--name", cli.name("no"), "--network", net, "--", "sh", "-c", f"echo x >> {once}; exit 0")
    wait_until(lambda: [r for r in cli.json("ps") if r["name"] == cli.name("no")][0]["status"] == "exited (0)", 5,
               "policy no: exited")
    time.sleep(1)
    assert len(once.read_text().split()) == 1

    bad = cli.run("run", "-d", "--name", cli.name("bad"), "--network", net, "--restart", "sometimes", "--", "true",
                  check=False)
    assert bad.returncode != 0 and "on-failure[:N]" in bad.stderr


def test_restarted_task_is_back_in_answers_with_its_address(cli, tmp_path):
    net, task, client = cli.name("n"), cli.name("t"), cli.name("c")
    cli.run("network", "create", net, "--subnet", "10.178.0.0/24")
    runs = tmp_path / "runs"
    cli.run("run", "-d", "--name", task, "--network", net, "--restart", "always", "--",
            "sh", "-c", f"echo x >> {runs}; sleep 2; exit 1")
    cli.run("run", "-d", "--name", client, "--network", net)
    address = dig_short(cli, client, task)
    assert address

    # the exited window lasts only the restart backoff (0.1 s): watch the registry for it
    key = f"{cli.prefix}/endpoints/{net}/{task}"
    watch = subprocess.Popen(["etcdctl", "--endpoints", cli.env["SVCNET_ETCD"], "watch", key],
                             stdout=subprocess.PIPE, text=True, env=dict(os.environ, ETCDCTL_API="3"))
    try:
        wait_until(lambda: len(runs.read_text().split()) == 2, 6, "restarted after its exit")
        wait_until(lambda: dig_short(cli, client, task) == address, 2, "back, same address, after the restart")
    finally:
        watch.terminate()
    healths = [json.loads(line)["health"] for line in watch.communicate(timeout=10)[0].splitlines()
               if line.startswith("{")]
    assert healths[:2] == ["exited", "healthy"], healths


def test_exit_code_of_a_command_started_by_a_previous_agent(cli):
    net, task = cli.name("n"), cli.name("t")
    cli.run("network", "create", net, "--subnet", "10.179.0.0/24")
    cli.run("run", "-d", "--name", task, "--network", net, "--", "sh", "-c", "sleep 2; exit 7")
    cli.stop_agent(signal.SIGKILL)
    cli.run("ps")  # a new agent adopts the running command
    wait_until(lambda: cli.json("ps")[0]["status"] == "exited (7)", 6, "exit code read from the shim's file")


# ---- bad data in etcd -----------------------------------------------------------------------


def test_unparsable_value_is_logged_once_and_the_last_good_version_stays(cli):
    net, client = cli.name("n"), cli.name("c")
    cli.run("network", "create", net, "--subnet", "10.180.0.0/24")
    cli.run("service", "create", "web", "--network", net)
    cli.run("run", "-d", "--name", client, "--network", net)
    vip = cli.json("service", "inspect", "web")["vips"][net]
    assert vip in lb_state(cli.netns(client))[0]
    bridge = subprocess.run(["ip", "-o", "link", "show", "type", "bridge"], capture_output=True, text=True).stdout
    service_key, network_key = f"{cli.prefix}/services/web", f"{cli.prefix}/networks/{net}"
    etcdctl(cli, "put", service_key, "{not json")
    etcdctl(cli, "put", network_key, json.dumps({"name": net, "subnet": "banana"}))
    wait_until(lambda: agent_log(cli).count(f"key={network_key}") >= 1, 5, "bad network value logged")
    cli.run("network", "create", cli.name("other"), "--subnet", "10.181.0.0/24")  # more View changes
    time.sleep(0.5)
    assert dig_short(cli, client, "web") == [vip], "a bad service value deleted its names"
    assert vip in lb_state(cli.netns(client))[0], "a bad service value deleted the VIP's rules"
    assert subprocess.run(["ip", "-o", "link", "show", "type", "bridge"], capture_output=True,
                          text=True).stdout.count("svbr") >= bridge.count("svbr"), "a bad network value removed its bridge"
    assert subprocess.run(["nsenter", f"--net={cli.netns(client)}", "ping", "-c1", "-W1", "10.180.0.1"],
                          capture_output=True).returncode == 0
    log = agent_log(cli)
    assert log.count(f"key={service_key}") == 1, "logged more than once"
    assert log.count(f"key={network_key}") == 1, "logged more than once"
    assert "the last good version stays" in log


# ---- the API on bad requests ------------------------------------------------------------------


def _raw(cli: Cli, request: bytes) -> tuple[int, dict]:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(str(cli.state_dir / "agent.sock"))
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


@pytest.mark.parametrize("request_bytes, status, message", [
    (b"GARBAGE\r\n\r\n", 400, "malformed request line"),
    (b"POST /v1/sandboxes HTTP/1.1\r\nContent-Length: banana\r\n\r\n", 400, "is not a number"),
    (b"POST /v1/sandboxes HTTP/1.1\r\nContent-Length: 5\r\n\r\n{oops", 400, "not JSON"),
    (b"POST /v1/sandboxes HTTP/1.1\r\nContent-Length: 2\r\n\r\n[]", 400, "JSON object"),
    (b'POST /v1/sandboxes HTTP/1.1\r\nContent-Length: 31\r\n\r\n{"name": "x", "networks": "ab"}', 400,
     "must be a list of strings"),
    (b'POST /v1/sandboxes HTTP/1.1\r\nContent-Length: 14\r\n\r\n{"name": "x"}\n', 400, "needs 'name' and 'networks'"),
    (b"GET /v1/" + b"x" * 9000 + b" HTTP/1.1\r\n\r\n", 431, "longer than"),
    (b"POST /v1/sandboxes HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n", 413, "over"),
])
def test_malformed_api_requests_get_a_message_not_a_traceback(cli, request_bytes, status, message):
    agent = cli.start_agent()
    got, body = _raw(cli, request_bytes)
    assert got == status, body
    assert message in body["error"] and "Traceback" not in body["error"]
    assert cli.info()["pid"] == agent.pid and agent.poll() is None  # the same agent, still serving


# ---- etcd endpoints: failover ------------------------------------------------------------------


def test_agent_fails_over_between_etcd_endpoints(own_cli, own_etcd):
    """Two endpoints (proxies in front of one member): cutting the one in use loses nothing."""
    cli = own_cli
    first, second = _ProxyThread(own_etcd.client_port), _ProxyThread(own_etcd.client_port)
    try:
        cli.env["SVCNET_ETCD"] = f"http://127.0.0.1:{first.proxy.port},http://127.0.0.1:{second.proxy.port}"
        cli.start_agent()
        net, client = cli.name("n"), cli.name("c")
        cli.run("network", "create", net, "--subnet", "10.182.0.0/24")
        cli.run("run", "-d", "--name", client, "--network", net)
        for proxy in (first, second):
            proxy.call(proxy.proxy.cut())
            for i in range(3):
                name = f"{proxy is first and 'a' or 'b'}{i}"
                cli.run("service", "create", name, "--network", net)  # the CLI fails over as well
                vip = cli.json("service", "inspect", name)["vips"][net]
                wait_until(lambda n=name, v=vip: dig_short(cli, client, n) == [v], 10,
                           f"service {name} answered after an endpoint died")
            proxy.call(proxy.proxy.restore())
        assert cli.info()["ready"]
    finally:
        first.close()
        second.close()


def test_remove_on_exit_cleans_up_once_nothing_runs_and_never_under_a_running_sandbox(cli):
    """`agent --remove-on-exit` (compose's agent): a SIGTERM while a sandbox runs is a
    restart and changes nothing; once nothing runs, SIGTERM removes sandboxes, bridges, chains."""
    from discovery.host import firewall, netlink

    net = cli.name("gone")
    cli.run("network", "create", net, "--subnet", "10.97.0.0/24")
    cli.start_agent("--remove-on-exit")
    box = cli.name("box")
    cli.run("run", "-d", "--name", box, "--network", net, "--", "sleep", "1000")
    pid = next(r for r in cli.json("ps") if r["name"] == box)["pid"]
    forward, nat = firewall.chain_names(cli.prefix)
    cli.stop_agent()
    assert pid_alive(pid) and os.path.exists(cli.netns(box)), "running: a restart, nothing removed"
    assert netlink.list_bridges(cli.prefix)

    cli.start_agent("--remove-on-exit")
    os.kill(pid, signal.SIGTERM)
    assert wait(lambda: next(r for r in cli.json("ps") if r["name"] == box)["status"].startswith("exited"), 5)
    cli.stop_agent()
    assert not os.path.exists(cli.netns(box))
    assert netlink.list_bridges(cli.prefix) == {}
    for table, chain in (("filter", forward), ("nat", nat), ("raw", firewall.raw_chain_name(cli.prefix))):
        rules = subprocess.run(["iptables-legacy-save", "-t", table], capture_output=True, text=True).stdout
        assert chain not in rules, rules
    assert not any(f"/{box}" in key for key in cli.registry_items()), "deregistered"

