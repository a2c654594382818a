"""Health checks: the owner runs ``--health-cmd`` inside the sandbox and reports the result.

As Docker: a task starts ``starting`` (in no answer and no VIP), becomes ``healthy`` on its
first passing check, and ``unhealthy`` after ``retries`` failures in a row (a check that
outlives the interval fails); one pass makes it healthy again. Only changes are reported,
so the registry sees a write per transition, not per check.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Awaitable, Callable

from discovery.state.model import HealthSpec

log = logging.getLogger(__name__)


class HealthState:
    """The pure state machine: feed it results, it says when the health changes."""

    def __init__(self, retries: int, health: str = "starting") -> None:
        self.retries = retries
        self.health = health
        self.failures = 0

    def record(self, passed: bool) -> str | None:
        """The new health if this result changes it, else None."""
        if passed:
            self.failures = 0
            new = "healthy"
        else:
            self.failures += 1
            if self.failures < self.retries:
                return None
            new = "unhealthy"
        if new == self.health:
            return None
        self.health = new
        return new


Report = Callable[[str, str], Awaitable[None]]  # (sandbox, health)


class HealthChecker:
    """One task per checked sandbox."""

    def __init__(self, report: Report) -> None:
        self.report = report
        self._tasks: dict[str, asyncio.Task] = {}

    def start(self, name: str, argv: list[str], spec: HealthSpec, health: str = "starting") -> None:
        """Check ``name`` by running ``argv`` (the check command already wrapped to run inside it)."""
        self.stop(name)
        self._tasks[name] = asyncio.create_task(self._run(name, argv, spec, health), name=f"health-{name}")

    def stop(self, name: str) -> None:
        task = self._tasks.pop(name, None)
        if task is not None:
            task.cancel()

    def stop_all(self) -> None:
        for name in list(self._tasks):
            self.stop(name)

    async def _run(self, name: str, argv: list[str], spec: HealthSpec, health: str) -> None:
        state = HealthState(spec.retries, health)
        while True:
            passed = await check_once(argv, spec.time_limit())
            changed = state.record(passed)
            if changed is not None:
                log.info("health changed sandbox=%s health=%s", name, changed)
                try:
                    await self.report(name, changed)
                except Exception as exc:  # etcd down: say it again on the next change or re-assert
                    log.error("cannot report health sandbox=%s health=%s error=%s", name, changed, exc)
            await asyncio.sleep(spec.interval)


async def check_once(argv: list[str], time_limit: float) -> bool:
    """Run one check; it passes if it exits 0 within ``time_limit`` seconds.

    The check runs in a session of its own, so one that is too slow (or whose task is
    cancelled) is killed with its whole process group: killing only the shell would leave
    what it started (``sh -c 'sleep 1000 & sleep 1000'``) running, one more per interval.
    """
    process = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        start_new_session=True)
    try:
        return await asyncio.wait_for(process.wait(), time_limit) == 0
    except TimeoutError:
        return False
    finally:
        if process.returncode is None:
            _kill_group(process.pid)
            await process.wait()


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:  # all gone already
        pass
