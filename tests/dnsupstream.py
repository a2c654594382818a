"""An upstream DNS server the tests start themselves, on loopback (never the host's resolver).

Threaded UDP + TCP, answers built with dnslib. Behaviour by name:
- a name in ``records`` -> its A records;
- ``big.<anything>`` -> 100 A records (truncated over UDP, whole over TCP);
- ``slow.<anything>`` -> answered after ``slow_delay`` seconds;
- everything else -> NXDOMAIN.
``mode`` makes the whole server misbehave: "ok", "servfail", "refused" or "silent" (never
answers). Every query is recorded in ``seen`` as (transport, lower-case name).
"""

from __future__ import annotations

import socket
import struct
import threading
import time

from dnslib import QTYPE, RCODE, RR, SOA, A, DNSRecord


class TestUpstream:
    __test__ = False  # not a pytest class

    def __init__(self, records: dict[str, str] | None = None, mode: str = "ok", slow_delay: float = 1.0,
                 ttl: int = 30, negative_soa: tuple[int, int] | None = None) -> None:
        self.records = {k.lower().rstrip("."): v for k, v in (records or {}).items()}
        self.mode = mode
        self.slow_delay = slow_delay
        self.ttl = ttl
        self.negative_soa = negative_soa  # (the SOA record's TTL, its MINIMUM) in NXDOMAIN replies
        self.seen: list[tuple[str, str]] = []
        self._udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._udp.bind(("127.0.0.1", 0))
        self.port = self._udp.getsockname()[1]
        self._tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._tcp.bind(("127.0.0.1", self.port))
        self._tcp.listen(16)
        self._stopped = False
        for target in (self._serve_udp, self._serve_tcp):
            threading.Thread(target=target, daemon=True).start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def names_seen(self) -> list[str]:
        return [name for _, name in self.seen]

    def close(self) -> None:
        self._stopped = True
        self._udp.close()
        self._tcp.close()

    def _reply(self, data: bytes, transport: str) -> bytes | None:
        try:
            query = DNSRecord.parse(data)
        except Exception:
            return None
        name = str(query.q.qname).rstrip(".").lower()
        self.seen.append((transport, name))
        if self.mode == "silent":
            return None
        reply = query.reply(ra=1, aa=0)  # a recursive resolver: not authoritative
        if self.mode == "servfail":
            reply.header.rcode = RCODE.SERVFAIL
        elif self.mode == "refused":
            reply.header.rcode = RCODE.REFUSED
        elif name.startswith("big."):
            for index in range(100):
                reply.add_answer(RR(query.q.qname, QTYPE.A, rdata=A(f"198.51.100.{index + 1}"), ttl=30))
        elif name in self.records and query.q.qtype == QTYPE.A:
            reply.add_answer(RR(query.q.qname, QTYPE.A, rdata=A(self.records[name]), ttl=self.ttl))
        elif name not in self.records and not name.startswith("slow."):
            reply.header.rcode = RCODE.NXDOMAIN
            if self.negative_soa is not None:
                ttl, minimum = self.negative_soa
                reply.add_auth(RR("example.", QTYPE.SOA, ttl=ttl, rdata=SOA(
                    "ns.example.", "hostmaster.example.", (1, 3600, 600, 86400, minimum))))
        if name.startswith("slow."):
            reply.add_answer(RR(query.q.qname, QTYPE.A, rdata=A("198.51.100.200"), ttl=30))
            time.sleep(self.slow_delay)
        packed = reply.pack()
        if transport == "udp" and len(packed) > 512:
            reply.rr = []
            reply.header.tc = 1
            packed = reply.pack()
        return packed

    def _serve_udp(self) -> None:
        while not self._stopped:
            try:
                data, addr = self._udp.recvfrom(65535)
            except OSError:
                return
            threading.Thread(target=self._answer_udp, args=(data, addr), daemon=True).start()

    def _answer_udp(self, data: bytes, addr) -> None:
        reply = self._reply(data, "udp")
        if reply is not None:
            try:
                self._udp.sendto(reply, addr)
            except OSError:
                pass

    def _serve_tcp(self) -> None:
        while not self._stopped:
            try:
                conn, _ = self._tcp.accept()
            except OSError:
                return
            threading.Thread(target=self._answer_tcp, args=(conn,), daemon=True).start()

    def _answer_tcp(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(5)
            try:
                length = struct.unpack("!H", _read(conn, 2))[0]
                reply = self._reply(_read(conn, length), "tcp")
                if reply is not None:
                    conn.sendall(struct.pack("!H", len(reply)) + reply)
            except (OSError, ValueError):
                pass


def _read(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise ValueError("closed")
        data += chunk
    return data


def silent_port() -> tuple[socket.socket, int]:
    """A bound UDP socket that never answers (a black-holed upstream); keep it open."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    return sock, sock.getsockname()[1]
