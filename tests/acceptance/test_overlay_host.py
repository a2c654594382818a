"""Acceptance: host-side overlay pieces on real links (one bridge, one namespace)."""

from __future__ import annotations

import ipaddress
import secrets
import subprocess
import sys
from pathlib import Path

from discovery.host import overlay
from tests.helpers import require_root, require_tools, wait

ROOT = Path(__file__).resolve().parents[2]


def _ip(*args: str) -> str:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=True).stdout


def test_a_new_node_address_moves_the_bridge_mac_and_neighbours_learn_it_at_once():
    """The bridge takes the MAC of this node's overlay address after sandboxes may already
    hold the gateway's old MAC: a gratuitous ARP updates them at once (seconds otherwise)."""
    require_root()
    require_tools("ip", "ping")
    tag = secrets.token_hex(3)
    bridge, netns, host_end = f"svgarp{tag}", f"svcnet-garp-{tag}", f"svga{tag}"
    try:
        _ip("link", "add", bridge, "type", "bridge")
        _ip("addr", "add", "10.250.0.1/24", "dev", bridge)
        _ip("link", "set", bridge, "up")
        _ip("netns", "add", netns)
        _ip("link", "add", host_end, "type", "veth", "peer", "name", "eth0", "netns", netns)
        _ip("link", "set", host_end, "master", bridge, "up")
        _ip("-n", netns, "addr", "add", "10.250.0.5/24", "dev", "eth0")
        _ip("-n", netns, "link", "set", "eth0", "up")
        subprocess.run(["ip", "netns", "exec", netns, "ping", "-c1", "-W2", "10.250.0.1"], check=True,
                       capture_output=True)
        assert "lladdr" in _ip("-n", netns, "neigh", "show", "10.250.0.1")
        address = ipaddress.IPv4Address("10.250.0.9")
        assert overlay.ensure_node_address(bridge, address, ipaddress.IPv4Network("10.250.0.0/24"))
        new_mac = overlay.mac_for(address)
        assert new_mac in _ip("link", "show", bridge) and "10.250.0.9/32" in _ip("addr", "show", bridge)
        assert wait(lambda: new_mac in _ip("-n", netns, "neigh", "show", "10.250.0.1"), 0.5), \
            _ip("-n", netns, "neigh", "show")
        assert not overlay.ensure_node_address(bridge, address, ipaddress.IPv4Network("10.250.0.0/24")), \
            "nothing to change the second time"
    finally:
        subprocess.run(["ip", "netns", "del", netns], capture_output=True)
        subprocess.run(["ip", "link", "del", bridge], capture_output=True)


def test_the_host_rules_instantiate_only_the_legacy_tables_they_use():
    """Every legacy table that exists in a netns is walked by every packet there, bridged overlay
    frames included. The host firewall uses raw, filter and nat; python-iptables used to open
    all five tables (security and mangle too) to decide whether CT was a chain name."""
    require_root()
    require_tools("ip")
    netns = f"svcnet-tables-{secrets.token_hex(3)}"
    script = (
        "import ipaddress\n"
        "from pathlib import Path\n"
        "from discovery.host import firewall\n"
        "from discovery.state.model import Network\n"
        "net = Network('ov', ipaddress.IPv4Network('10.251.0.0/24'), ipaddress.IPv4Address('10.251.0.1'),"
        " driver='overlay', vni=4096)\n"
        "assert firewall.sync('/svcnet-tables', [net], vxlan_port=4789)\n"
        "print(' '.join(sorted(Path('/proc/self/net/ip_tables_names').read_text().split())))\n"
    )
    try:
        _ip("netns", "add", netns)
        result = subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", script], capture_output=True,
                                text=True, cwd=ROOT)
        assert result.returncode == 0, result.stderr
        assert result.stdout.split() == ["filter", "nat", "raw"]
    finally:
        subprocess.run(["ip", "netns", "del", netns], capture_output=True)
