import json
import logging

from discovery.state.keys import KeyLayout
from discovery.state.model import Endpoint, Network
from discovery.state.view import Change, View

KEYS = KeyLayout("/t")


def _net(name, subnet):
    return json.dumps(Network.create(name, subnet).to_dict()).encode()


def _ep(container, network, address):
    return json.dumps({"container": container, "network": network, "ipv4": address, "node": "n1"}).encode()


def test_apply_puts_and_deletes():
    view = View().apply([Change(b"/t/networks/a", _net("a", "10.1.0.0/24")),
                         Change(b"/t/endpoints/a/c1", _ep("c1", "a", "10.1.0.2"))], 5, KEYS)
    assert view.revision == 5 and set(view.networks) == {"a"}
    assert view.endpoints[("a", "c1")].ipv4.exploded == "10.1.0.2"
    later = view.apply([Change(b"/t/endpoints/a/c1", None)], 6, KEYS)
    assert not later.endpoints and view.endpoints  # the old snapshot is unchanged
    assert later.networks is view.networks  # untouched tables are shared, not copied


def test_bad_values_are_logged_and_skipped(caplog):
    caplog.set_level(logging.WARNING)
    view = View().apply([
        Change(b"/t/networks/a", b"{not json"),
        Change(b"/t/networks/b", _net("other", "10.2.0.0/24")),  # name does not match key
        Change(b"/t/endpoints/a", _ep("c", "a", "10.1.0.2")),  # wrong key shape
        Change(b"/t/networks/c", _net("c", "10.3.0.0/24")),
        Change(b"/elsewhere/networks/d", _net("d", "10.4.0.0/24")),
    ], 9, KEYS)
    assert set(view.networks) == {"c"}
    assert "/t/networks/a" in caplog.text and "/t/networks/b" in caplog.text and "/t/endpoints/a" in caplog.text


def test_claims_are_not_part_of_the_view():
    view = View().apply([Change(b"/t/names/a/x", b'{"kind":"container"}')], 3, KEYS)
    assert not view.networks and not view.endpoints and view.revision == 3


def test_tasks_of_service():
    ep = Endpoint("c1", "a", "10.1.0.2", "n1", service="web")
    view = View().apply([Change(b"/t/endpoints/a/c1", json.dumps(ep.to_dict()).encode())], 2, KEYS)
    assert [t.container for t in view.tasks_of("web")] == ["c1"]


def test_key_layout_split():
    assert KEYS.split(b"/t/endpoints/n/c") == ("endpoints", ("n", "c"))
    assert KEYS.split(b"/tx/endpoints/n/c") is None
    assert KEYS.split(b"/t/bogus/x") is None


def test_services_that_publish_a_port_are_indexed_as_they_change():
    from discovery.state.model import PortSpec, Service

    def put(service):
        return Change(KEYS.service(service.name), json.dumps(service.to_dict()).encode())
    web = Service("web", ("a",), ports=(PortSpec.parse("8080:80"),))
    view = View().apply([put(web), put(Service("db", ("a",)))], 1, KEYS)
    assert dict(view.published) == {"web": web}
    quiet = Service("web", ("a",))
    later = view.apply([put(quiet), put(Service("api", ("a",), ports=(PortSpec.parse("53:53/udp"),)))], 2, KEYS)
    assert set(later.published) == {"api"}, "web stopped publishing, api started"
    gone = later.apply([Change(KEYS.service("api"), None)], 3, KEYS)
    assert not gone.published and dict(view.published) == {"web": web}, "earlier Views keep theirs"
