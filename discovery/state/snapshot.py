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

import hashlib
import json
import logging
from pathlib import Path

from discovery.files import write_atomically

from .keys import KeyLayout
from .view import View

log = logging.getLogger(__name__)

FORMAT = 3
OBJECTS_MARK = ',"objects":['


def canonical(value) -> str:
    """The one JSON text of an object's dict that the digest covers."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _line(key: str, value) -> str:
    return f"[{json.dumps(key)},{canonical(value)}]"


def _digest(objects: str) -> str:
    """sha256 of the objects array's text (hashlib lets go of the GIL over a large buffer:
    the event loop keeps answering while 40,000 objects are hashed)."""
    return hashlib.sha256(objects.encode()).hexdigest()


class Encoder:
    """Encodes Views for saving, remembering each object's line while the object is the same
    one: Views share unchanged objects, and their maps are persistent (an untouched kind keeps
    its very map), so saving a View of 10,000 services after one change walks one kind and
    encodes one object, and an untouched kind's joined text is reused whole. The save runs in
    a worker thread that holds the GIL while it runs Python: at 10,000 services a save walked,
    encoded and hashed 40,000 objects in ~100 ms; now ~10 ms (``bench/scale_bench.py``)."""

    def __init__(self) -> None:
        # kind -> (its map as last saved, map key -> (object, line), the lines joined)
        self._kinds: dict[str, tuple[object, dict, str]] = {}

    def objects(self, view: View, keys: KeyLayout) -> str:
        """The text of the objects array, without its brackets."""
        chunks = []
        for kind, table, key_of in (("networks", view.networks, lambda n: keys.network(n.name)),
                                    ("services", view.services, lambda s: keys.service(s.name)),
                                    ("endpoints", view.endpoints, lambda e: keys.endpoint(*e.key)),
                                    ("nodes", view.nodes, lambda n: keys.node(n.name))):
            joined = self._kind(kind, table, key_of)
            if joined:
                chunks.append(joined)
        return ",".join(chunks)

    def _kind(self, kind: str, table, key_of) -> str:
        last = self._kinds.get(kind)
        if last is not None and last[0] is table:
            return last[2]
        before = last[1] if last is not None else {}
        lines = {}
        for name, obj in table.items():
            done = before.get(name)
            lines[name] = done if done is not None and done[0] is obj else (
                obj, _line(key_of(obj).decode(), obj.to_dict()))
        joined = ",".join(line for _, line in lines.values())
        self._kinds[kind] = (table, lines, joined)
        return joined


def save(view: View, keys: KeyLayout, path: Path, encoder: Encoder | None = None) -> None:
    """Write ``view`` to ``path`` atomically (temp file, fsync, rename)."""
    objects = (encoder or Encoder()).objects(view, keys)
    head = json.dumps({"format": FORMAT, "prefix": keys.prefix, "revision": view.revision,
                       "digest": _digest(objects)}, separators=(",", ":"))
    write_atomically(path, f"{head[:-1]}{OBJECTS_MARK}{objects}]}}".encode())


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
        # the digest covers the objects as save() writes them, re-encoded from what was
        # parsed: an edited value, a lost or added object, or another order fails it
        if document.get("digest") != _digest(",".join(_line(key, value) for key, value in objects)):
            log.warning("ignoring view snapshot whose digest does not match path=%s", path)
            return None
        return View.from_kvs([(key.encode(), canonical(value).encode()) for key, value in objects],
                             int(document["revision"]), keys)
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        log.warning("ignoring malformed view snapshot path=%s error=%s", path, exc)
        return None
