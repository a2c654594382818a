"""Fixtures: a real etcd per test session (and per test where a test stops it)."""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest

from discovery.state.etcd_local import EtcdProcess, free_port
from tests.dnsupstream import TestUpstream
from tests.helpers import Cli, require_root

OUTSIDE_NAME = "outside.example.test"
OUTSIDE_ADDRESS = "203.0.113.7"


def _start_etcd(directory: Path) -> EtcdProcess:
    member = EtcdProcess(directory, free_port(), free_port())
    member.start()
    return member


@pytest.fixture(scope="session")
def etcd(tmp_path_factory) -> EtcdProcess:
    """One etcd for the session; tests keep apart by using their own key prefix."""
    member = _start_etcd(tmp_path_factory.mktemp("etcd"))
    yield member
    member.stop()


@pytest.fixture
def own_etcd(tmp_path) -> EtcdProcess:
    """An etcd this test may stop, restart or compact."""
    member = _start_etcd(tmp_path / "etcd")
    yield member
    member.stop()


@pytest.fixture
def prefix() -> str:
    return f"/svcnet-test-{secrets.token_hex(3)}"


@pytest.fixture(scope="session")
def upstream() -> TestUpstream:
    """The upstream every test agent forwards to: ours, on loopback."""
    server = TestUpstream({OUTSIDE_NAME: OUTSIDE_ADDRESS})
    yield server
    server.close()


@pytest.fixture
def cli(etcd, tmp_path, upstream) -> Cli:
    require_root()
    runner = Cli(etcd.url, "t" + secrets.token_hex(3), tmp_path / "state", upstream.address)
    yield runner
    runner.cleanup()
