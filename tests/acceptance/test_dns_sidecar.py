"""Acceptance: `svcnet sidecar` for a netns made by someone else, and its lease."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from tests.acceptance.test_dns import _status, _wait
from tests.helpers import lb_state, nat_rules, require_tools


@pytest.fixture(autouse=True)
def _tools():
    require_tools("ip", "dig", "nsenter", "etcd", "iptables")


def _foreign_netns(cli, suffix: str) -> str:
    """A netns as Docker or a pod runtime would make it: not svcnet's."""
    name = cli.name(suffix)
    subprocess.run(["ip", "netns", "add", name], check=True)
    subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
    return name


def _sidecar(cli, netns: str, name: str, network: str, *extra: str) -> subprocess.Popen:
    log = open(cli.state_dir.parent / f"sidecar-{name}.log", "wb")
    return subprocess.Popen([sys.executable, "-m", "discovery.cli", "sidecar", "--netns", netns, "--name", name,
                             "--network", network, *extra], env=cli.env, stdout=log, stderr=subprocess.STDOUT)


def _dig_in(netns: str, *args: str) -> str:
    return subprocess.run(["nsenter", f"--net=/run/netns/{netns}", "dig", "@127.0.0.11", "+tries=1", "+time=2",
                           *args], capture_output=True, text=True, timeout=10).stdout


def _network_with_client(cli, suffix: str, subnet: str) -> tuple[str, str]:
    net, client = cli.name(suffix), cli.name("client")
    cli.run("network", "create", net, "--subnet", subnet)
    cli.run("run", "-d", "--name", client, "--network", net)
    return net, client


def _stop(process: subprocess.Popen, sig=signal.SIGTERM) -> int:
    if process.poll() is None:
        process.send_signal(sig)
    return process.wait(timeout=15)


def test_sidecar_registers_serves_and_its_names_die_with_its_lease(cli):
    net, client = _network_with_client(cli, "side", "10.95.0.0/24")
    peer = cli.name("peer")
    cli.run("run", "-d", "--name", peer, "--network", net)
    netns = _foreign_netns(cli, "pod")
    sidecar = _sidecar(cli, netns, "pod", net, "--alias", "sidekick", "--lease-ttl", "2")
    try:
        assert _wait(lambda: cli.short(client, "sidekick"), 10, step=0.2), "the sidecar's names resolve elsewhere"
        address = cli.short(client, "pod")
        # inside the sidecar's netns, 127.0.0.11 is the sidecar's own resolver, scoped to its network
        assert sorted(_dig_in(netns, "+short", peer).split()) == cli.short(client, peer)
        assert "svcnet" in _dig_in(netns, "+short", "probe.svcnet.internal", "TXT")
        inside = subprocess.run(["ip", "-n", netns, "-4", "-o", "addr"], capture_output=True, text=True).stdout
        assert address[0] in inside

        sidecar.kill()  # no goodbye: only the lease ends it
        killed_at = time.monotonic()
        assert _wait(lambda: _status(cli.dig(client, "pod")) == "NXDOMAIN", 10, step=0.2)
        assert time.monotonic() - killed_at < 8, "gone once the 2 s lease expires"
    finally:
        _stop(sidecar, signal.SIGKILL)


def test_sidecar_sigterm_deregisters_at_once(cli):
    net, client = _network_with_client(cli, "side2", "10.96.0.0/24")
    cli.run("service", "create", "web", "--network", net)
    vip = cli.json("service", "inspect", "web")["vips"][net]
    netns = _foreign_netns(cli, "job")
    sidecar = _sidecar(cli, netns, "job", net, "--lease-ttl", "30")
    try:
        assert _wait(lambda: cli.short(client, "job"), 10, step=0.2)
        assert vip in lb_state(f"/run/netns/{netns}")[0], "the sidecar programs the netns's VIPs too"
        assert _stop(sidecar) == 0
        assert "SVCNET" not in nat_rules(f"/run/netns/{netns}"), "and takes its rules out of a netns it does not own"
        assert lb_state(f"/run/netns/{netns}") == (set(), set()), "nftables too"
        assert _status(cli.dig(client, "job")) == "NXDOMAIN", "deregistered before exiting, not after 30 s"
        links = subprocess.run(["ip", "-n", netns, "-o", "link"], capture_output=True, text=True).stdout
        assert "eth0" not in links, "and detached from the netns"
    finally:
        _stop(sidecar, signal.SIGKILL)


def test_sidecar_refuses_a_netns_whose_127_0_0_11_is_redirected_like_dockers(cli):
    net, client = _network_with_client(cli, "side3", "10.97.0.0/24")
    netns = _foreign_netns(cli, "dock")
    # what Docker's embedded DNS installs in a container's netns
    subprocess.run(["ip", "netns", "exec", netns, "iptables", "-t", "nat", "-A", "OUTPUT", "-d", "127.0.0.11/32",
                    "-p", "udp", "--dport", "53", "-j", "DNAT", "--to-destination", "127.0.0.11:35353"], check=True)
    sidecar = _sidecar(cli, netns, "dock", net)
    code = sidecar.wait(timeout=30)
    output = (cli.state_dir.parent / "sidecar-dock.log").read_text()
    assert code != 0 and "Docker's embedded DNS" in output, output
    assert _status(cli.dig(client, "dock")) == "NXDOMAIN", "nothing left registered"


def test_sidecar_started_inside_the_netns_it_serves(cli):
    """As a compose sidecar (network_mode: service:APP, pid: host): it starts in the app's
    netns, takes it as /proc/self/ns/net, and moves itself to the host's for its veths and etcd."""
    net, client = _network_with_client(cli, "inside", "10.96.0.0/24")
    netns = _foreign_netns(cli, "app")
    log = open(cli.state_dir.parent / "sidecar-inside.log", "wb")
    sidecar = subprocess.Popen(["ip", "netns", "exec", netns, sys.executable, "-m", "discovery.cli", "sidecar",
                                "--netns", "/proc/self/ns/net", "--host-netns", "parent",
                                "--name", "app", "--network", net], env=cli.env, stdout=log, stderr=subprocess.STDOUT)
    try:
        assert _wait(lambda: cli.short(client, "app"), 10, step=0.2), (cli.state_dir.parent / "sidecar-inside.log").read_text()
        address = cli.short(client, "app")[0]
        assert address in subprocess.run(["ip", "-n", netns, "-o", "addr"], capture_output=True, text=True).stdout
        assert '"svcnet"' in _dig_in(netns, "+short", "TXT", "probe.svcnet.internal")
        assert _dig_in(netns, "+short", client).split() == cli.short(client, client)
        assert _stop(sidecar) == 0
        assert _wait(lambda: not cli.short(client, "app"), 5), "deregistered on SIGTERM"
    finally:
        _stop(sidecar, signal.SIGKILL)
