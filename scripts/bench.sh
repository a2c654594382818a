#!/usr/bin/env bash
# Install what the benchmarks need and run them (as root): DNS vs Docker, load balancer, registry, CLI,
# across hosts (scripts/cluster.sh). bench/compose_bench.py needs the Docker lane's setup: see README.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
DEBIAN_FRONTEND=noninteractive apt-get install -y -q dnsperf docker.io nftables util-linux iperf3 >/dev/null
.venv/bin/python bench/dns_bench.py "$@"
.venv/bin/python bench/lb_bench.py
.venv/bin/python bench/registry_bench.py --sandboxes 0
.venv/bin/python bench/cli_bench.py
.venv/bin/python bench/cluster_bench.py
