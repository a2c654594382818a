"""Acceptance: compose.yaml on a real engine with the compose v2 plugin, as a user runs it.

The project (etcd, the agent, 3 web replicas, a client, db and its sidecar) comes up once
for the module, the tests run in order against it, and the last one brings it down and
checks the host. Images come from scripts/images.sh (no registry).
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest

from discovery.host import firewall, netlink
from tests.docker.conftest import docker
from tests.helpers import time_scale, wait

ROOT = Path(__file__).resolve().parents[2]
PREFIX = "/svcnet-compose"


def compose(*args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    result = subprocess.run(["docker", "compose", *args], cwd=ROOT, capture_output=True, text=True,
                            timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"docker compose {' '.join(args)} exited {result.returncode}:\n{result.stderr[-3000:]}")
    return result


def in_client(*argv: str) -> str:
    return compose("exec", "-T", "client", *argv, check=False, timeout=30).stdout.strip()


def dig(name: str, *args: str, service: str = "client") -> list[str]:
    out = compose("exec", "-T", service, "dig", "+short", "+tries=1", "+time=2", name, *args, check=False,
                  timeout=30).stdout
    return sorted(line for line in out.splitlines() if line and not line.startswith(";;"))


def svcnet(*argv: str) -> str:
    return compose("exec", "-T", "svcnet", "svcnet", *argv).stdout


@pytest.fixture(scope="module")
def project(docker_engine):
    if compose("version", check=False).returncode != 0:
        raise AssertionError("the compose v2 plugin is missing: run scripts/docker-setup.sh install")
    running = compose("ls", "--format", "json").stdout
    if any(p["Name"] == "svcnet" for p in json.loads(running or "[]")):
        raise AssertionError("a compose project named svcnet is already up; `docker compose down` it first")
    subprocess.run([str(ROOT / "scripts" / "images.sh")], check=True, timeout=1200)
    try:
        compose("up", "-d", "--wait", timeout=300)
        yield
    finally:
        compose("down", "--timeout", "5", check=False)


def test_svcnet_owns_127_0_0_11_and_web_is_one_vip(project):
    assert dig("probe.svcnet.internal", "TXT") == ['"svcnet"']
    vip = json.loads(svcnet("service", "inspect", "web", "--format", "json"))["vips"]["demo"]
    assert dig("web") == [vip]
    assert len(dig("tasks.web")) == 3
    resolv = in_client("cat", "/etc/resolv.conf")
    assert "nameserver 127.0.0.11" in resolv, resolv


def test_curl_through_the_vip_reaches_every_replica(project):
    hostnames = {docker("inspect", "-f", "{{.Config.Hostname}}", c).stdout.strip()
                 for c in compose("ps", "-q", "web").stdout.split()}
    assert len(hostnames) == 3
    seen = Counter(in_client("curl", "-s", "--max-time", "2", "http://web/") for _ in range(40))
    assert set(seen) == hostnames, seen
    # web publishes 18088 (routing mesh): from this host, to its address on the demo network
    published = Counter(subprocess.run(["curl", "-s", "--max-time", "2", "http://10.233.0.1:18088/"],
                                       capture_output=True, text=True).stdout.strip() for _ in range(40))
    assert set(published) == hostnames, published


def test_sidecar_serves_db_and_client_reaches_it_by_name(project):
    assert in_client("curl", "-s", "--max-time", "2", "http://db/") == "db"
    assert dig("probe.svcnet.internal", "TXT", service="db") == ['"svcnet"'], "the sidecar answers in db"
    assert dig("web", service="db") == dig("web")
    ps = svcnet("ps")
    assert "db" not in ps.split(), "db is the sidecar's, not the agent's"


def test_scaling_to_five_is_in_the_answers_within_a_second(project):
    compose("up", "-d", "--scale", "web=5", timeout=120)
    started = time.monotonic()
    assert wait(lambda: len(dig("tasks.web")) == 5, 10), dig("tasks.web")
    took = time.monotonic() - started
    assert took <= 1.0 * time_scale(), f"tasks.web listed 5 replicas {took:.2f} s after compose returned"
    seen = Counter(in_client("curl", "-s", "--max-time", "2", "http://web/") for _ in range(60))
    assert len(seen) == 5, seen


def test_agent_restart_keeps_serving_the_running_containers(project):
    before = dig("tasks.web")
    compose("restart", "svcnet", timeout=120)
    assert wait(lambda: dig("tasks.web") == before, 15), "the restarted agent serves the same replicas"
    assert dig("probe.svcnet.internal", "TXT") == ['"svcnet"']
    assert in_client("curl", "-s", "--max-time", "2", "http://web/") != ""
    compose("up", "-d", "--scale", "web=3", timeout=120)
    assert wait(lambda: len(dig("tasks.web")) == 3, 10), "scaling down after the restart"


def test_down_leaves_nothing_of_svcnet(project):
    compose("down", "--timeout", "5")
    assert netlink.list_bridges(PREFIX) == {}
    veths = subprocess.run(["ip", "-o", "link", "show", "type", "veth"], capture_output=True, text=True).stdout
    assert not re.search(r": sv[0-9a-f]{10}@", veths), veths
    forward, nat = firewall.chain_names(PREFIX)
    for save in (["iptables-legacy-save"], ["iptables-legacy-save", "-t", "nat"], ["iptables-legacy-save", "-t", "raw"],
                 ["iptables-nft-save"]):
        rules = subprocess.run(save, capture_output=True, text=True).stdout
        assert forward.split("-")[-1] not in rules, (save, rules)
    tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
    assert f"svcnet-mesh-{forward.split('-')[-1].lower()}" not in tables, tables
    mounts = Path("/proc/self/mounts").read_text()
    assert "svcnet" not in mounts, mounts
    assert docker("ps", "-aq", "--filter", "label=com.docker.compose.project=svcnet").stdout.strip() == ""
    records = docker("run", "--rm", "--network", "none", "-v", "svcnet_svcnet-state:/state", "--entrypoint", "ls",
                     "svcnet-demo:local", "/state/sandboxes").stdout.split()
    assert records == [], f"the agent's state volume still holds sandboxes {records}"
