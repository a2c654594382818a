"""Connecting to etcd: parse ``--etcd`` URLs and open an aetcd client on the first that answers."""

from __future__ import annotations

import asyncio
import os
from urllib.parse import urlsplit

import aetcd

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
        if parts.scheme not in ("http", ""):
            raise ValidationError(f"etcd URL {item!r}: only http:// is supported")
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
# within seconds of etcd returning. Keepalives find a dead peer that sent no RST.
# min_reconnect_backoff is also gRPC's *connect timeout*: too small and a slow machine (or
# a VM under emulation) never finishes the HTTP/2 handshake.
CHANNEL_OPTIONS = {
    "grpc.initial_reconnect_backoff_ms": 100,
    "grpc.min_reconnect_backoff_ms": 5000,
    "grpc.max_reconnect_backoff_ms": 2000,
    "grpc.keepalive_time_ms": 10000,
    "grpc.keepalive_timeout_ms": 5000,
}


def default_timeout() -> float:
    """Seconds per etcd request (env SVCNET_ETCD_TIMEOUT, default 3; raise it on slow machines)."""
    try:
        return float(os.environ.get("SVCNET_ETCD_TIMEOUT", "3"))
    except ValueError:
        raise ValidationError("SVCNET_ETCD_TIMEOUT must be a number of seconds") from None


async def connect(urls: str, timeout: float | None = None) -> aetcd.Client:
    """An aetcd client for the first endpoint that answers a status call."""
    timeout = timeout if timeout is not None else default_timeout()
    errors = []
    for host, port in parse_endpoints(urls):
        client = aetcd.Client(host=host, port=port, timeout=timeout, options=CHANNEL_OPTIONS)
        try:
            await asyncio.wait_for(client.status(), timeout)
        except (*TRANSIENT_ERRORS, aetcd.exceptions.ClientError) as exc:
            errors.append(f"{host}:{port}: {exc or type(exc).__name__}")
            await client.close()
            continue
        return client
    raise EtcdUnavailableError(
        "cannot reach etcd at " + "; ".join(errors) + ". Is it running? Check --etcd / SVCNET_ETCD"
    )
