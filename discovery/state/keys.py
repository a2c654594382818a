"""The etcd key layout, in one place.

All keys live under a prefix (default ``/svcnet``)::

    <prefix>/networks/<network>               Network JSON
    <prefix>/services/<service>               Service JSON (VIPs included)
    <prefix>/endpoints/<network>/<container>  Endpoint JSON        (leased by its owner)
    <prefix>/nodes/<node>                     Node JSON            (kept: `node ls` shows it down)
    <prefix>/alive/<node>                     its lease's heartbeat (leased by its agent)
    <prefix>/ipam/<network>/<address>         claim of an address  (leased if an endpoint's)
    <prefix>/names/<network>/<name>           claim of a DNS name  (leased if an endpoint's)
    <prefix>/ports/<protocol>/<port>          claim of a published port by a service (cluster-wide)
    <prefix>/members/<service>/<network>/<container>   a task of the service (leased with its endpoint):
                                              "has it tasks?" is one range count, not a listing
    <prefix>/ipam-next/<network>/<4|6>        where the next free-address search starts

A claim's value is JSON ``{"kind": "container"|"service", "owner": NAME, "as": ROLE}``;
claims exist so that uniqueness is enforced by etcd transactions (``version == 0``), not
by a read-then-write race.
"""

from __future__ import annotations

from dataclasses import dataclass

KINDS = ("networks", "services", "endpoints", "nodes", "ipam", "names", "ports", "members", "ipam-next")


@dataclass(frozen=True)
class KeyLayout:
    prefix: str = "/svcnet"

    def __post_init__(self) -> None:
        prefix = "/" + self.prefix.strip("/")
        object.__setattr__(self, "prefix", prefix)

    def root(self) -> bytes:
        return f"{self.prefix}/".encode()

    def kind_prefix(self, kind: str, *parts: str) -> bytes:
        return "/".join((self.prefix, kind, *parts, "")).encode()

    def network(self, name: str) -> bytes:
        return f"{self.prefix}/networks/{name}".encode()

    def service(self, name: str) -> bytes:
        return f"{self.prefix}/services/{name}".encode()

    def endpoint(self, network: str, container: str) -> bytes:
        return f"{self.prefix}/endpoints/{network}/{container}".encode()

    def node(self, name: str) -> bytes:
        return f"{self.prefix}/nodes/{name}".encode()

    def alive(self, name: str) -> bytes:
        """Exists while the node's agent holds its lease (not a View kind: only `node ls` reads it)."""
        return f"{self.prefix}/alive/{name}".encode()

    def address_claim(self, network: str, address) -> bytes:
        return f"{self.prefix}/ipam/{network}/{address}".encode()

    def name_claim(self, network: str, name: str) -> bytes:
        return f"{self.prefix}/names/{network}/{name}".encode()

    def member(self, service: str, network: str, container: str) -> bytes:
        return f"{self.prefix}/members/{service}/{network}/{container}".encode()

    def ipam_cursor(self, network: str, version: int) -> bytes:
        return f"{self.prefix}/ipam-next/{network}/{version}".encode()

    def port_claim(self, protocol: str, port: int) -> bytes:
        return f"{self.prefix}/ports/{protocol}/{port}".encode()

    def split(self, key: bytes) -> tuple[str, tuple[str, ...]] | None:
        """``b'/svcnet/endpoints/n/c'`` -> ``('endpoints', ('n', 'c'))``; None if foreign."""
        text = key.decode(errors="replace")
        root = self.prefix + "/"
        if not text.startswith(root):
            return None
        kind, _, rest = text[len(root):].partition("/")
        if kind not in KINDS or not rest:
            return None
        return kind, tuple(rest.split("/"))
