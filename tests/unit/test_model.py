import ipaddress

import pytest

from discovery.errors import ValidationError
from discovery.state.model import Endpoint, Network, PortSpec, Service, normalize_name


@pytest.mark.parametrize("name", ["web", "Web-1", "a", "x" * 63, "9lives"])
def test_valid_names_are_lowercased(name):
    assert normalize_name(name) == name.lower()


@pytest.mark.parametrize("name, hint", [
    ("", "must not be empty"),
    ("-web", "not a valid DNS label"),
    ("web-", "not a valid DNS label"),
    ("we_b", "not a valid DNS label"),
    ("a.b", "not a valid DNS label"),
    ("x" * 64, "at most 63"),
])
def test_bad_names_say_what_is_wrong(name, hint):
    with pytest.raises(ValidationError, match=hint):
        normalize_name(name, "container name")


def test_network_defaults_gateway_to_first_host():
    net = Network.create("Front", "10.1.0.0/24", "fd00:1::/64")
    assert net.name == "front"
    assert net.gateway == ipaddress.ip_address("10.1.0.1")
    assert net.gateway6 == ipaddress.ip_address("fd00:1::1")
    assert {str(a) for a in net.reserved()} == {"10.1.0.0", "10.1.0.255", "10.1.0.1", "fd00:1::", "fd00:1::1"}


@pytest.mark.parametrize("subnet, subnet6, gateway, hint", [
    ("10.1.0.1/24", None, None, "did you mean 10.1.0.0/24"),
    ("10.1.0.0/30", None, None, "too small"),
    ("fd00::/64", None, None, "pass it with --subnet6"),
    ("10.1.0.0", None, None, "needs a prefix length"),
    ("banana", None, None, "not a CIDR"),
    ("10.1.0.0/24", "10.2.0.0/24", None, "pass it with --subnet"),
    ("10.1.0.0/24", None, "10.2.0.1", "outside the subnet"),
    ("10.1.0.0/24", None, "10.1.0.255", "broadcast"),
])
def test_bad_networks_are_refused(subnet, subnet6, gateway, hint):
    with pytest.raises(ValidationError, match=hint):
        Network.create("n", subnet, subnet6, gateway)


def test_unsupported_driver_is_refused():
    with pytest.raises(ValidationError, match="not supported"):
        Network.create("n", "10.1.0.0/24", driver="macvlan")


def test_overlap_checks_both_families():
    a = Network.create("a", "10.1.0.0/16")
    assert a.overlaps(Network.create("b", "10.1.2.0/24"))
    assert not a.overlaps(Network.create("c", "10.2.0.0/24"))
    v6a = Network.create("d", "10.3.0.0/24", "fd00:1::/64")
    v6b = Network.create("e", "10.4.0.0/24", "fd00:1::/80")
    assert v6a.overlaps(v6b)


@pytest.mark.parametrize("text, expected", [
    ("80", PortSpec(80)),
    ("8080:80", PortSpec(80, 8080)),
    ("53:53/udp", PortSpec(53, 53, "udp")),
    ("8443:443/tcp,mode=host", PortSpec(443, 8443, "tcp", "host")),
    ("8080:80,source=keep", PortSpec(80, 8080, "tcp", "ingress", "keep")),
    ("53:53/udp,source=keep,mode=host", PortSpec(53, 53, "udp", "host", "keep")),
])
def test_port_parse(text, expected):
    assert PortSpec.parse(text) == expected
    assert PortSpec.parse(str(expected)) == expected
    assert PortSpec.from_dict(expected.to_dict()) == expected


@pytest.mark.parametrize("text", ["", "x:80", "8080:80/sctp", "80,mode=", "99999:80", "80:0", "80,foo=bar",
                                  "80,source=keep", "8080:80,source=all", "8080:80,mode=host,"])
def test_bad_ports_are_refused(text):
    with pytest.raises(ValidationError):
        PortSpec.parse(text)


def test_publish_rm_spelling():
    assert PortSpec.parse_published("8080") == (8080, "tcp")
    assert PortSpec.parse_published("53/udp") == (53, "udp")
    with pytest.raises(ValidationError):
        PortSpec.parse_published("8080:80")


def test_node_addresses_round_trip_sorted():
    from discovery.state.model import Node
    node = Node("h1", addresses=(("b", "10.2.0.2"), ("a", ipaddress.ip_address("10.1.0.2"))))
    assert node.address_on("a") == ipaddress.ip_address("10.1.0.2") and node.address_on("c") is None
    assert Node.from_dict(node.to_dict()) == node and node.addresses[0][0] == "a"


def test_dnsrr_cannot_publish_in_ingress_mode():
    with pytest.raises(ValidationError, match="needs a VIP"):
        Service("db", ("back",), "dnsrr", ports=(PortSpec(5432, 5432),))
    Service("db", ("back",), "dnsrr", ports=(PortSpec(5432, 5432, mode="host"),))


def test_service_refuses_duplicate_published_port_and_stray_vip():
    with pytest.raises(ValidationError, match="given twice"):
        Service("web", ("front",), ports=(PortSpec(80, 8080), PortSpec(81, 8080)))
    with pytest.raises(ValidationError, match="not on"):
        Service("web", ("front",), vips={"back": ipaddress.ip_address("10.0.0.2")})


def test_service_round_trips_and_drops_self_alias():
    svc = Service("Web", ("Front",), aliases=("web", "WWW"), ports=(PortSpec(80, 8080),),
                  vips={"front": ipaddress.ip_address("10.1.0.2")})
    assert svc.aliases == ("www",)
    assert Service.from_dict(svc.to_dict()) == svc


def test_endpoint_names_in_precedence_order():
    ep = Endpoint("a1", "front", ipaddress.ip_address("10.1.0.3"), "n1", hostname="A1", aliases=("db", "a1"))
    assert ep.dns_names() == ("a1", "db")
    assert Endpoint.from_dict(ep.to_dict()) == ep


@pytest.mark.parametrize("data, hint", [
    ({"network": "n", "ipv4": "10.0.0.1", "node": "x"}, "missing field 'container'"),
    ({"container": "c", "network": "n", "ipv4": "nope", "node": "x"}, "bad field"),
    ({"container": "c", "network": "n", "ipv4": "10.0.0.1", "node": "x", "health": "meh"}, "health"),
    (["not", "an", "object"], "JSON object"),
])
def test_decoding_bad_data_names_the_problem(data, hint):
    with pytest.raises(ValidationError, match=hint):
        Endpoint.from_dict(data)


def test_flow_timeout_parses_round_trips_and_refuses_what_it_cannot_mean():
    from discovery.state.model import FlowTimeout

    timeout = FlowTimeout.parse("tcp=7200, UDP=60")
    assert (timeout.tcp, timeout.udp) == (7200, 60) and str(timeout) == "tcp=7200,udp=60"
    assert FlowTimeout.parse("udp=5") == FlowTimeout(None, 5)
    service = Service("slow", ("front",), flow_timeout=timeout)
    assert service.to_dict()["flow_timeout"] == {"tcp": 7200, "udp": 60}
    assert Service.from_dict(service.to_dict()) == service
    assert "flow_timeout" not in Service("plain", ("front",)).to_dict(), "old records stay as they were"
    for bad, message in (("tcp=0", "must be 1 to"), ("tcp=1,tcp=2", "is not tcp=SECONDS"),
                         ("sctp=5", "is not tcp=SECONDS"), ("tcp", "is not tcp=SECONDS"),
                         (f"udp={31 * 86400}", "must be 1 to")):
        with pytest.raises(ValidationError, match=message):
            FlowTimeout.parse(bad)
    with pytest.raises(ValidationError, match="through a VIP"):
        Service("rr", ("front",), "dnsrr", flow_timeout=timeout)
