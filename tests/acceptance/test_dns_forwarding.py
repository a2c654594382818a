"""Acceptance: forwarding to upstreams the test starts (failover, SERVFAIL, TCP retry, in-flight cap)."""

from __future__ import annotations

import time

import pytest

from tests.acceptance.test_dns import _answers, _status
from tests.dnsupstream import TestUpstream, silent_port
from tests.helpers import metric_value, require_tools


@pytest.fixture(autouse=True)
def _tools():
    require_tools("ip", "dig", "nsenter", "etcd")


@pytest.fixture
def upstreams():
    servers = {"servfail": TestUpstream(mode="servfail"), "refused": TestUpstream(mode="refused"),
               "good": TestUpstream({"far.example.test": "198.51.100.9"}, slow_delay=2.0)}
    silent, silent_port_number = silent_port()
    servers["silent"] = silent_port_number
    yield servers
    silent.close()
    for server in servers.values():
        if isinstance(server, TestUpstream):
            server.close()


def _sandbox(cli, subnet: str) -> str:
    net, client = cli.name("fwd"), cli.name("client")
    cli.run("network", "create", net, "--subnet", subnet)
    cli.run("run", "-d", "--name", client, "--network", net)
    return client


def test_next_upstream_on_timeout_servfail_and_refused(cli, upstreams):
    cli.start_agent("--upstream", f"127.0.0.1:{upstreams['silent']}", "--upstream", upstreams["servfail"].address,
                    "--upstream", upstreams["refused"].address, "--upstream", upstreams["good"].address,
                    "--upstream-timeout", "0.3", "--ttl-name", "7")
    client = _sandbox(cli, "10.81.0.0/24")
    started = time.monotonic()
    output = cli.ns_dig(client, "far.example.test").communicate(timeout=10)[0]
    took = time.monotonic() - started
    assert _answers(output) == [("far.example.test.", 30, "A", "198.51.100.9")], output
    assert 0.3 <= took < 2.0, f"one 0.3 s timeout, then two quick failures: took {took:.2f}s"
    assert "far.example.test" in upstreams["servfail"].names_seen()
    assert "far.example.test" in upstreams["refused"].names_seen()
    assert _answers(cli.dig(client, client))[0][1] == 7, "--ttl-name applies"
    metrics = cli.metrics()
    silent = f"127.0.0.1:{upstreams['silent']}"
    assert f'svcnet_dns_upstream_errors_total{{upstream="{silent}",reason="timeout"}} 1' in metrics
    assert 'reason="servfail"' in metrics and 'reason="refused"' in metrics


def test_servfail_when_no_upstream_answers(cli, upstreams):
    cli.start_agent("--upstream", f"127.0.0.1:{upstreams['silent']}", "--upstream", upstreams["servfail"].address,
                    "--upstream-timeout", "0.2")
    client = _sandbox(cli, "10.82.0.0/24")
    output = cli.ns_dig(client, "far.example.test").communicate(timeout=10)[0]
    assert _status(output) == "SERVFAIL"


def test_truncated_upstream_reply_is_fetched_over_tcp(cli, upstreams):
    cli.start_agent("--upstream", upstreams["good"].address)
    client = _sandbox(cli, "10.83.0.0/24")
    output = cli.dig(client, "+tcp", "big.example.test")
    assert len(_answers(output)) == 100
    assert ("udp", "big.example.test") in upstreams["good"].seen
    assert ("tcp", "big.example.test") in upstreams["good"].seen, "the TC reply was retried over TCP"
    udp = cli.dig(client, "+ignore", "big.example.test")  # 100 answers do not fit 1232 octets
    assert "tc" in udp.split("flags:")[1].split(";")[0] and not _answers(udp)


def test_forwards_in_flight_are_capped_per_sandbox(cli, upstreams):
    cli.start_agent("--upstream", upstreams["good"].address, "--max-inflight", "2", "--upstream-timeout", "5")
    client = _sandbox(cli, "10.84.0.0/24")
    digs = [cli.ns_dig(client, f"slow.{i}.example.test") for i in range(6)]
    statuses = sorted(_status(d.communicate(timeout=15)[0]) for d in digs)
    assert statuses.count("REFUSED") >= 3 and statuses.count("NOERROR") >= 1, statuses
    refused = metric_value(cli.metrics(), "svcnet_dns_forward_limit_refused_total")
    assert refused == statuses.count("REFUSED"), f"{refused} counted, {statuses.count('REFUSED')} seen"
