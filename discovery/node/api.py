"""A small HTTP/1.1 JSON API over a unix socket: the agent serves it, the CLI calls it.

Routes (all JSON; errors are ``{"error": MESSAGE, "kind": CLASS}`` with 4xx/5xx):

    GET    /v1/info                 agent's node, prefix, etcd, pid, view revision
    GET    /v1/sandboxes            every local sandbox
    POST   /v1/sandboxes            create one (body: SandboxSpec fields)
    GET    /v1/sandboxes/NAME       one sandbox
    DELETE /v1/sandboxes/NAME       remove it: its process, veths, netns and registry keys

Any HTTP client that speaks unix sockets works, e.g.
``curl --unix-socket /var/lib/svcnet/agent.sock http://svcnet/v1/sandboxes``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Awaitable, Callable
from pathlib import Path

from discovery import errors

log = logging.getLogger(__name__)

Handler = Callable[[dict, re.Match], Awaitable[object]]
MAX_BODY = 1 << 20
_STATUS = {
    errors.ValidationError: 400,
    errors.NotFoundError: 404,
    errors.ConflictError: 409,
    errors.ExhaustedError: 409,
    errors.EtcdUnavailableError: 503,
}
_REASONS = {200: "OK", 201: "Created", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            409: "Conflict", 413: "Payload Too Large", 500: "Internal Server Error", 503: "Service Unavailable"}


class ApiServer:
    def __init__(self) -> None:
        self._routes: list[tuple[str, re.Pattern, Handler]] = []
        self._server: asyncio.AbstractServer | None = None

    def route(self, method: str, pattern: str, handler: Handler) -> None:
        self._routes.append((method, re.compile(f"^{pattern}$"), handler))

    async def start(self, path: Path) -> None:
        if path.exists():
            path.unlink()
        self._server = await asyncio.start_unix_server(self._serve, path=str(path))
        path.chmod(0o600)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            status, payload = await asyncio.wait_for(self._handle(reader), timeout=120)
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            writer.close()
            return
        body = json.dumps(payload).encode()
        head = (f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
        try:
            writer.write(head.encode() + body)
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def _handle(self, reader: asyncio.StreamReader) -> tuple[int, object]:
        request_line = (await reader.readline()).decode("latin-1").split()
        if len(request_line) != 3:
            return 400, {"error": "malformed request line", "kind": "ValidationError"}
        method, target, _ = request_line
        length = 0
        while True:
            line = (await reader.readline()).decode("latin-1").strip()
            if not line:
                break
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value.strip() or 0)
        if length > MAX_BODY:
            return 413, {"error": "request body too large", "kind": "ValidationError"}
        raw = await reader.readexactly(length) if length else b""
        try:
            body = json.loads(raw) if raw else {}
        except ValueError:
            return 400, {"error": "request body is not JSON", "kind": "ValidationError"}
        path = target.split("?", 1)[0]
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
            except Exception as exc:  # the agent keeps serving; the caller learns what broke
                log.exception("api handler failed method=%s path=%s", method, path)
                return 500, {"error": f"internal error: {exc}", "kind": "SvcnetError"}
            return (201 if method == "POST" else 200), result
        if allowed:
            return 405, {"error": f"{method} is not allowed on {path}", "kind": "ValidationError"}
        return 404, {"error": f"no such endpoint {path}", "kind": "NotFoundError"}
