"""Kernel plumbing with pyroute2: network namespaces, bridges and veth pairs.

Every function is idempotent where it can be (ensure_*), so a restarted agent converges
instead of failing on what it made before. The functions block: async callers run them in
a worker thread (pyroute2's sync API refuses to run under a running event loop). Inside a
namespace we open the netlink socket after ``setns`` on the calling thread and switch the
thread back at once, instead of forking a helper: a fork beside gRPC's threads is unsafe. Interfaces svcnet owns carry an ifalias of the
form ``svcnet:<prefix>:<network>`` (bridges) so that they can be found and swept without
guessing from their names.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from pyroute2 import IPRoute, NetlinkError

from discovery.state.model import Network

from .netns import NETNS_DIR, entered_netns, netns_exists, netns_path  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)



def _short_hash(*parts: str, length: int = 8) -> str:
    return hashlib.sha1("\0".join(parts).encode()).hexdigest()[:length]


def bridge_name(prefix: str, network: str) -> str:
    """Linux interface names hold 15 bytes; a hash keeps bridge names unique and short."""
    return "svbr" + _short_hash(prefix, network)


def bridge_alias(prefix: str, network: str) -> str:
    return f"svcnet:{prefix}:{network}"


def host_veth_name(netns: str, network: str) -> str:
    return "sv" + _short_hash(netns, network, length=10)


# ---- namespaces ----------------------------------------------------------------


@contextmanager
def in_netns(path: str) -> Iterator[IPRoute]:
    """An IPRoute whose socket lives in the netns at ``path``."""
    with entered_netns(path):
        ipr = IPRoute()
    try:
        yield ipr
    finally:
        ipr.close()


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise OSError(f"ip {' '.join(args)}: {result.stderr.strip()}")


def create_netns(name: str) -> str:
    """Create a named netns (``/run/netns/NAME``) with lo up; refuse if it exists already."""
    if (NETNS_DIR / name).exists():
        raise FileExistsError(f"network namespace {name!r} already exists")
    _ip("netns", "add", name)
    with in_netns(str(NETNS_DIR / name)) as ns:
        ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")
    return str(NETNS_DIR / name)


def remove_netns(name: str) -> None:
    if (NETNS_DIR / name).exists():
        _ip("netns", "del", name)


# ---- bridges -----------------------------------------------------------------------


@dataclass(frozen=True)
class BridgeState:
    ifname: str
    network: str
    index: int


def links_by_alias(mark: str) -> dict[str, BridgeState]:
    """Links whose ifalias starts with ``mark``, by the rest of it (the network name)."""
    found = {}
    with IPRoute() as ipr:
        for link in ipr.get_links():
            alias = link.get("ifalias") or ""
            if alias.startswith(mark):
                network = alias[len(mark):]
                found[network] = BridgeState(link.get("ifname"), network, link["index"])
    return found


def list_bridges(prefix: str) -> dict[str, BridgeState]:
    """svcnet's bridges for ``prefix``, by network name."""
    return links_by_alias(f"svcnet:{prefix}:")


def ensure_bridge(prefix: str, network: Network) -> str:
    """Create (or repair) the network's bridge with its gateway addresses; return its name."""
    name = bridge_name(prefix, network.name)
    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=name)
        if not found:
            try:
                ipr.link("add", ifname=name, kind="bridge")
            except NetlinkError as exc:
                if exc.code != errno.EEXIST:
                    raise
            found = ipr.link_lookup(ifname=name)
        index = found[0]
        ipr.link("set", index=index, ifalias=bridge_alias(prefix, network.name), state="up")
        present = {(a.get("address"), a["prefixlen"]) for a in ipr.get_addr(index=index)}
        wanted = [(str(network.gateway), network.subnet.prefixlen)]
        if network.subnet6 is not None:
            wanted.append((str(network.gateway6), network.subnet6.prefixlen))
        for address, prefixlen in wanted:
            if (address, prefixlen) not in present:
                try:
                    ipr.addr("add", index=index, address=address, prefixlen=prefixlen)
                except NetlinkError as exc:  # the host sync and a sandbox's build may race here
                    if exc.code != errno.EEXIST:
                        raise
    return name


def ignore_missing(call, *args, **kwargs) -> None:
    """``call(...)``, where an entry already gone (ENOENT, ESRCH) is what we wanted anyway."""
    try:
        call(*args, **kwargs)
    except NetlinkError as exc:
        if exc.code not in (errno.ENOENT, errno.ESRCH):
            raise


def remove_link(ifname: str) -> None:
    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=ifname)
        if found:
            try:
                ipr.link("del", index=found[0])
            except NetlinkError as exc:
                if exc.code != errno.ENODEV:
                    raise


# ---- veth into a sandbox -----------------------------------------------------------


@dataclass(frozen=True)
class Attachment:
    """One sandbox interface: which network, its names inside and outside, its addresses."""

    network: str
    host_ifname: str
    inner_ifname: str
    ipv4: str
    prefixlen4: int
    ipv6: str | None = None
    prefixlen6: int | None = None
    mtu: int | None = None  # overlay networks: the underlay's minus VXLAN's overhead
    mac: str | None = None  # overlay networks: derived from the address (peers know it unasked)


def free_inner_name(path: str, wanted: int = 0) -> str:
    with in_netns(path) as ns:
        taken = {link.get("ifname") for link in ns.get_links()}
    index = wanted
    while f"eth{index}" in taken:
        index += 1
    return f"eth{index}"


def attach(path: str, bridge: str, attachment: Attachment, gateway4: str | None, gateway6: str | None) -> None:
    """Create a veth pair, plug the host end into ``bridge`` and configure the inner end.

    ``gateway4``/``gateway6`` are set as default routes when given (first network only).
    """
    temp_peer = "svp" + _short_hash(attachment.host_ifname, length=10)
    with IPRoute() as ipr:
        bridge_index = ipr.link_lookup(ifname=bridge)
        if not bridge_index:
            raise RuntimeError(f"bridge {bridge} is missing")
        fd = os.open(path, os.O_RDONLY)
        try:
            ipr.link("add", ifname=attachment.host_ifname, kind="veth",
                     peer={"ifname": temp_peer, "net_ns_fd": fd})
        finally:
            os.close(fd)
        host_index = ipr.link_lookup(ifname=attachment.host_ifname)[0]
        if attachment.mtu:
            ipr.link("set", index=host_index, mtu=attachment.mtu)
        ipr.link("set", index=host_index, master=bridge_index[0], state="up")
    with in_netns(path) as ns:
        index = ns.link_lookup(ifname=temp_peer)[0]
        ns.link("set", index=index, ifname=attachment.inner_ifname)
        if attachment.mtu:
            ns.link("set", index=index, mtu=attachment.mtu)
        if attachment.mac:
            ns.link("set", index=index, address=attachment.mac)
        ns.addr("add", index=index, address=attachment.ipv4, prefixlen=attachment.prefixlen4)
        if attachment.ipv6:
            # IFA_F_NODAD: the address is ours by IPAM; skip duplicate detection's delay.
            ns.addr("add", index=index, address=attachment.ipv6, prefixlen=attachment.prefixlen6,
                    IFA_FLAGS=0x02)
        ns.link("set", index=index, state="up")
        lo = ns.link_lookup(ifname="lo")
        if lo:
            ns.link("set", index=lo[0], state="up")
        if gateway4:
            ns.route("replace", dst="0.0.0.0/0", gateway=gateway4)
        if gateway6 and attachment.ipv6:
            ns.route("replace", dst="::/0", gateway=gateway6, family=10)


def inner_addresses(path: str) -> dict[str, list[str]]:
    """Interface name -> addresses inside a namespace (for tests and `inspect`)."""
    result: dict[str, list[str]] = {}
    with in_netns(path) as ns:
        names = {link["index"]: link.get("ifname") for link in ns.get_links()}
        for addr in ns.get_addr():
            result.setdefault(names.get(addr["index"], "?"), []).append(
                f"{addr.get('address')}/{addr['prefixlen']}"
            )
    return result
