"""Acceptance: real `dig @127.0.0.11` inside sandboxes made by `svcnet run`, on a real etcd.

Everything not local is forwarded to the test's own upstream (tests/dnsupstream.py) on
loopback, which knows ``outside.example.test`` and answers NXDOMAIN for the rest.
"""

from __future__ import annotations

import json
import re
import time

import pytest

from tests.conftest import OUTSIDE_ADDRESS, OUTSIDE_NAME
from tests.helpers import require_tools
from tests.helpers import wait as _wait


@pytest.fixture(autouse=True)
def _tools():
    require_tools("ip", "dig", "nsenter", "etcd")


def _status(output: str) -> str:
    match = re.search(r"status: (\w+)", output)
    assert match, output
    return match.group(1)


def _flags(output: str) -> set[str]:
    match = re.search(r";; flags: ([a-z ]+);", output)
    assert match, output
    return set(match.group(1).split())


def _answers(output: str) -> list[tuple[str, int, str, str]]:
    """(owner, ttl, type, data) of the ANSWER section of full dig output."""
    section = re.search(r";; ANSWER SECTION:\n(.*?)(?:\n\n|\Z)", output, re.S)
    if not section:
        return []
    rows = []
    for line in section.group(1).splitlines():
        owner, ttl, _, rtype, data = line.split(None, 4)
        rows.append((owner, int(ttl), rtype, data))
    return rows


def _ip(cli, sandbox: str, index: int = 0, family: str = "ipv4") -> str:
    record = next(r for r in cli.json("ps") if r["name"] == sandbox)
    return record["endpoints"][index][family]


def test_names_services_ptr_srv_nodata_and_flags(cli, upstream):
    front = cli.name("front")
    cli.run("network", "create", front, "--subnet", "10.71.0.0/24", "--subnet6", "fd00:71::/64")
    cli.run("service", "create", "web", "--network", front, "--publish", "8080:80")
    cli.run("service", "create", "rr", "--network", front, "--endpoint-mode", "dnsrr", "--publish", "53/udp")
    c1, w1, client = cli.name("c1"), cli.name("w1"), cli.name("client")
    cli.run("run", "-d", "--name", c1, "--network", front, "--hostname", "box", "--alias", "db")
    # resolvable by the time `svcnet run` returns, from another sandbox
    cli.run("run", "-d", "--name", client, "--network", front)
    assert cli.short(client, c1) == [_ip(cli, c1)]
    cli.run("run", "-d", "--name", w1, "--network", front, "--service", "web")
    assert cli.short(client, "tasks.web") == [_ip(cli, w1)]
    tasks = [cli.name(f"r{i}") for i in range(3)]
    for task in tasks:
        cli.run("run", "-d", "--name", task, "--network", front, "--service", "rr")
    vip = cli.json("service", "inspect", "web")["vips"][front]
    c1_ip, c1_ip6 = _ip(cli, c1), _ip(cli, c1, family="ipv6")
    task_ips = sorted(_ip(cli, t) for t in tasks)

    for name in ("box", "db", f"{c1}.{front}", "DB.svcnet.internal"):
        assert cli.short(client, name) == [c1_ip], name
    assert cli.short(client, c1, "AAAA") == [c1_ip6]
    assert cli.short(client, "web") == [vip]
    assert cli.short(client, f"web.{front}") == [vip]
    assert cli.short(client, "rr") == task_ips and cli.short(client, "tasks.rr") == task_ips
    assert cli.short(client, "-x", c1_ip) == [f"{c1}.{front}."]
    assert cli.short(client, "-x", c1_ip6) == [f"{c1}.{front}."]
    assert cli.short(client, "-x", vip) == [f"web.{front}."]
    assert cli.short(client, "_80._tcp.web", "SRV") == [f"0 0 80 web.{front}."]
    assert sorted(cli.short(client, "_53._udp.rr", "SRV")) == sorted(f"0 0 53 {t}.{front}." for t in tasks)

    full = cli.dig(client, "WeB")  # 0x20: the question's case comes back
    assert _status(full) == "NOERROR" and {"qr", "aa", "rd", "ra"} <= _flags(full)
    assert _answers(full) == [("WeB.", 600, "A", vip)]
    assert "; EDNS: version: 0" in full and "udp: 1232" in full
    assert "EDNS" not in cli.dig(client, "+noedns", "web")
    assert _answers(cli.dig(client, c1))[0][1] == 60 and {a[1] for a in _answers(cli.dig(client, "rr"))} == {5}

    nodata = cli.dig(client, "web", "AAAA")
    assert _status(nodata) == "NOERROR" and not _answers(nodata)
    assert re.search(r"AUTHORITY SECTION:\nweb\.\s+5\s+IN\s+SOA", nodata), nodata
    assert _status(cli.dig(client, "nothing-here.svcnet.internal")) == "NXDOMAIN"

    outside = cli.dig(client, OUTSIDE_NAME)
    assert _answers(outside) == [(f"{OUTSIDE_NAME}.", 30, "A", OUTSIDE_ADDRESS)] and "aa" not in _flags(outside)
    unknown = f"{cli.run_id}-nobody"
    assert _status(cli.dig(client, unknown)) == "NXDOMAIN" and unknown in upstream.names_seen()

    orders = cli.dig(client, "+short", *["rr"] * 12).split()
    assert len({tuple(orders[i:i + 3]) for i in range(0, 36, 3)}) > 1, "dnsrr answers must be shuffled per reply"


def test_scope_follows_attachment_and_first_network_wins(cli, upstream):
    a, b = cli.name("neta"), cli.name("netb")
    cli.run("network", "create", a, "--subnet", "10.72.0.0/24")
    cli.run("network", "create", b, "--subnet", "10.73.0.0/24")
    on_a, on_b = cli.name("on-a"), cli.name("on-b")
    cli.run("run", "-d", "--name", on_a, "--network", a, "--alias", "shared")
    cli.run("run", "-d", "--name", on_b, "--network", b, "--alias", "shared")
    only_a, both_ab, both_ba = cli.name("only-a"), cli.name("ab"), cli.name("ba")
    cli.run("run", "-d", "--name", only_a, "--network", a)
    cli.run("run", "-d", "--name", both_ab, "--network", a, "--network", b)
    cli.run("run", "-d", "--name", both_ba, "--network", b, "--network", a)

    assert cli.short(only_a, on_a) == [_ip(cli, on_a)]
    assert _status(cli.dig(only_a, on_b)) == "NXDOMAIN", "a B-only name must not resolve on A"
    assert on_b in upstream.names_seen(), "and it was forwarded, not answered"
    assert _status(cli.dig(only_a, f"{on_b}.{b}")) == "NXDOMAIN"
    assert cli.short(both_ab, on_a) == [_ip(cli, on_a)] and cli.short(both_ab, on_b) == [_ip(cli, on_b)]
    assert cli.short(both_ab, "shared") == [_ip(cli, on_a)]
    assert cli.short(both_ba, "shared") == [_ip(cli, on_b)]
    assert cli.short(both_ab, f"shared.{b}") == [_ip(cli, on_b)]


def _register_remote_tasks(cli, service: str, network: str, count: int) -> None:
    """Tasks of ``service`` on another node: written to the registry as that node's agent would."""
    from discovery.state.keys import KeyLayout
    from discovery.state.registry import Registry, SandboxRequest

    async def register(client):
        lease = await client.lease(60)
        registry = Registry(client, KeyLayout(cli.prefix))
        for index in range(count):
            await registry.register_sandbox(SandboxRequest(
                container=f"remote-{index}", networks=(network,), node="remote-node", service=service), lease.id)
    cli.with_etcd(register)


def test_large_answers_truncate_over_udp_and_come_whole_over_tcp(cli):
    net = cli.name("big")
    cli.run("network", "create", net, "--subnet", "10.74.0.0/24")
    cli.run("service", "create", "many", "--network", net, "--endpoint-mode", "dnsrr")
    client = cli.name("client")
    cli.run("run", "-d", "--name", client, "--network", net)
    _register_remote_tasks(cli, "many", net, 60)

    truncated = cli.dig(client, "+noedns", "+ignore", "tasks.many")
    assert "tc" in _flags(truncated) and not _answers(truncated)
    assert len(_answers(cli.dig(client, "+tcp", "tasks.many"))) == 60
    assert len(_answers(cli.dig(client, "+noedns", "many"))) == 60, "dig retries over TCP after TC"
    assert len(_answers(cli.dig(client, "many"))) == 60, "960 octets of answers fit the EDNS size"


def _set_health(cli, network: str, container: str, health: str) -> None:
    async def put(client):
        key = f"{cli.prefix}/endpoints/{network}/{container}".encode()
        current = await client.get(key)
        value = json.loads(current.value)
        value["health"] = health
        await client.put(key, json.dumps(value).encode(), lease=current.lease)
    cli.with_etcd(put)


def test_unhealthy_endpoints_leave_answers_and_return(cli):
    net = cli.name("hl")
    cli.run("network", "create", net, "--subnet", "10.75.0.0/24")
    cli.run("service", "create", "api", "--network", net, "--endpoint-mode", "dnsrr")
    t1, t2, client = cli.name("t1"), cli.name("t2"), cli.name("client")
    for task in (t1, t2):
        cli.run("run", "-d", "--name", task, "--network", net, "--service", "api")
    cli.run("run", "-d", "--name", client, "--network", net)
    assert cli.short(client, "api") == sorted([_ip(cli, t1), _ip(cli, t2)])

    _set_health(cli, net, t1, "unhealthy")
    assert _wait(lambda: cli.short(client, "api") == [_ip(cli, t2)], 2)
    assert cli.short(client, "tasks.api") == [_ip(cli, t2)]
    sick = cli.dig(client, t1)
    assert _status(sick) == "NOERROR" and not _answers(sick), "known name, no healthy address: NODATA"
    _set_health(cli, net, t1, "healthy")
    assert _wait(lambda: cli.short(client, "api") == sorted([_ip(cli, t1), _ip(cli, t2)]), 2)


def test_removed_endpoint_is_nxdomain_within_a_second(cli, upstream):
    net = cli.name("rm")
    cli.run("network", "create", net, "--subnet", "10.76.0.0/24")
    gone, client = cli.name("gone"), cli.name("client")
    cli.run("run", "-d", "--name", gone, "--network", net)
    cli.run("run", "-d", "--name", client, "--network", net)
    assert cli.short(client, gone) == [_ip(cli, gone)]
    cli.run("rm", gone)
    removed_at = time.monotonic()

    def nxdomain() -> bool:
        output = cli.ns_dig(client, gone).communicate(timeout=10)[0]
        return _status(output) == "NXDOMAIN"
    assert _wait(nxdomain, 1.0, step=0.02)
    assert time.monotonic() - removed_at < 1.0
    assert gone in upstream.names_seen(), "no longer local: the upstream's answer"


def test_internal_networks_never_forward(cli, upstream):
    net = cli.name("sealed")
    cli.run("network", "create", net, "--subnet", "10.77.0.0/24", "--internal")
    peer, client = cli.name("peer"), cli.name("client")
    cli.run("run", "-d", "--name", peer, "--network", net)
    cli.run("run", "-d", "--name", client, "--network", net)
    assert cli.short(client, peer) == [_ip(cli, peer)]
    secret = f"{cli.run_id}-leak.example.test"
    assert _status(cli.dig(client, secret)) == "REFUSED"
    assert secret not in upstream.names_seen()


def test_etcd_down_keeps_known_names_answering(own_etcd, tmp_path, upstream):
    from tests.helpers import Cli
    cli = Cli(own_etcd.url, "te" + str(int(time.time()) % 100000), tmp_path / "state", upstream.address)
    try:
        net = cli.name("keep")
        cli.run("network", "create", net, "--subnet", "10.78.0.0/24")
        cli.run("service", "create", "kept", "--network", net)
        known, client = cli.name("known"), cli.name("client")
        cli.run("run", "-d", "--name", known, "--network", net, "--service", "kept")
        cli.run("run", "-d", "--name", client, "--network", net)
        vip = cli.short(client, "kept")
        own_etcd.stop()
        time.sleep(1.0)
        assert cli.short(client, known) == [_ip(cli, known)]
        assert cli.short(client, "kept") == vip and cli.short(client, "tasks.kept") == [_ip(cli, known)]
        assert cli.info()["etcd_connected"] is False
    finally:
        cli.stop_agent()
        from tests.helpers import sweep
        sweep(cli.run_id, cli.prefix)
