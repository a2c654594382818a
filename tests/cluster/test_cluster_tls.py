"""Acceptance: `scripts/cluster.sh up --tls` — etcd members and every svcnet client on TLS with
client certificates (--etcd-cacert/--etcd-cert/--etcd-key, as SVCNET_ETCD_* here)."""

from __future__ import annotations

import json

import pytest

from tests.cluster.harness import cluster_up
from tests.helpers import require_tools, wait


@pytest.fixture(scope="module")
def tls_cluster(tmp_path_factory):
    require_tools("openssl")
    with cluster_up(tmp_path_factory.mktemp("tls-cluster"), "--tls") as harness:
        yield harness


def test_the_whole_cluster_runs_on_tls(tls_cluster):
    nodes = json.loads(tls_cluster.svcnet("h2", "node", "ls", "--format", "json"))
    assert [(n["name"], n["status"]) for n in nodes] == [("h1", "ready"), ("h2", "ready"), ("h3", "ready")]
    members = tls_cluster.on("h1", "etcdctl", "member", "list")
    assert members.count("https://") == 6, members
    tls_cluster.svcnet("h1", "network", "create", "sec", "--driver", "overlay", "--subnet", "10.63.0.0/24")
    tls_cluster.svcnet("h1", "run", "-d", "--name", "s1", "--network", "sec", "--", "sleep", "1000")
    tls_cluster.svcnet("h3", "run", "-d", "--name", "s3", "--network", "sec", "--", "sleep", "1000")
    assert wait(lambda: len(tls_cluster.dig("h3", "s3", "s1")) == 1, 5)
    assert " 0% packet loss" in tls_cluster.on("h3", "svcnet", "exec", "s3", "--", "ping", "-c1", "-W2", "s1")


def test_no_client_certificate_no_registry(tls_cluster):
    refused = tls_cluster.run("on", "h1", "--", "sh", "-c", "unset SVCNET_ETCD_CERT SVCNET_ETCD_KEY; "
                              "SVCNET_ETCD_TIMEOUT=2 svcnet network ls", check=False)
    assert refused.returncode != 0 and "cannot reach etcd" in refused.stderr, refused.stderr[-500:]
    plain = tls_cluster.run("on", "h1", "--", "sh", "-c", "unset SVCNET_ETCD_CACERT SVCNET_ETCD_CERT SVCNET_ETCD_KEY; "
                            "SVCNET_ETCD_TIMEOUT=2 svcnet --etcd http://192.168.251.11:2379 network ls", check=False)
    assert plain.returncode != 0 and "cannot reach etcd" in plain.stderr, "no plaintext"
    mixed = tls_cluster.run("on", "h1", "--", "svcnet", "--etcd", "http://192.168.251.11:2379", "network", "ls",
                            check=False)
    assert mixed.returncode != 0 and "use https:// URLs" in mixed.stderr
    half = tls_cluster.run("on", "h1", "--", "sh", "-c", "unset SVCNET_ETCD_KEY; svcnet network ls", check=False)
    assert half.returncode != 0 and "--etcd-cert and --etcd-key together" in half.stderr


def test_a_killed_agent_comes_back_on_tls(tls_cluster):
    tls_cluster.run("kill", "h2", "agent")
    tls_cluster.run("start", "h2", "agent")
    node = json.loads(tls_cluster.svcnet("h1", "node", "inspect", "h2", "--format", "json"))
    assert node["status"] == "ready"
