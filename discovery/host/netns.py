"""Entering network namespaces from a thread, with the standard library only.

Kept apart from ``netlink`` (which needs pyroute2) so that what a restarted node needs
first, its DNS sockets inside every sandbox, loads and runs without pyroute2 or iptc.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

NETNS_DIR = Path("/run/netns")


def netns_path(name_or_path: str) -> str:
    return name_or_path if "/" in name_or_path else str(NETNS_DIR / name_or_path)


def netns_exists(path: str) -> bool:
    return os.path.exists(path)


# ---- namespaces --------------------------------------------------------------------

_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@contextmanager
def entered_netns(path: str) -> Iterator[None]:
    """Run the block with this thread in the netns at ``path``; sockets made there stay there.

    Only for short blocks on worker threads: the thread is switched back on exit.
    """
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(path, os.O_RDONLY)
        try:
            _setns(target)
        finally:
            os.close(target)
        try:
            yield
        finally:
            _setns(own)
    finally:
        os.close(own)


def leave_for(path: str, host: str) -> str:
    """Hold the netns at ``path`` open, then move this (still single-threaded) process into
    ``host``; returns a path that names the held netns from there on (``/proc/PID/fd/N``).

    For a sidecar that starts inside the netns it serves (compose ``network_mode:
    service:APP``) but must make veths and reach etcd in the host's.
    """
    import threading

    if threading.active_count() != 1:
        raise RuntimeError("leave_for() must run before any thread starts: setns moves only the calling thread")
    held = os.open(path, os.O_RDONLY)  # kept open for the process's life
    if host == "parent":
        host = _ancestor_netns(path)
    try:
        target = os.open(host, os.O_RDONLY)
    except OSError as exc:
        os.close(held)
        raise FileNotFoundError(f"cannot open the host netns {host!r}: {exc.strerror}") from None
    try:
        _setns(target)
    finally:
        os.close(target)
    return f"/proc/{os.getpid()}/fd/{held}"


def _ancestor_netns(path: str) -> str:
    """The netns of the nearest ancestor process that is not in ``path``'s: for a container
    with pid: host, its runtime shim's, which is the host's (/proc/1 may not be readable)."""
    inside = os.stat(path).st_ino
    pid = os.getppid()
    while pid > 1:
        candidate = f"/proc/{pid}/ns/net"
        try:
            if os.stat(candidate).st_ino != inside:
                return candidate
            with open(f"/proc/{pid}/stat") as stat:
                pid = int(stat.read().rsplit(")", 1)[1].split()[1])
        except OSError:
            break
    raise FileNotFoundError("no parent process in another netns: a sidecar container needs pid: host "
                            "(or give --host-netns /proc/PID/ns/net of a process in the host's netns)")
