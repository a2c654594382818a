"""The harness's verbs as a test uses them, and one cluster per test module."""

from __future__ import annotations

import contextlib
import subprocess
from pathlib import Path

from tests.helpers import require_root, require_tools

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = str(ROOT / "scripts" / "cluster.sh")
TASK_SERVER = str(ROOT / "tests" / "taskserver.py")


class Cluster:
    def __init__(self, directory: Path) -> None:
        self.env = {"SVCNET_CLUSTER_DIR": str(directory), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}

    def run(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        result = subprocess.run([CLUSTER, *args], env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"cluster.sh {' '.join(args)} exited {result.returncode}: {result.stderr[-2000:]}")
        return result

    def on(self, host: str, *argv: str, check: bool = True) -> str:
        return self.run("on", host, "--", *argv, check=check).stdout

    def svcnet(self, host: str, *argv: str) -> str:
        return self.on(host, "svcnet", *argv)

    def dig(self, host: str, sandbox: str, name: str) -> list[str]:
        out = self.on(host, "svcnet", "exec", sandbox, "--", "dig", "+short", "+tries=1", "+time=1", name, check=False)
        return sorted(line for line in out.splitlines() if line and not line.startswith(";;"))


@contextlib.contextmanager
def cluster_up(directory: Path, *args: str):
    """``scripts/cluster.sh up 3 ARGS`` for the block, ``down`` after it (also on failure)."""
    require_root()
    require_tools("ip", "nsenter", "etcd", "etcdctl", "dig", "curl")
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    if "svccl-" in listed:
        raise AssertionError("a scripts/cluster.sh cluster is up already: 'scripts/cluster.sh down' it first")
    harness = Cluster(directory)
    try:
        out = harness.run("up", "3", *args).stdout
        assert [line.split()[0] for line in out.splitlines() if line.startswith("h")] == ["h1", "h2", "h3"], out
        yield harness
    finally:
        harness.run("down", check=False)
