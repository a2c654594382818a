"""Reply caches: one per sandbox and transport, under one memory budget for the process.

Two keys lead to an entry. The *raw* key is the query minus its ID: an exact repeat (the
common case) costs one dict lookup on the hot path. The *normalized* key is the question
as DNS defines its meaning (RFC 1034/4343: name case-insensitive): lower-case name, type,
class, RD, DO and the UDP size the reply must fit; not the ID, the 0x20 case mix or EDNS
options such as a client cookie (RFC 7873), so those queries share one entry. A hit on it
writes the query's own question (its case) into a copy kept under the query's raw key.

Every entry is tagged with the name it was looked up under (on the sandbox's networks): a
View change drops only the entries of the names it touched. The budget evicts with a
second-chance FIFO (an entry hit since it was queued goes round once more), so the hot
path does nothing but count hits.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Callable, Iterable

from .answers import Entry
from .wire import read_name

ENTRY_OVERHEAD = 240  # bytes of dict slots, tags and the Entry object around the reply bytes


def entry_size(key, entry: Entry) -> int:
    payload = len(entry.static) if entry.static is not None else len(entry.head) + sum(map(len, entry.rrs)) + len(
        entry.tail)
    return payload + (len(key) if isinstance(key, bytes) else 64) + ENTRY_OVERHEAD


def with_question(entry: Entry, question: bytes) -> Entry:
    """``entry`` answering a question that differs only in case: the question is echoed as
    asked (RFC 1035 4.1.2; 0x20 resolvers check it), and compression pointers into it stay
    valid because its length is the same."""
    end = 10 + len(question)
    if entry.static is not None:
        copy = Entry(entry.static[:10] + question + entry.static[end:], b"", (), b"",
                     entry.qtype, entry.rcode, entry.truncated)
    else:
        copy = Entry(None, entry.head[:10] + question + entry.head[end:], entry.rrs, entry.tail,
                     entry.qtype, entry.rcode, entry.truncated)
    return copy


class Budget:
    """Bytes held by every cache of the process, and the eviction queue."""

    def __init__(self, limit: int, on_evict: Callable[[list[Entry]], None] | None = None) -> None:
        self.limit = limit
        self.used = 0
        self.entries = 0
        self.evicted = 0
        self.on_evict = on_evict  # the resolver folds an evicted entry's hits into its counters
        self._queue: deque[tuple[ReplyCache, object, Entry, int]] = deque()

    def charge(self, cache: ReplyCache, key, entry: Entry) -> None:
        self.used += entry_size(key, entry)
        self.entries += 1
        self._queue.append((cache, key, entry, entry.hits))
        if self.used > self.limit:
            self._trim()
        elif len(self._queue) > 2 * self.entries + 4096:
            self._compact()

    def refund(self, key, entry: Entry) -> None:
        self.used -= entry_size(key, entry)
        self.entries -= 1

    def _trim(self) -> None:
        second_chances = len(self._queue)
        while self.used > self.limit and self._queue:
            cache, key, entry, seen = self._queue.popleft()
            if not cache.holds(key, entry):
                continue  # dropped already (and refunded then)
            if entry.hits != seen and second_chances > 0:
                second_chances -= 1
                self._queue.append((cache, key, entry, entry.hits))
                continue
            gone = cache.remove(key)
            self.evicted += 1
            if gone is not None and self.on_evict is not None:
                self.on_evict([gone])

    def _compact(self) -> None:
        self._queue = deque(item for item in self._queue if item[0].holds(item[1], item[2]))


class ReplyCache:
    """One sandbox's memoized replies for one transport."""

    __slots__ = ("raw", "normal", "_tags", "_tag_of", "budget")

    def __init__(self, budget: Budget) -> None:
        self.raw: dict[bytes, Entry] = {}
        self.normal: dict[tuple, Entry] = {}
        self._tags: dict[str, set] = {}  # name -> keys of entries looked up under it
        self._tag_of: dict[object, str] = {}
        self.budget = budget

    def __len__(self) -> int:
        return len(self.raw) + len(self.normal)

    def holds(self, key, entry: Entry) -> bool:
        table = self.raw if isinstance(key, bytes) else self.normal
        return table.get(key) is entry

    def put(self, key, entry: Entry, tag: str) -> None:
        table = self.raw if isinstance(key, bytes) else self.normal
        if key in table:
            self.remove(key)
        table[key] = entry
        entry.refs += 1
        self._tags.setdefault(tag, set()).add(key)
        self._tag_of[key] = tag
        self.budget.charge(self, key, entry)

    def remove(self, key) -> Entry | None:
        """Forget ``key``; returns its entry once no key holds it any more (its hits are
        then final), else None."""
        table = self.raw if isinstance(key, bytes) else self.normal
        entry = table.pop(key, None)
        if entry is None:
            return None
        entry.refs -= 1
        tag = self._tag_of.pop(key)
        keys = self._tags[tag]
        keys.discard(key)
        if not keys:
            del self._tags[tag]
        self.budget.refund(key, entry)
        return entry if entry.refs == 0 else None

    def drop(self, tags: Iterable[str]) -> list[Entry]:
        """Forget the entries looked up under any of ``tags``; returns them (for their hits)."""
        dropped = []
        for tag in tags:
            for key in list(self._tags.get(tag, ())):
                entry = self.remove(key)
                if entry is not None:
                    dropped.append(entry)
        return dropped

    def clear(self) -> list[Entry]:
        dropped = [*self.raw.values(), *self.normal.values()]
        for key, entry in (*self.raw.items(), *self.normal.items()):
            self.budget.refund(key, entry)
            entry.refs = 0
        self.raw.clear()
        self.normal.clear()
        self._tags.clear()
        self._tag_of.clear()
        return dropped

    def entries(self) -> Iterable[Entry]:
        yield from self.raw.values()
        yield from self.normal.values()


# ---- forwarded answers -----------------------------------------------------------------

FORWARD_TTL_CAP = 3600  # seconds a forwarded answer is kept at most, whatever its TTL says
_OPT = 41
_SOA = 6


class ForwardedEntry(Entry):
    """An upstream reply kept for its TTL (RFC 1035 7.4) or, negative, for the SOA's TTL and
    MINIMUM (RFC 2308 5). Only ever under a normalized key, so the hot path never serves
    one: the slow path checks its age and sends the TTLs counted down."""

    __slots__ = ("stored_at", "expires_at", "ttls")

    def fresh(self, now: float) -> bool:
        return now < self.expires_at

    def reply_now(self, query_id: bytes, question: bytes, now: float) -> bytes:
        elapsed = int(now - self.stored_at)
        data = bytearray(query_id + self.static)
        data[12:12 + len(question)] = question  # the asker's case (same length)
        for offset, ttl in self.ttls:
            data[offset:offset + 4] = max(0, ttl - elapsed).to_bytes(4, "big")
        return bytes(data)


def forwarded_entry(reply: bytes, qtype: int, now: float) -> ForwardedEntry | None:
    """A cacheable copy of an upstream ``reply``, or None (truncated, an error, a negative
    answer without SOA, a TTL of 0, or bytes that do not parse)."""
    try:
        flags, counts = reply[2:4], struct.unpack("!HHHH", reply[4:12])
    except struct.error:
        return None
    rcode = flags[1] & 0x0F
    if flags[0] & 0x02 or rcode not in (0, 3):  # TC, or not NOERROR/NXDOMAIN
        return None
    try:
        ttls, answer_ttl, negative_ttl = _ttl_fields(reply, counts)
    except (ValueError, IndexError, struct.error):
        return None
    lifetime = answer_ttl if rcode == 0 and counts[1] else negative_ttl
    if lifetime is None or lifetime <= 0:
        return None
    entry = ForwardedEntry(reply[2:], b"", (), b"", qtype, rcode, False)
    entry.stored_at, entry.expires_at = now, now + min(lifetime, FORWARD_TTL_CAP)
    entry.ttls = tuple(ttls)
    return entry


def _ttl_fields(reply: bytes, counts: tuple[int, int, int, int]):
    """(offset, TTL) of every record but OPT; the answers' lowest TTL; the negative TTL
    (min of the authority SOA's TTL and its MINIMUM), None where there is none."""
    offset = 12
    for _ in range(counts[0]):
        _, offset = read_name(reply, offset)
        offset += 4
    fields, answer_ttl, negative_ttl = [], None, None
    for section, count in enumerate(counts[1:]):
        for _ in range(count):
            _, offset = read_name(reply, offset)
            rtype, _, ttl, length = struct.unpack("!HHIH", reply[offset:offset + 10])
            if rtype != _OPT:
                fields.append((offset + 4, ttl))
                if section == 0:
                    answer_ttl = ttl if answer_ttl is None else min(answer_ttl, ttl)
                elif section == 1 and rtype == _SOA:
                    _, rdata = read_name(reply, offset + 10)  # MNAME
                    _, rdata = read_name(reply, rdata)  # RNAME
                    minimum = struct.unpack("!I", reply[rdata + 16:rdata + 20])[0]
                    negative_ttl = min(ttl, minimum)
            offset += 10 + length
            if offset > len(reply):
                raise ValueError("record runs past the end")
    return fields, answer_ttl, negative_ttl
