"""The agent API's client: HTTP/1.1 JSON over the agent's unix socket, standard library only.

The CLI imports this and nothing heavier for commands that only talk to the agent, so
`svcnet ps` starts in a few tens of milliseconds. Routes are listed in ``node/api.py``.
"""

from __future__ import annotations

import http.client
import json
import socket
from pathlib import Path

from discovery import errors


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("svcnet", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


class ApiClient:
    def __init__(self, socket_path: Path, timeout: float = 120.0) -> None:
        self.socket_path = socket_path
        self.timeout = timeout

    def call(self, method: str, path: str, body: object | None = None) -> object:
        """Send one request; raise the SvcnetError subclass the agent reported."""
        connection = _UnixConnection(str(self.socket_path), self.timeout)
        try:
            payload = json.dumps(body).encode() if body is not None else None
            headers = {"Content-Type": "application/json"} if payload else {}
            connection.request(method, path, body=payload, headers=headers)
            response = connection.getresponse()
            data = json.loads(response.read() or b"null")
        except (OSError, http.client.HTTPException) as exc:
            raise errors.AgentUnavailableError(
                f"cannot talk to the svcnet agent at {self.socket_path}: {exc}"
            ) from None
        finally:
            connection.close()
        if response.status >= 400:
            kind = getattr(errors, str(data.get("kind")), errors.SvcnetError) if isinstance(data, dict) else errors.SvcnetError
            if not (isinstance(kind, type) and issubclass(kind, errors.SvcnetError)):
                kind = errors.SvcnetError
            raise kind(data.get("error", f"agent answered HTTP {response.status}") if isinstance(data, dict) else str(data))
        return data
