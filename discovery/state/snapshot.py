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

FORMAT = 1


def _objects(view: View, keys: KeyLayout) -> list[tuple[str, dict]]:
    objects = [(keys.network(n.name), n) for n in view.networks.values()]
    objects += [(keys.service(s.name), s) for s in view.services.values()]
    objects += [(keys.endpoint(*e.key), e) for e in view.endpoints.values()]
    objects += [(keys.node(n.name), n) for n in view.nodes.values()]
    return sorted((key.decode(), obj.to_dict()) for key, obj in objects)


def _digest(objects: list) -> str:
    return hashlib.sha256(json.dumps(objects, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def save(view: View, keys: KeyLayout, path: Path) -> None:
    """Write ``view`` to ``path`` atomically (temp file, fsync, rename)."""
    objects = _objects(view, keys)
    document = {"format": FORMAT, "prefix": keys.prefix, "revision": view.revision,
                "digest": _digest(objects), "objects": objects}
    write_atomically(path, json.dumps(document, separators=(",", ":")).encode())


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
    if not isinstance(objects, list) or document.get("digest") != _digest(objects):
        log.warning("ignoring view snapshot whose digest does not match path=%s", path)
        return None
    try:
        kvs = [(key.encode(), json.dumps(value).encode()) for key, value in objects]
        return View.from_kvs(kvs, int(document["revision"]), keys)
    except (TypeError, ValueError, KeyError) as exc:
        log.warning("ignoring malformed view snapshot path=%s error=%s", path, exc)
        return None
