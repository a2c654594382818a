"""Keep one etcd lease alive for an owner (agent or sidecar) and re-grant it when lost.

Endpoints are written under the owner's lease: if the owner dies, etcd deletes them after
the TTL and the names leave DNS. If the lease is lost while the owner lives (etcd was down
for longer than the TTL), a new lease is granted and ``on_new_lease`` re-asserts every key
the owner holds: the same level-triggered repair a restart does.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

import aetcd

from .etcd import TRANSIENT_ERRORS

log = logging.getLogger(__name__)


class LeaseKeeper:
    def __init__(
        self,
        client: aetcd.Client,
        ttl: int = 10,
        on_new_lease: Callable[[int], Awaitable[None]] | None = None,
    ) -> None:
        self.client = client
        self.ttl = ttl
        self.on_new_lease = on_new_lease
        self.lease_id: int | None = None
        self.grants = 0
        self._granted = asyncio.Event()
        self._last_refresh = 0.0

    async def current(self) -> int:
        """The live lease id, waiting for the first grant."""
        await self._granted.wait()
        assert self.lease_id is not None
        return self.lease_id

    async def run(self) -> None:
        interval = max(self.ttl / 3, 0.5)
        while True:
            try:
                if self.lease_id is None or time.monotonic() - self._last_refresh > self.ttl:
                    await self._grant()
                else:
                    reply = await self.client.refresh_lease(self.lease_id)
                    if reply is None or reply.TTL <= 0:
                        log.warning("lease expired, granting a new one lease=%x", self.lease_id)
                        self.lease_id = None
                        continue
                    self._last_refresh = time.monotonic()
            except TRANSIENT_ERRORS as exc:
                log.warning("lease keepalive failed lease=%s error=%s", _hex(self.lease_id), type(exc).__name__)
            await asyncio.sleep(interval)

    async def _grant(self) -> None:
        lease = await self.client.lease(self.ttl)
        self.lease_id = lease.id
        self._last_refresh = time.monotonic()
        self.grants += 1
        log.info("lease granted lease=%x ttl=%ss", lease.id, self.ttl)
        if self.on_new_lease is not None:
            try:
                await self.on_new_lease(lease.id)
            except TRANSIENT_ERRORS:
                self.lease_id = None  # re-grant and re-assert on the next round
                raise
            except Exception:
                log.exception("re-asserting keys under the new lease failed lease=%x", lease.id)
        self._granted.set()

    async def revoke(self) -> None:
        if self.lease_id is not None:
            try:
                await self.client.revoke_lease(self.lease_id)
            except TRANSIENT_ERRORS:
                pass
            self.lease_id = None


def _hex(value: int | None) -> str:
    return "none" if value is None else f"{value:x}"
