"""Local answers, packed and read back with dnslib (an independent parser)."""

import ipaddress

from dnslib import EDNS0, QTYPE, RCODE, DNSRecord

from discovery.dns import records
from discovery.dns import wire as w
from discovery.dns.answers import Answers, Ttls, pack
from discovery.state.model import Endpoint, Network, PortSpec, Service
from tests.unit.test_records import _view

ip = ipaddress.ip_address
FRONT = Network.create("front", "10.1.0.0/22", "fd00:1::/64")
BACK = Network.create("back", "10.2.0.0/24")
WEB = Service("web", ("front",), "vip", ports=(PortSpec(80),), vips={"front": ip("10.1.0.2")})
RR = Service("rr", ("front",), "dnsrr", ports=(PortSpec(53, protocol="udp"),))


def _task(name, address, service, health="healthy", network="front"):
    return Endpoint(name, network, ip(address), "n1", service=service, health=health)


def _answers(tasks=60, ttls: Ttls | None = None) -> Answers:
    endpoints = [Endpoint("a1", "front", ip("10.1.0.3"), "n1", aliases=("db",), ipv6=ip("fd00:1::3")),
                 Endpoint("b1", "back", ip("10.2.0.3"), "n1"),
                 _task("w1", "10.1.0.4", "web"), _task("sick", "10.1.0.5", "rr", health="unhealthy")]
    endpoints += [_task(f"r{i}", f"10.1.1.{i + 1}", "rr") for i in range(tasks)]
    return Answers(records.build(_view([FRONT, BACK], [WEB, RR], endpoints)), ttls or Ttls())


def _ask(answers, name, qtype="A", attached=("front",), udp=False, edns=None) -> DNSRecord:
    question = DNSRecord.question(name, qtype)
    question.header.id = 4242
    if edns is not None:
        question.add_ar(EDNS0(udp_len=edns))
    data = question.pack()
    query = w.parse_query(data)
    local = answers.lookup(attached, query)
    if local is None:
        return None
    return DNSRecord.parse(pack(query, local, query.udp_limit() if udp else 65535).reply(data[:2]))


def test_local_answers_are_authoritative_with_ra_and_the_question_case_kept():
    reply = _ask(_answers(), "WeB")
    assert reply.header.id == 4242 and reply.header.aa and reply.header.ra and reply.header.rd
    assert str(reply.q.qname) == "WeB." and str(reply.rr[0].rname) == "WeB."
    assert [str(r.rdata) for r in reply.rr] == ["10.1.0.2"] and reply.rr[0].ttl == 600


def test_ttl_classes_vip_name_tasks_and_configurable():
    answers = _answers(tasks=3)
    assert _ask(answers, "a1").rr[0].ttl == 60
    assert {r.ttl for r in _ask(answers, "tasks.rr").rr} == {5}
    custom = _answers(tasks=3, ttls=Ttls(vip=30, name=7, tasks=1, negative=2))
    assert _ask(custom, "web").rr[0].ttl == 30 and _ask(custom, "db").rr[0].ttl == 7
    assert _ask(custom, "a1", "MX").auth[0].ttl == 2


def test_nodata_has_an_soa_and_unknown_names_are_not_ours():
    answers = _answers(tasks=3)
    reply = _ask(answers, "web", "AAAA")
    assert reply.header.rcode == RCODE.NOERROR and not reply.rr
    assert reply.auth[0].rtype == QTYPE.SOA and str(reply.auth[0].rname) == "web."
    assert str(_ask(answers, "a1", "AAAA").rr[0].rdata) == "fd00:1::3"
    assert _ask(answers, "example.com") is None  # forwarded
    assert _ask(answers, "b1") is None  # not on this sandbox's network
    assert [str(r.rdata) for r in _ask(answers, "b1", attached=("front", "back")).rr] == ["10.2.0.3"]


def test_unhealthy_tasks_are_in_no_answer_but_their_name_is_nodata():
    answers = _answers(tasks=2)
    assert sorted(str(r.rdata) for r in _ask(answers, "tasks.rr").rr) == ["10.1.1.1", "10.1.1.2"]
    sick = _ask(answers, "sick")
    assert sick.header.rcode == RCODE.NOERROR and not sick.rr and sick.auth


def test_internal_zone_is_never_forwarded():
    answers = _answers(tasks=1)
    assert [str(r.rdata) for r in _ask(answers, "db.svcnet.internal").rr] == ["10.1.0.3"]
    assert [str(r.rdata) for r in _ask(answers, "web.front.svcnet.internal").rr] == ["10.1.0.2"]
    assert _ask(answers, "nope.svcnet.internal").header.rcode == RCODE.NXDOMAIN
    probe = _ask(answers, "probe.svcnet.internal", "TXT")
    assert b"svcnet" in probe.rr[0].rdata.data[0]


def test_ptr_for_endpoints_and_vips_v4_and_v6_scoped():
    answers = _answers(tasks=1)
    assert str(_ask(answers, "3.0.1.10.in-addr.arpa", "PTR").rr[0].rdata) == "a1.front."
    assert str(_ask(answers, "2.0.1.10.in-addr.arpa", "PTR").rr[0].rdata) == "web.front."
    v6 = ip("fd00:1::3").reverse_pointer
    assert str(_ask(answers, v6, "PTR").rr[0].rdata) == "a1.front."
    assert _ask(answers, "3.0.2.10.in-addr.arpa", "PTR") is None  # back's: not visible, forwarded


def test_srv_for_vip_and_dnsrr_services():
    answers = _answers(tasks=2)
    reply = _ask(answers, "_80._tcp.web", "SRV")
    assert [(r.rdata.port, str(r.rdata.target)) for r in reply.rr] == [(80, "web.front.")]
    assert [str(r.rdata) for r in reply.ar] == ["10.1.0.2"]
    reply = _ask(answers, "_53._udp.rr", "SRV")
    assert sorted(str(r.rdata.target) for r in reply.rr) == ["r0.front.", "r1.front."]
    assert _ask(answers, "_81._tcp.web", "SRV").header.rcode == RCODE.NXDOMAIN
    assert _ask(answers, "_80._tcp.web", "A").header.rcode == RCODE.NOERROR


def test_over_512_bytes_is_truncated_without_edns_and_whole_over_tcp():
    answers = _answers(tasks=60)
    udp = _ask(answers, "tasks.rr", udp=True)
    assert udp.header.tc and not udp.rr
    udp_edns = _ask(answers, "tasks.rr", udp=True, edns=4096)  # 60 x 16 octets fit in 1232
    assert not udp_edns.header.tc and len(udp_edns.rr) == 60 and udp_edns.ar[0].rtype == QTYPE.OPT
    tcp = _ask(answers, "tasks.rr")
    assert not tcp.header.tc and len(tcp.rr) == 60


def test_task_lists_are_shuffled_per_reply():
    answers = _answers(tasks=8)
    data = DNSRecord.question("rr").pack()
    query = w.parse_query(data)
    entry = pack(query, answers.lookup(("front",), query), 65535)
    orders = {tuple(str(r.rdata) for r in DNSRecord.parse(entry.reply(data[:2])).rr) for _ in range(20)}
    assert len(orders) > 1 and all(len(order) == 8 for order in orders)
