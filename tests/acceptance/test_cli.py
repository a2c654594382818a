"""Acceptance: the CLI as a user runs it, on real etcd, namespaces, bridges and veths."""

import json
import os
import signal
import subprocess
import time

import pytest

from discovery.host import netlink
from tests.helpers import require_tools


@pytest.fixture(autouse=True)
def _tools():
    require_tools("ip", "ping", "etcd")


def _ping(cli, sandbox: str, address: str) -> bool:
    result = cli.run("exec", sandbox, "--", "ping", "-c", "1", "-W", "1", address, check=False)
    return result.returncode == 0


def _links() -> set[str]:
    out = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}


def _registry_keys(cli) -> list[str]:
    async def read(client):
        return [kv.key.decode() for kv in await client.get_prefix(f"{cli.prefix}/".encode())]
    return cli.with_etcd(read)


def test_sandboxes_on_one_network_reach_each_other_and_not_another(cli):
    front, back = cli.name("front"), cli.name("back")
    cli.run("network", "create", front, "--subnet", "10.61.0.0/24", "--subnet6", "fd00:61::/64")
    cli.run("network", "create", back, "--subnet", "10.62.0.0/24")
    a1, a2, b1 = cli.name("a1"), cli.name("a2"), cli.name("b1")
    cli.run("run", "-d", "--name", a1, "--network", front, "--", "sleep", "300")
    cli.run("run", "-d", "--name", a2, "--network", front, "--ip", "10.61.0.50")
    cli.run("run", "-d", "--name", b1, "--network", back)

    sandboxes = {r["name"]: r for r in cli.json("ps")}
    assert set(sandboxes) == {a1, a2, b1}
    assert sandboxes[a1]["status"] == "running"
    a1_ip = sandboxes[a1]["endpoints"][0]["ipv4"]
    assert sandboxes[a2]["endpoints"][0]["ipv4"] == "10.61.0.50"

    assert _ping(cli, a1, "10.61.0.50")
    assert _ping(cli, a2, a1_ip)
    assert _ping(cli, a1, sandboxes[a2]["endpoints"][0]["ipv6"])
    assert not _ping(cli, b1, "10.61.0.50"), "a sandbox on another network must not reach this one"
    assert not _ping(cli, a1, sandboxes[b1]["endpoints"][0]["ipv4"])

    # The sandbox sees the resolver and its own name.
    resolv = cli.run("exec", a1, "--", "cat", "/etc/resolv.conf").stdout
    assert "nameserver 127.0.0.11" in resolv and "options ndots:0" in resolv
    assert cli.run("exec", a1, "--", "hostname").stdout.strip() == a1

    inspect = cli.json("network", "inspect", front)
    assert {e["container"] for e in inspect["endpoints"]} == {a1, a2}
    bridge = netlink.bridge_name(cli.prefix, front)
    veths = {netlink.host_veth_name(f"/run/netns/svcnet-{n}", front) for n in (a1, a2)}
    assert bridge in _links() and veths <= _links()

    cli.run("rm", a1, a2, b1)
    assert cli.json("ps") == []
    assert not any(cli.run_id in ns for ns in os.listdir("/run/netns"))
    assert not (veths & _links())
    keys = _registry_keys(cli)
    assert not [k for k in keys if "/endpoints/" in k or "/names/" in k or "/ipam/" in k], keys

    cli.run("network", "rm", front)
    cli.run("network", "rm", back)
    for _ in range(50):
        if bridge not in _links():
            break
        time.sleep(0.1)
    assert bridge not in _links(), "the agent removes a removed network's bridge"


@pytest.mark.parametrize("args, message", [
    (["network", "create", "{overlap}", "--subnet", "10.63.0.128/25"], "overlaps network"),
    (["run", "-d", "--name", "{dup}", "--network", "{net}"], "already exists on this node"),
    (["run", "-d", "--name", "{other}", "--network", "{net}", "--alias", "{dup}"], "is already used by container"),
    (["run", "-d", "--name", "{other}", "--network", "{net}", "--ip", "10.99.0.5"], "outside network"),
    (["run", "-d", "--name", "{other}", "--network", "{net}", "--ip", "10.63.0.1"], "reserved"),
    (["run", "-d", "--name", "{other}", "--network", "nosuchnet"], "does not exist"),
    (["run", "-d", "--name", "Bad_Name", "--network", "{net}"], "not a valid DNS label"),
    (["network", "create", "{other}", "--subnet", "10.64.0.1/24"], "did you mean 10.64.0.0/24"),
    (["service", "create", "{other}", "--network", "{net}", "--publish", "80:eighty"], "is not PUBLISHED:TARGET"),
    (["network", "rm", "{net}"], "still has endpoints attached"),
])
def test_bad_input_exits_non_zero_with_a_message(cli, args, message):
    net = cli.name("net")
    cli.run("network", "create", net, "--subnet", "10.63.0.0/24")
    cli.run("run", "-d", "--name", cli.name("dup"), "--network", net)
    names = {"net": net, "dup": cli.name("dup"), "other": cli.name("other"), "overlap": cli.name("ov")}
    result = cli.run(*[a.format(**names) for a in args], check=False)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr
    assert result.stderr.startswith("svcnet: ")
    assert {r["name"] for r in cli.json("ps")} == {cli.name("dup")}, "a refused command changes nothing"


def test_foreground_run_returns_the_exit_code_and_removes_the_sandbox(cli):
    net = cli.name("fg")
    cli.run("network", "create", net, "--subnet", "10.65.0.0/24")
    result = cli.run("run", "--name", cli.name("once"), "--network", net, "--",
                     "sh", "-c", "ip -4 -o addr show eth0; exit 7", check=False)
    assert result.returncode == 7
    assert "10.65.0.2/24" in result.stdout
    assert cli.json("ps") == []
    assert not any(cli.run_id in ns for ns in os.listdir("/run/netns"))


def test_services_get_a_vip_and_list_their_tasks(cli):
    net = cli.name("svc")
    cli.run("network", "create", net, "--subnet", "10.66.0.0/24")
    web = cli.name("web")
    created = cli.run("service", "create", web, "--network", net, "--publish", "8080:80", "--alias", cli.name("www"))
    assert f"{net}=10.66.0.2" in created.stdout
    cli.run("run", "-d", "--name", cli.name("t1"), "--network", net, "--service", web)
    info = cli.json("service", "inspect", web)
    assert info["vips"] == {net: "10.66.0.2"}
    assert [t["container"] for t in info["tasks"]] == [cli.name("t1")]
    assert info["ports"] == [{"target": 80, "published": 8080, "protocol": "tcp", "mode": "ingress",
                             "source": "nat"}]
    refused = cli.run("service", "rm", web, check=False)
    assert refused.returncode != 0 and "still has tasks" in refused.stderr
    dnsrr = cli.run("service", "create", cli.name("rr"), "--network", net, "--endpoint-mode", "dnsrr")
    assert dnsrr.stdout.strip() == cli.name("rr")
    cli.run("rm", cli.name("t1"))
    cli.run("service", "rm", web)
    assert [s["name"] for s in cli.json("service", "ls")] == [cli.name("rr")]


def test_attach_an_existing_namespace(cli):
    net = cli.name("att")
    cli.run("network", "create", net, "--subnet", "10.67.0.0/24")
    external = f"{cli.run_id}-ext"
    subprocess.run(["ip", "netns", "add", external], check=True)
    try:
        cli.run("attach", "--netns", f"/run/netns/{external}", "--name", cli.name("ext"), "--network", net)
        cli.run("run", "-d", "--name", cli.name("peer"), "--network", net)
        addrs = netlink.inner_addresses(f"/run/netns/{external}")
        assert "10.67.0.2/24" in addrs.get("eth0", [])
        assert _ping(cli, cli.name("peer"), "10.67.0.2")
        cli.run("rm", cli.name("ext"))
        assert os.path.exists(f"/run/netns/{external}"), "attach never deletes a namespace it did not make"
        assert "eth0" not in netlink.inner_addresses(f"/run/netns/{external}")
    finally:
        subprocess.run(["ip", "netns", "del", external])


def _wait_until(predicate, timeout: float, what: str) -> float:
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(0.05)
    return time.monotonic() - started


def test_agent_restart_reregisters_sandboxes_under_a_new_lease(cli):
    """Killed outright, the agent's keys die with its lease; the restarted agent writes them again."""
    first = cli.start_agent("--lease-ttl", "2")
    net, keep = cli.name("rs"), cli.name("keep")
    cli.run("network", "create", net, "--subnet", "10.68.0.0/24")
    cli.run("run", "-d", "--name", keep, "--network", net, "--", "sleep", "300")
    before = cli.registry_items()
    endpoint = f"{cli.prefix}/endpoints/{net}/{keep}"
    assert endpoint in before
    command_pid = cli.json("ps")[0]["pid"]
    cli.stop_agent(signal.SIGKILL)
    first.wait(timeout=5)
    # the old lease runs out: nothing of the sandbox stays registered on its own
    _wait_until(lambda: endpoint not in cli.registry_items(), 6, "endpoint gone with the dead agent's lease")
    assert not [k for k in cli.registry_items() if f"/{keep}" in k or "/ipam/" in k], "claims outlived the lease"
    second = cli.start_agent("--lease-ttl", "2")
    assert second.pid != first.pid
    def sandbox_keys(items: dict[str, bytes]) -> dict[str, bytes]:
        # a node's value carries its start time, its heartbeat its lease
        return {k: v for k, v in items.items() if "/nodes/" not in k and "/alive/" not in k}
    try:
        _wait_until(lambda: sandbox_keys(cli.registry_items()) == sandbox_keys(before), 3,
                    "the restarted agent re-registered every key")
    except AssertionError:
        after = sandbox_keys(cli.registry_items())
        raise AssertionError(f"registry differs: before={sandbox_keys(before)} after={after}") from None
    assert f"{cli.prefix}/nodes/node-{cli.run_id}" in cli.registry_items()
    records = cli.json("ps")
    assert [(r["name"], r["status"], r["pid"]) for r in records] == [(keep, "running", command_pid)]
    info = cli.json("network", "inspect", net)
    assert [e["container"] for e in info["endpoints"]] == [keep]


def test_ls_and_inspect_emit_json(cli):
    net = cli.name("js")
    cli.run("network", "create", net, "--subnet", "10.69.0.0/24", "--internal")
    listing = cli.json("network", "ls")
    assert listing == [{"name": net, "subnet": "10.69.0.0/24", "gateway": "10.69.0.1", "subnet6": None,
                        "gateway6": None, "driver": "bridge", "internal": True, "vni": None}]
    table = cli.run("network", "ls").stdout.splitlines()
    assert table[0].split() == ["NAME", "DRIVER", "SUBNET", "GATEWAY", "SUBNET6", "INTERNAL"]
    assert json.loads(cli.run("network", "inspect", net, "--format", "json").stdout)["internal"] is True


def test_node_ls_shows_the_agent_ready_then_down_and_rm_forgets_it(cli):
    from tests.helpers import wait

    cli.start_agent("--lease-ttl", "2", "--advertise-addr", "192.0.2.44")
    box = cli.name("box")
    net = cli.name("n")
    cli.run("network", "create", net, "--subnet", "10.98.0.0/24")
    cli.run("run", "-d", "--name", box, "--network", net)
    node = cli.env["SVCNET_NODE"]
    row = next(r for r in cli.json("node", "ls") if r["name"] == node)
    assert (row["status"], row["advertise_addr"], row["vtep"]) == ("ready", "192.0.2.44", "192.0.2.44")
    assert row["endpoints"] == [f"{net}/{box}"]
    assert f"{net}/{box}" in cli.run("node", "inspect", node).stdout
    refused = cli.run("node", "rm", node, check=False)
    assert refused.returncode != 0 and "alive" in refused.stderr

    cli.stop_agent(signal.SIGKILL)
    assert wait(lambda: next(r for r in cli.json("node", "ls") if r["name"] == node)["status"] == "down", 6)
    assert "down" in cli.run("node", "ls").stdout
    cli.run("node", "rm", node)
    assert all(r["name"] != node for r in cli.json("node", "ls"))
    missing = cli.run("node", "inspect", node, check=False)
    assert missing.returncode != 0 and "node ls" in missing.stderr
