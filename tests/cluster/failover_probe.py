"""Run on a cluster host (scripts/cluster.sh on HOST -- python3 THIS ...) by test_cluster.py.

    write PREFIX SECONDS   create services s0, s1, ... one after another for SECONDS, each
                           retried until etcd acknowledges it, then "done"; print the count
    watch PREFIX           follow the registry with the node's own ViewWatcher until "done"
                           is in the View; print its services and every revision it published
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time

from discovery.errors import ConflictError, EtcdUnavailableError
from discovery.state.etcd import TRANSIENT_ERRORS, client_for
from discovery.state.keys import KeyLayout
from discovery.state.model import Network, Service
from discovery.state.registry import Registry
from discovery.state.watch import ViewWatcher


async def write(prefix: str, seconds: float) -> None:
    client = client_for(os.environ["SVCNET_ETCD"])
    registry = Registry(client, KeyLayout(prefix))
    await registry.create_network(Network.create("probe", "10.99.0.0/16"))
    acknowledged, deadline = 0, time.monotonic() + seconds
    while time.monotonic() < deadline:
        await _create(registry, Service(f"s{acknowledged}", ("probe",), endpoint_mode="dnsrr"))
        acknowledged += 1
        await asyncio.sleep(0.02)
    await _create(registry, Service("done", ("probe",), endpoint_mode="dnsrr"))
    print(json.dumps({"acknowledged": acknowledged}))
    await client.close()


async def _create(registry: Registry, service: Service) -> None:
    """Create it, retrying while etcd fails over; an "already exists" after a lost reply means it landed."""
    while True:
        try:
            await registry.create_service(service)
            return
        except (EtcdUnavailableError, *TRANSIENT_ERRORS):
            await asyncio.sleep(0.05)
        except ConflictError as exc:
            if "already exists" in str(exc):
                return
            raise


async def watch(prefix: str) -> None:
    client = client_for(os.environ["SVCNET_ETCD"])
    watcher = ViewWatcher(client, KeyLayout(prefix))
    revisions: list[int] = []
    watcher.subscribe(lambda view: revisions.append(view.revision))
    task = asyncio.create_task(watcher.run())
    view = await watcher.wait_for(lambda v: "done" in v.services, timeout=90)
    print(json.dumps({"services": sorted(view.services), "revisions": revisions,
                      "relists": watcher.relists, "reconnects": watcher.reconnects}))
    task.cancel()
    await client.close()


if __name__ == "__main__":
    verb, prefix = sys.argv[1], sys.argv[2]
    asyncio.run(write(prefix, float(sys.argv[3])) if verb == "write" else watch(prefix))
