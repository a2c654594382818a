import ipaddress

import pytest

from discovery.errors import ConflictError, ExhaustedError, ValidationError
from discovery.state import ipam
from discovery.state.model import Network

ip = ipaddress.ip_address


def test_first_free_skips_reserved_and_taken():
    net = Network.create("n", "10.5.0.0/29")
    assert ipam.first_free(net, net.subnet, set()) == ip("10.5.0.2")
    assert ipam.first_free(net, net.subnet, {ip("10.5.0.2"), ip("10.5.0.3")}) == ip("10.5.0.4")


def test_full_subnet_says_so():
    net = Network.create("n", "10.5.0.0/29")
    taken = {ip(f"10.5.0.{i}") for i in range(2, 7)}
    with pytest.raises(ExhaustedError, match="no free address left in 10.5.0.0/29"):
        ipam.first_free(net, net.subnet, taken)


def test_ipv6_allocation():
    net = Network.create("n", "10.5.0.0/24", "fd00:5::/64")
    assert ipam.first_free(net, net.subnet6, {ip("fd00:5::2")}) == ip("fd00:5::3")


def test_requested_address_checks():
    net = Network.create("front", "10.5.0.0/24")
    with pytest.raises(ValidationError, match="outside network 'front'"):
        ipam.check_requested(net, net.subnet, ip("10.6.0.9"), {})
    with pytest.raises(ValidationError, match="reserved"):
        ipam.check_requested(net, net.subnet, ip("10.5.0.1"), {})
    with pytest.raises(ConflictError, match="already used by container 'x'"):
        ipam.check_requested(net, net.subnet, ip("10.5.0.9"), {ip("10.5.0.9"): "container 'x'"})
    ipam.check_requested(net, net.subnet, ip("10.5.0.10"), {ip("10.5.0.9"): "container 'x'"})
