"""Keep one etcd lease alive for an owner (agent or sidecar) and re-grant it when lost.

Endpoints are written under the owner's lease: if the owner dies, etcd deletes them after
the TTL and the names leave DNS. If the lease is lost while the owner lives (etcd was down
for longer than the TTL), a new lease is granted and ``on_new_lease`` re-asserts every key
the owner holds: the same level-triggered repair a restart does.

The re-assertion runs as a task of its own, beside the keepalive loop: however long it
takes, the keepalives go on, so a big re-registration can never let the new lease lapse
(the failure mode of re-registering 101 sandboxes one at a time against a 10 s TTL).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

import aetcd

from discovery.errors import EtcdUnavailableError

from .etcd import TRANSIENT_ERRORS, retry_pause

log = logging.getLogger(__name__)


class LeaseKeeper:
    def __init__(
        self,
        client: aetcd.Client,
        ttl: int = 10,
        on_new_lease: Callable[[int], Awaitable[None]] | None = None,
        min_backoff: float = 0.1,
        max_backoff: float = 2.0,
    ) -> None:
        self.client = client
        self.ttl = ttl
        self.on_new_lease = on_new_lease
        self.min_backoff = min_backoff
        self.max_backoff = max_backoff
        self.lease_id: int | None = None
        self.grants = 0
        self.reasserted = asyncio.Event()  # set once the keys of the current lease are all written
        self._granted = asyncio.Event()
        self._last_refresh = 0.0
        self._reassert: asyncio.Task | None = None

    async def current(self, timeout: float | None = None) -> int:
        """The live lease id, waiting (at most ``timeout`` s) for a grant."""
        try:
            await asyncio.wait_for(self._granted.wait(), timeout)
        except TimeoutError:
            raise EtcdUnavailableError("etcd is unreachable: this node holds no lease yet; "
                                       "try again when etcd is back (svcnet ps still works)") from None
        assert self.lease_id is not None
        return self.lease_id

    async def run(self) -> None:
        interval = max(self.ttl / 3, 0.5)
        backoff = self.min_backoff
        try:
            while True:
                try:
                    if self.lease_id is None or time.monotonic() - self._last_refresh > self.ttl:
                        await self._grant()
                    else:
                        reply = await self.client.refresh_lease(self.lease_id)
                        if reply is None or reply.TTL <= 0:
                            log.warning("lease expired, granting a new one lease=%x", self.lease_id)
                            self._lost()
                            continue
                        self._last_refresh = time.monotonic()
                except TRANSIENT_ERRORS as exc:
                    log.warning("lease keepalive failed lease=%s retry_in=%.1fs error=%s",
                                _hex(self.lease_id), backoff, type(exc).__name__)
                    await retry_pause(self.client, backoff)
                    backoff = min(backoff * 2, self.max_backoff)
                    continue
                except aetcd.exceptions.ClientError as exc:  # e.g. "requested lease not found"
                    log.warning("lease lost, granting a new one lease=%s error=%s", _hex(self.lease_id), exc)
                    self._lost()
                    continue
                backoff = self.min_backoff
                await asyncio.sleep(interval)
        finally:
            if self._reassert is not None:
                self._reassert.cancel()

    def _lost(self) -> None:
        self.lease_id = None
        self._granted.clear()
        self.reasserted.clear()

    async def _grant(self) -> None:
        lease = await self.client.lease(self.ttl)
        self.lease_id = lease.id
        self._last_refresh = time.monotonic()
        self.grants += 1
        log.info("lease granted lease=%x ttl=%ss", lease.id, self.ttl)
        self._granted.set()
        if self._reassert is not None:
            self._reassert.cancel()
        self._reassert = asyncio.create_task(self._run_reassert(lease.id), name="lease-reassert")

    async def _run_reassert(self, lease: int) -> None:
        if self.on_new_lease is None:
            self.reasserted.set()
            return
        delay = self.min_backoff
        while self.lease_id == lease:
            started = time.perf_counter()
            try:
                await self.on_new_lease(lease)
            except TRANSIENT_ERRORS as exc:
                log.warning("re-asserting keys failed, retrying lease=%x retry_in=%.1fs error=%s",
                            lease, delay, type(exc).__name__)
                await retry_pause(self.client, delay)
                delay = min(delay * 2, self.max_backoff)
                continue
            except Exception:
                log.exception("re-asserting keys under the new lease failed lease=%x", lease)
            log.info("keys re-asserted lease=%x took_ms=%.1f", lease, (time.perf_counter() - started) * 1000)
            self.reasserted.set()
            return

    async def revoke(self) -> None:
        if self.lease_id is not None:
            try:
                await self.client.revoke_lease(self.lease_id)
            except TRANSIENT_ERRORS:
                pass
            self.lease_id = None


def _hex(value: int | None) -> str:
    return "none" if value is None else f"{value:x}"
