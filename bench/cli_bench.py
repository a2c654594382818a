"""CLI start-up and sandbox creation, as a user waits for them, next to `docker run -d`.

    sudo .venv/bin/python bench/cli_bench.py [--runs 20] [--no-docker]

Starts its own etcd and agent under a temp state dir, then times (medians over --runs):
``python -c pass`` (the interpreter's floor), ``svcnet --help``, ``svcnet ps``,
``svcnet run -d`` of an idle ``sleep`` on a network, and the agent's side of that alone
(the API call from a warm process), so the difference says where the time goes.
With Docker installed, it starts its own dockerd (bench/dns_bench.py's DockerSide) and
times ``docker run -d`` of a comparable container on a user-defined network.
Everything it starts it stops.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.dns_bench import DockerSide  # noqa: E402
from discovery.node.client import ApiClient  # noqa: E402
from discovery.state.etcd_local import EtcdProcess, free_port  # noqa: E402
from tests.helpers import sweep  # noqa: E402


def timed(argv: list[str], env: dict) -> float:
    started = time.perf_counter()
    subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def median_ms(values: list[float]) -> str:
    return f"{statistics.median(values) * 1000:7.1f} ms"


def dig_answers(netns: str, name: str) -> bool:
    result = subprocess.run(["nsenter", f"--net={netns}", "dig", "@127.0.0.11", "+tries=1", "+time=1", "+short",
                             name], capture_output=True, text=True)
    return bool(result.stdout.strip()) and not result.stdout.startswith(";")


def restart_gaps(svcnet: list[str], env: dict, home: Path, etcd: EtcdProcess, run_id: str, rounds: int) -> None:
    """SIGKILL the agent, start it again: time until a sandbox's DNS answers, etcd up and down."""
    netns, name = f"/run/netns/svcnet-{run_id}-c0", f"{run_id}-c1"
    state = home / "state"
    for etcd_state in ("up", "down"):
        gaps = []
        for _ in range(rounds):
            time.sleep(1.2)  # the View snapshot is written at most once a second
            os.kill(int((state / "agent.pid").read_text()), 9)
            time.sleep(0.3)
            if etcd_state == "down" and etcd.pid is not None:
                etcd.stop()
            log = open(state / "agent.log", "ab")
            started = time.perf_counter()
            subprocess.Popen([*svcnet, "--log-level", "info", "agent"], env=env, stdout=log, stderr=log,
                             start_new_session=True)
            while not dig_answers(netns, name):
                if time.perf_counter() - started > 30:
                    raise SystemExit("DNS did not come back within 30 s of the restart")
            gaps.append(time.perf_counter() - started)
        print(f"  agent SIGKILL + restart, etcd {etcd_state:4}: DNS answers {median_ms(gaps)} after the start "
              f"(median of {rounds}; target <= 1000 ms)")
    etcd.start()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--no-docker", action="store_true")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root: the benchmark makes network namespaces (and starts dockerd)")
    home = Path(tempfile.mkdtemp(prefix="svcnet-clibench-"))
    etcd = EtcdProcess(home / "etcd", free_port(), free_port())
    etcd.start()
    run_id = f"cb{os.getpid()}"
    prefix = f"/svcnet-bench-{run_id}"
    env = dict(os.environ, SVCNET_ETCD=etcd.url, SVCNET_PREFIX=prefix, SVCNET_STATE_DIR=str(home / "state"),
               SVCNET_UPSTREAM="127.0.0.1:9", SVCNET_METRICS_ADDR="127.0.0.1:0")
    svcnet = [sys.executable, "-m", "discovery.cli"]
    docker = DockerSide([]) if not args.no_docker else None
    try:
        subprocess.run([*svcnet, "network", "create", f"{run_id}-n", "--subnet", "10.252.0.0/24"], env=env,
                       check=True, capture_output=True)
        subprocess.run([*svcnet, "ps"], env=env, check=True, capture_output=True)  # starts the agent
        floor = [timed([sys.executable, "-c", "pass"], env) for _ in range(args.runs)]
        helps = [timed([*svcnet, "--help"], env) for _ in range(args.runs)]
        ps = [timed([*svcnet, "ps"], env) for _ in range(args.runs)]
        runs = [timed([*svcnet, "run", "-d", "--name", f"{run_id}-c{i}", "--network", f"{run_id}-n", "--",
                       "sleep", "300"], env) for i in range(args.runs)]
        api = ApiClient(home / "state" / "agent.sock")
        calls = []
        for i in range(args.runs):
            started = time.perf_counter()
            api.call("POST", "/v1/sandboxes", {"name": f"{run_id}-a{i}", "networks": [f"{run_id}-n"],
                                               "command": ["sleep", "300"], "detach": True})
            calls.append(time.perf_counter() - started)
        print(f"CLI and sandbox creation, median of {args.runs} (this machine, {os.cpu_count()} cores):")
        print(f"  python -c pass (interpreter floor): {median_ms(floor)}")
        print(f"  svcnet --help:                      {median_ms(helps)}   (target <= 150 ms)")
        print(f"  svcnet ps:                          {median_ms(ps)}   (target <= 150 ms)")
        print(f"  svcnet run -d (sleep, one network): {median_ms(runs)}")
        print(f"    of which the agent's work (API):  {median_ms(calls)}")
        restart_gaps(svcnet, env, home, etcd, run_id, args.runs // 3 or 1)
        if docker is not None:
            docker.start()
            drun = []
            for i in range(args.runs):
                started = time.perf_counter()
                docker.docker("run", "-d", "--name", f"cb{i}", "--network", docker.network, docker.IMAGE,
                              "/bin/sleep", "300")
                drun.append(time.perf_counter() - started)
            docker.docker("rm", "-f", *[f"cb{i}" for i in range(args.runs)], check=False)
            print(f"  docker run -d (same, own dockerd):  {median_ms(drun)}")
            print(f"  ratio svcnet/docker run -d: {statistics.median(runs) / statistics.median(drun):.2f} "
                  "(target <= 1.0)")
    finally:
        if docker is not None:
            docker.stop()
        for i in range(args.runs):
            for name in (f"{run_id}-c{i}", f"{run_id}-a{i}"):
                subprocess.run([*svcnet, "rm", name], env=env, capture_output=True)
        subprocess.run([*svcnet, "network", "rm", f"{run_id}-n"], env=env, capture_output=True)
        pid_file = home / "state" / "agent.pid"
        if pid_file.exists():
            subprocess.run(["kill", pid_file.read_text().strip()])
            time.sleep(1)
        sweep(run_id, prefix, home / "state")
        etcd.stop()


if __name__ == "__main__":
    main()
