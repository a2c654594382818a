"""Address choice within a subnet: pure functions, no I/O.

The registry calls these with the set of addresses it read from etcd and then claims the
chosen address with a transaction that fails if someone else claimed it first, so two
allocators racing never hand out one address twice (see ``registry.py``).
"""

from __future__ import annotations

import ipaddress
import itertools
from collections.abc import Container, Iterator

from discovery.errors import ConflictError, ExhaustedError, ValidationError

from .model import Network

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Subnet = ipaddress.IPv4Network | ipaddress.IPv6Network


def first_free(network: Network, subnet: Subnet, taken: Container[Address]) -> Address:
    """The lowest address of ``subnet`` that is neither reserved nor taken."""
    reserved = network.reserved()
    for offset in range(1, subnet.num_addresses):
        candidate = subnet.network_address + offset
        if candidate in reserved or candidate in taken:
            continue
        if subnet.version == 4 and candidate == subnet.broadcast_address:
            break
        return candidate
    raise ExhaustedError(
        f"network {network.name!r} has no free address left in {subnet}; "
        "remove endpoints or services from it, or create a network with a larger subnet"
    )


def candidates(network: Network, subnet: Subnet, start: int) -> Iterator[tuple[int, Address]]:
    """Usable addresses of ``subnet`` by offset, from ``start`` to the end, then from the
    beginning: the registry tries them by key (a freed address is reused only after the
    search wraps, as Docker's allocator does, so a just-freed address's caches can go)."""
    reserved = network.reserved()
    size = subnet.num_addresses
    last = size - 1 if subnet.version == 4 else size  # an IPv4 broadcast address is never given
    start = start if 1 <= start < last else 1
    for offset in itertools.chain(range(start, last), range(1, start)):
        candidate = subnet.network_address + offset
        if candidate not in reserved:
            yield offset, candidate


def exhausted(network: Network, subnet: Subnet) -> ExhaustedError:
    return ExhaustedError(
        f"network {network.name!r} has no free address left in {subnet}; "
        "remove endpoints or services from it, or create a network with a larger subnet"
    )


def check_requested(
    network: Network, subnet: Subnet, address: Address, owners: dict[Address, str]
) -> None:
    """Refuse a user-requested address that is outside the subnet, reserved or in use."""
    if address.version != subnet.version or address not in subnet:
        raise ValidationError(
            f"IP {address} is outside network {network.name!r}'s subnet {subnet}; "
            f"pick an address inside {subnet}"
        )
    if address in network.reserved():
        raise ValidationError(
            f"IP {address} is reserved on network {network.name!r} "
            "(network, broadcast or gateway address); pick another"
        )
    if address in owners:
        raise ConflictError(
            f"IP {address} on network {network.name!r} is already used by {owners[address]}; "
            "pick another or leave --ip out to get a free one"
        )


def parse_address(text: str) -> Address:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise ValidationError(f"{text!r} is not an IP address") from None
