"""Process liveness, shared by the local etcd launcher, the sandbox manager and the tests.

A PID alone does not name a process for long: once it exits, the kernel may hand the
number to another. Where a process must be recognised later (a sandbox's command after an
agent restart), keep its start time beside its PID and pass both.
"""

from __future__ import annotations

import os


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (``/proc/PID/stat`` field 22)."""
    fields = _stat_fields(pid)
    return int(fields[19]) if fields else None


def pid_alive(pid: int, started: int | None = None) -> bool:
    """True if ``pid`` runs (and, given ``started``, is still the process that started then).

    A zombie (exited, not yet reaped) counts as dead.
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    fields = _stat_fields(pid)
    if fields is None or fields[0] == "Z":
        return False
    return started is None or int(fields[19]) == started
