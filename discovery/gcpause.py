"""Keeping the event loop responsive with a big heap: GC pauses and GIL hand-over.

A full (generation 2) collection walks every tracked object while holding the GIL: with a
View of 10,000 services and its tables that is millions of objects, and the resolver's
event loop stopped for ~120 ms (measured with bench/scale_bench.py). ``freeze()`` moves
what exists now (the View, tables, rules state after start-up) into the permanent
generation, which collections skip; what is made later is collected as usual. Every pause
is observed in ``svcnet_gc_pause_seconds{generation}``.
"""

from __future__ import annotations

import functools
import gc
import logging
import time

from discovery.metrics import Metrics

log = logging.getLogger(__name__)

SLOW = 0.05  # seconds: a pause this long is logged


class GcPauses:
    def __init__(self, metrics: Metrics) -> None:
        self.pauses = metrics.histogram("svcnet_gc_pause_seconds", "Garbage-collector pauses, by generation.",
                                        ("generation",))
        metrics.gauge("svcnet_gc_frozen_objects", "Objects moved out of the collector's reach (gc.freeze).",
                      gc.get_freeze_count)
        self._started = 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        took = time.perf_counter() - self._started
        self.pauses.observe(took, str(info.get("generation")))
        if took >= SLOW:
            log.warning("slow garbage collection generation=%s took_ms=%.1f collected=%s", info.get("generation"),
                        took * 1000, info.get("collected"))

    def close(self) -> None:
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)


SWITCH_INTERVAL = 0.0005  # seconds a worker thread may hold the GIL while the event loop waits for it


def share_the_gil() -> None:
    """Worker threads (snapshots, host syncs, the LB's nft calls) hold the GIL up to the
    switch interval (5 ms by default) each time the event loop asks for it back; with a few
    of them busy after a burst of changes, a query waited ~25 ms (measured). The loop may
    wait its turn behind each of them (the GIL goes to whichever waiter the OS wakes), so the
    interval is short: at 1 ms the longest wait in the scale bench's 1 ms query loop was
    2.7-10 ms (median 5.9 over ten runs), most of it at the end of a burst, when the LB's four
    workers are busy; at 0.5 ms 2.7-8 ms (median 5.0 over seven), the 8 ms in a run whose
    control (a trivial server, bench/scale_bench.py) waited 6.6 ms at the same moment."""
    import sys
    sys.setswitchinterval(SWITCH_INTERVAL)


def release_free_memory() -> None:
    """Hand the C heap's free pages back to the kernel (glibc's malloc_trim). A sandbox's
    first sync builds and parses one transaction of 30,000 elements: ~40 MB that libnftables
    frees but glibc keeps, once per arena, which 100 sandboxes synced by four threads turn
    into resident memory that is never used again (measured: 94 -> 54 MB after one load)."""
    try:
        _libc().malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to do


@functools.cache
def _libc():
    import ctypes
    return ctypes.CDLL("libc.so.6")


def freeze(reason: str) -> None:
    """Collect once, then move every surviving object out of later collections."""
    started = time.perf_counter()
    gc.collect()
    gc.freeze()
    log.info("heap frozen reason=%s objects=%d took_ms=%.1f", reason, gc.get_freeze_count(),
             (time.perf_counter() - started) * 1000)
