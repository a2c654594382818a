"""Scale-out convergence: `docker compose up -d --scale web=N`, then how long until the
client's resolver lists every replica — svcnet (compose.yaml: `dig tasks.web`, answered by
the agent) next to Docker's embedded DNS (the same images on a Docker network, where the
service name lists every replica: `dig web`), in the same run.

    sudo .venv/bin/python bench/compose_bench.py [--replicas 20] [--rounds 3]

Needs the Docker engine and compose plugin (scripts/docker-setup.sh install && start) and
the images (scripts/images.sh). Each round scales web from 1 to N and back. Two figures per
side: from the moment `up` is started (what a user waits for) and from the moment it
returns (the resolver's own lag once every container runs). Both projects are brought down
at the end, whatever happens.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
POLL = 0.02

DOCKER_SIDE = """\
name: svcnet-bench-docker
services:
  web:
    image: svcnet-demo:local
    entrypoint: [hostname-server]
    command: ["80"]
    networks: [bench]
  client:
    image: svcnet-demo:local
    entrypoint: [sleep]
    command: [infinity]
    init: true
    networks: [bench]
networks:
  bench:
    ipam: {config: [{subnet: 10.234.0.0/16}]}
"""


class Side:
    def __init__(self, label: str, files: list[str], query: str) -> None:
        self.label, self.files, self.query = label, files, query
        self.last_error = ""

    def compose(self, *args: str, timeout: float = 600) -> None:
        argv = ["docker", "compose", *[a for f in self.files for a in ("-f", f)], *args]
        subprocess.run(argv, cwd=ROOT, check=True, capture_output=True, timeout=timeout)

    def client_pid(self) -> int:
        argv = ["docker", "compose", *[a for f in self.files for a in ("-f", f)], "ps", "-q", "client"]
        container = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()[0]
        return int(subprocess.run(["docker", "inspect", "-f", "{{.State.Pid}}", container], capture_output=True,
                                  text=True, check=True).stdout)

    def count(self, pid: int) -> int:
        """Replicas in the answer, asked from inside the client's netns (~10 ms a try, unlike
        `docker compose exec`'s ~150 ms)."""
        argv = ["nsenter", f"--net=/proc/{pid}/ns/net", "dig", "@127.0.0.11", "+short", "+tries=1", "+time=1",
                self.query]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        if result.returncode != 0:
            self.last_error = (result.stdout + result.stderr).strip()[-300:]
        return sum(1 for line in result.stdout.splitlines() if line and not line.startswith(";;"))

    def scale(self, replicas: int) -> tuple[float, float]:
        """Seconds from `up` started, and from `up` returned, until the answer lists ``replicas``."""
        pid = self.client_pid()
        started = time.monotonic()
        self.compose("up", "-d", "--scale", f"web={replicas}")
        returned = time.monotonic()
        deadline = returned + 60
        while self.count(pid) != replicas:
            if time.monotonic() > deadline:
                subprocess.run(["docker", "compose", *[a for f in self.files for a in ("-f", f)], "logs",
                                "--tail", "60"], cwd=ROOT, timeout=60)
                raise SystemExit(f"{self.label}: {self.query} listed {self.count(pid)} replicas, not {replicas}, "
                                 f"for 60 s (client pid {pid}, now {self.client_pid()}; {self.last_error})")
            time.sleep(POLL)
        done = time.monotonic()
        return done - started, done - returned


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sides", default="svcnet,docker", help="which to measure (default: both)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="svcnet-composebench-") as tmp:
        docker_file = Path(tmp) / "compose.yaml"
        docker_file.write_text(DOCKER_SIDE)
        sides = [Side("svcnet", [str(ROOT / "compose.yaml")], "tasks.web"), Side("docker", [str(docker_file)], "web")]
        sides = [s for s in sides if s.label in args.sides.split(",")]
        results: dict[str, list[tuple[float, float]]] = {s.label: [] for s in sides}
        try:
            for side in sides:
                print(f"{side.label}: up", flush=True)
                side.compose("up", "-d", "--wait", "--scale", "web=1")
                for round_ in range(args.rounds):
                    total, lag = side.scale(args.replicas)
                    results[side.label].append((total, lag))
                    print(f"  round {round_ + 1}: 1 -> {args.replicas} replicas listed {total:.2f} s after up "
                          f"started, {lag * 1000:.0f} ms after it returned", flush=True)
                    side.scale(1)
        finally:
            for side in sides:
                side.compose("down", "--timeout", "3")
    if len(results) < 2:
        return 0
    print(f"\nscale web 1 -> {args.replicas} (median of {args.rounds}):")
    medians = {}
    for label, runs in results.items():
        medians[label] = (statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs))
        print(f"  {label:7s} listed after {medians[label][0]:.2f} s from up, {medians[label][1] * 1000:.0f} ms "
              "after up returned")
    ours, theirs = medians["svcnet"], medians["docker"]
    print(f"  ratio svcnet/docker: {ours[0] / theirs[0]:.2f}x from up, "
          f"{ours[1] / max(theirs[1], 1e-3):.2f}x after up returned (below 1 is faster)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
