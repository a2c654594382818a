"""The return path of ``source=keep``: replies go back through the node the client reached.

With the client's address kept, a task's reply is addressed to the client, and its own node
would route it straight out to the underlay, where nobody knows the connection. So, on the
task's node, in this host's netns:

    mangle PREROUTING -j SVCNET-KEEP-<t>
    mangle SVCNET-KEEP-<t>: -i <bridge> -m mac --mac-source <MAC of node M's address>
                                -j CONNMARK --set-xmark <slot of M>/RETURN_MASK
                            -i <bridge> --ctstate ESTABLISHED -j CONNMARK --restore-mark (RETURN_MASK)
    ip rule  fwmark <slot>/RETURN_MASK iif <bridge> lookup <table>    (priority 3000)
    table <table>: default via <M's address> dev <bridge> onlink

A request that node M DNATed arrives bridged from the VXLAN port with M's bridge MAC as its
source (M routed it): the flow is marked with M's slot. The task's reply, routed by this node,
gets the mark back and the policy route sends it over the overlay to M, whose conntrack
undoes the DNAT. The table id is M's address as a number (unique: addresses are unique
cluster-wide); the slot is its offset in the subnet, and ``iif`` keeps slots of different
networks apart.

The request is bridged on this node, so only br_netfilter lets the host's mangle table and
conntrack see it. svcnet asks for that per bridge (``nf_call_iptables`` on exactly the bridges
that carry return paths) rather than relying on the netns-wide
``net.bridge.bridge-nf-call-iptables``: where that switch is off, every other overlay frame
skips the host's netfilter (8-10 points of overlay throughput here); where it is on (Docker's
bridge driver turns it on) nothing changes.
"""

from __future__ import annotations

import errno
import logging
import subprocess
from pathlib import Path

from pyroute2 import IPRoute, NetlinkError

from discovery.host import netlink
from discovery.host.firewall import RETURN_MASK, prefix_tag
from discovery.host.netlink import bridge_name, ignore_missing
from discovery.host.overlay import mac_for
from discovery.host.xtables import LOCK, converge_jumped, drop_chain, fresh_table, release, table_in_use

from .ipvs import modprobe_path
from .mesh import SLOT_SHIFT, ReturnPath

log = logging.getLogger(__name__)

RULE_PRIORITY = 3000


def chain_name(prefix: str) -> str:
    return "SVCNET-KEEP-" + prefix_tag(prefix)


def _mark(slot: int) -> int:
    return slot << SLOT_SHIFT


def mangle_rules(prefix: str, paths: tuple[ReturnPath, ...]) -> list[dict]:
    rules = []
    mask = f"{RETURN_MASK:#x}"
    for path in paths:
        # every packet, not only NEW: a client port reused through another node can meet the
        # old flow's entry here (keep mode maps both to one tuple), which must follow the newest
        rules.append({"in-interface": bridge_name(prefix, path.network), "mac": {"mac-source": mac_for(path.address)},
                      "target": {"CONNMARK": {"set-xmark": f"{_mark(path.slot):#x}/{mask}"}}})
    for network in sorted({p.network for p in paths}):
        rules.append({"in-interface": bridge_name(prefix, network), "conntrack": {"ctstate": "ESTABLISHED"},
                      "target": {"CONNMARK": {"restore-mark": "", "nfmask": mask, "ctmask": mask}}})
    return rules


def sync(prefix: str, paths: tuple[ReturnPath, ...]) -> int:
    """Converge the mangle chain, the ip rules and their tables, and the bridges' br_netfilter
    switches to ``paths``; returns changes made."""
    changed = _sync_mangle(prefix, paths)
    changed += _sync_routes(prefix, paths)
    changed += _sync_bridge_netfilter(prefix, paths)
    if changed:
        log.info("source=keep return paths synced paths=%d changes=%d", len(paths), changed)
    return changed


def _sync_mangle(prefix: str, paths: tuple[ReturnPath, ...]) -> int:
    chain = chain_name(prefix)
    if not paths and not table_in_use("mangle"):
        return 0  # never instantiate mangle for nothing: every packet would pay
    with LOCK:
        mangle = fresh_table("mangle")
        try:
            if not paths and not mangle.is_chain(chain):  # no empty chain for an agent without keep ports
                return 0
            changed = converge_jumped(mangle, chain, mangle_rules(prefix, paths), ("PREROUTING",) if paths else ())
            if changed:
                mangle.commit()
            return int(changed)
        finally:
            release(mangle)


def _sync_routes(prefix: str, paths: tuple[ReturnPath, ...]) -> int:
    bridges = {bridge_name(prefix, p.network) for p in paths}
    wanted = {(int(p.address), _mark(p.slot), bridge_name(prefix, p.network), str(p.address)) for p in paths}
    changes = 0
    with IPRoute() as ipr:
        ours = [r for r in ipr.get_rules(family=2) if r.get("priority") == RULE_PRIORITY
                and (r.get("FRA_IIFNAME") or "").startswith("svbr")]
        present = {}
        for rule in ours:
            key = (rule.get("FRA_TABLE") or rule["table"], rule.get("FRA_FWMARK"), rule.get("FRA_IIFNAME"))
            present[key] = rule
        mine = {b.ifname for b in netlink.list_bridges(prefix).values()}
        # ours: rules on our bridges, and on bridges that are gone (a removed network's)
        owned_bridges = bridges | {b for _, _, b in present if b in mine or not ipr.link_lookup(ifname=b)}
        for key in present:
            table, mark, bridge = key
            if bridge in owned_bridges and not any(w[:3] == key for w in wanted):
                ignore_missing(ipr.rule, "del", family=2, priority=RULE_PRIORITY, table=table, fwmark=mark,
                       fwmask=RETURN_MASK, iifname=bridge)
                ignore_missing(ipr.route, "del", table=table, dst="0.0.0.0/0")
                changes += 1
        for table, mark, bridge, gateway in sorted(wanted):
            index = ipr.link_lookup(ifname=bridge)
            if not index:
                continue
            routes = ipr.get_routes(family=2, table=table)
            if not any(r.get("RTA_GATEWAY") == gateway and r.get("RTA_OIF") == index[0] for r in routes):
                ipr.route("replace", table=table, dst="0.0.0.0/0", gateway=gateway, oif=index[0], flags=4)  # onlink
                changes += 1
            if (table, mark, bridge) not in present:
                try:
                    ipr.rule("add", family=2, priority=RULE_PRIORITY, table=table, fwmark=mark,
                             fwmask=RETURN_MASK, iifname=bridge)
                except NetlinkError as exc:
                    if exc.code != errno.EEXIST:
                        raise
                changes += 1
    return changes


def _sync_bridge_netfilter(prefix: str, paths: tuple[ReturnPath, ...]) -> int:
    """Turn br_netfilter on for the bridges of ``paths``' networks and off for our others."""
    wanted = {bridge_name(prefix, p.network) for p in paths}
    if wanted:
        _ensure_br_netfilter()
    changes = 0
    with IPRoute() as ipr:
        for bridge in netlink.list_bridges(prefix).values():
            links = ipr.get_links(bridge.index)
            now = links[0].get_nested("IFLA_LINKINFO", "IFLA_INFO_DATA", "IFLA_BR_NF_CALL_IPTABLES") if links else None
            want = int(bridge.ifname in wanted)
            if now is not None and now != want:
                ipr.link("set", index=bridge.index, kind="bridge", br_nf_call_iptables=want)
                changes += 1
    return changes


_br_netfilter_checked = False


def _ensure_br_netfilter() -> None:
    """Without the br_netfilter module the per-bridge switch does nothing: load it, or say so.
    Loading it turns ``bridge-nf-call-iptables`` on in every netns (the kernel's default):
    a host that wants it off loads the module at boot and sets the sysctl there."""
    global _br_netfilter_checked
    if _br_netfilter_checked or Path("/proc/sys/net/bridge").exists():
        return
    _br_netfilter_checked = True
    modprobe = modprobe_path()
    try:
        loaded = modprobe is not None and subprocess.run([modprobe, "br_netfilter"], capture_output=True,
                                                         timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        loaded = False
    if not loaded or not Path("/proc/sys/net/bridge").exists():
        log.error("source=keep needs the br_netfilter kernel module (replies of kept-source flows cannot be "
                  "routed back without it): run 'modprobe br_netfilter', or publish without source=keep")
    else:
        log.warning("loaded br_netfilter for source=keep; the kernel turns net.bridge.bridge-nf-call-iptables "
                    "on in every netns with it (set it to 0 where bridged frames should skip iptables: svcnet "
                    "turns it on per bridge where it needs it)")


def remove(prefix: str) -> None:
    sync(prefix, ())
    if not table_in_use("mangle"):
        return
    with LOCK:
        mangle = fresh_table("mangle")
        try:
            drop_chain(mangle, "PREROUTING", chain_name(prefix))
            mangle.commit()
        finally:
            release(mangle)
