"""Shared use of python-iptables: one lock, fresh table handles.

iptc keeps one Table object per table name for the whole process, and its libiptc handle
belongs to the netns of the thread that last refreshed it. So every user (the host
firewall, each sandbox's load balancer) takes ``LOCK``, enters its netns, refreshes, and
commits before letting go.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from pathlib import Path

import iptc
from iptc import easy

LOCK = threading.RLock()


def tables_in_use() -> set[str]:
    """The legacy tables instantiated in this thread's netns."""
    try:
        return set(Path("/proc/thread-self/net/ip_tables_names").read_text().split())
    except OSError:
        return set(iptc.Table.ALL)


def table_in_use(name: str) -> bool:
    """Is the legacy table instantiated in this thread's netns? Asking libiptc would create it,
    and then every packet passes its (empty) chains."""
    return name in tables_in_use()


def _tables_here(rule: iptc.Rule) -> list[iptc.Table]:
    in_use = tables_in_use()
    return [iptc.Table(name) for name in iptc.Table.ALL if name in in_use]


# python-iptables decides whether a target such as CT or CONNMARK is a jump to a user chain
# by looking for a chain of that name in every table it deems available, and it deems a
# table available by opening it: one encoded CT rule instantiated all five legacy tables in
# the netns (measured: security and mangle appeared in every host), and from then on every
# packet there, bridged overlay frames included, walked their empty chains. A table this
# netns does not hold has no chain to jump to: ask the kernel's list instead.
iptc.ip4tc.Rule.tables = property(_tables_here)


def fresh_table(name: str) -> iptc.Table:
    """The ``name`` table as the kernel holds it now in this thread's netns, autocommit off."""
    table = iptc.Table(name)
    table.autocommit = False
    table.refresh()
    return table


def release(table: iptc.Table) -> None:
    table.autocommit = True


def ensure_jump(table: iptc.Table, parent: str, chain_name: str) -> bool:
    """Create ``chain_name`` and one jump to it at the top of ``parent``; True if anything changed."""
    changed = False
    if not table.is_chain(chain_name):
        table.create_chain(chain_name)
        changed = True
    parent_chain = iptc.Chain(table, parent)
    if not any(rule.target.name == chain_name for rule in parent_chain.rules):
        parent_chain.insert_rule(easy.encode_iptc_rule({"target": chain_name}))
        changed = True
    return changed


def unjump(table: iptc.Table, parent: str, chain_name: str) -> None:
    """Remove the jumps from ``parent`` to ``chain_name``."""
    parent_chain = iptc.Chain(table, parent)
    for rule in list(parent_chain.rules):
        if rule.target.name == chain_name:
            parent_chain.delete_rule(rule)


def drop_chain(table: iptc.Table, parent: str, chain_name: str) -> None:
    """Remove the jumps from ``parent`` to ``chain_name``, then the chain."""
    if not table.is_chain(chain_name):
        return
    unjump(table, parent, chain_name)
    iptc.Chain(table, chain_name).flush()
    table.delete_chain(chain_name)


def normalize(rules: list[dict]) -> list[dict]:
    """Rules as ``decode_iptc_rule`` gives them back, without counters: comparable."""
    cleaned = []
    for rule in rules:
        rule = {k: v for k, v in rule.items() if k != "counters"}
        if "src" in rule and "/" not in rule["src"]:
            rule["src"] += "/32"
        cleaned.append(rule)
    return cleaned


def dump(chain: iptc.Chain) -> list[dict]:
    return normalize([easy.decode_iptc_rule(rule) for rule in chain.rules])


def converge_chain(table: iptc.Table, chain_name: str, rules: list[dict]) -> bool:
    """Make ``chain_name`` hold exactly ``rules`` (created if missing); True if anything was written.

    Compared rule by rule with what the kernel holds, so an unchanged chain is never
    rewritten (a restarted agent leaves the rules byte-identical)."""
    changed = False
    if not table.is_chain(chain_name):
        table.create_chain(chain_name)
        changed = True
    chain = iptc.Chain(table, chain_name)
    wanted = normalize([easy.decode_iptc_rule(easy.encode_iptc_rule(r)) for r in rules])
    if dump(chain) != wanted:
        chain.flush()
        for rule in rules:
            chain.append_rule(easy.encode_iptc_rule(rule))
        changed = True
    return changed


def converge_jumped(table: iptc.Table, chain_name: str, rules: list[dict], parents: tuple[str, ...]) -> bool:
    """``converge_chain``, and a jump to the chain at the top of each of ``parents``."""
    changed = converge_chain(table, chain_name, rules)
    for parent in parents:
        parent_chain = iptc.Chain(table, parent)
        if {"target": chain_name} not in dump(parent_chain):
            parent_chain.insert_rule(easy.encode_iptc_rule({"target": chain_name}))
            changed = True
    return changed


def delete_rules(chain: iptc.Chain, rules: Iterable[dict]) -> None:
    """Delete by content (libiptc matches the whole entry): no walk over the chain."""
    for rule in rules:
        try:
            chain.delete_rule(easy.encode_iptc_rule(rule))
        except iptc.IPTCError:
            pass  # not there: nothing to undo
