"""One etcd watch per process, feeding the View.

The loop lists the prefix once, then watches from the next revision. Events that arrive
together are applied as one batch, so a transaction that wrote ten keys yields one new
View. When etcd goes away the last View stays in place and is served; the watch resumes
from the last revision it saw, so no change is missed; if etcd compacted that revision
meanwhile, the loop lists again and rebuilds the View from scratch.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

import aetcd

from .etcd import TRANSIENT_ERRORS, retry_pause
from .keys import KeyLayout
from .view import Change, View

log = logging.getLogger(__name__)

Subscriber = Callable[[View], Awaitable[None] | None]


class ViewWatcher:
    def __init__(
        self,
        client: aetcd.Client,
        keys: KeyLayout,
        min_backoff: float = 0.1,
        max_backoff: float = 2.0,
    ) -> None:
        self.client = client
        self.keys = keys
        self.view = View()
        self.min_backoff = min_backoff
        self.max_backoff = max_backoff
        self.relists = 0
        self.reconnects = 0
        self.connected = False
        self.last_contact = 0.0
        self._subscribers: list[Subscriber] = []
        self._changed = asyncio.Condition()
        self._ready = asyncio.Event()
        self._hold: Callable[[], Awaitable[object]] | None = None
        self._hold_timeout = 0.0

    def hold_first_list(self, until: Callable[[], Awaitable[object]], timeout: float) -> None:
        """Before the first listing, wait (at most ``timeout`` s per try) for ``until()``.

        A node restarted after its lease ran out would otherwise list a registry without
        its own endpoints and, for the moment until it has written them again, take its own
        tasks out of every answer and VIP: it waits for its re-registration instead."""
        self._hold, self._hold_timeout = until, timeout

    def subscribe(self, subscriber: Subscriber) -> None:
        """Call ``subscriber(view)`` after every new View (sync or async callables)."""
        self._subscribers.append(subscriber)

    async def seed(self, view: View) -> None:
        """Serve ``view`` (a snapshot from disk) until the first listing replaces it."""
        await self._publish(view)

    @property
    def listed(self) -> bool:
        """True once etcd has been listed at least once by this process."""
        return self._ready.is_set()

    async def ready(self) -> View:
        """Wait for the first listing."""
        await self._ready.wait()
        return self.view

    async def wait_for(self, predicate: Callable[[View], bool], timeout: float | None = None) -> View:
        """Wait until ``predicate(view)`` holds; for tests, benchmarks and the CLI."""
        async def waiter() -> View:
            async with self._changed:
                await self._changed.wait_for(lambda: predicate(self.view))
                return self.view
        return await asyncio.wait_for(waiter(), timeout)

    async def run(self) -> None:
        backoff = self.min_backoff
        need_list = True
        while True:
            try:
                if need_list:
                    if self._hold is not None and not self.listed:
                        try:
                            await asyncio.wait_for(self._hold(), self._hold_timeout)
                        except TimeoutError:
                            log.info("listing the registry before this node re-registered its endpoints")
                    await self._list()
                    need_list = False
                await self._watch()
            except aetcd.exceptions.RevisionCompactedError as exc:
                log.warning("watch revision compacted, listing again revision=%s compacted=%s",
                            self.view.revision, exc.compacted_revision)
                self.relists += 1
                need_list = True
                continue
            except TRANSIENT_ERRORS as exc:
                self.connected = False
                self.reconnects += 1
                log.warning("etcd unreachable, serving last view revision=%s retry_in=%.1fs error=%s",
                            self.view.revision, backoff, type(exc).__name__)
                await retry_pause(self.client, backoff)
                backoff = min(backoff * 2, self.max_backoff)
                continue
            backoff = self.min_backoff

    async def _list(self) -> None:
        result = await self.client.get_prefix(self.keys.root())
        view = View.from_kvs(((kv.key, kv.value) for kv in result), result.header.revision, self.keys)
        self.connected = True
        self.last_contact = time.monotonic()
        log.info("listed registry revision=%s networks=%d services=%d endpoints=%d",
                 view.revision, len(view.networks), len(view.services), len(view.endpoints))
        await self._publish(view)
        self._ready.set()

    async def _watch(self) -> None:
        pending: list[Change] = []
        wake = asyncio.Event()
        revision = self.view.revision
        watch = await self.client.watch_prefix(self.keys.root(), start_revision=revision + 1)
        self.connected = True
        self.last_contact = time.monotonic()

        async def read() -> None:
            nonlocal revision
            async for event in watch:
                value = event.kv.value if event.kind == "PUT" else None
                pending.append(Change(event.kv.key, value))
                revision = max(revision, event.kv.mod_revision)
                wake.set()

        reader = asyncio.ensure_future(read())
        try:
            while True:
                waiter = asyncio.ensure_future(wake.wait())
                done, _ = await asyncio.wait({reader, waiter}, return_when=asyncio.FIRST_COMPLETED)
                if waiter not in done:
                    waiter.cancel()
                if pending:
                    batch, pending[:] = list(pending), []
                    wake.clear()
                    self.last_contact = time.monotonic()
                    await self._publish(self.view.apply(batch, revision, self.keys))
                if reader in done:
                    reader.result()  # raises the watch's error, if any
                    raise aetcd.exceptions.ConnectionFailedError("watch stream ended")
        finally:
            reader.cancel()
            try:
                await watch.cancel()
            except Exception:  # the stream may already be gone with the connection
                pass

    async def _publish(self, view: View) -> None:
        self.view = view
        # subscribers first: whoever waits for a View may rely on what they built from it
        for subscriber in self._subscribers:
            try:
                result = subscriber(view)
                if asyncio.iscoroutine(result):
                    await result
            except Exception:
                log.exception("view subscriber failed revision=%s", view.revision)
        async with self._changed:
            self._changed.notify_all()
