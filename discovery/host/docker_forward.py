"""Let svcnet's bridges through dockerd's FORWARD policy.

dockerd sets the filter FORWARD policy to DROP when it finds IP forwarding off at start,
in the iptables it uses (on Debian and Ubuntu the nft one). A packet must be accepted by
every table hooked on FORWARD, legacy and nft alike, so svcnet's own rules (python-iptables,
legacy tables) cannot save it there: with br_netfilter loaded (dockerd loads it) even two
containers on one svcnet bridge would stop talking. So wherever a ``DOCKER-USER`` chain
exists (Docker's documented place for the user's rules, evaluated first), svcnet keeps one
chain of its own there, per registry prefix, holding the same policy as its legacy chain:

- bridge to the same bridge: accept;
- an internal network: nothing in or out;
- another network to the outside (not another svcnet bridge): accept, and replies back in;
- between two svcnet networks: drop.

What falls through returns to Docker's rules. The chain is compared with what it should hold
and rewritten (``iptables-restore --noflush``, one commit) only when they differ.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from collections.abc import Iterable

from discovery.state.model import Network

from .netlink import bridge_name

log = logging.getLogger(__name__)

VARIANTS = ("iptables-nft", "iptables-legacy")
DOCKER_CHAIN = "DOCKER-USER"
BRIDGE_WILDCARD = "svbr+"


def chain_name(forward_chain: str) -> str:
    """SVCNET-FWD-ABC123 -> SVCNET-DKR-ABC123 (the same prefix tag)."""
    return forward_chain.replace("-FWD-", "-DKR-")


def rules(prefix: str, networks: Iterable[Network]) -> list[str]:
    """The chain's rules, as ``iptables -S`` prints them."""
    lines = []
    networks = sorted(networks, key=lambda n: n.name)
    for network in networks:  # sealed first: nothing, not even the mesh, crosses these
        if network.internal:
            bridge = bridge_name(prefix, network.name)
            lines.append(f"-i {bridge} ! -o {bridge} -j DROP")
            lines.append(f"! -i {bridge} -o {bridge} -j DROP")
    lines.append("-m conntrack --ctstate DNAT -j ACCEPT")  # the routing mesh
    for network in networks:
        bridge = bridge_name(prefix, network.name)
        lines.append(f"-i {bridge} -o {bridge} -j ACCEPT")
        if not network.internal:
            lines.append(f"-i {bridge} ! -o {BRIDGE_WILDCARD} -j ACCEPT")
            lines.append(f"-o {bridge} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT")
    lines.append(f"-i {BRIDGE_WILDCARD} -o {BRIDGE_WILDCARD} -j DROP")
    return lines


def _run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=30)


def _docker_variants() -> list[str]:
    """The iptables variants in which dockerd made its chains on this host."""
    return [v for v in VARIANTS if shutil.which(v) and _run(v, "-w", "-t", "filter", "-S", DOCKER_CHAIN).returncode == 0]


def sync(prefix: str, forward_chain: str, networks: Iterable[Network]) -> bool:
    """Keep our chain in DOCKER-USER where dockerd runs; True if anything changed."""
    networks = list(networks)
    chain = chain_name(forward_chain)
    wanted = [f"-A {chain} {line}" for line in rules(prefix, networks)]
    changed = False
    for variant in _docker_variants():
        listed = _run(variant, "-w", "-t", "filter", "-S", chain)
        current = [line for line in listed.stdout.splitlines() if line.startswith("-A ")]
        if listed.returncode != 0 or current != wanted:
            script = "\n".join(["*filter", f":{chain} - [0:0]", *wanted, "COMMIT", ""])
            restore = subprocess.run([f"{variant}-restore", "-w", "--noflush"], input=script, text=True,
                                     capture_output=True, timeout=30)
            if restore.returncode != 0:
                log.error("cannot write the docker forward chain variant=%s error=%s", variant, restore.stderr.strip())
                continue
            changed = True
        if _run(variant, "-w", "-t", "filter", "-C", DOCKER_CHAIN, "-j", chain).returncode != 0:
            _run(variant, "-w", "-t", "filter", "-I", DOCKER_CHAIN, "1", "-j", chain)
            changed = True
        if changed:
            log.info("docker forward rules updated variant=%s chain=%s networks=%d", variant, chain, len(networks))
    return changed


def remove(forward_chain: str) -> None:
    """Delete our chain and the jump to it from every variant that has it."""
    chain = chain_name(forward_chain)
    for variant in VARIANTS:
        if not shutil.which(variant) or _run(variant, "-w", "-t", "filter", "-S", chain).returncode != 0:
            continue
        while _run(variant, "-w", "-t", "filter", "-D", DOCKER_CHAIN, "-j", chain).returncode == 0:
            pass
        _run(variant, "-w", "-t", "filter", "-F", chain)
        _run(variant, "-w", "-t", "filter", "-X", chain)
