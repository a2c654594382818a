"""Retry loops against etcd: the wait grows from a small minimum to a larger maximum, and a
connection that comes back cuts the wait short."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import aetcd
import grpc

from discovery.state import etcd, lease
from discovery.state.lease import LeaseKeeper


class _FlakyLeases:
    """A client whose first ``failures`` lease grants fail as if etcd were down."""

    channel = None

    def __init__(self, failures: int) -> None:
        self.failures = failures

    async def lease(self, ttl: int):
        if self.failures:
            self.failures -= 1
            raise aetcd.exceptions.ConnectionFailedError("etcd is down")
        return SimpleNamespace(id=0x5EED)

    async def refresh_lease(self, lease_id: int):
        return SimpleNamespace(TTL=10)


def test_lease_retries_back_off_from_the_minimum_to_the_maximum(monkeypatch):
    waits: list[float] = []

    async def pause(client, seconds: float) -> None:
        waits.append(seconds)

    monkeypatch.setattr(lease, "retry_pause", pause)

    async def scenario() -> int:
        keeper = LeaseKeeper(_FlakyLeases(8), ttl=10, min_backoff=0.1, max_backoff=2.0)
        running = asyncio.create_task(keeper.run())
        try:
            return await keeper.current(timeout=5)
        finally:
            running.cancel()
            await asyncio.gather(running, return_exceptions=True)

    assert asyncio.run(scenario()) == 0x5EED
    assert waits == [0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0, 2.0]


class _Channel:
    """A gRPC channel stand-in that becomes READY at a given moment (or is READY already)."""

    def __init__(self, ready_after: float | None) -> None:
        self.ready_at = None if ready_after is None else time.monotonic() + ready_after

    def get_state(self, try_to_connect: bool = False):
        if self.ready_at is None or time.monotonic() >= self.ready_at:
            return grpc.ChannelConnectivity.READY
        return grpc.ChannelConnectivity.TRANSIENT_FAILURE

    async def wait_for_state_change(self, state) -> None:
        while self.get_state() == state:
            await asyncio.sleep(0.01)


def _timed_pause(channel, seconds: float) -> float:
    async def scenario() -> float:
        started = time.monotonic()
        await etcd.retry_pause(SimpleNamespace(channel=channel), seconds)
        return time.monotonic() - started
    return asyncio.run(scenario())


def test_retry_pause_ends_as_soon_as_the_channel_is_ready_again():
    assert _timed_pause(_Channel(ready_after=0.1), 5.0) < 1.0


def test_retry_pause_waits_in_full_when_the_channel_was_ready_all_along():
    """An error on a live connection gets no shortcut: a failing call must never spin."""
    assert _timed_pause(_Channel(ready_after=None), 0.3) >= 0.3
    assert _timed_pause(None, 0.2) >= 0.2  # not connected yet: a plain sleep
