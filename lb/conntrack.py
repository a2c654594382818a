"""Stale conntrack cleanup: UDP flows to a VIP whose backend is gone must move on at once.

A UDP "connection" has no end, so its conntrack entry (and the DNAT decision in it) lives
as long as packets keep coming; kube-proxy's most reported bug class. After a sync removes
backends, entries whose original destination is the VIP and whose reply comes from a
removed backend are deleted; the next packet is load-balanced afresh. TCP entries are left
alone: an established connection to a draining task should finish.

A dump costs ~10.7 ms here whatever the netns holds, even nothing: the kernel walks its
whole conntrack hash (global, shared by every netns) for each dump. Measured with raw
ctnetlink too: the time is the kernel's, not pyroute2's. The sync loop therefore runs this
beside, not in front of, the next sandbox's rules.
"""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Mapping
from ipaddress import IPv4Address

from pyroute2 import Conntrack
from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple

from discovery.host import netlink

log = logging.getLogger(__name__)


def forget_udp_flows(netns: str, lost: Mapping[IPv4Address, set[IPv4Address]]) -> int:
    """Delete UDP conntrack entries VIP -> removed backend in ``netns``; returns how many."""
    return _forget(netns, [(NFCTAttrTuple(proto=socket.IPPROTO_UDP, daddr=str(vip)), backends)
                           for vip, backends in lost.items()])


def forget_mesh_udp_flows(netns: str | None, lost: Mapping[int, set[IPv4Address]]) -> int:
    """Delete UDP entries to a published port (any local address) whose reply comes from a
    removed backend; ``netns`` None: the current one (the host's)."""
    return _forget(netns, [(NFCTAttrTuple(proto=socket.IPPROTO_UDP, dport=port), backends)
                           for port, backends in lost.items()])


def _tracks_nothing() -> bool:
    """This thread's netns holds no conntrack entry at all (the count is per netns): no dump.
    A dump also holds an RCU read section for its ~10 ms, and an nft commit waiting for a
    grace period waits for it: skipping needless dumps keeps rule changes fast."""
    try:
        with open("/proc/sys/net/netfilter/nf_conntrack_count") as count:
            return count.read().strip() == "0"
    except OSError:
        return False


def _forget(netns: str | None, selections: list[tuple[NFCTAttrTuple, set[IPv4Address]]]) -> int:
    if not selections:
        return 0
    deleted = 0
    # pyroute2 opens its socket on first use: keep every call inside the netns
    with netlink.entered_netns(netns) if netns else contextlib.nullcontext():
        if _tracks_nothing():
            return 0
        conntrack = Conntrack()
        try:
            for wanted, backends in selections:
                gone = {str(b) for b in backends}
                for entry in list(conntrack.dump_entries(tuple_orig=wanted)):
                    if entry.tuple_reply.saddr in gone:
                        try:
                            conntrack.delete(entry)
                            deleted += 1
                        except OSError as exc:  # expired meanwhile
                            log.debug("conntrack delete failed error=%s", exc)
        finally:
            conntrack.close()
    return deleted
