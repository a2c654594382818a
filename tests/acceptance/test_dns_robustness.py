"""Acceptance: bad packets, a fuzz run, slow TCP clients, many sandboxes, and the metrics."""

from __future__ import annotations

import random
import socket
import struct
import time

import pytest
from dnslib import EDNS0, DNSRecord

from discovery.host import netlink
from tests.acceptance.test_dns import _status
from tests.helpers import metric_value, require_tools

RESOLVER = ("127.0.0.11", 53)


@pytest.fixture(autouse=True)
def _tools():
    require_tools("ip", "dig", "nsenter", "etcd")


def _socket_in(cli, sandbox: str, kind=socket.SOCK_DGRAM) -> socket.socket:
    with netlink.entered_netns(cli.netns(sandbox)):
        return socket.socket(socket.AF_INET, kind)


def _header(qd=1, an=0, ns=0, ar=0, flags=0x0100, query_id=0x4242) -> bytes:
    return struct.pack("!HHHHHH", query_id, flags, qd, an, ns, ar)


MALFORMED_WITH_ID = {
    "short header": b"\x42\x42\x01\x00\x00",
    "two questions": _header(qd=2) + b"\x03web\x00\x00\x01\x00\x01" * 2,
    "compression loop": _header() + b"\xc0\x0c\x00\x01\x00\x01",
    "label over 63": _header() + b"\x40" + b"a" * 64 + b"\x00\x00\x01\x00\x01",
    "name over 255": _header() + (b"\x3f" + b"a" * 63) * 4 + b"\x00\x00\x01\x00\x01",
    "bogus OPT": _header(ar=1) + b"\x03web\x00\x00\x01\x00\x01" + b"\x03bad\x00\x00\x29\x10\x00" + bytes(6),
    "OPT option overrun": _header(ar=1) + b"\x03web\x00\x00\x01\x00\x01"
    + b"\x00\x00\x29\x10\x00\x00\x00\x00\x00\x00\x06\x00\x0a\x00\x09ab",
}


def _sandbox(cli, subnet: str, *extra: str) -> tuple[str, str]:
    net, client = cli.name("rb"), cli.name("client")
    cli.run("network", "create", net, "--subnet", subnet)
    cli.run("run", "-d", "--name", client, "--network", net, *extra)
    return net, client


def test_malformed_packets_get_formerr_or_are_dropped_and_serving_goes_on(cli):
    _, client = _sandbox(cli, "10.91.0.0/24")
    sock = _socket_in(cli, client)
    sock.settimeout(2)
    for reason, packet in MALFORMED_WITH_ID.items():
        sock.sendto(packet, RESOLVER)
        reply = sock.recv(4096)
        assert reply[:2] == b"\x42\x42" and reply[2] & 0x80 and reply[3] & 0x0F == 1, reason
    sock.sendto(b"\x42", RESOLVER)  # no ID to answer to: dropped
    sock.sendto(_header(flags=0x8180) + b"\x03web\x00\x00\x01\x00\x01", RESOLVER)  # a response: dropped
    good = DNSRecord.question(client)
    sock.sendto(good.pack(), RESOLVER)
    reply = DNSRecord.parse(sock.recv(4096))
    assert reply.header.id == good.header.id and len(reply.rr) == 1, "the next good query is answered"
    sock.close()
    assert 'svcnet_dns_malformed_total{action="formerr"} 7' in cli.metrics()
    assert 'svcnet_dns_malformed_total{action="dropped"} 2' in cli.metrics()


def _mutations(rng: random.Random, seeds: list[bytes], count: int):
    for _ in range(count):
        choice = rng.random()
        if choice < 0.3:
            yield rng.randbytes(rng.randrange(0, 80))
        else:
            packet = bytearray(rng.choice(seeds))
            for _ in range(rng.randrange(1, 4)):
                position = rng.randrange(len(packet))
                if choice < 0.7:
                    packet[position] = rng.randrange(256)
                else:
                    del packet[position:position + rng.randrange(1, 8)]
                if not packet:
                    break
            yield bytes(packet)


def test_fuzz_100k_random_and_mutated_packets(cli):
    _, client = _sandbox(cli, "10.92.0.0/24")
    pid = cli.agent_pid()
    seeds = [DNSRecord.question(n, t).pack() for n, t in (("web", "A"), (client, "AAAA"), ("tasks.x", "SRV"))]
    with_opt = DNSRecord.question(client)
    with_opt.add_ar(EDNS0(udp_len=4096))
    seeds.append(with_opt.pack())
    sock = _socket_in(cli, client)
    sock.setblocking(False)
    rng = random.Random(20261122)
    sent = 0
    for packet in _mutations(rng, seeds, 100_000):
        try:
            sock.sendto(packet, RESOLVER)
        except BlockingIOError:
            time.sleep(0.001)
            continue
        sent += 1
        if sent % 500 == 0:  # pace the flood so the resolver, not the socket buffer, sees it
            time.sleep(0.005)
            try:
                while sock.recv(65535):
                    pass
            except BlockingIOError:
                pass
    sock.close()
    assert sent >= 99_000
    time.sleep(1)
    assert cli.short(client, client) == [next(r for r in cli.json("ps") if r["name"] == client)["endpoints"][0]["ipv4"]]
    # the agent that took the flood answers (a crashed one would have been replaced by a
    # new agent, started by the CLI calls above, with its own pid)
    assert cli.info()["pid"] == pid, "the agent survived"
    formerr = metric_value(cli.metrics(), "svcnet_dns_malformed_total", action="formerr")
    assert formerr > 10_000, "most mutations are malformed and were answered FORMERR"


def test_idle_and_half_sent_tcp_clients_time_out_without_blocking_others(cli):
    cli.start_agent("--tcp-idle-timeout", "1")
    _, client = _sandbox(cli, "10.93.0.0/24")
    idle = _socket_in(cli, client, socket.SOCK_STREAM)
    partial = _socket_in(cli, client, socket.SOCK_STREAM)
    idle.connect(RESOLVER)
    partial.connect(RESOLVER)
    partial.sendall(b"\x00")  # half a length prefix
    started = time.monotonic()
    output = cli.ns_dig(client, "+tcp", client).communicate(timeout=10)[0]
    assert _status(output) == "NOERROR" and time.monotonic() - started < 1.0, "others are served meanwhile"
    for sock in (idle, partial):
        sock.settimeout(3)
        assert sock.recv(10) == b"", "closed by the server after the idle timeout"
        sock.close()
    # several queries on one connection, answered in turn (RFC 7766)
    with _socket_in(cli, client, socket.SOCK_STREAM) as pipelined:
        pipelined.settimeout(3)
        pipelined.connect(RESOLVER)
        queries = [DNSRecord.question(client) for _ in range(3)]
        pipelined.sendall(b"".join(struct.pack("!H", len(q.pack())) + q.pack() for q in queries))
        ids = set()
        for _ in queries:
            length = struct.unpack("!H", _recv_exactly(pipelined, 2))[0]
            ids.add(DNSRecord.parse(_recv_exactly(pipelined, length)).header.id)
        assert ids == {q.header.id for q in queries}


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, "connection closed early"
        data += chunk
    return data


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return int(next(line for line in status if line.startswith("VmRSS:")).split()[1])


def test_a_pipelining_client_that_never_reads_is_closed_and_memory_stays_bounded(cli):
    _, client = _sandbox(cli, "10.95.0.0/24")
    assert cli.short(client, client), "the sandbox is answered before"
    pid = cli.info()["pid"]
    rss_before = _rss_kib(pid)
    query = DNSRecord.question(client).pack()
    burst = (struct.pack("!H", len(query)) + query) * 2000
    hog = _socket_in(cli, client, socket.SOCK_STREAM)
    try:
        hog.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small window
        hog.settimeout(0.5)
        hog.connect(RESOLVER)
        started, sent, closed_by = time.monotonic(), 0, None
        while closed_by is None and time.monotonic() - started < 30:
            try:
                sent += hog.send(burst)  # never reads a reply
            except TimeoutError:
                continue  # the server stopped reading: keep pushing until it gives up on us
            except (BrokenPipeError, ConnectionResetError) as exc:
                closed_by = type(exc).__name__
        if closed_by is None:  # the write did not fail yet; the close may still be under the replies
            hog.settimeout(5)
            try:
                while hog.recv(65536):
                    pass
                closed_by = "eof"
            except ConnectionResetError:
                closed_by = "reset"
            except TimeoutError:
                pass
        elapsed = time.monotonic() - started
        assert closed_by is not None, f"the server kept a client that never reads for {elapsed:.0f}s"
        assert elapsed < 20, f"closed only after {elapsed:.1f}s"
        assert sent // len(query) > 5000, "many thousands of queries were pipelined"
    finally:
        hog.close()
    grown_mib = (_rss_kib(pid) - rss_before) / 1024
    assert grown_mib < 50, f"the agent grew by {grown_mib:.0f} MiB"
    # the others are still served, over TCP and UDP
    output = cli.ns_dig(client, "+tcp", client).communicate(timeout=10)[0]
    assert _status(output) == "NOERROR", output
    assert cli.short(client, client), "and over UDP"
    assert metric_value(cli.metrics(), "svcnet_dns_tcp_slow_readers_closed_total") >= 1
    assert cli.info()["pid"] == pid, "the agent survived"


def test_one_agent_serves_50_sandboxes_each_with_its_own_scope(cli):
    from discovery.node.client import ApiClient
    networks = [cli.name(f"n{i}") for i in range(5)]
    for index, net in enumerate(networks):
        cli.run("network", "create", net, "--subnet", f"10.{100 + index}.0.0/24")
    cli.run("ps")  # starts the agent
    api = ApiClient(cli.state_dir / "agent.sock")
    sandboxes = {}
    for index in range(50):
        name, net = cli.name(f"s{index}"), networks[index % 5]
        record = api.call("POST", "/v1/sandboxes", {"name": name, "networks": [net], "aliases": []})
        sandboxes[name] = (net, record["endpoints"][0]["ipv4"])
    assert cli.info()["dns_sandboxes"] == 50
    names = list(sandboxes)
    digs = {}
    for index, name in enumerate(names):
        same = names[(index + 5) % 50]  # same network (index % 5 equal)
        other = names[(index + 1) % 50]  # the next network
        digs[name] = (same, other, cli.ns_dig(name, "+noall", "+answer", same, other))
    for name, (same, _other, process) in digs.items():
        output = process.communicate(timeout=20)[0]
        answered = {line.split()[0].rstrip("."): line.split()[-1] for line in output.splitlines() if line.strip()}
        assert answered == {same: sandboxes[same][1]}, f"{name} on {sandboxes[name][0]}: {output}"


def test_metrics_count_queries_by_type_rcode_and_source(cli):
    _, client = _sandbox(cli, "10.94.0.0/24")
    for _ in range(3):
        cli.ns_dig(client, client).communicate(timeout=10)
    cli.ns_dig(client, client, "MX").communicate(timeout=10)
    cli.ns_dig(client, "outside.example.test").communicate(timeout=10)
    metrics = cli.metrics()
    queries = "svcnet_dns_queries_total"
    assert metric_value(metrics, queries, qtype="A", rcode="NOERROR", source="local") >= 3
    assert metric_value(metrics, queries, qtype="MX", rcode="NOERROR", source="local") == 1
    assert metric_value(metrics, queries, qtype="A", rcode="NOERROR", source="forwarded") == 1
    assert metric_value(metrics, "svcnet_dns_upstream_latency_seconds_count",
                        upstream=cli.env["SVCNET_UPSTREAM"]) == 1, "the one forward was timed"
    assert metric_value(metrics, "svcnet_view_revision") > 0
    assert 0 <= metric_value(metrics, "svcnet_view_age_seconds") < 60
    assert metric_value(metrics, "svcnet_etcd_connected") == 1
