"""DNS wire format, by hand: validate a query, and pack the few record types svcnet answers.

dnslib parses correctly but costs tens of microseconds a packet; the resolver answers from
pre-packed bytes, so all it needs is a strict parser for one question plus an optional OPT
record (RFC 1035 section 4, RFC 6891) and packers for A, AAAA, PTR, SRV, SOA and TXT.
``parse_query`` raises :class:`Malformed` with the reply the RFCs ask for: FORMERR when
an ID can be read, nothing when it cannot, NOTIMP for opcodes other than QUERY, BADVERS for
EDNS versions other than 0.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

HEADER_LEN = 12
MAX_NAME_LEN = 255  # wire octets, including the root label (RFC 1035 2.3.4)
MAX_LABEL_LEN = 63
MAX_UDP_PLAIN = 512  # without EDNS (RFC 1035 4.2.1)
SERVER_UDP_PAYLOAD = 1232  # advertised in our OPT (DNS flag day 2020: no fragmentation)

A, NS, SOA, PTR, TXT, AAAA, SRV, OPT, IXFR, AXFR, ANY = 1, 2, 6, 12, 16, 28, 33, 41, 251, 252, 255
CLASS_IN = 1
NOERROR, FORMERR, SERVFAIL, NXDOMAIN, NOTIMP, REFUSED = 0, 1, 2, 3, 4, 5
BADVERS = 16  # extended rcode: 4 bits in the header, 8 in the OPT record

TYPE_NAMES = {A: "A", NS: "NS", SOA: "SOA", PTR: "PTR", 5: "CNAME", 15: "MX", TXT: "TXT", AAAA: "AAAA",
              SRV: "SRV", 65: "HTTPS", 64: "SVCB", OPT: "OPT", IXFR: "IXFR", AXFR: "AXFR", ANY: "ANY"}
RCODE_NAMES = {NOERROR: "NOERROR", FORMERR: "FORMERR", SERVFAIL: "SERVFAIL", NXDOMAIN: "NXDOMAIN",
               NOTIMP: "NOTIMP", REFUSED: "REFUSED", BADVERS: "BADVERS"}

QNAME_POINTER = b"\xc0\x0c"  # the question's name, always at offset 12


def type_name(qtype: int) -> str:
    return TYPE_NAMES.get(qtype, "OTHER")


def rcode_name(rcode: int) -> str:
    return RCODE_NAMES.get(rcode, str(rcode))


class Malformed(Exception):
    """A packet we will not answer normally; ``reply`` is what to send back (or None: drop)."""

    def __init__(self, reason: str, reply: bytes | None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.reply = reply


@dataclass(frozen=True, slots=True)
class Query:
    id: bytes  # two bytes, as received
    flags: int  # the 16-bit flags word as received
    question: bytes  # qname + qtype + qclass as received: echoed back, case preserved (0x20)
    labels: tuple[bytes, ...]  # as received
    qtype: int
    qclass: int
    edns_size: int | None  # the client's UDP payload size, None when it sent no OPT
    dnssec_ok: bool = False

    @property
    def rd(self) -> int:
        return (self.flags >> 8) & 1

    @property
    def name(self) -> str | None:
        """Lower-case, dot-joined, no trailing dot; None if a label could not be a host name."""
        try:
            text = ".".join(label.decode("ascii") for label in self.labels).lower()
        except UnicodeDecodeError:
            return None
        if any(b"." in label for label in self.labels):
            return None
        return text

    def udp_limit(self) -> int:
        if self.edns_size is None:
            return MAX_UDP_PLAIN
        return max(MAX_UDP_PLAIN, min(self.edns_size, SERVER_UDP_PAYLOAD))


def error_reply(data: bytes, rcode: int) -> bytes:
    """A bare reply (no sections) with ``rcode``, the query's ID, opcode and RD."""
    opcode_rd = data[2] & 0x79 if len(data) > 2 else 0
    return data[:2] + bytes((0x80 | opcode_rd, 0x80 | (rcode & 0x0F))) + bytes(8)


def read_name(data: bytes, offset: int, allow_pointers: bool = True) -> tuple[tuple[bytes, ...], int]:
    """Labels of the name at ``offset`` and the offset just past it (past the first pointer).

    Pointers must point strictly backwards, so a loop cannot exist; the name's wire length
    (as if uncompressed) is limited to 255 octets and each label to 63.
    """
    labels: list[bytes] = []
    total = 1
    end = -1
    position = offset
    lowest = offset  # a pointer must go below every offset visited so far
    while True:
        if position >= len(data):
            raise ValueError("name runs past the end of the packet")
        length = data[position]
        if length & 0xC0 == 0xC0:
            if not allow_pointers:
                raise ValueError("compression pointer in the question")
            if position + 1 >= len(data):
                raise ValueError("truncated compression pointer")
            target = ((length & 0x3F) << 8) | data[position + 1]
            if end < 0:
                end = position + 2
            if target >= lowest:
                raise ValueError("compression pointer loop or forward pointer")
            position = lowest = target
            continue
        if length & 0xC0:
            raise ValueError("label type 0x40/0x80 is not supported (RFC 6891 retired it)")
        if length == 0:
            return tuple(labels), (end if end >= 0 else position + 1)
        if length > MAX_LABEL_LEN:  # unreachable given the bit tests above, kept for clarity
            raise ValueError("label longer than 63 octets")
        total += length + 1
        if total > MAX_NAME_LEN:
            raise ValueError("name longer than 255 octets")
        if position + 1 + length > len(data):
            raise ValueError("label runs past the end of the packet")
        labels.append(data[position + 1:position + 1 + length])
        position += 1 + length


def parse_query(data: bytes) -> Query:
    """Validate a query for one question; raise :class:`Malformed` with the reply to send."""
    if len(data) < 2:
        raise Malformed("shorter than a DNS ID", None)
    if len(data) < HEADER_LEN:
        raise Malformed("header shorter than 12 octets", error_reply(data, FORMERR))
    flags, qdcount, ancount, nscount, arcount = struct.unpack_from("!HHHHH", data, 2)
    if flags & 0x8000:
        raise Malformed("a response, not a query", None)  # never answer answers: no loops
    opcode = (flags >> 11) & 0x0F
    if opcode != 0:
        raise Malformed(f"opcode {opcode} is not QUERY", error_reply(data, NOTIMP))
    formerr = error_reply(data, FORMERR)
    if qdcount != 1:
        raise Malformed(f"QDCOUNT is {qdcount}, not 1", formerr)
    if ancount or nscount:
        raise Malformed("a query with answer or authority records", formerr)
    try:
        labels, offset = read_name(data, HEADER_LEN, allow_pointers=False)
    except ValueError as exc:
        raise Malformed(f"bad question name: {exc}", formerr) from None
    if offset + 4 > len(data):
        raise Malformed("question ends before its type and class", formerr)
    qtype, qclass = struct.unpack_from("!HH", data, offset)
    question = data[HEADER_LEN:offset + 4]
    offset += 4
    edns_size: int | None = None
    dnssec_ok = False
    for _ in range(arcount):
        try:
            owner, offset = read_name(data, offset)
        except ValueError as exc:
            raise Malformed(f"bad additional record name: {exc}", formerr) from None
        if offset + 10 > len(data):
            raise Malformed("additional record header runs past the end", formerr)
        rtype, rclass, ttl, rdlength = struct.unpack_from("!HHIH", data, offset)
        offset += 10
        if offset + rdlength > len(data):
            raise Malformed("additional record data runs past the end", formerr)
        if rtype == OPT:
            if edns_size is not None:
                raise Malformed("more than one OPT record", formerr)
            if owner:
                raise Malformed("OPT record owner is not the root", formerr)
            _check_options(data, offset, rdlength, formerr)
            version = (ttl >> 16) & 0xFF
            if version != 0:
                raise Malformed(f"EDNS version {version}", badvers_reply(data, question))
            edns_size = rclass
            dnssec_ok = bool(ttl & 0x8000)
        offset += rdlength
    if offset != len(data):
        raise Malformed(f"{len(data) - offset} octets after the last record", formerr)
    return Query(data[:2], flags, question, labels, qtype, qclass, edns_size, dnssec_ok)


def _check_options(data: bytes, offset: int, length: int, formerr: bytes) -> None:
    end = offset + length
    while offset < end:
        if offset + 4 > end:
            raise Malformed("truncated EDNS option header", formerr)
        (option_length,) = struct.unpack_from("!H", data, offset + 2)
        offset += 4 + option_length
        if offset > end:
            raise Malformed("EDNS option runs past its record", formerr)


def opt_record(dnssec_ok: bool, extended_rcode: int = 0) -> bytes:
    """Our OPT: root owner, our payload size, version 0, DO copied from the query (RFC 3225)."""
    return struct.pack("!BHHBBHH", 0, OPT, SERVER_UDP_PAYLOAD, extended_rcode, 0, 0x8000 if dnssec_ok else 0, 0)


def badvers_reply(data: bytes, question: bytes) -> bytes:
    opcode_rd = data[2] & 0x79
    return (data[:2] + bytes((0x80 | opcode_rd, 0x80)) + struct.pack("!HHHH", 1, 0, 0, 1)
            + question + opt_record(False, BADVERS >> 4))


# ---- packing ------------------------------------------------------------------------------

def encode_name(name: str) -> bytes:
    """``a.b.`` or ``a.b`` -> wire labels; names svcnet packs are validated host names."""
    out = bytearray()
    for label in name.rstrip(".").split("."):
        if label:
            raw = label.encode("ascii")
            out.append(len(raw))
            out += raw
    out.append(0)
    return bytes(out)


def record(owner: bytes, rtype: int, ttl: int, rdata: bytes) -> bytes:
    return owner + struct.pack("!HHIH", rtype, CLASS_IN, ttl, len(rdata)) + rdata


def address_record(owner: bytes, address: ipaddress.IPv4Address | ipaddress.IPv6Address, ttl: int) -> bytes:
    return record(owner, A if address.version == 4 else AAAA, ttl, address.packed)


def srv_rdata(priority: int, weight: int, port: int, target: str) -> bytes:
    return struct.pack("!HHH", priority, weight, port) + encode_name(target)


def soa_rdata(mname: str, rname: str, serial: int, minimum: int) -> bytes:
    # refresh/retry/expire matter only to secondaries, which svcnet does not have
    return encode_name(mname) + encode_name(rname) + struct.pack("!IIIII", serial & 0xFFFFFFFF, 3600, 600, 86400, minimum)


def txt_rdata(text: str) -> bytes:
    raw = text.encode()[:255]
    return bytes((len(raw),)) + raw


def header_tail(*, rd: int, aa: bool, tc: bool, rcode: int, answers: int, authority: int, additional: int) -> bytes:
    """Flags and counts (the 10 header octets after the ID) of a reply to one question."""
    first = 0x80 | (0x04 if aa else 0) | (0x02 if tc else 0) | rd
    return bytes((first, 0x80 | rcode)) + struct.pack("!HHHH", 1, answers, authority, additional)
