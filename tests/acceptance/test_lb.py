"""Acceptance: real TCP and UDP traffic to a VIP through the kernel rules svcnet programs.

Tasks are sandboxes from `svcnet run` running tests/taskserver.py (answers with its own
name). Clients are sockets opened inside a client sandbox's netns. Every test runs on each
backend of ``tests.helpers.lb_backends()`` (nftables, what ``auto`` picks on this kernel,
and iptables), passed to the agent as SVCNET_LB_BACKEND. Each test starts its own
agent and drives it with the CLI, which is too slow under the IPVS lane's emulation (an
agent start ~60 s there): ``test_lb_agent.py`` is the agent-level file that lane runs.
"""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from discovery.host import netlink
from tests.acceptance.test_dns import _wait
from tests.helpers import lb_backends, lb_rules, require_tools
from tests.stats import assert_uniform

TASK_SERVER = str(Path(__file__).resolve().parent.parent / "taskserver.py")
PORT = 8080
SOCKET_TIMEOUT = 2.0
DROP_WAIT = 5.0  # past ARP's ~3 s to give up on an address nobody has
THREE_TASKS = 750  # connections: enough for the chi-square check to catch an uneven split (tests/stats.py)
FIVE_TASKS = 500


@pytest.fixture(autouse=True, params=lb_backends())
def _backend(cli, request):
    require_tools("ip", "etcd", "iptables-legacy-save", "nft")
    cli.env["SVCNET_LB_BACKEND"] = request.param


def _socket(cli, sandbox: str, kind: int) -> socket.socket:
    with netlink.entered_netns(cli.netns(sandbox)):
        sock = socket.socket(socket.AF_INET, kind)
    sock.settimeout(SOCKET_TIMEOUT)
    return sock


def _tcp_name(cli, client: str, address: str) -> str:
    with _socket(cli, client, socket.SOCK_STREAM) as sock:
        sock.connect((address, PORT))
        return sock.recv(64).split(b"\n")[0].decode()


def _udp_name(cli, client: str, address: str) -> str:
    with _socket(cli, client, socket.SOCK_DGRAM) as sock:
        sock.sendto(b"?", (address, PORT))
        return sock.recv(64).decode()


def _spread(cli, client: str, vip: str, count: int, udp: bool = False) -> Counter:
    ask = _udp_name if udp else _tcp_name
    return Counter(ask(cli, client, vip) for _ in range(count))


def _names_seen(cli, client: str, vip: str, count: int) -> set[str]:
    """Tasks that answered ``count`` connections; refused or timed-out tries count as none."""
    seen = set()
    for _ in range(count):
        try:
            seen.add(_tcp_name(cli, client, vip))
        except OSError:
            pass
    return seen


def _task(cli, name: str, network: str, service: str = "web", *extra: str) -> str:
    cli.run("run", "-d", "--name", name, "--network", network, "--service", service, *extra,
            "--", sys.executable, TASK_SERVER, name, str(PORT))
    return next(r for r in cli.json("ps") if r["name"] == name)["endpoints"][0]["ipv4"]


def _listening(cli, client: str, address: str) -> bool:
    try:
        _tcp_name(cli, client, address)
        return True
    except OSError:
        return False


def _service_with_tasks(cli, count: int, subnet: str, *task_flags: str) -> tuple[str, str, str, dict[str, str]]:
    net, client = cli.name("lb"), cli.name("client")
    cli.run("network", "create", net, "--subnet", subnet)
    cli.run("service", "create", "web", "--network", net, "--publish", str(PORT))
    cli.run("run", "-d", "--name", client, "--network", net)
    tasks = {cli.name(f"t{i}"): "" for i in range(1, count + 1)}
    for name in tasks:
        tasks[name] = _task(cli, name, net, "web", *task_flags)
    for address in tasks.values():
        assert _wait(lambda a=address: _listening(cli, client, a), 10, step=0.1), f"task at {address} never listened"
    vip = cli.json("service", "inspect", "web")["vips"][net]
    return net, client, vip, tasks


def test_vip_spreads_tcp_and_udp_evenly_and_follows_scaling(cli):
    net, client, vip, tasks = _service_with_tasks(cli, 3, "10.120.0.0/24")
    assert_uniform(_spread(cli, client, vip, THREE_TASKS), tasks, "TCP over 3 tasks")
    assert_uniform(_spread(cli, client, vip, THREE_TASKS, udp=True), tasks, "UDP over 3 tasks")

    for name in (cli.name("t4"), cli.name("t5")):
        address = _task(cli, name, net)
        assert _wait(lambda a=address: _listening(cli, client, a), 10, step=0.1)
        tasks[name] = address
    assert _wait(lambda: len(_names_seen(cli, client, vip, 60)) == 5, 5), "new tasks get connections"
    assert_uniform(_spread(cli, client, vip, FIVE_TASKS), tasks, "TCP over 5 tasks")


def test_unhealthy_task_gets_nothing_new_while_its_connection_finishes(cli, tmp_path):
    flags = tmp_path / "health"
    flags.mkdir()
    for index in range(1, 4):
        (flags / cli.name(f"t{index}")).touch()
    net, client, vip, tasks = _service_with_tasks(
        cli, 3, "10.121.0.0/24", "--health-cmd", f"test -e {flags}/$(hostname)",
        # Fast checks, but each may take 10 s and a lone failure is forgiven: on a loaded CI
        # machine a 1 s limit once failed a healthy task and took it out of the spread below.
        "--health-interval", "0.3", "--health-retries", "2", "--health-timeout", "10")
    assert _wait(lambda: len(_names_seen(cli, client, vip, 30)) == 3, 10), "all three pass their checks"
    sick = cli.name("t1")

    held = None
    for _ in range(100):  # a connection that landed on the task about to go
        sock = _socket(cli, client, socket.SOCK_STREAM)
        sock.connect((vip, PORT))
        if sock.recv(64).split(b"\n")[0].decode() == sick:
            held = sock
            break
        sock.close()
    assert held is not None
    (flags / sick).unlink()
    assert _wait(lambda: sick not in _names_seen(cli, client, vip, 30), 5), "unhealthy: out of the VIP"
    assert next(r for r in cli.json("ps") if r["name"] == sick)["health"] == "unhealthy"
    assert re.search(rf"^{sick}\s.*\sunhealthy\s", cli.run("ps").stdout, re.M), "ps shows it"
    spread = _spread(cli, client, vip, 150)
    assert sick not in spread and set(spread) == set(tasks) - {sick}, spread
    held.sendall(b"still there\n")
    assert held.recv(64) == b"still there\n", "the established connection finishes on its task"
    held.close()

    (flags / sick).touch()
    assert _wait(lambda: sick in _names_seen(cli, client, vip, 60), 5), "healthy again: back in the VIP"


def test_udp_flow_leaves_a_removed_task_within_a_second(cli):
    _, client, vip, tasks = _service_with_tasks(cli, 3, "10.122.0.0/24")
    flow = _socket(cli, client, socket.SOCK_DGRAM)  # one source port: one conntrack entry
    flow.settimeout(0.1)
    flow.sendto(b"?", (vip, PORT))
    first = flow.recv(64).decode()
    cli.run("rm", first)
    removed_at = time.monotonic()
    moved_to = None
    while time.monotonic() - removed_at < 3 and moved_to is None:
        flow.sendto(b"?", (vip, PORT))
        try:
            answer = flow.recv(64).decode()
        except (TimeoutError, ConnectionRefusedError):
            continue
        if answer != first:
            moved_to = answer
    took = time.monotonic() - removed_at
    flow.close()
    assert moved_to in tasks and moved_to != first
    assert took < 1.0, f"the flow moved after {took:.2f}s"


def test_vip_without_tasks_refuses_and_other_networks_cannot_reach_it(cli):
    net, client, vip, tasks = _service_with_tasks(cli, 1, "10.123.0.0/24")
    (task,) = tasks
    cli.run("service", "create", "empty", "--network", net)
    empty_vip = cli.json("service", "inspect", "empty")["vips"][net]
    started = time.monotonic()
    with pytest.raises(ConnectionRefusedError):
        _tcp_name(cli, client, empty_vip)
    # a local sender hears the reject as EPERM on send, or ECONNREFUSED from the ICMP error
    with pytest.raises((ConnectionRefusedError, PermissionError)):
        with _socket(cli, client, socket.SOCK_DGRAM) as sock:
            sock.connect((empty_vip, PORT))
            sock.send(b"?")
            sock.recv(64)
    assert time.monotonic() - started < 1.5, "refused at once, not a timeout"

    other_net, outsider = cli.name("elsewhere"), cli.name("outsider")
    cli.run("network", "create", other_net, "--subnet", "10.124.0.0/24")
    cli.run("run", "-d", "--name", outsider, "--network", other_net)
    # The outsider has no rules for the VIP and svcnet drops routed traffic between its
    # bridges (host FORWARD): the SYN vanishes and nothing comes back. Were it forwarded, the
    # other bridge would find no host with the VIP's address and answer EHOSTUNREACH after
    # ARP gave up (~3 s), so wait past that: only a silent drop runs into the timeout.
    started = time.monotonic()
    with pytest.raises(TimeoutError), _socket(cli, outsider, socket.SOCK_STREAM) as sock:
        sock.settimeout(DROP_WAIT)
        sock.connect((vip, PORT))
    waited = time.monotonic() - started
    assert waited >= 0.9 * DROP_WAIT, f"failed after {waited:.2f}s: refused or unreachable, not dropped"
    assert _tcp_name(cli, client, vip) == task, "the same VIP answers from its own network"


def _rules(cli, sandbox: str, backend: str) -> str:
    return lb_rules(cli.netns(sandbox), backend)


def test_agent_restart_keeps_flows_and_leaves_rules_identical(cli):
    """Killed outright, the agent's endpoints die with its lease; the kernel rules stay and
    carry the open connection meanwhile; the restarted agent registers the tasks again and
    the rules come out the same (a re-registration that wrote nothing would leave the VIP
    with no backend, and its rules would change)."""
    first = cli.start_agent("--lease-ttl", "2")
    net, client, vip, tasks = _service_with_tasks(cli, 3, "10.125.0.0/24")
    backend = cli.info()["lb_backend"]
    before = {name: _rules(cli, name, backend) for name in [client, *tasks]}
    assert backend == cli.env["SVCNET_LB_BACKEND"]
    assert vip in before[client]
    held = _socket(cli, client, socket.SOCK_STREAM)
    held.connect((vip, PORT))
    held_task = held.recv(64).split(b"\n")[0].decode()

    cli.stop_agent(signal.SIGKILL)
    first.wait(timeout=5)
    task_keys = {f"{cli.prefix}/endpoints/{net}/{task}" for task in tasks}
    assert _wait(lambda: not task_keys & cli.registry_items().keys(), 6, step=0.2), "the dead agent's lease ran out"
    held.sendall(b"while down\n")
    assert held.recv(64) == b"while down\n", f"the connection to {held_task} goes on with no agent"
    second = cli.start_agent("--lease-ttl", "2")
    assert second.pid != first.pid and cli.info()["pid"] == second.pid
    assert _wait(lambda: task_keys <= cli.registry_items().keys(), 5, step=0.1), "tasks registered again"
    held.sendall(b"after restart\n")
    assert held.recv(64) == b"after restart\n", f"the connection to {held_task} survived"
    held.close()
    assert set(_spread(cli, client, vip, 60)) == set(tasks)
    # every sandbox converges to the rules it had (the client's did above; a task's own sync
    # may come a moment later): the same bytes, not merely equivalent ones
    after: dict = {}

    def converged() -> bool:
        after.update({name: _rules(cli, name, backend) for name in [client, *tasks]})
        return after == before
    assert _wait(converged, 5, step=0.2), (after, before)


def test_flow_timeout_sets_the_idle_timeout_of_connections_to_the_vip_or_is_refused(cli):
    """--flow-timeout end to end: stored, shown, and the task's connection carries it in the
    client's conntrack table (nftables); an agent on another backend refuses it up front."""
    net, client = cli.name("ft"), cli.name("client")
    cli.run("network", "create", net, "--subnet", "10.126.0.0/24")
    cli.run("run", "-d", "--name", client, "--network", net)  # the agent runs from here on
    create = ("service", "create", "slow", "--network", net, "--flow-timeout", "tcp=7200,udp=60")
    if cli.info()["lb_backend"] != "nftables":
        refused = cli.run(*create, check=False)
        assert refused.returncode != 0 and "--flow-timeout needs the nftables" in refused.stderr, refused.stderr
        assert "--lb-backend nftables" in refused.stderr
        return
    cli.run(*create)
    service = cli.json("service", "inspect", "slow")
    assert service["flow_timeout"] == {"tcp": 7200, "udp": 60}
    task = _task(cli, cli.name("t1"), net, "slow")
    assert _wait(lambda: _listening(cli, client, task), 10, step=0.1)
    vip = service["vips"][net]
    with _socket(cli, client, socket.SOCK_STREAM) as sock:
        sock.connect((vip, PORT))
        sock.recv(64)
        listing = subprocess.run(["nsenter", f"--net={cli.netns(client)}", "conntrack", "-L", "-p", "tcp",
                                  "--dport", str(PORT)], capture_output=True, text=True, check=True).stdout
        timeouts = [int(line.split()[2]) for line in listing.splitlines() if f"dst={vip}" in line]
        assert len(timeouts) == 1 and 7000 < timeouts[0] <= 7200, (listing, task)
    for bad in ("tcp=0", "tcp=7200,tcp=5", "sctp=5", "tcp=soon"):
        result = cli.run("service", "create", "bad", "--network", net, "--flow-timeout", bad, check=False)
        assert result.returncode != 0 and "flow timeout" in result.stderr, (bad, result.stderr)
