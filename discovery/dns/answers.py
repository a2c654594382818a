"""Pre-packed replies: what a query means for one sandbox, as wire bytes ready to send.

:class:`Answers` wraps one revision's :class:`~discovery.records.Records` and turns a parsed
query into a :class:`LocalAnswer` (or None: not ours, forward it); :func:`pack` turns that
into an :class:`Entry` whose bytes lack only the query's ID. The resolver memoizes entries
keyed by everything after the ID, so a repeated query costs one dict lookup and one
concatenation; only task lists are re-shuffled per reply.

Names svcnet answers without forwarding: everything in the records, reverse names of known
addresses, and anything under ``svcnet.internal.`` (``<name>.svcnet.internal`` and
``<name>.<network>.svcnet.internal`` mean ``<name>`` and ``<name>.<network>``; an unknown
name there is NXDOMAIN, never forwarded; ``probe.svcnet.internal TXT`` says "svcnet", which
is how svcnet checks that it, and not something else, owns 127.0.0.11:53 in a netns).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from discovery import defaults

from . import wire as w
from .records import NameRecord, Records, ServiceRecord

INTERNAL_ZONE = "svcnet.internal"
PROBE_NAME = f"probe.{INTERNAL_ZONE}"
PROBE_TEXT = "svcnet"
_ZONE_SUFFIX = "." + INTERNAL_ZONE
_SOA_MNAME = f"ns.{INTERNAL_ZONE}."
_SOA_RNAME = f"hostmaster.{INTERNAL_ZONE}."
_REVERSE_SUFFIXES = (".in-addr.arpa", ".ip6.arpa")


@dataclass(frozen=True)
class Ttls:
    """Seconds. Defaults: a VIP lives as long as its service (long); a container name can move
    when the container is re-created (a minute); a task list changes with every start, stop
    and health flip (seconds); a negative answer must not hide a name that is about to exist."""

    vip: int = defaults.TTL_VIP
    name: int = defaults.TTL_NAME
    tasks: int = defaults.TTL_TASKS
    negative: int = defaults.TTL_NEGATIVE

    def of(self, ttl_class: str) -> int:
        return {"vip": self.vip, "name": self.name, "tasks": self.tasks}[ttl_class]


@dataclass(frozen=True)
class LocalAnswer:
    rcode: int
    answers: tuple[bytes, ...] = ()
    authority: tuple[bytes, ...] = ()
    additional: tuple[bytes, ...] = ()
    shuffle: bool = False


class Entry:
    """One memoized reply, minus the ID. ``static`` is the whole rest when it never changes;
    otherwise ``head`` + shuffled ``rrs`` + ``tail``. ``hits`` feeds the metrics."""

    __slots__ = ("static", "head", "rrs", "tail", "qtype", "rcode", "truncated", "hits", "refs")

    def __init__(self, static: bytes | None, head: bytes, rrs: tuple[bytes, ...], tail: bytes,
                 qtype: int, rcode: int, truncated: bool) -> None:
        self.static = static
        self.head = head
        self.rrs = rrs
        self.tail = tail
        self.qtype = qtype
        self.rcode = rcode
        self.truncated = truncated
        self.hits = 0
        self.refs = 0  # cache keys it is held under (a raw and a normalized one)

    def reply(self, query_id: bytes) -> bytes:
        if self.static is not None:
            return query_id + self.static
        return query_id + self.head + b"".join(random.sample(self.rrs, len(self.rrs))) + self.tail


class Answers:
    def __init__(self, records: Records, ttls: Ttls) -> None:
        self.records = records
        self.ttls = ttls
        self.revision = records.revision

    def lookup(self, attached: Sequence[str], query: w.Query) -> LocalAnswer | None:
        """The local answer to ``query`` for a sandbox on ``attached``; None to forward."""
        name = query.name
        if name is None or query.qclass != w.CLASS_IN:
            return None
        internal = name == INTERNAL_ZONE or name.endswith(_ZONE_SUFFIX)
        if internal:
            if name == PROBE_NAME:
                return self._probe(query.qtype)
            name = name[: -len(_ZONE_SUFFIX)] if name != INTERNAL_ZONE else ""
        qtype = query.qtype
        if name.endswith(_REVERSE_SUFFIXES):
            target = self.records.pointer(attached, name)
            if target is None:
                return self._nxdomain() if internal else None
            if qtype not in (w.PTR, w.ANY):
                return self._nodata()
            return LocalAnswer(w.NOERROR, (w.record(w.QNAME_POINTER, w.PTR, self.ttls.name, w.encode_name(target)),))
        if name.startswith("_"):
            found = self._srv(attached, name, qtype)
            if found is not None:
                return found
        record = self.records.lookup(attached, name) if name else None
        if record is None:
            return self._nxdomain() if internal else None
        return self._addresses(record, qtype)

    def _addresses(self, record: NameRecord, qtype: int) -> LocalAnswer:
        ttl = self.ttls.of(record.ttl_class)
        if qtype == w.A:
            addresses = record.ipv4
        elif qtype == w.AAAA:
            addresses = record.ipv6
        elif qtype == w.ANY:
            addresses = record.ipv4 + record.ipv6
        else:
            addresses = ()
        if not addresses:
            return self._nodata()
        rrs = tuple(w.address_record(w.QNAME_POINTER, a, ttl) for a in addresses)
        return LocalAnswer(w.NOERROR, rrs, shuffle=record.shuffle and len(rrs) > 1)

    def _srv(self, attached: Sequence[str], name: str, qtype: int) -> LocalAnswer | None:
        """``_<port>._<proto>.<svc>``: None when ``<svc>`` is not a service here."""
        port_label, _, rest = name.partition(".")
        proto_label, _, service_name = rest.partition(".")
        service = self.records.service(attached, service_name) if service_name else None
        if service is None or not proto_label.startswith("_"):
            return None
        try:
            port = int(port_label[1:])
        except ValueError:
            return self._nxdomain()
        if (proto_label[1:], port) not in service.ports:
            return self._nxdomain()
        if qtype not in (w.SRV, w.ANY):
            return self._nodata()
        return self._srv_answer(service, port)

    def _srv_answer(self, service: ServiceRecord, port: int) -> LocalAnswer:
        ttl = self.ttls.of(service.ttl_class)
        answers, additional = [], []
        for target, record in service.targets:
            if not (record.ipv4 or record.ipv6):
                continue
            answers.append(w.record(w.QNAME_POINTER, w.SRV, ttl, w.srv_rdata(0, 0, port, target)))
            owner = w.encode_name(target)
            additional.extend(w.address_record(owner, a, ttl) for a in record.ipv4 + record.ipv6)
        if not answers:
            return self._nodata()
        return LocalAnswer(w.NOERROR, tuple(answers), additional=tuple(additional), shuffle=len(answers) > 1)

    def _probe(self, qtype: int) -> LocalAnswer:
        if qtype != w.TXT:
            return self._nodata()
        return LocalAnswer(w.NOERROR, (w.record(w.QNAME_POINTER, w.TXT, 0, w.txt_rdata(PROBE_TEXT)),))

    def _soa(self, owner: bytes) -> bytes:
        # RFC 2308: the SOA's TTL and MINIMUM bound how long a resolver caches the negative
        negative = self.ttls.negative
        return w.record(owner, w.SOA, negative, w.soa_rdata(_SOA_MNAME, _SOA_RNAME, self.revision, negative))

    def _nodata(self) -> LocalAnswer:
        # the name exists (we are its authority), the type does not: SOA owned by the name
        return LocalAnswer(w.NOERROR, authority=(self._soa(w.QNAME_POINTER),))

    def _nxdomain(self) -> LocalAnswer:
        return LocalAnswer(w.NXDOMAIN, authority=(self._soa(w.encode_name(INTERNAL_ZONE)),))


def pack(query: w.Query, answer: LocalAnswer, limit: int) -> Entry:
    """Wire reply for ``answer`` (AA, RA, RD copied, OPT echoed), truncated past ``limit``."""
    opt = w.opt_record(query.dnssec_ok) if query.edns_size is not None else b""
    extra = 1 if opt else 0
    size = (w.HEADER_LEN + len(query.question) + sum(map(len, answer.answers)) + sum(map(len, answer.authority))
            + sum(map(len, answer.additional)) + len(opt))
    if size > limit:
        # RFC 2181 9: never a partial RRset; the client retries over TCP (RFC 7766)
        head = w.header_tail(rd=query.rd, aa=True, tc=True, rcode=answer.rcode, answers=0, authority=0,
                             additional=extra)
        return Entry(head + query.question + opt, b"", (), b"", query.qtype, answer.rcode, True)
    head = w.header_tail(rd=query.rd, aa=True, tc=False, rcode=answer.rcode, answers=len(answer.answers),
                         authority=len(answer.authority), additional=len(answer.additional) + extra) + query.question
    tail = b"".join(answer.authority) + b"".join(answer.additional) + opt
    if answer.shuffle:
        return Entry(None, head, answer.answers, tail, query.qtype, answer.rcode, False)
    return Entry(head + b"".join(answer.answers) + tail, b"", (), b"", query.qtype, answer.rcode, False)


def error_entry(query: w.Query, rcode: int) -> Entry:
    """REFUSED/SERVFAIL-style reply for a valid query: question echoed, no AA, OPT echoed."""
    opt = w.opt_record(query.dnssec_ok) if query.edns_size is not None else b""
    head = w.header_tail(rd=query.rd, aa=False, tc=False, rcode=rcode, answers=0, authority=0,
                         additional=1 if opt else 0)
    return Entry(head + query.question + opt, b"", (), b"", query.qtype, rcode, False)
