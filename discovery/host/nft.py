"""nftables through libnftables, the library ``nft`` itself is built on (ctypes, no package).

Chosen by measurement over pyroute2's nftables module (issue 13's note): pyroute2 0.9 can
add plain set elements (0.45 ms each here) but not map elements with data, concatenated
keys, verdict maps or rules with ``numgen``/map lookups, which is all the LB needs;
libnftables does all of it from ``nft``'s own syntax, 0.2-0.6 ms per element transaction.

A context's netlink socket is opened when the context is made, in the netns of the thread
making it, and stays there: ``Nft.open(netns)`` makes one inside a netns and later calls run
from any thread without ``setns``. A context is not thread-safe: one user at a time.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import json
import logging
import threading
import weakref

from .netns import entered_netns

log = logging.getLogger(__name__)

_OUTPUT_JSON = 1 << 4
_OUTPUT_TERSE = 1 << 11  # leave set elements out of listings


class NftError(OSError):
    """A command nft refused; the message is nft's own (it names the offending part)."""


@functools.cache
def _lib() -> ctypes.CDLL:
    name = ctypes.util.find_library("nftables") or "libnftables.so.1"
    lib = ctypes.CDLL(name)
    lib.nft_ctx_new.restype = ctypes.c_void_p
    lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
    lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_buffer_output.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_get_output_buffer.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_get_output_buffer.restype = ctypes.c_char_p
    lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
    lib.nft_ctx_output_get_flags.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_output_get_flags.restype = ctypes.c_uint
    lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
    lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
    return lib


def _free(pointer: int) -> None:
    _lib().nft_ctx_free(pointer)


class Nft:
    """One libnftables context bound to one netns (the caller's, or ``open``'s)."""

    def __init__(self) -> None:
        lib = _lib()
        pointer = lib.nft_ctx_new(0)
        if not pointer:
            raise NftError("nft_ctx_new failed (out of memory?)")
        lib.nft_ctx_buffer_output(pointer)
        lib.nft_ctx_buffer_error(pointer)
        self._pointer = pointer
        self._lock = threading.Lock()
        self._finalizer = weakref.finalize(self, _free, pointer)

    @classmethod
    def open(cls, netns: str | None) -> Nft:
        if netns is None:
            return cls()
        with entered_netns(netns):
            return cls()

    def close(self) -> None:
        self._finalizer()

    def run(self, commands: str) -> str:
        """Run ``commands`` (nft syntax, one transaction); returns nft's output."""
        return self._run(commands, 0)

    def drop_cache(self) -> None:
        """Free the copy of the ruleset the last command fetched.

        libnftables keeps it until a later command finds the ruleset's generation changed,
        and our own commit always changes it, so it is never reused: it only held ~0.7 MB
        per sandbox after one change among 10,000 services (70 MB over 100 sandboxes). An
        empty command sees the new generation and lets it go; it costs one netlink round
        trip."""
        self._run("\n", 0)

    def run_json(self, commands: str) -> dict:
        """Run a listing with JSON output, parsed."""
        text = self._run(commands, _OUTPUT_JSON)
        return json.loads(text) if text.strip() else {}

    def run_terse(self, commands: str) -> str:
        """A listing without set and map elements (the shape of a table, cheap to compare)."""
        return self._run(commands, _OUTPUT_TERSE)

    def _run(self, commands: str, flags: int) -> str:
        if not self._finalizer.alive:
            raise NftError("nft context used after close()")
        lib = _lib()
        with self._lock:
            lib.nft_ctx_output_set_flags(self._pointer, flags)
            status = lib.nft_run_cmd_from_buffer(self._pointer, commands.encode())
            output = (lib.nft_ctx_get_output_buffer(self._pointer) or b"").decode()
            error = (lib.nft_ctx_get_error_buffer(self._pointer) or b"").decode().strip()
        if status != 0:
            raise NftError(error or f"nft failed with status {status}: {commands[:200]}")
        return output


def chain_rules(listing: str) -> dict[str, list[str]]:
    """Chain -> its rules as nft prints them (the hook declaration left out), from a listing."""
    chains: dict[str, list[str]] = {}
    current: list[str] | None = None
    for raw in listing.splitlines():
        line = raw.strip()
        if line.startswith("chain ") and line.endswith("{"):
            current = chains.setdefault(line.split()[1], [])
        elif line == "}":
            current = None
        elif current is not None and line and not line.startswith("type "):
            current.append(line)
    return chains


@functools.cache
def nft_available() -> bool:
    """libnftables loads and the kernel answers nf_tables requests (asked once per process)."""
    try:
        Nft().run("list tables")
    except (OSError, AttributeError) as exc:
        log.warning("nftables unavailable error=%r install=libnftables1 fallback=iptables hint=%r", exc,
                    "apt-get install libnftables1 (and a kernel with nf_tables) for the nftables backend")
        return False
    return True
