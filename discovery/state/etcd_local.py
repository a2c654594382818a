"""Start and reuse a local single-member etcd (Debian's ``etcd`` binary).

Used when no ``--etcd`` is given, by the test suite and by the benchmarks: one way to run
etcd everywhere.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from discovery.errors import EtcdUnavailableError
from discovery.files import write_atomically
from discovery.procs import pid_alive

INSTALL_HINT = (
    "the etcd binary was not found on PATH; install it with "
    "'apt-get install etcd-server' (Debian/Ubuntu) or point svcnet at a running "
    "cluster with --etcd http://HOST:2379"
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# Loopback health checks must not follow an http_proxy from the environment.
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def healthy(url: str, timeout: float = 0.5) -> bool:
    """etcd's /health says true: it has a leader and serves requests."""
    try:
        with _NO_PROXY.open(f"{url}/health", timeout=timeout) as response:
            return json.loads(response.read()).get("health") == "true"
    except (OSError, ValueError):
        return False


@dataclass
class EtcdProcess:
    """One etcd member on loopback with its data in ``data_dir``."""

    data_dir: Path
    client_port: int
    peer_port: int
    pid: int | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    def start(self, log_path: Path | None = None, timeout: float = 15.0) -> None:
        binary = shutil.which("etcd")
        if binary is None:
            raise EtcdUnavailableError(INSTALL_HINT)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        peer = f"http://127.0.0.1:{self.peer_port}"
        log = open(log_path or self.data_dir / "etcd.log", "ab")
        proc = subprocess.Popen(
            [
                binary,
                "--name", "svcnet",
                "--data-dir", str(self.data_dir / "member-data"),
                "--listen-client-urls", self.url,
                "--advertise-client-urls", self.url,
                "--listen-peer-urls", peer,
                "--initial-advertise-peer-urls", peer,
                "--initial-cluster", f"svcnet={peer}",
                "--logger", "zap",
                "--log-outputs", "stderr",
            ],
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()
        self.pid = proc.pid
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise EtcdUnavailableError(
                    f"etcd exited with code {proc.returncode} at start; see {log_path or self.data_dir / 'etcd.log'}"
                )
            if healthy(self.url):
                return
            time.sleep(0.05)
        self.stop()
        raise EtcdUnavailableError(f"etcd did not become healthy on {self.url} within {timeout:.0f}s")

    def stop(self, timeout: float = 10.0) -> None:
        if self.pid is None:
            return
        try:
            os.kill(self.pid, signal.SIGTERM)
        except ProcessLookupError:
            self.pid = None
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                done, _ = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                done = self.pid if not pid_alive(self.pid) else 0
            if done:
                break
            time.sleep(0.05)
        else:
            os.kill(self.pid, signal.SIGKILL)
        self.pid = None


def ensure_local_etcd(state_dir: Path) -> str:
    """Return the URL of svcnet's own local etcd, starting it if it is not running."""
    home = state_dir / "etcd"
    home.mkdir(parents=True, exist_ok=True)
    meta_path = home / "member.json"
    meta = {}
    if meta_path.exists():
        try:
            meta = json.loads(meta_path.read_text())
        except ValueError:
            meta = {}
    if meta.get("pid") and pid_alive(meta["pid"]) and healthy(f"http://127.0.0.1:{meta['client_port']}"):
        return f"http://127.0.0.1:{meta['client_port']}"
    # Keep the ports we had so a restarted etcd keeps its member URLs.
    member = EtcdProcess(home, meta.get("client_port") or free_port(), meta.get("peer_port") or free_port())
    member.start(home / "etcd.log")
    write_atomically(meta_path, json.dumps(
        {"pid": member.pid, "client_port": member.client_port, "peer_port": member.peer_port}
    ).encode())
    return member.url
