"""The nftables backend: a VIP's tasks as map elements, so cost does not grow with services.

One table per sandbox netns, ``ip svcnet``:

    map services  { ipv4_addr : verdict }      VIP -> goto pick-N   (N = its task count)
                                               VIP -> goto refuse   (no task)
    map backends  { ipv4_addr . integer : ipv4_addr }   VIP . slot -> task, slots 0..N-1
    chain vips    nat output:    [ip daddr @ft-tcp-S meta l4proto tcp ct timeout set "ft-tcp-S"]
                                 (only with --flow-timeout: one rule per S in use, per protocol)
                                 ip daddr vmap @services
    chain pick-N:                dnat to ip daddr . numgen random mod N map @backends
    chain refuse:                TCP, UDP: dnat to 127.0.0.1:0 (refused: no socket has port 0);
                                 anything else: drop

A packet to a VIP costs one verdict-map lookup and one map lookup whatever the number of
services (kube-proxy's nftables mode keeps a chain per service and per endpoint: measured
here, 42 s to load 10,000 services that way, against 0.3 s for these elements). Every
task of a service has exactly one slot and the modulus is the task count, so tasks are
weighed exactly evenly for any count; one ``pick-N`` chain exists per task count in use.
A VIP carries every port and protocol, as the other backends do (svcnet's VIPs are not
per-port), so the key is the address alone.

Only a connection's first packet walks the table: the chains hook nat, which conntrack
consults once per connection. A VIP with no task is refused there too, by sending the
connection to port 0 of the sandbox's loopback, where no socket can listen: TCP gets a
reset and UDP a port unreachable, both ECONNREFUSED, and a connection already open to a
task goes on (it is not new). ``reject`` would say the same, but nat chains cannot use it
(the kernel loads the rule; the reset never reaches the socket), and a filter chain for it
is walked by every packet of every connection: measured, 7 % of the throughput between two
sandboxes on an overlay (iperf3, 9.35 vs 10.0 Gbit/s, six runs each way).

A change is one nft transaction of element adds and deletes for the VIPs that changed.
Slot i holds the i-th task in address order, so the kernel state depends on the plan alone
(not on the order tasks came and went: a restarted agent finds the same bytes); a change
rewrites only the slots whose task changed, at most the service's task count. The first sync of a netns reads
the table back (JSON) and converges by diff: a restarted agent writes nothing when the
kernel is already right. Removed tasks leave at once (conntrack keeps their open TCP
connections going; the sync loop deletes their UDP flows), as with iptables.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address

from discovery.host.nft import Nft, NftError, chain_rules

from .iptables import SyncResult
from .plan import Plan, VipPlan

log = logging.getLogger(__name__)

TABLE = "ip svcnet"
REFUSE = "refuse"  # the chain a VIP with no task goes to
SKELETON = f"""\
add table {TABLE}
add map {TABLE} services {{ type ipv4_addr : verdict; }}
add map {TABLE} backends {{ typeof ip daddr . numgen random mod 1 : ip daddr; }}
add chain {TABLE} vips {{ type nat hook output priority -100; policy accept; }}
add chain {TABLE} {REFUSE}
"""
DISPATCH = "ip daddr vmap @services"  # the vips chain's last rule, after any flow timeout rules
CHAIN_RULES = {
    "vips": [DISPATCH],
    REFUSE: ["meta l4proto { tcp, udp } dnat to 127.0.0.1:0", "drop"],
}


def pick_chain(count: int) -> str:
    return f"pick-{count}"


def pick_rule(count: int) -> str:
    return f"dnat to ip daddr . numgen random mod {count} map @backends"


Slots = tuple[IPv4Address, ...]
FlowPair = tuple[int | None, int | None]
NO_TIMEOUT: FlowPair = (None, None)
PROTOCOLS = ("tcp", "udp")


def timeout_name(protocol: str, seconds: int) -> str:
    return f"ft-{protocol}-{seconds}"


def timeout_object(protocol: str, seconds: int) -> str:
    """A conntrack timeout policy (nf_conntrack_timeout) and the set of VIPs it applies to."""
    policy = (f"established: {seconds}" if protocol == "tcp" else f"unreplied: {seconds}, replied: {seconds}")
    name = timeout_name(protocol, seconds)
    return (f"add ct timeout {TABLE} {name} {{ protocol {protocol}; l3proto ip; policy = {{ {policy} }}; }}\n"
            f"add set {TABLE} {name} {{ type ipv4_addr; }}")


def flow_rule(protocol: str, seconds: int) -> str:
    name = timeout_name(protocol, seconds)
    return f'ip daddr @{name} meta l4proto {protocol} ct timeout set "{name}"'



@dataclass(frozen=True)
class Held:
    """One VIP as the kernel holds it."""

    modulus: int | None  # its services element goes to pick-N; None: to refuse, or none
    slots: Mapping[int, IPv4Address]  # its backends elements
    empty: bool  # its services element goes to refuse (a VIP with no task)
    flows: FlowPair  # the timeout sets it is in

    @property
    def target(self) -> str | None:
        """The chain its services element goes to (None: no element)."""
        if self.modulus is not None:
            return pick_chain(self.modulus)
        return REFUSE if self.empty else None

    @classmethod
    def of(cls, plan: VipPlan | None) -> Held:
        """What a successful sync left for ``plan`` (None: nothing)."""
        if plan is None:
            return ABSENT
        count = len(plan.backends)
        return cls(count or None, dict(enumerate(plan.backends)), not count, plan.flow_timeout)


ABSENT = Held(None, {}, False, NO_TIMEOUT)


@dataclass
class Observed:
    """A table read back element by element (a first sync, after a restart)."""

    services: dict[IPv4Address, int] = field(default_factory=dict)
    backends: dict[IPv4Address, dict[int, IPv4Address]] = field(default_factory=dict)
    empty: set[IPv4Address] = field(default_factory=set)
    flows: dict[IPv4Address, FlowPair] = field(default_factory=dict)

    def vips(self) -> set[IPv4Address]:
        return self.services.keys() | self.backends.keys() | self.empty | self.flows.keys()

    def held(self, vip: IPv4Address) -> Held:
        return Held(self.services.get(vip), self.backends.get(vip, {}), vip in self.empty,
                    self.flows.get(vip, NO_TIMEOUT))


@dataclass
class NftState:
    """What one netns's table holds, with the context bound to it.

    After a successful sync the kernel holds exactly the plan it was given, so that plan
    (the network's VIP table, shared by every sandbox on the network) *is* the state: no
    per-sandbox copy of 10,000 VIPs. Only a table read back is held element by element,
    until the first sync converges it."""

    nft: Nft
    netns_id: tuple[int, int]
    applied: Plan = field(default_factory=dict)
    observed: Observed | None = None
    picks: Counter[int] = field(default_factory=Counter)  # pick-N chains present -> VIPs using them
    timeouts: Counter[tuple[str, int]] = field(default_factory=Counter)  # (proto, seconds) present -> VIPs
    flow_rules: list[str] = field(default_factory=list)  # the vips chain's timeout rules as held

    def held(self, vip: IPv4Address) -> Held:
        if self.observed is not None:
            return self.observed.held(vip)
        return Held.of(self.applied.get(vip))


class NftablesBackend:
    name = "nftables"

    def sync(self, netns: str, current: NftState | None, desired: Plan,
             changed: Iterable[IPv4Address] | None = None) -> tuple[NftState, SyncResult]:
        """Make ``netns`` hold ``desired``; ``changed`` (optional) names the only VIPs that may
        differ from what ``current`` holds, so a change costs its VIPs, not the table."""
        netns_id = _netns_id(netns)
        if current is None or current.netns_id != netns_id:
            if current is not None:
                current.nft.close()
            current = _observe(netns, netns_id)
            changed = None
        state = current
        if changed is None:
            held_vips = state.observed.vips() if state.observed is not None else state.applied.keys()
            vips = sorted(held_vips | desired.keys())
        else:
            vips = sorted(set(changed))
        edit = _Edit()
        result = SyncResult()
        for vip in vips:
            plan = desired.get(vip)
            if _converge_vip(state, edit, vip, state.held(vip), Held.of(plan)):
                if plan is None:
                    result.services_removed += 1
                else:
                    result.services_written += 1
        if changed is None:
            edit.unused |= {count for count, users in state.picks.items() if not users}
        for count in edit.unused:
            del state.picks[count]
        _converge_flow_rules(state, edit)
        if edit.commands:
            try:
                state.nft.run(edit.text())
            except NftError:
                state.nft.close()
                raise
            result.rules_written = edit.elements
        state.applied, state.observed = desired, None
        return state, result

    def next_deadline(self, state) -> float | None:
        return None  # as iptables: removed tasks leave at once

    def release(self, state: NftState) -> None:
        """Let the sandbox's libnftables context free the ruleset copy its last command
        fetched (~0.7 MB at 10,000 services; ``Nft.drop_cache``). Called once a sandbox has
        been quiet for a while, not after every sync: at 100 sandboxes that added 10-15 ms
        to a change reaching all of them."""
        try:
            state.nft.drop_cache()
        except NftError as exc:
            log.debug("could not release the nft cache error=%s", exc)

    def remove(self, netns: str) -> None:
        """Take svcnet's table out of ``netns`` (a foreign netns we detach from)."""
        nft = Nft.open(netns)
        try:
            if _has_table(nft):
                nft.run(f"delete table {TABLE}")
        finally:
            nft.close()


class _Edit:
    """One transaction: chains first, then deletes, then adds (nft applies them in order)."""

    def __init__(self) -> None:
        self.chains: list[str] = []
        self.deletes: dict[str, list[str]] = {"services": [], "backends": []}
        self.adds: dict[str, list[str]] = {"backends": [], "services": []}
        self.unused: set[int] = set()  # pick-N chains no VIP goes to any more: deleted last
        self.flow_rules: list[str] | None = None  # the vips chain rewritten with these (timeouts changed)
        self.unused_timeouts: set[tuple[str, int]] = set()  # deleted after the rules that use them
        self.elements = 0

    @property
    def commands(self) -> bool:
        return bool(self.chains or self.unused or self.flow_rules is not None or self.unused_timeouts
                    or any(self.deletes.values()) or any(self.adds.values()))

    def text(self) -> str:
        lines = list(self.chains)
        for verb, groups in (("delete", self.deletes), ("add", self.adds)):
            for name, elements in groups.items():
                if elements:
                    lines.append(f"{verb} element {TABLE} {name} {{ {', '.join(elements)} }}")
        if self.flow_rules is not None:
            lines.append(f"flush chain {TABLE} vips")
            lines += [f"add rule {TABLE} vips {rule}" for rule in (*self.flow_rules, DISPATCH)]
        for protocol, seconds in sorted(self.unused_timeouts):
            name = timeout_name(protocol, seconds)
            lines += [f"delete set {TABLE} {name}", f"delete ct timeout {TABLE} {name}"]
        lines += [f"delete chain {TABLE} {pick_chain(count)}" for count in sorted(self.unused)]
        return "\n".join(lines) + "\n"


def _converge_vip(state: NftState, edit: _Edit, vip: IPv4Address, held: Held, wanted: Held) -> bool:
    """Queue the element changes that take ``vip`` from ``held`` to ``wanted`` (and count the
    pick chains and timeout policies in use). True if anything changes."""
    if held == wanted:
        return False
    before = edit.elements
    if held.target != wanted.target:
        if held.target is not None:
            edit.deletes["services"].append(str(vip))
            edit.elements += 1
        if held.modulus is not None:
            state.picks[held.modulus] -= 1
            if not state.picks[held.modulus]:
                edit.unused.add(held.modulus)
        if wanted.modulus is not None:
            if wanted.modulus not in state.picks:
                edit.chains.append(f"add chain {TABLE} {pick_chain(wanted.modulus)}\n"
                                   f"add rule {TABLE} {pick_chain(wanted.modulus)} {pick_rule(wanted.modulus)}")
            state.picks[wanted.modulus] += 1
            edit.unused.discard(wanted.modulus)
        if wanted.target is not None:
            edit.adds["services"].append(f"{vip} : goto {wanted.target}")
            edit.elements += 1
    for slot, task in sorted(held.slots.items()):
        if wanted.slots.get(slot) != task:
            edit.deletes["backends"].append(f"{vip} . {slot}")
            edit.elements += 1
    for slot, task in sorted(wanted.slots.items()):
        if held.slots.get(slot) != task:
            edit.adds["backends"].append(f"{vip} . {slot} : {task}")
            edit.elements += 1
    for protocol, old, new in zip(PROTOCOLS, held.flows, wanted.flows, strict=True):
        if old == new:
            continue
        if old is not None:
            edit.deletes.setdefault(timeout_name(protocol, old), []).append(str(vip))
            state.timeouts[(protocol, old)] -= 1
        if new is not None:
            if (protocol, new) not in state.timeouts:
                edit.chains.append(timeout_object(protocol, new))
            state.timeouts[(protocol, new)] += 1
            edit.adds.setdefault(timeout_name(protocol, new), []).append(str(vip))
        edit.elements += 1
    return edit.elements > before


def _converge_flow_rules(state: NftState, edit: _Edit) -> None:
    """One rule per timeout in use (not per service: the first packet's cost grows with the
    number of distinct timeouts), at the head of the vips chain, before its dispatch turns the
    VIP into a task. That chain hooks nat, so only a connection's first packet pays for them;
    conntrack has made the entry by then and not yet confirmed it, which is when the kernel
    lets a policy attach (at raw, -300, there is none yet: measured, the policy was ignored)."""
    unused = {key for key, users in state.timeouts.items() if users <= 0}
    for key in unused:
        del state.timeouts[key]
    wanted = [flow_rule(protocol, seconds) for protocol, seconds in sorted(state.timeouts)]
    if wanted != state.flow_rules or unused:
        edit.flow_rules = wanted
        state.flow_rules = wanted
    edit.unused_timeouts = unused


def _netns_id(netns: str) -> tuple[int, int]:
    stat = os.stat(netns)
    return stat.st_dev, stat.st_ino


def _has_table(nft: Nft) -> bool:
    return any(line.split()[-1] == "svcnet" and line.split()[1] == "ip"
               for line in nft.run("list tables").splitlines() if line.startswith("table"))


def _observe(netns: str, netns_id: tuple[int, int]) -> NftState:
    """The table as the kernel holds it; a table whose shape is not ours is rebuilt.

    Elements are read back as they are; ``sync`` then converges them by diff. Every listing
    runs on a context of its own, freed at once: a context keeps what it listed in its cache
    (~40 MB of C heap for 30,000 elements, measured), and the one kept for the sandbox's
    writes must not hold that 100 times over."""
    lister = Nft.open(netns)
    try:
        state = NftState(lister, netns_id, observed=Observed())
        if _has_table(lister) and not _shape_is_ours(lister, state):
            log.warning("rebuilding an nftables table that is not as svcnet wrote it table=%r", TABLE)
            lister.run(f"delete table {TABLE}")
            state.picks.clear()
            state.flow_rules = []
        if not _has_table(lister):
            lister.run(SKELETON + "".join(f"add rule {TABLE} {chain} {rule}\n"
                                          for chain, rules in CHAIN_RULES.items() for rule in rules))
            listing = []
        else:
            listing = lister.run_json(f"list table {TABLE}").get("nftables", [])
    finally:
        lister.close()
    state.nft = Nft.open(netns)
    for entry in listing:
        timeout = _timeout_key(entry.get("ct timeout", {}).get("name", ""))
        if timeout is not None:
            state.timeouts[timeout] += 0  # present; counted by its set's elements
            continue
        found = entry.get("map") or entry.get("set")
        if not found:
            continue
        for element in found.get("elem", []):
            try:
                _read_element(state, found["name"], element)
            except (KeyError, TypeError, ValueError, IndexError):
                log.warning("skipping an nftables element svcnet cannot read set=%s element=%r",
                            found.get("name"), element)
    return state


def _timeout_key(name: str) -> tuple[str, int] | None:
    parts = name.split("-")
    if len(parts) == 3 and parts[0] == "ft" and parts[1] in PROTOCOLS and parts[2].isdigit():
        return parts[1], int(parts[2])
    return None


def _read_element(state: NftState, name: str, element) -> None:
    seen = state.observed
    timeout = _timeout_key(name)
    if timeout is not None:
        vip = IPv4Address(element if isinstance(element, str) else element["elem"]["val"])
        tcp, udp = seen.flows.get(vip, NO_TIMEOUT)
        seen.flows[vip] = (timeout[1], udp) if timeout[0] == "tcp" else (tcp, timeout[1])
        state.timeouts[timeout] += 1
    elif name == "services":
        key, verdict = element
        target = verdict["goto"]["target"]
        if target == REFUSE:
            seen.empty.add(IPv4Address(key))
            return
        count = int(target.removeprefix("pick-"))
        seen.services[IPv4Address(key)] = count
        state.picks[count] += 1
    elif name == "backends":
        key, task = element
        vip, slot = key["concat"]
        seen.backends.setdefault(IPv4Address(vip), {})[int(slot)] = IPv4Address(task)


def _shape_is_ours(nft: Nft, state: NftState) -> bool:
    """Sets, maps and chains exactly as svcnet declares them; records the pick chains found."""
    listing = nft.run_terse(f"list table {TABLE}")
    chains = chain_rules(listing)
    vips = chains.pop("vips", [])
    if not vips or vips[-1] != DISPATCH or any(not rule.startswith("ip daddr @ft-") for rule in vips[:-1]):
        return False
    state.flow_rules = vips[:-1]
    for chain, rules in CHAIN_RULES.items():
        if chain != "vips" and chains.pop(chain, None) != rules:
            return False
    for chain in chains:
        if not chain.startswith("pick-") or not chain[5:].isdigit():
            return False
        count = int(chain[5:])
        if chains[chain] != [pick_rule(count)]:
            return False
        state.picks[count] += 0  # present; counted by the services elements read next
    return all(f"\tmap {name} {{" in listing for name in ("services", "backends"))
