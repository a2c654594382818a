"""Acceptance: host-side overlay pieces on real links (one bridge, one namespace)."""

from __future__ import annotations

import ipaddress
import secrets
import subprocess

from discovery.host import overlay
from tests.helpers import require_root, require_tools, wait


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
