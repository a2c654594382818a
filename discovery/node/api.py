"""The node's one HTTP/1.1 server: the JSON API on a unix socket and ``/metrics`` on TCP.

Agent routes (all JSON; errors are ``{"error": MESSAGE, "kind": CLASS}`` with 4xx/5xx):

    GET    /v1/info                 node, prefix, etcd, pid, view revision, readiness
    GET    /v1/sandboxes            every local sandbox
    POST   /v1/sandboxes            create one (body: SandboxSpec fields)
    GET    /v1/sandboxes/NAME       one sandbox
    DELETE /v1/sandboxes/NAME       remove it: its process, veths, netns and registry keys
    GET    /metrics                 Prometheus text (also on --metrics-addr over TCP)

Any HTTP client that speaks unix sockets works, e.g.
``curl --unix-socket /var/lib/svcnet/agent.sock http://svcnet/v1/sandboxes``.

A request the server cannot read (a bad request line, a bad or oversized header or body,
a body that is not a JSON object) gets 400/413/431 with a message; a handler's unexpected
error gets 500 with its message, logged with its traceback on the node, never sent.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from discovery import errors

log = logging.getLogger(__name__)

Handler = Callable[[dict, re.Match], Awaitable[object]]
MAX_BODY = 1 << 20
MAX_LINE = 8192
MAX_HEADERS = 100
_STATUS = {
    errors.ValidationError: 400,
    errors.NotFoundError: 404,
    errors.ConflictError: 409,
    errors.ExhaustedError: 409,
    errors.EtcdUnavailableError: 503,
}
_REASONS = {200: "OK", 201: "Created", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            409: "Conflict", 413: "Payload Too Large", 431: "Request Header Fields Too Large",
            500: "Internal Server Error", 503: "Service Unavailable"}


@dataclass(frozen=True)
class Text:
    """A handler's reply that is not JSON (``/metrics``)."""

    body: str
    content_type: str = "text/plain; version=0.0.4; charset=utf-8"


class _BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class ApiServer:
    def __init__(self) -> None:
        self._routes: list[tuple[str, re.Pattern, Handler]] = []
        self._servers: list[tuple[asyncio.AbstractServer, frozenset[str] | None]] = []

    def route(self, method: str, pattern: str, handler: Handler) -> None:
        self._routes.append((method, re.compile(f"^{pattern}$"), handler))

    async def listen_unix(self, path: Path) -> None:
        """Serve every route on ``path`` (owner-only: the API can create sandboxes)."""
        path.unlink(missing_ok=True)
        server = await asyncio.start_unix_server(lambda r, w: self._serve(r, w, None), path=str(path),
                                                 limit=MAX_LINE)
        path.chmod(0o600)
        self._servers.append((server, None))

    async def listen_tcp(self, host: str, port: int, paths: frozenset[str]) -> tuple[str, int]:
        """Serve only ``paths`` (``/metrics``) on TCP; returns the address bound."""
        server = await asyncio.start_server(lambda r, w: self._serve(r, w, paths), host, port, limit=MAX_LINE)
        self._servers.append((server, paths))
        return server.sockets[0].getsockname()[:2]

    async def close(self) -> None:
        for server, _ in self._servers:
            server.close()
        for server, _ in self._servers:
            await server.wait_closed()
        self._servers.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     paths: frozenset[str] | None) -> None:
        try:
            status, payload = await asyncio.wait_for(self._handle(reader, paths), timeout=120)
        except _BadRequest as exc:
            status, payload = exc.status, {"error": str(exc), "kind": "ValidationError"}
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            writer.close()
            return
        if isinstance(payload, Text):
            body, kind = payload.body.encode(), payload.content_type
        else:
            body, kind = json.dumps(payload).encode(), "application/json"
        head = (f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}\r\nContent-Type: {kind}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
        try:
            writer.write(head.encode() + body)
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def _readline(self, reader: asyncio.StreamReader) -> str:
        try:
            line = await reader.readuntil(b"\n")
        except asyncio.LimitOverrunError:
            raise _BadRequest(431, f"a request line or header is longer than {MAX_LINE} bytes") from None
        except asyncio.IncompleteReadError as exc:
            if exc.partial:
                raise _BadRequest(400, "the request ended in the middle of a line") from None
            raise
        return line.decode("latin-1").rstrip("\r\n")

    async def _handle(self, reader: asyncio.StreamReader, paths: frozenset[str] | None) -> tuple[int, object]:
        request_line = (await self._readline(reader)).split()
        if len(request_line) != 3 or not request_line[2].startswith("HTTP/"):
            raise _BadRequest(400, "malformed request line; expected 'METHOD /path HTTP/1.1'")
        method, target, _ = request_line
        length = 0
        for _ in range(MAX_HEADERS + 1):
            line = await self._readline(reader)
            if not line:
                break
            name, colon, value = line.partition(":")
            if not colon:
                raise _BadRequest(400, f"malformed header line {line[:60]!r}")
            if name.strip().lower() == "content-length":
                if not value.strip().isdigit():
                    raise _BadRequest(400, f"Content-Length {value.strip()[:20]!r} is not a number")
                length = int(value.strip())
        else:
            raise _BadRequest(431, f"more than {MAX_HEADERS} header lines")
        if length > MAX_BODY:
            raise _BadRequest(413, f"request body over {MAX_BODY} bytes")
        raw = await reader.readexactly(length) if length else b""
        try:
            body = json.loads(raw) if raw else {}
        except ValueError:
            raise _BadRequest(400, "request body is not JSON") from None
        if not isinstance(body, dict):
            raise _BadRequest(400, "request body must be a JSON object")
        path = target.split("?", 1)[0]
        if paths is not None and path not in paths:
            return 404, {"error": f"only {', '.join(sorted(paths))} is served here", "kind": "NotFoundError"}
        allowed = False
        for route_method, pattern, handler in self._routes:
            match = pattern.match(path)
            if not match:
                continue
            allowed = True
            if route_method != method:
                continue
            try:
                result = await handler(body, match)
            except errors.SvcnetError as exc:
                return _STATUS.get(type(exc), 400), {"error": str(exc), "kind": type(exc).__name__}
            except Exception as exc:  # the node keeps serving; the caller learns what broke, not how
                log.exception("api handler failed method=%s path=%s", method, path)
                return 500, {"error": f"internal error: {type(exc).__name__}: {exc}; see the node's log",
                             "kind": "SvcnetError"}
            return (201 if method == "POST" else 200), result
        if allowed:
            return 405, {"error": f"{method} is not allowed on {path}", "kind": "ValidationError"}
        return 404, {"error": f"no such endpoint {path}", "kind": "NotFoundError"}
