"""Overlay networks: one L2 segment across hosts, over VXLAN, programmed from the View.

As Docker's overlay driver does from its peer table, nothing is learned on the wire: on
each host an overlay network's bridge gets a VXLAN port (learning off, ARP proxy on), and
every *remote* endpoint is written statically from the View — an FDB entry from its MAC to
its host's VTEP and a neighbour entry from its IP to its MAC, so ARP is answered on the
spot and no broadcast crosses hosts. MACs are derived from IPs (``02:42:`` + the IPv4
address, as Docker), so a host knows a remote endpoint's MAC without asking. Veths on an
overlay network get the underlay's MTU minus the 50 bytes VXLAN adds, so nothing fragments.

``sync_peers`` converges one VXLAN device to the peers it should have: what is missing is
added, what is stale is removed, what is right is left alone.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import logging
import socket
import struct
from dataclasses import dataclass
from ipaddress import IPv4Address

from pyroute2 import IPRoute, NetlinkError

from discovery.state.model import Network

from .netlink import ignore_missing

log = logging.getLogger(__name__)

VXLAN_OVERHEAD = 50  # outer Ethernet 14 + IPv4 20 + UDP 8 + VXLAN 8
DEFAULT_PORT = 4789  # IANA's VXLAN port
NUD_PERMANENT = 0x80
NTF_SELF = 0x02


def mac_for(ipv4: str | IPv4Address) -> str:
    """10.1.2.3 -> 02:42:0a:01:02:03 (locally administered, unique per address)."""
    return "02:42:" + ":".join(f"{octet:02x}" for octet in IPv4Address(str(ipv4)).packed)


def vxlan_name(prefix: str, network: str) -> str:
    return "svvx" + hashlib.sha1(f"{prefix}\0{network}".encode()).hexdigest()[:8]


def vxlan_alias(prefix: str, network: str) -> str:
    return f"svcnet-vxlan:{prefix}:{network}"


@functools.cache
def overlay_mtu(underlay: str | None) -> int:
    """The MTU for overlay veths: that of the interface holding ``underlay``, minus VXLAN's 50.

    Read once per process (the bridge's VXLAN port and every veth must agree); call it from
    a worker thread: pyroute2's sync API refuses to run under the event loop."""
    with IPRoute() as ipr:
        for addr in ipr.get_addr(family=2):
            if addr.get("address") == underlay:
                link = ipr.get_links(addr["index"])[0]
                return int(link.get("mtu")) - VXLAN_OVERHEAD
    return 1500 - VXLAN_OVERHEAD


@dataclass(frozen=True)
class Peer:
    """A remote endpoint as this host's VXLAN device must know it."""

    ipv4: str
    mac: str
    vtep: str


def list_vxlans(prefix: str) -> dict[str, str]:
    """svcnet's VXLAN devices for ``prefix``: network name -> ifname."""
    from .netlink import links_by_alias

    return {network: link.ifname for network, link in links_by_alias(f"svcnet-vxlan:{prefix}:").items()}


def ensure_vxlan(prefix: str, network: Network, bridge: str, local: str, port: int, mtu: int) -> str:
    """Create (or repair) the network's VXLAN port on ``bridge``; return its name."""
    name = vxlan_name(prefix, network.name)
    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=name)
        if found:
            info = ipr.get_links(found[0])[0].get(("IFLA_LINKINFO", "IFLA_INFO_DATA")) or {}
            if (info.get("IFLA_VXLAN_ID"), info.get("IFLA_VXLAN_LOCAL"), info.get("IFLA_VXLAN_PORT")) != \
                    (network.vni, local, port):
                ipr.link("del", index=found[0])  # a VNI, address or port that changed: made anew
                found = []
        if not found:
            try:
                # RFC 7348 5: the outer UDP checksum SHOULD be zero over IPv4 (the inner frame
                # carries its own); computing it costs CPU for nothing
                ipr.link("add", ifname=name, kind="vxlan", vxlan_id=network.vni, vxlan_local=local,
                         vxlan_port=port, vxlan_learning=0, vxlan_proxy=1, vxlan_udp_csum=0, mtu=mtu)
            except NetlinkError as exc:
                if exc.code != errno.EEXIST:
                    raise
            found = ipr.link_lookup(ifname=name)
            log.info("vxlan created network=%s vxlan=%s vni=%s local=%s port=%d mtu=%d",
                     network.name, name, network.vni, local, port, mtu)
        master = ipr.link_lookup(ifname=bridge)
        ipr.link("set", index=found[0], master=master[0], ifalias=vxlan_alias(prefix, network.name), state="up")
    return name


def ensure_node_address(bridge: str, address: IPv4Address, subnet) -> bool:
    """Give ``bridge`` this node's own address on the overlay (a /32 beside the shared gateway)
    and the MAC derived from it, so remote hosts reach it through their static FDB and
    neighbour entries (the routing mesh's masquerade address and return path); True if changed."""
    changed = False
    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=bridge)
        if not found:
            return False
        index = found[0]
        mac = mac_for(address)
        moved = ipr.get_links(index)[0].get("IFLA_ADDRESS") != mac
        if moved:
            ipr.link("set", index=index, address=mac)
            changed = True
        present = {a.get("IFA_ADDRESS"): a["prefixlen"] for a in ipr.get_addr(index=index, family=2)}
        if moved:  # sandboxes already attached learn the gateway's new MAC now, not in seconds
            for gateway in present:
                if IPv4Address(gateway) in subnet:
                    announce(index, gateway, mac)
        for other, prefixlen in present.items():
            if prefixlen == 32 and other != str(address) and IPv4Address(other) in subnet:
                ignore_missing(ipr.addr, "del", index=index, address=other, prefixlen=32)
                changed = True
        if present.get(str(address)) != 32:
            try:
                ipr.addr("add", index=index, address=str(address), prefixlen=32)
            except NetlinkError as exc:
                if exc.code != errno.EEXIST:
                    raise
            changed = True
    if changed:
        log.info("node address set bridge=%s address=%s mac=%s", bridge, address, mac)
    return changed


def announce(ifindex: int, ipv4: str, mac: str) -> None:
    """A gratuitous ARP (RFC 5227 announcement) for ``ipv4`` at ``mac`` out of one interface:
    neighbours holding an entry for the address take the new MAC at once."""
    hw = bytes.fromhex(mac.replace(":", ""))
    ip = IPv4Address(ipv4).packed
    frame = (b"\xff" * 6 + hw + struct.pack("!H", 0x0806)
             + struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + hw + ip + b"\x00" * 6 + ip)
    try:
        with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as sock:
            sock.bind((socket.if_indextoname(ifindex), 0))
            sock.send(frame)
    except OSError as exc:
        log.warning("cannot announce the gateway's new MAC address=%s error=%s", ipv4, exc)


def remove_vxlan(ifname: str) -> None:
    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=ifname)
        if found:
            ipr.link("del", index=found[0])


def sync_peers(ifname: str, peers: set[Peer]) -> tuple[int, int]:
    """Make the device's static FDB and neighbour entries exactly ``peers``; (added, removed)."""
    added = removed = 0
    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=ifname)
        if not found:
            return 0, 0
        index = found[0]
        fdb = {}
        for entry in ipr.fdb("dump", ifindex=index):
            mac, dst = entry.get("NDA_LLADDR"), entry.get("NDA_DST")
            if entry["ifindex"] == index and dst is not None and mac is not None:
                fdb[(mac, dst)] = entry
        neighbours = {}
        for entry in ipr.get_neighbours(ifindex=index, family=2):
            if entry.get("NDA_DST") and entry.get("NDA_LLADDR"):
                neighbours[(entry.get("NDA_DST"), entry.get("NDA_LLADDR"))] = entry
        wanted_fdb = {(p.mac, p.vtep) for p in peers}
        wanted_neigh = {(p.ipv4, p.mac) for p in peers}
        for mac, dst in set(fdb) - wanted_fdb:
            ignore_missing(ipr.fdb, "del", ifindex=index, lladdr=mac, dst=dst)
            removed += 1
        for ip, mac in set(neighbours) - wanted_neigh:
            ignore_missing(ipr.neigh, "del", dst=ip, lladdr=mac, ifindex=index)
        for mac, dst in wanted_fdb - set(fdb):
            ipr.fdb("append", ifindex=index, lladdr=mac, dst=dst, state=NUD_PERMANENT, flags=NTF_SELF)
            added += 1
        for ip, mac in wanted_neigh - set(neighbours):
            ipr.neigh("replace", dst=ip, lladdr=mac, ifindex=index, state=NUD_PERMANENT)
    return added, removed
