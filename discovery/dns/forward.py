"""Forwarding to upstream resolvers: which ones, in what order, how long to wait.

Upstreams come from ``--upstream`` or the host's resolv.conf, minus 127.0.0.11 (that would
be us: a loop). Each query tries them in order with a per-try timeout (default 1.5 s, where
Docker waits 4 s per upstream), moving on after a timeout, a network error, SERVFAIL or
REFUSED; a truncated UDP reply is fetched again over TCP from the same upstream. Every
try uses a fresh socket (random source port) and a random ID, and a reply is accepted only
if its ID and question match (RFC 5452), so an off-path spoofer has to guess both.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import secrets
import struct
import time
from dataclasses import dataclass
from pathlib import Path

from discovery.errors import ValidationError
from discovery.metrics import Metrics

from . import wire as w

log = logging.getLogger(__name__)

SELF_ADDRESS = ipaddress.ip_address("127.0.0.11")


@dataclass(frozen=True)
class Upstream:
    host: str
    port: int = 53

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @classmethod
    def parse(cls, text: str) -> Upstream:
        """``1.1.1.1``, ``127.0.0.1:5353``, ``::1`` or ``[::1]:5353``."""
        host, port = text.strip(), 53
        if host.startswith("["):
            host, _, rest = host[1:].partition("]")
            if rest:
                port = _port(rest.removeprefix(":"), text)
        elif host.count(":") == 1:
            host, raw_port = host.split(":")
            port = _port(raw_port, text)
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            raise ValidationError(f"upstream {text!r} is not an IP address (optionally with :port), "
                                  f"for example 192.0.2.53 or [2001:db8::53]:5353") from None
        return cls(str(address), port)

    def is_self(self) -> bool:
        return ipaddress.ip_address(self.host) == SELF_ADDRESS and self.port == 53


def _port(text: str, whole: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValidationError(f"upstream {whole!r} has a bad port; use 1-65535")
    return int(text)


def from_resolv_conf(path: Path = Path("/etc/resolv.conf")) -> list[Upstream]:
    """The nameservers of a resolv.conf, in order, minus ourselves and anything unparsable."""
    upstreams = []
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        log.warning("cannot read resolv.conf path=%s error=%s", path, exc)
        return []
    for line in lines:
        fields = line.split()
        if len(fields) >= 2 and fields[0] == "nameserver":
            try:
                upstream = Upstream.parse(fields[1].split("%")[0])
            except ValidationError:
                log.warning("skipping unparsable nameserver path=%s value=%s", path, fields[1])
                continue
            if upstream.is_self():
                log.info("skipping nameserver 127.0.0.11: that is svcnet's own address")
                continue
            upstreams.append(upstream)
    return upstreams


class _UdpExchange(asyncio.DatagramProtocol):
    def __init__(self, query_id: bytes, question: bytes, reply: asyncio.Future) -> None:
        self.query_id = query_id
        self.question = question.lower()
        self.reply = reply

    def datagram_received(self, data: bytes, addr) -> None:
        end = w.HEADER_LEN + len(self.question)
        if (not self.reply.done() and data[:2] == self.query_id and len(data) >= end and data[2] & 0x80
                and data[w.HEADER_LEN:end].lower() == self.question):
            self.reply.set_result(data)

    def error_received(self, exc: Exception) -> None:  # ICMP port unreachable and friends
        if not self.reply.done():
            self.reply.set_exception(exc)


class Forwarder:
    def __init__(self, upstreams: list[Upstream], timeout: float, metrics: Metrics) -> None:
        self.upstreams = [u for u in upstreams if not u.is_self()]
        self.timeout = timeout
        self.errors = metrics.counter("svcnet_dns_upstream_errors_total",
                                      "Failed forwarding tries, by upstream and reason.", ("upstream", "reason"))
        self.latency = metrics.histogram("svcnet_dns_upstream_latency_seconds",
                                         "Time for an upstream to answer a forwarded query.", ("upstream",))
        self.tcp_retries = metrics.counter("svcnet_dns_upstream_tcp_retries_total",
                                           "Truncated UDP replies fetched again over TCP.", ("upstream",))

    async def forward(self, query: bytes, question: bytes) -> bytes | None:
        """The first usable upstream reply to ``query`` (with the query's own ID), or None."""
        for upstream in self.upstreams:
            name = str(upstream)
            query_id = secrets.token_bytes(2)
            packet = query_id + query[2:]
            started = time.perf_counter()
            try:
                reply = await asyncio.wait_for(self._udp(upstream, packet, question), self.timeout)
                if reply[2] & 0x02:
                    self.tcp_retries.inc(name)
                    reply = await asyncio.wait_for(self._tcp(upstream, packet, question), self.timeout)
            except TimeoutError:
                self.errors.inc(name, "timeout")
                log.debug("upstream timed out upstream=%s", name)
                continue
            except (OSError, asyncio.IncompleteReadError) as exc:
                self.errors.inc(name, "network")
                log.debug("upstream failed upstream=%s error=%r", name, exc)
                continue
            rcode = reply[3] & 0x0F
            if rcode in (w.SERVFAIL, w.REFUSED):
                self.errors.inc(name, w.rcode_name(rcode).lower())
                continue
            self.latency.observe(time.perf_counter() - started, name)
            return query[:2] + reply[2:]
        return None

    async def _udp(self, upstream: Upstream, packet: bytes, question: bytes) -> bytes:
        loop = asyncio.get_running_loop()
        reply: asyncio.Future = loop.create_future()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _UdpExchange(packet[:2], question, reply), remote_addr=(upstream.host, upstream.port))
        try:
            transport.sendto(packet)
            return await reply
        finally:
            transport.close()

    async def _tcp(self, upstream: Upstream, packet: bytes, question: bytes) -> bytes:
        reader, writer = await asyncio.open_connection(upstream.host, upstream.port)
        try:
            writer.write(struct.pack("!H", len(packet)) + packet)
            await writer.drain()
            while True:
                (length,) = struct.unpack("!H", await reader.readexactly(2))
                data = await reader.readexactly(length)
                end = w.HEADER_LEN + len(question)
                if data[:2] == packet[:2] and data[w.HEADER_LEN:end].lower() == question.lower():
                    return data
        finally:
            writer.close()


def truncated(reply: bytes, question: bytes) -> bytes:
    """A forwarded reply too big for the client's UDP size: header with TC and the question."""
    return reply[:2] + bytes((reply[2] | 0x02, reply[3])) + struct.pack("!HHHH", 1, 0, 0, 0) + question
