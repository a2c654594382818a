"""Docker labels -> what svcnet serves, and svcnet's chain in DOCKER-USER (pure parts)."""

from __future__ import annotations

import pytest

from discovery.errors import ValidationError
from discovery.host import docker_forward
from discovery.host.netlink import bridge_name
from discovery.node.docker import ContainerSpec, engine_url
from discovery.state.model import Network


def _inspect(labels: dict, name: str = "/svcnet-web-1", hostname: str = "3f2a1b4c5d6e", health: str | None = None):
    state = {"Pid": 4242, "Running": True}
    if health is not None:
        state["Health"] = {"Status": health}
    return {"Id": "3f2a1b4c5d6e" + "0" * 52, "Name": name, "State": state,
            "Config": {"Labels": labels, "Hostname": hostname}}


def test_labels_give_networks_service_aliases_and_the_netns():
    spec = ContainerSpec.from_inspect(_inspect({"svcnet.networks": "front, back", "svcnet.service": "web",
                                                "svcnet.aliases": "www,api"}))
    assert spec.networks == ("front", "back") and spec.service == "web" and spec.aliases == ("www", "api")
    assert spec.name == "svcnet-web-1" and spec.hostname == "3f2a1b4c5d6e" and spec.health is None
    sandbox = spec.sandbox()
    assert sandbox.netns == "/proc/4242/ns/net" and sandbox.docker_id == spec.id
    assert not sandbox.external_health


def test_a_healthcheck_makes_docker_the_judge_of_health():
    spec = ContainerSpec.from_inspect(_inspect({"svcnet.networks": "front"}, health="starting"))
    assert spec.health == "starting" and spec.sandbox().external_health


def test_docker_names_with_underscores_become_dns_labels_and_labels_override():
    assert ContainerSpec.from_inspect(_inspect({"svcnet.networks": "n"}, name="/focused_turing")).name == \
        "focused-turing"
    spec = ContainerSpec.from_inspect(_inspect({"svcnet.networks": "n", "svcnet.name": "db",
                                                "svcnet.hostname": "primary"}))
    assert (spec.name, spec.hostname) == ("db", "primary")


@pytest.mark.parametrize("labels, message", [
    ({"svcnet.networks": " , "}, "names no network"),
    ({"svcnet.networks": "n", "svcnet.name": "Not_A_Label"}, "set the label svcnet.name"),
])
def test_labels_that_cannot_be_served_say_what_to_fix(labels, message):
    with pytest.raises(ValidationError, match=message):
        ContainerSpec.from_inspect(_inspect(labels))


def test_engine_url():
    assert engine_url("off") is None and engine_url("") is None
    assert engine_url("on") == "unix:///var/run/docker.sock"
    assert engine_url("unix:///run/user/docker.sock") == "unix:///run/user/docker.sock"


def test_docker_user_chain_mirrors_the_isolation_policy():
    front = Network.create("front", "10.1.0.0/24")
    back = Network.create("back", "10.2.0.0/24", internal=True)
    rules = docker_forward.rules("/p", [front, back])
    fb, bb = bridge_name("/p", "front"), bridge_name("/p", "back")
    assert f"-i {fb} -o {fb} -j ACCEPT" in rules and f"-i {bb} -o {bb} -j ACCEPT" in rules
    assert f"-i {fb} ! -o svbr+ -j ACCEPT" in rules, "out to the world"
    assert f"-o {fb} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT" in rules, "replies back in"
    assert f"-i {bb} ! -o {bb} -j DROP" in rules and f"! -i {bb} -o {bb} -j DROP" in rules, "internal: sealed"
    assert not any(r.startswith(f"-i {bb} ! -o svbr+") for r in rules)
    assert rules[-1] == "-i svbr+ -o svbr+ -j DROP", "between svcnet networks, last"
    assert docker_forward.chain_name("SVCNET-FWD-ABC123") == "SVCNET-DKR-ABC123"
