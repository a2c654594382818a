"""The last View, kept on disk so a node that starts without etcd still answers.

A restarted agent (or one started while etcd is down) loads this before it talks to etcd,
so every name it knew still resolves and every VIP still balances within a second of
starting; when etcd answers, the watch lists afresh and the View catches up.

The file is JSON ``{"format", "prefix", "revision", "digest", "objects"}``, written to a
temporary file and renamed (atomic), versioned by ``format``, and checked on load: a file
of another format or prefix, or whose digest does not match its objects, is ignored with a
log line, never half-used.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
from pathlib import Path

from discovery.files import write_atomically

from .keys import KeyLayout
from .view import View

log = logging.getLogger(__name__)

FORMAT = 2


def canonical(value) -> str:
    """The one JSON text of an object's dict that the digest covers."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _digest(texts: list[tuple[str, str]]) -> str:
    """sha256 over every (key, canonical object) pair, in key order."""
    hasher = hashlib.sha256()
    for key, text in texts:
        hasher.update(key.encode())
        hasher.update(b"\0")
        hasher.update(text.encode())
        hasher.update(b"\n")
    return hasher.hexdigest()


class Encoder:
    """Encodes Views for saving, remembering each object's JSON text while the object is
    the same one: Views share unchanged objects, so saving a View of 10,000 services after
    one change encodes one object, not 10,000. The keys' order is kept too (new keys are
    inserted, not the whole list sorted again): the save runs in a worker thread, and a
    sort of 40,000 keys is one C call that holds the GIL, and the event loop, ~20 ms."""

    def __init__(self) -> None:
        self._texts: dict[str, tuple[object, str]] = {}
        self._order: list[str] = []
        self._tables: dict[str, tuple[object, dict[str, tuple[object, str]]]] = {}  # kind -> (table, texts)

    def texts(self, view: View, keys: KeyLayout) -> list[tuple[str, str]]:
        texts: dict[str, tuple[object, str]] = {}
        for kind, table, key_of in (("networks", view.networks, lambda n: keys.network(n.name)),
                                    ("services", view.services, lambda s: keys.service(s.name)),
                                    ("endpoints", view.endpoints, lambda e: keys.endpoint(*e.key)),
                                    ("nodes", view.nodes, lambda n: keys.node(n.name))):
            texts.update(self._kind_texts(kind, table, key_of))
        known = self._texts
        gone = [key for key in known if key not in texts]
        if gone:
            dropped = set(gone)
            self._order = [key for key in self._order if key not in dropped]
        for key in texts:
            if key not in known:
                bisect.insort(self._order, key)
        self._texts = texts
        return [(key, texts[key][1]) for key in self._order]

    def _kind_texts(self, kind: str, table, key_of) -> dict[str, tuple[object, str]]:
        """One kind's texts; a table that is the very one of the last save (the View's maps
        are persistent: an untouched kind keeps its map) is not walked at all."""
        last = self._tables.get(kind)
        if last is not None and last[0] is table:
            return last[1]
        before = last[1] if last is not None else {}
        texts = {}
        for obj in table.values():
            key = key_of(obj).decode()
            done = before.get(key)
            texts[key] = done if done is not None and done[0] is obj else (obj, canonical(obj.to_dict()))
        self._tables[kind] = (table, texts)
        return texts


def save(view: View, keys: KeyLayout, path: Path, encoder: Encoder | None = None) -> None:
    """Write ``view`` to ``path`` atomically (temp file, fsync, rename)."""
    texts = (encoder or Encoder()).texts(view, keys)
    head = json.dumps({"format": FORMAT, "prefix": keys.prefix, "revision": view.revision,
                       "digest": _digest(texts)}, separators=(",", ":"))
    objects = ",".join(f"[{json.dumps(key)},{text}]" for key, text in texts)
    write_atomically(path, f'{head[:-1]},"objects":[{objects}]}}'.encode())


def load(keys: KeyLayout, path: Path) -> View | None:
    """The View saved at ``path``, or None (logged) if there is none or it is unusable."""
    try:
        document = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("ignoring unreadable view snapshot path=%s error=%s", path, exc)
        return None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        log.warning("ignoring view snapshot of another format path=%s format=%s", path,
                    document.get("format") if isinstance(document, dict) else None)
        return None
    if document.get("prefix") != keys.prefix:
        log.warning("ignoring view snapshot of another prefix path=%s prefix=%s", path, document.get("prefix"))
        return None
    objects = document.get("objects")
    if not isinstance(objects, list):
        log.warning("ignoring malformed view snapshot path=%s error='no list of objects'", path)
        return None
    try:
        texts = [(key, canonical(value)) for key, value in objects]
        if document.get("digest") != _digest(texts):
            log.warning("ignoring view snapshot whose digest does not match path=%s", path)
            return None
        return View.from_kvs([(key.encode(), text.encode()) for key, text in texts], int(document["revision"]), keys)
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        log.warning("ignoring malformed view snapshot path=%s error=%s", path, exc)
        return None
