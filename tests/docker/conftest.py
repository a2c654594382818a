"""The Docker lane: a real dockerd (scripts/docker-setup.sh starts one) and real containers.

Every container a test makes carries the label ``svcnet.test-run=<run id>`` and a name
starting with the run id, so a crashed run is swept with
``docker rm -f $(docker ps -aq --filter label=svcnet.test-run)``.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

BUSYBOX_TOOLS = ("sh", "sleep", "httpd", "hostname", "cat", "touch", "rm", "test", "true", "false")
# the tag changes with the tool list: an image made by an older list is not reused
TEST_IMAGE = "svcnet-test-busybox:" + hashlib.sha1(" ".join(BUSYBOX_TOOLS).encode()).hexdigest()[:8]


def docker(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    result = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} exited {result.returncode}: {result.stderr.strip()}")
    return result


@pytest.fixture(scope="session")
def docker_engine() -> None:
    if shutil.which("docker") is None:
        raise AssertionError("the Docker lane needs the docker CLI: run scripts/docker-setup.sh install")
    info = docker("info", "--format", "{{.ServerVersion}}", check=False)
    if info.returncode != 0:
        raise AssertionError(f"no Docker engine answers ({info.stderr.strip()[:200]}): "
                             "run scripts/docker-setup.sh start")


@pytest.fixture(scope="session")
def test_image(docker_engine) -> str:
    """A 2 MB image of the host's busybox (no registry needed): sh, httpd, sleep."""
    busybox = shutil.which("busybox")
    if busybox is None:
        raise AssertionError("the Docker lane needs busybox-static: scripts/install-deps.sh installs it")
    if docker("image", "inspect", TEST_IMAGE, check=False).returncode != 0:
        with tempfile.TemporaryDirectory(prefix="svcnet-testimage-") as root:
            for directory in ("bin", "www", "tmp", "etc"):
                (Path(root) / directory).mkdir()
            shutil.copy(busybox, Path(root) / "bin" / "busybox")
            for tool in BUSYBOX_TOOLS:
                (Path(root) / "bin" / tool).symlink_to("busybox")
            tar = subprocess.Popen(["tar", "-C", root, "-c", "."], stdout=subprocess.PIPE)
            subprocess.run(["docker", "import", "-", TEST_IMAGE], stdin=tar.stdout, check=True,
                           capture_output=True, timeout=120)
            tar.wait()
    return TEST_IMAGE
