"""Benchmark the foundation: registry -> View propagation, and sandbox creation.

    sudo .venv/bin/python bench/registry_bench.py [--changes 1000] [--sandboxes 20]

Prints:
  * how long a registry change takes to appear in another process's View: a writer
    process puts endpoint keys one after another; a watcher process (a ViewWatcher, as
    the agent runs it) notes when each appears. Latency = appearance - just before the
    put, both on CLOCK_MONOTONIC, which is system-wide. p50/p99/max over all changes.
  * how long `svcnet run -d` takes to return a ready sandbox (netns, veth, addresses,
    registry entries), as a user sees it from the shell, and the agent's share of it
    (the API call alone, without the CLI's interpreter start-up). p50 and p90.

Starts its own etcd on free loopback ports and cleans up after itself.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from discovery.node.client import ApiClient  # noqa: E402
from discovery.state.etcd import connect  # noqa: E402
from discovery.state.etcd_local import EtcdProcess, free_port  # noqa: E402
from discovery.state.keys import KeyLayout  # noqa: E402
from discovery.state.watch import ViewWatcher  # noqa: E402


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(pct / 100 * (len(ordered) - 1))))]


def _watch_process(url: str, prefix: str, expected: int, ready, results) -> None:
    async def run():
        client = await connect(url)
        watcher = ViewWatcher(client, KeyLayout(prefix))
        seen: dict[str, float] = {}

        def on_view(view):
            now = time.monotonic()
            for _network, container in view.endpoints:
                if container not in seen:
                    seen[container] = now

        watcher.subscribe(on_view)
        task = asyncio.create_task(watcher.run())
        await watcher.ready()
        ready.set()
        await watcher.wait_for(lambda v: len(v.endpoints) >= expected, timeout=300)
        results.put(seen)
        task.cancel()
        await client.close()

    asyncio.run(run())


async def _write_changes(url: str, prefix: str, count: int) -> dict[str, float]:
    client = await connect(url)
    keys = KeyLayout(prefix)
    sent = {}
    for i in range(count):
        name = f"c{i}"
        value = json.dumps({"container": name, "network": "bench", "ipv4": f"10.{i // 65536 % 256}.{i // 256 % 256}.{i % 256}",
                            "node": "bench"}).encode()
        sent[name] = time.monotonic()
        await client.put(keys.endpoint("bench", name), value)
    await client.close()
    return sent


def bench_propagation(url: str, changes: int) -> None:
    prefix = f"/svcnet-bench-{secrets.token_hex(3)}"
    ctx = multiprocessing.get_context("spawn")
    ready, results = ctx.Event(), ctx.Queue()
    watcher = ctx.Process(target=_watch_process, args=(url, prefix, changes, ready, results))
    watcher.start()
    if not ready.wait(30):
        raise SystemExit("the watcher process did not start")
    started = time.monotonic()
    sent = asyncio.run(_write_changes(url, prefix, changes))
    elapsed = time.monotonic() - started
    seen = results.get(timeout=300)
    watcher.join(30)
    latencies = [(seen[name] - sent[name]) * 1000 for name in sent]
    print(f"view propagation over {changes} changes ({changes / elapsed:.0f} writes/s, one writer):")
    print(f"  p50 {percentile(latencies, 50):.2f} ms   p99 {percentile(latencies, 99):.2f} ms   "
          f"max {max(latencies):.2f} ms   (target p99 <= 20 ms)")

    async def clean():
        client = await connect(url)
        await client.delete_prefix(KeyLayout(prefix).root())
        await client.close()
    asyncio.run(clean())


def bench_sandboxes(url: str, count: int) -> None:
    if os.geteuid() != 0:
        print("sandbox creation: skipped, needs root (run the benchmark with sudo)")
        return
    run_id = "b" + secrets.token_hex(3)
    state = Path(tempfile.mkdtemp(prefix="svcnet-bench-"))
    prefix = f"/svcnet-bench-{run_id}"
    env = dict(os.environ, SVCNET_ETCD=url, SVCNET_PREFIX=prefix, SVCNET_STATE_DIR=str(state),
               SVCNET_NODE=f"node-{run_id}")

    def svcnet(*args: str) -> None:
        subprocess.run([sys.executable, "-m", "discovery.cli", *args], env=env, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    network = f"{run_id}-net"
    svcnet("network", "create", network, "--subnet", "10.240.0.0/22")
    svcnet("ps")  # start the agent outside the timings
    cli_times, api_times = [], []
    names = []
    try:
        for i in range(count):
            name = f"{run_id}-c{i}"
            names.append(name)
            started = time.perf_counter()
            svcnet("run", "-d", "--name", name, "--network", network)
            cli_times.append((time.perf_counter() - started) * 1000)
        api = ApiClient(state / "agent.sock")
        for i in range(count):
            name = f"{run_id}-a{i}"
            names.append(name)
            started = time.perf_counter()
            api.call("POST", "/v1/sandboxes", {"name": name, "networks": [network]})
            api_times.append((time.perf_counter() - started) * 1000)
        print(f"sandbox creation over {count} sandboxes each way:")
        print(f"  svcnet run -d (CLI, as a user sees it): p50 {statistics.median(cli_times):.0f} ms   "
              f"p90 {percentile(cli_times, 90):.0f} ms")
        print(f"  agent API POST /v1/sandboxes:           p50 {statistics.median(api_times):.0f} ms   "
              f"p90 {percentile(api_times, 90):.0f} ms")
    finally:
        for name in names:
            subprocess.run([sys.executable, "-m", "discovery.cli", "rm", name], env=env, capture_output=True)
        subprocess.run([sys.executable, "-m", "discovery.cli", "network", "rm", network], env=env, capture_output=True)
        time.sleep(0.5)
        pid_file = state / "agent.pid"
        if pid_file.exists():
            try:
                os.kill(int(pid_file.read_text()), 15)
            except ProcessLookupError:
                pass
        time.sleep(0.5)
        from discovery.host import firewall
        firewall.remove(prefix)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--changes", type=int, default=1000, help="registry changes to time (default 1000)")
    parser.add_argument("--sandboxes", type=int, default=20, help="sandboxes to create each way (default 20)")
    parser.add_argument("--etcd", help="use this etcd instead of starting one")
    args = parser.parse_args()
    member = None
    url = args.etcd
    if url is None:
        member = EtcdProcess(Path(tempfile.mkdtemp(prefix="svcnet-bench-etcd-")), free_port(), free_port())
        member.start()
        url = member.url
    try:
        bench_propagation(url, args.changes)
        if args.sandboxes:
            bench_sandboxes(url, args.sandboxes)
    finally:
        if member is not None:
            member.stop()


if __name__ == "__main__":
    main()
