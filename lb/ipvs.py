"""The IPVS backend: fwmark services inside a sandbox netns, as Docker Swarm does.

Per VIP, svcnet owns (all commented ``svcnet <vip>``):

    mangle OUTPUT -j SVCNET-MARK
    mangle SVCNET-MARK: -d VIP -j MARK --set-xmark M         every protocol
                        -d VIP -p udp -j MARK --set-xmark M^0x80000000   UDP apart
    IPVS   fwmark M   rr, masquerade -> tasks (TCP and the rest)
    IPVS   fwmark M'  rr, masquerade -> tasks (UDP)
    filter SVCNET-VIP-REJECT (shared with the iptables backend) for VIPs with no task

M is the VIP as a 32-bit number: stable, unique among a sandbox's VIPs, the same after a
restart. UDP gets a service of its own so that its destinations can be dropped at once when
a task goes (``expire_nodest_conn=1`` moves the flow on its next packet), while a TCP
destination is first set to weight 0 (no new connections, established ones go on) and only
deleted after the drain grace. ``conn_reuse_mode=0``, ``expire_nodest_conn=1`` and
``expire_quiescent_template=1`` are set in each netns (Docker's settings), and IPVS's idle
timeout for established TCP is raised from its 900 s to conntrack's (5 days by default) in
each sandbox: an idle connection through a VIP is not cut before the kernel would cut it
without IPVS (moby#37822). IPVS has no per-service timeout, so ``--flow-timeout`` stays
refused here. The mesh's IPVS services live in the host's netns, whose timeout other IPVS
users (kube-proxy) share: svcnet leaves that one alone.
"""

from __future__ import annotations

import functools
import logging
import shutil
import socket
import struct
import subprocess
import time
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path
from typing import TYPE_CHECKING

import iptc
from iptc import easy

from discovery.host import netlink
from discovery.host.xtables import LOCK, delete_rules, drop_chain, ensure_jump, fresh_table, release

from .iptables import REJECT_CHAIN, SyncResult, reject_rules
from .plan import Plan

if TYPE_CHECKING:
    from pyroute2 import IPVS

log = logging.getLogger(__name__)

MARK_CHAIN = "SVCNET-MARK"
UDP_MARK_BIT = 0x80000000
MASQUERADE = 0  # IP_VS_CONN_F_MASQ
SYSCTLS = {"conn_reuse_mode": "0", "expire_nodest_conn": "1", "expire_quiescent_template": "1"}


@functools.cache
def ipvs_available() -> bool:
    """Does this kernel have IPVS? Loads the module if it can; asked once per process.

    A missing ``modprobe`` (Debian's kmod) or a kernel without ``ip_vs`` is no error: the
    caller falls back to nftables (or iptables), and the reason is logged once, with what to install.
    """
    if Path("/proc/net/ip_vs").exists():
        return True
    modprobe = modprobe_path()
    if modprobe is None:
        log.warning("ipvs unavailable: modprobe not found and ip_vs is not loaded; "
                    "install=kmod (apt-get install kmod) fallback=nftables_or_iptables")
        return False
    try:
        result = subprocess.run([modprobe, "ip_vs"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("ipvs unavailable: modprobe ip_vs failed error=%r fallback=nftables_or_iptables", exc)
        return False
    if not Path("/proc/net/ip_vs").exists():
        reason = (result.stderr.strip() or f"exit {result.returncode}").replace(" ", "_")[:160]
        log.warning("ipvs unavailable: the kernel has no ip_vs module reason=%s fallback=nftables_or_iptables "
                    "hint=%r", reason, "use a kernel built with CONFIG_IP_VS (Debian's linux-image-amd64 has it) "
                    "to get IPVS; nftables or iptables balances the same VIPs meanwhile")
        return False
    return True


def modprobe_path() -> str | None:
    """kmod's modprobe: on PATH, or where Debian puts it (root's PATH may lack /sbin)."""
    return shutil.which("modprobe") or next((p for p in ("/sbin/modprobe", "/usr/sbin/modprobe")
                                             if Path(p).exists()), None)


def marks(vip: IPv4Address) -> tuple[int, int]:
    return int(vip), int(vip) ^ UDP_MARK_BIT


def mark_rules(vip: IPv4Address) -> list[dict]:
    tcp_mark, udp_mark = marks(vip)
    text = {"comment": f"svcnet {vip}"}
    return [
        {"dst": f"{vip}/32", "comment": text, "target": {"MARK": {"set-xmark": f"{hex(tcp_mark)}/0xffffffff"}}},
        {"dst": f"{vip}/32", "protocol": "udp", "comment": text,
         "target": {"MARK": {"set-xmark": f"{hex(udp_mark)}/0xffffffff"}}},
    ]


@dataclass
class NetnsState:
    """What svcnet last left in one netns."""

    vips: dict[IPv4Address, tuple[IPv4Address, ...]] = field(default_factory=dict)  # desired backends
    tcp: dict[IPv4Address, dict[IPv4Address, int]] = field(default_factory=dict)  # dest -> weight
    udp: dict[IPv4Address, set[IPv4Address]] = field(default_factory=dict)
    draining: dict[tuple[IPv4Address, IPv4Address], float] = field(default_factory=dict)  # -> remove at


class IpvsBackend:
    name = "ipvs"

    def __init__(self, drain_grace: float = 30.0) -> None:
        self.drain_grace = drain_grace

    def sync(self, netns: str, current: NetnsState | None, desired: Plan,
             changed=None) -> tuple[NetnsState, SyncResult]:
        """``changed`` is accepted for the sync loop's sake; IPVS compares every VIP (cheap:
        no kernel read) because drains run on their own deadlines."""
        from pyroute2 import IPVS
        result = SyncResult()
        now = time.monotonic()
        with LOCK, netlink.entered_netns(netns):
            ipvs = IPVS()
            mangle, filt = fresh_table("mangle"), fresh_table("filter")
            try:
                if current is None:
                    set_sysctls()
                    set_tcp_timeout(ipvs, conntrack_tcp_timeout())
                    current = _observe(ipvs, mangle)
                state = current
                mangle_changed = ensure_jump(mangle, "OUTPUT", MARK_CHAIN)
                filter_changed = ensure_jump(filt, "OUTPUT", REJECT_CHAIN)
                mark_chain, rejects = iptc.Chain(mangle, MARK_CHAIN), iptc.Chain(filt, REJECT_CHAIN)
                for vip in sorted(state.vips.keys() - desired.keys()):
                    delete_rules(mark_chain, mark_rules(vip))
                    delete_rules(rejects, reject_rules(vip))
                    for mark in marks(vip):
                        _service(ipvs, "del", mark)
                    state.vips.pop(vip)
                    state.tcp.pop(vip, None)
                    state.udp.pop(vip, None)
                    state.draining = {k: v for k, v in state.draining.items() if k[0] != vip}
                    result.services_removed += 1
                    mangle_changed = filter_changed = True
                for vip, plan in sorted(desired.items()):
                    touched = False
                    if vip not in state.vips:
                        for rule in mark_rules(vip):
                            mark_chain.append_rule(easy.encode_iptc_rule(rule))
                        for mark in marks(vip):
                            _service(ipvs, "add", mark)
                        state.tcp[vip], state.udp[vip] = {}, set()
                        mangle_changed = touched = True
                        result.rules_written += 2
                    touched |= self._sync_tcp(ipvs, state, vip, plan.backends, now, result)
                    touched |= _sync_udp(ipvs, state, vip, plan.backends, result)
                    if state.vips.get(vip) != plan.backends or vip not in state.vips:
                        had_none = vip in state.vips and not state.vips[vip]
                        if had_none != (not plan.backends):
                            delete_rules(rejects, reject_rules(vip))
                            if not plan.backends:
                                for rule in reject_rules(vip):
                                    rejects.append_rule(easy.encode_iptc_rule(rule))
                            filter_changed = True
                        state.vips[vip] = plan.backends
                    if touched:
                        result.services_written += 1
                if mangle_changed:
                    mangle.commit()
                if filter_changed:
                    filt.commit()
            finally:
                release(mangle)
                release(filt)
                ipvs.close()
        return state, result

    def _sync_tcp(self, ipvs, state: NetnsState, vip: IPv4Address, backends: tuple[IPv4Address, ...], now: float,
                  result: SyncResult) -> bool:
        mark = marks(vip)[0]
        dests = state.tcp.setdefault(vip, {})
        touched = False
        for backend in backends:
            if dests.get(backend) != 1:
                set_dest(ipvs, "set" if backend in dests else "add", mark, backend, 1)
                dests[backend] = 1
                state.draining.pop((vip, backend), None)
                touched = True
                result.rules_written += 1
        for backend in sorted(set(dests) - set(backends)):
            key = (vip, backend)
            if dests[backend] != 0:  # stop new connections now, let established ones finish
                set_dest(ipvs, "set", mark, backend, 0)
                dests[backend] = 0
                state.draining[key] = now + self.drain_grace
                touched = True
            elif now >= state.draining.setdefault(key, now + self.drain_grace):
                set_dest(ipvs, "del", mark, backend, 0)
                del dests[backend]
                state.draining.pop(key)
                touched = True
        return touched

    def next_deadline(self, state: NetnsState) -> float | None:
        return min(state.draining.values(), default=None)

    def remove(self, netns: str) -> None:
        from pyroute2 import IPVS
        with LOCK, netlink.entered_netns(netns):
            ipvs = IPVS()
            mangle, filt = fresh_table("mangle"), fresh_table("filter")
            try:
                state = _observe(ipvs, mangle)
                for vip in state.vips:
                    for mark in marks(vip):
                        _service(ipvs, "del", mark)
                for table, chain in ((mangle, MARK_CHAIN), (filt, REJECT_CHAIN)):
                    drop_chain(table, "OUTPUT", chain)
                    table.commit()
            finally:
                release(mangle)
                release(filt)
                ipvs.close()


def _sync_udp(ipvs, state: NetnsState, vip: IPv4Address, backends: tuple[IPv4Address, ...],
              result: SyncResult) -> bool:
    mark = marks(vip)[1]
    dests = state.udp.setdefault(vip, set())
    touched = False
    for backend in sorted(set(backends) - dests):
        set_dest(ipvs, "add", mark, backend, 1)
        result.rules_written += 1
        touched = True
    for backend in sorted(dests - set(backends)):  # UDP has nothing to finish: go at once
        set_dest(ipvs, "del", mark, backend, 1)
        touched = True
    state.udp[vip] = set(backends)
    return touched


def _service(ipvs, command: str, mark: int) -> None:
    from pyroute2 import IPVSService
    try:
        ipvs.service(command, service=IPVSService(fwmark=mark, af=socket.AF_INET, sched_name="rr", netmask="255.255.255.255"))
    except Exception as exc:  # exists already / gone already: converge, do not fail the sync
        if command == "add" and "exist" not in str(exc).lower():
            raise
        log.debug("ipvs service %s fwmark=%#x: %s", command, mark, exc)


def set_dest(ipvs, command: str, mark: int, backend: IPv4Address | str, weight: int, port: int = 0) -> None:
    """``port`` 0: the connection's own port (a VIP); else the task's (the mesh's TARGET)."""
    from pyroute2 import IPVSDest, IPVSService
    service = IPVSService(fwmark=mark, af=socket.AF_INET, sched_name="rr", netmask="255.255.255.255")
    dest = IPVSDest(addr=str(backend), port=port, fwd_method=MASQUERADE, weight=weight)
    ipvs.dest(command, service=service, dest=dest)


_sysctl_warned: set[str] = set()

CONNTRACK_TCP_ESTABLISHED = Path("/proc/sys/net/netfilter/nf_conntrack_tcp_timeout_established")
DEFAULT_TCP_TIMEOUT = 432000  # nf_conntrack's default for an established TCP flow: 5 days


def conntrack_tcp_timeout() -> int:
    """Conntrack's idle timeout for established TCP in the current netns, in seconds."""
    try:
        return int(CONNTRACK_TCP_ESTABLISHED.read_text())
    except (OSError, ValueError):  # conntrack not loaded yet: its default
        return DEFAULT_TCP_TIMEOUT


def set_tcp_timeout(ipvs: IPVS, seconds: int) -> None:
    """IPVS_CMD_SET_CONFIG with the TCP timeout only (the kernel leaves an absent one as is).

    pyroute2 maps the timeouts as raw bytes: the value goes packed as the kernel's u32."""
    from pyroute2 import NetlinkError
    from pyroute2.netlink import NLM_F_ACK, NLM_F_REQUEST
    from pyroute2.netlink.generic import ipvs as genl

    msg = genl.ipvsmsg()
    msg["cmd"] = genl.IPVS_CMD_SET_CONFIG
    msg["version"] = genl.GENL_VERSION
    msg["attrs"] = [("IPVS_CMD_ATTR_TIMEOUT_TCP", struct.pack("=I", seconds))]
    try:
        ipvs.nlm_request(msg, msg_type=ipvs.prid, msg_flags=NLM_F_REQUEST | NLM_F_ACK)
    except (NetlinkError, OSError) as exc:  # same cause in every netns: say it once per process
        level = logging.DEBUG if "tcp_timeout" in _sysctl_warned else logging.WARNING
        _sysctl_warned.add("tcp_timeout")
        log.log(level, "cannot set the ipvs tcp timeout seconds=%d error=%s: idle connections through "
                "IPVS are cut after 900 s", seconds, exc)


def set_sysctls(values: dict[str, str] = SYSCTLS) -> None:
    for key, value in values.items():
        path = Path("/proc/sys/net/ipv4/vs") / key
        try:
            path.write_text(value + "\n")
        except OSError as exc:  # same cause in every netns: say it once per process
            level = logging.DEBUG if key in _sysctl_warned else logging.WARNING
            _sysctl_warned.add(key)
            log.log(level, "cannot set ipvs sysctl key=%s error=%s", key, exc)


def _observe(ipvs, mangle: iptc.Table) -> NetnsState:
    """Rebuild the state from the kernel: marks in mangle, services and dests in IPVS."""
    from pyroute2 import IPVSDest, IPVSService
    state = NetnsState()
    if mangle.is_chain(MARK_CHAIN):
        for rule in iptc.Chain(mangle, MARK_CHAIN).rules:
            try:
                vip = IPv4Address(rule.dst.split("/")[0])
            except ValueError:
                continue
            state.vips.setdefault(vip, ())
    for message in ipvs.service("dump"):
        service = IPVSService.from_message(message)
        mark = service.get("fwmark") or 0
        if not mark:
            continue
        dests = [IPVSDest.from_message(d) for d in ipvs.dest("dump", service=service)]
        if IPv4Address(mark ^ UDP_MARK_BIT) in state.vips:
            state.udp[IPv4Address(mark ^ UDP_MARK_BIT)] = {IPv4Address(d["addr"]) for d in dests}
        else:
            state.tcp[IPv4Address(mark)] = {IPv4Address(d["addr"]): int(d["weight"]) for d in dests}
    for vip in state.vips:
        state.vips[vip] = tuple(sorted(b for b, w in state.tcp.get(vip, {}).items() if w > 0))
    return state
