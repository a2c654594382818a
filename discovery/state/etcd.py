"""Connecting to etcd: parse ``--etcd`` URLs and open one aetcd client on all of them.

The client's gRPC channel holds every endpoint given (``round_robin`` over the members
that are up), so when a member dies its requests move to the others with no code of ours
in the way; a request that was in flight fails with a transient error and its caller
retries. Watches end with the connection and are resumed from their last revision.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
from urllib.parse import urlsplit

import aetcd
import grpc

from discovery.errors import EtcdUnavailableError, ValidationError

# Errors that mean "etcd is not there right now": retry later, keep serving what we have.
TRANSIENT_ERRORS = (
    aetcd.exceptions.ConnectionFailedError,
    aetcd.exceptions.ConnectionTimeoutError,
    aetcd.exceptions.InternalError,
    aetcd.exceptions.WatchTimeoutError,
    asyncio.TimeoutError,
    OSError,
)


def parse_endpoints(text: str) -> list[tuple[str, int]]:
    """``"http://a:2379,b:2379"`` -> ``[("a", 2379), ("b", 2379)]``."""
    endpoints = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        parts = urlsplit(item if "://" in item else f"http://{item}")
        if parts.scheme not in ("http", "https", ""):
            raise ValidationError(f"etcd URL {item!r}: use http:// or https://")
        if not parts.hostname:
            raise ValidationError(f"etcd URL {item!r} has no host; use http://HOST:PORT")
        try:
            port = parts.port or 2379
        except ValueError:
            raise ValidationError(f"etcd URL {item!r} has a bad port") from None
        endpoints.append((parts.hostname, port))
    if not endpoints:
        raise ValidationError("no etcd URL given; use --etcd http://HOST:2379")
    return endpoints


# gRPC's default reconnect backoff grows to 120 s; a registry client wants to be back
# within a second or so of etcd returning: the channel's own reconnect attempts start at
# 100 ms and grow to at most 1 s (plus gRPC's 20 % jitter), and ``retry_pause`` wakes our
# retry loops as soon as the channel is connected again. Keepalives find a dead peer that
# sent no RST. min_reconnect_backoff is gRPC's *connect timeout*, not a wait: too small and
# a slow machine (or a VM under emulation) never finishes the HTTP/2 handshake.
CHANNEL_OPTIONS = {
    "grpc.initial_reconnect_backoff_ms": 100,
    "grpc.min_reconnect_backoff_ms": 1000,
    "grpc.max_reconnect_backoff_ms": 1000,
    "grpc.keepalive_time_ms": 10000,
    "grpc.keepalive_timeout_ms": 5000,
    "grpc.lb_policy_name": "round_robin",
}


async def retry_pause(client: aetcd.Client, seconds: float) -> None:
    """Wait ``seconds`` before retrying a failed etcd call, or less: return as soon as the
    client's channel comes back to READY, so a node is back as soon as etcd is, whatever
    its backoff had grown to. A channel that is READY already (the error was not about the
    connection) gives no shortcut: the full wait, so a failing call never spins."""
    channel = client.channel
    if channel is None:
        await asyncio.sleep(seconds)
        return
    state = channel.get_state(try_to_connect=True)
    if state == grpc.ChannelConnectivity.READY:
        await asyncio.sleep(seconds)
        return

    async def until_ready() -> None:
        nonlocal state
        while state != grpc.ChannelConnectivity.READY:
            await channel.wait_for_state_change(state)
            state = channel.get_state(try_to_connect=True)
    try:
        await asyncio.wait_for(until_ready(), seconds)
    except TimeoutError:
        pass


def default_timeout() -> float:
    """Seconds per etcd request (env SVCNET_ETCD_TIMEOUT, default 3; raise it on slow machines)."""
    try:
        return float(os.environ.get("SVCNET_ETCD_TIMEOUT", "3"))
    except ValueError:
        raise ValidationError("SVCNET_ETCD_TIMEOUT must be a number of seconds") from None


def grpc_target(endpoints: list[tuple[str, int]]) -> str:
    """One gRPC target naming every endpoint: ``ipv4:a:2379,b:2379`` (names resolved now)."""
    addresses = []
    for host, port in endpoints:
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            try:
                infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except socket.gaierror:
                if len(endpoints) == 1:
                    return f"{host}:{port}"  # let gRPC resolve (and report) it
                raise ValidationError(f"etcd host {host!r} does not resolve; check --etcd") from None
            address = ipaddress.ip_address(infos[0][4][0])
        addresses.append((address, port))
    if all(a.version == 4 for a, _ in addresses):
        return "ipv4:" + ",".join(f"{a}:{p}" for a, p in addresses)
    mapped = [a if a.version == 6 else ipaddress.IPv6Address(f"::ffff:{a}") for a, _ in addresses]
    return "ipv6:" + ",".join(f"[{a}]:{p}" for a, (_, p) in zip(mapped, addresses, strict=True))


class TlsFiles:
    """Client TLS for etcd, from SVCNET_ETCD_CACERT / _CERT / _KEY (the CLI's --etcd-cacert,
    --etcd-cert, --etcd-key set them, so an agent the CLI starts inherits them)."""

    def __init__(self, cacert: str, cert: str | None, key: str | None, server_name: str | None) -> None:
        if bool(cert) != bool(key):
            raise ValidationError("give --etcd-cert and --etcd-key together (a client certificate and its key)")
        try:
            self.cacert = open(cacert, "rb").read()
            self.cert = open(cert, "rb").read() if cert else None
            self.key = open(key, "rb").read() if key else None
        except OSError as exc:
            raise ValidationError(f"cannot read an etcd TLS file {exc.filename!r}: {exc.strerror}") from None
        self.server_name = server_name

    @classmethod
    def from_env(cls, urls: str) -> TlsFiles | None:
        """TLS if the URLs say https:// (all of them: one channel spans every endpoint)."""
        schemes = {"https" if u.strip().startswith("https://") else "http" for u in urls.split(",") if u.strip()}
        cacert = os.environ.get("SVCNET_ETCD_CACERT")
        if schemes == {"http", "https"}:
            raise ValidationError("etcd URLs mix http:// and https://; give every member the same scheme")
        if "https" not in schemes:
            if cacert:
                raise ValidationError("--etcd-cacert is given but the etcd URLs are http://; use https:// URLs")
            return None
        if not cacert:
            raise ValidationError("an https:// etcd URL needs --etcd-cacert (and --etcd-cert/--etcd-key "
                                  "where etcd checks client certificates)")
        return cls(cacert, os.environ.get("SVCNET_ETCD_CERT"), os.environ.get("SVCNET_ETCD_KEY"),
                   os.environ.get("SVCNET_ETCD_SERVER_NAME"))


class _TlsClient(aetcd.Client):
    """aetcd dials plaintext only: the same client over a TLS channel."""

    def __init__(self, *args, tls: TlsFiles, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._tls = tls

    async def connect(self) -> None:
        if self._connected.is_set():
            return
        if self._is_connecting:
            await asyncio.wait_for(self._connected.wait(), self._connect_wait_timeout)
            return
        from aetcd import rpc, watcher

        try:
            self._is_connecting = True
            credentials = grpc.ssl_channel_credentials(self._tls.cacert, self._tls.key, self._tls.cert)
            self.channel = grpc.aio.secure_channel(f"{self._host}:{self._port}", credentials,
                                                   options=list(self._options.items()))
            self.kvstub = rpc.KVStub(self.channel)
            self.clusterstub = rpc.ClusterStub(self.channel)
            self.leasestub = rpc.LeaseStub(self.channel)
            self.maintenancestub = rpc.MaintenanceStub(self.channel)
            self._watcher = watcher.Watcher(rpc.WatchStub(self.channel), timeout=self._timeout,
                                            metadata=self.metadata)
            self._connected.set()
        finally:
            self._is_connecting = False


def client_for(urls: str, timeout: float | None = None) -> aetcd.Client:
    """A client on every endpoint of ``urls``; it connects on first use (no network here).

    Over TLS (SVCNET_ETCD_CACERT set) one gRPC channel spans every endpoint, so every member's
    certificate is checked against one name: the first endpoint's host, or SVCNET_ETCD_SERVER_NAME.
    """
    endpoints = parse_endpoints(urls)
    target = grpc_target(endpoints)
    # aetcd dials f"{host}:{port}"; split our multi-address target where it will be joined again
    host, _, port = target.rpartition(":")
    timeout = timeout if timeout is not None else default_timeout()
    tls = TlsFiles.from_env(urls)
    if tls is None:
        return aetcd.Client(host=host, port=int(port), timeout=timeout, options=CHANNEL_OPTIONS)
    options = dict(CHANNEL_OPTIONS, **{"grpc.ssl_target_name_override": tls.server_name or endpoints[0][0],
                                       "grpc.default_authority": tls.server_name or endpoints[0][0]})
    return _TlsClient(host=host, port=int(port), timeout=timeout, options=options, tls=tls)


async def connect(urls: str, timeout: float | None = None) -> aetcd.Client:
    """A client on every endpoint of ``urls``, once one of them answers a status call."""
    timeout = timeout if timeout is not None else default_timeout()
    client = client_for(urls, timeout)
    try:
        await asyncio.wait_for(client.status(), timeout)
    except (*TRANSIENT_ERRORS, aetcd.exceptions.ClientError) as exc:
        await client.close()
        raise EtcdUnavailableError(
            f"cannot reach etcd at {urls}: {exc or type(exc).__name__}. Is it running? Check --etcd / SVCNET_ETCD"
        ) from None
    return client
