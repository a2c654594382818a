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
