"""The agent API's client: HTTP/1.1 JSON over the agent's unix socket, standard library only.

The CLI imports this and nothing heavier for commands that only talk to the agent, so
`svcnet ps` starts in a few tens of milliseconds. Routes are listed in ``node/api.py``.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

from discovery import errors


class ApiClient:
    """One request per connection (the server closes it), read to the end: no http.client,
    whose import (email parsing included) would cost every CLI call more than the call."""

    def __init__(self, socket_path: Path, timeout: float = 120.0) -> None:
        self.socket_path = socket_path
        self.timeout = timeout

    def call(self, method: str, path: str, body: object | None = None) -> object:
        """Send one request; raise the SvcnetError subclass the agent reported."""
        payload = json.dumps(body).encode() if body is not None else b""
        head = (f"{method} {path} HTTP/1.1\r\nHost: svcnet\r\nContent-Length: {len(payload)}\r\n"
                + ("Content-Type: application/json\r\n" if payload else "") + "Connection: close\r\n\r\n")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(self.timeout)
                sock.connect(str(self.socket_path))
                sock.sendall(head.encode() + payload)
                chunks = []
                while chunk := sock.recv(65536):
                    chunks.append(chunk)
            status, data = _parse(b"".join(chunks))
        except (OSError, ValueError) as exc:
            raise errors.AgentUnavailableError(
                f"cannot talk to the svcnet agent at {self.socket_path}: {exc}"
            ) from None
        if status >= 400:
            kind = getattr(errors, str(data.get("kind")), errors.SvcnetError) if isinstance(data, dict) else errors.SvcnetError
            if not (isinstance(kind, type) and issubclass(kind, errors.SvcnetError)):
                kind = errors.SvcnetError
            raise kind(data.get("error", f"agent answered HTTP {status}") if isinstance(data, dict) else str(data))
        return data


def _parse(response: bytes) -> tuple[int, object]:
    head, separator, body = response.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].split()
    if not separator or len(status_line) < 2 or not status_line[1].isdigit():
        raise ValueError("the agent's answer is not HTTP (connection closed early?)")
    return int(status_line[1]), json.loads(body or b"null")
