import struct

import pytest
from dnslib import EDNS0, QTYPE, DNSRecord

from discovery.dns import wire as w


def _query(name="web", qtype="A", edns=False, **kw) -> bytes:
    record = DNSRecord.question(name, qtype)
    record.header.id = 0x1234
    if edns:
        record.add_ar(EDNS0(udp_len=kw.get("udp_len", 4096), flags="do" if kw.get("do") else ""))
    return record.pack()


def _header(qd=1, an=0, ns=0, ar=0, flags=0x0100) -> bytes:
    return struct.pack("!HHHHHH", 0x1234, flags, qd, an, ns, ar)


def _rcode(reply: bytes) -> int:
    return reply[3] & 0x0F


def test_parses_a_plain_query_preserving_case():
    query = w.parse_query(_query("WeB.Front"))
    assert query.id == b"\x12\x34" and query.qtype == QTYPE.A and query.rd == 1
    assert query.name == "web.front"
    assert query.question.startswith(b"\x03WeB\x05Front\x00")
    assert query.edns_size is None and query.udp_limit() == 512


def test_edns_size_and_do_bit_are_read_and_capped():
    query = w.parse_query(_query(edns=True, udp_len=4096, do=True))
    assert query.edns_size == 4096 and query.dnssec_ok
    assert query.udp_limit() == w.SERVER_UDP_PAYLOAD
    assert w.parse_query(_query(edns=True, udp_len=100)).udp_limit() == 512


@pytest.mark.parametrize("packet, reason", [
    (_header(qd=2) + b"\x03web\x00\x00\x01\x00\x01" * 2, "QDCOUNT"),
    (_header(qd=0), "QDCOUNT"),
    (_header() + b"\xc0\x0c\x00\x01\x00\x01", "pointer"),
    (_header() + b"\x40" + b"a" * 64 + b"\x00\x00\x01\x00\x01", "label type"),
    (_header() + (b"\x3f" + b"a" * 63) * 4 + b"\x00\x00\x01\x00\x01", "longer than 255"),
    (_header() + b"\x03web", "past the end"),
    (_header() + b"\x03web\x00\x00", "type and class"),
    (_header(ar=1) + b"\x03web\x00\x00\x01\x00\x01" + b"\x03bad\x00\x00\x29\x10\x00\x00\x00\x00\x00\x00\x00",
     "owner is not the root"),
    (_header(ar=2) + b"\x03web\x00\x00\x01\x00\x01" + b"\x00\x00\x29\x10\x00\x00\x00\x00\x00\x00\x00" * 2,
     "more than one OPT"),
    (_header(ar=1) + b"\x03web\x00\x00\x01\x00\x01" + b"\x00\x00\x29\x10\x00\x00\x00\x00\x00\x00\x06\x00\x0a\x00\x09ab",
     "option runs past"),
    (_header(ar=1) + b"\x03web\x00\x00\x01\x00\x01" + b"\xc0\x1e\x00\x29", "pointer loop"),
    (_header() + b"\x03web\x00\x00\x01\x00\x01garbage", "after the last record"),
    (_header(an=1) + b"\x03web\x00\x00\x01\x00\x01", "answer or authority"),
])
def test_malformed_queries_get_formerr_with_their_id(packet, reason):
    with pytest.raises(w.Malformed) as caught:
        w.parse_query(packet)
    assert reason in caught.value.reason
    reply = caught.value.reply
    assert reply[:2] == b"\x12\x34" and reply[2] & 0x80 and _rcode(reply) == w.FORMERR


def test_too_short_to_hold_an_id_is_dropped_and_short_header_is_formerr():
    with pytest.raises(w.Malformed) as caught:
        w.parse_query(b"\x12")
    assert caught.value.reply is None
    with pytest.raises(w.Malformed) as caught:
        w.parse_query(b"\x12\x34\x01")
    assert caught.value.reply[:2] == b"\x12\x34" and _rcode(caught.value.reply) == w.FORMERR


def test_responses_are_dropped_other_opcodes_notimp_other_edns_versions_badvers():
    with pytest.raises(w.Malformed) as caught:
        w.parse_query(_header(flags=0x8180) + b"\x03web\x00\x00\x01\x00\x01")
    assert caught.value.reply is None
    with pytest.raises(w.Malformed) as caught:
        w.parse_query(_header(flags=0x2800) + b"\x03web\x00\x00\x01\x00\x01")  # UPDATE
    assert _rcode(caught.value.reply) == w.NOTIMP
    packet = _header(ar=1) + b"\x03web\x00\x00\x01\x00\x01" + b"\x00\x00\x29\x10\x00\x00\x01\x00\x00\x00\x00"
    with pytest.raises(w.Malformed) as caught:
        w.parse_query(packet)
    reply = DNSRecord.parse(caught.value.reply)
    assert reply.header.rcode == 0 and reply.ar[0].rtype == QTYPE.OPT and (reply.ar[0].ttl >> 24) == 1  # BADVERS


def test_backward_pointers_in_additional_names_are_followed():
    packet = _header(ar=1) + b"\x03web\x00\x00\x01\x00\x01" + b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x00\x00\x00\x00"
    assert w.parse_query(packet).edns_size is None


def test_packed_records_parse_back_with_dnslib():
    body = (w.record(w.encode_name("x.y."), w.SRV, 5, w.srv_rdata(0, 0, 80, "web.front."))
            + w.record(w.encode_name("web.front."), w.SOA, 5, w.soa_rdata("ns.a.", "h.a.", 7, 5)))
    packet = b"\x00\x01\x84\x00" + struct.pack("!HHHH", 0, 2, 0, 0) + body
    parsed = DNSRecord.parse(packet)
    assert str(parsed.rr[0].rdata.target) == "web.front." and parsed.rr[0].rdata.port == 80
    assert parsed.rr[1].rdata.times == (7, 3600, 600, 86400, 5)
