"""The View: an immutable, revision-stamped snapshot of the registry held in memory.

Consumers (DNS tables, the LB plan, the agent's bridge sync) read only the View; nothing
on a hot path reads etcd. A new View is built by applying a batch of key changes to the
old one, so unchanged objects are shared between snapshots.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from discovery.errors import ValidationError

from .keys import KeyLayout
from .model import Endpoint, Network, Node, Service

log = logging.getLogger(__name__)



def _empty() -> Mapping:
    return MappingProxyType({})

# kind in the key layout -> (model type, number of key parts after the kind)
_DECODERS = {
    "networks": (Network, 1),
    "services": (Service, 1),
    "endpoints": (Endpoint, 2),
    "nodes": (Node, 1),
}


@dataclass(frozen=True)
class Change:
    """One key's new value, or ``None`` for a deletion."""

    key: bytes
    value: bytes | None


@dataclass(frozen=True)
class View:
    revision: int = 0
    networks: Mapping[str, Network] = field(default_factory=_empty)
    services: Mapping[str, Service] = field(default_factory=_empty)
    endpoints: Mapping[tuple[str, str], Endpoint] = field(default_factory=_empty)
    nodes: Mapping[str, Node] = field(default_factory=_empty)
    created_at: float = field(default_factory=time.monotonic, compare=False)

    def endpoints_on(self, network: str) -> list[Endpoint]:
        return [e for (net, _), e in self.endpoints.items() if net == network]

    def tasks_of(self, service: str) -> list[Endpoint]:
        return [e for e in self.endpoints.values() if e.service == service]

    def apply(self, changes: Iterable[Change], revision: int, keys: KeyLayout) -> View:
        """A new View with ``changes`` applied; bad values are logged and left out."""
        tables = {
            "networks": None, "services": None, "endpoints": None, "nodes": None,
        }
        current = {"networks": self.networks, "services": self.services,
                   "endpoints": self.endpoints, "nodes": self.nodes}
        for change in changes:
            split = keys.split(change.key)
            if split is None or split[0] not in _DECODERS:
                continue  # claims and foreign keys are not part of the View
            kind, parts = split
            model, arity = _DECODERS[kind]
            if len(parts) != arity:
                log.warning("skipping key with unexpected shape key=%s", change.key.decode(errors="replace"))
                continue
            if tables[kind] is None:
                tables[kind] = dict(current[kind])
            table = tables[kind]
            ident = parts if arity > 1 else parts[0]
            if change.value is None:
                table.pop(ident, None)
                continue
            obj = decode(model, change.key, change.value)
            if obj is not None and _identity(obj) != ident:
                _report_once(change, "skipping value whose name does not match its key")
                obj = None
            if obj is None:
                # keep the last good version: one bad write must not delete a bridge, a
                # sandbox's rules or anyone's names
                continue
            table[ident] = obj
        frozen = {k: MappingProxyType(v) if v is not None else current[k] for k, v in tables.items()}
        return View(revision=revision, **frozen)

    @classmethod
    def from_kvs(cls, kvs: Iterable[tuple[bytes, bytes]], revision: int, keys: KeyLayout) -> View:
        return cls().apply((Change(k, v) for k, v in kvs), revision, keys)


def decode(model, key: bytes, raw: bytes):
    """Decode one etcd value into ``model``; log (once per key and value) and return None if bad."""
    try:
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        return model.from_dict(data)
    except (ValueError, ValidationError, TypeError, KeyError, AttributeError) as exc:
        _report_once(Change(key, raw), f"skipping malformed value error={str(exc).replace(chr(10), ' ')!r}")
        return None


_reported: dict[bytes, int] = {}  # key -> hash of the bad value already logged


def _report_once(change: Change, message: str) -> None:
    fingerprint = hash(change.value)
    if _reported.get(change.key) == fingerprint:
        return
    if len(_reported) > 10_000:
        _reported.clear()
    _reported[change.key] = fingerprint
    words = message.split(" error=", 1)
    suffix = f" error={words[1]}" if len(words) > 1 else ""
    log.warning("%s; the last good version stays key=%s%s", words[0], change.key.decode(errors="replace"), suffix)


def _identity(obj):
    if isinstance(obj, Endpoint):
        return obj.key
    return obj.name
