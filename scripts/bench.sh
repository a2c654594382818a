#!/usr/bin/env bash
# Install what the benchmarks need and run them (as root): DNS vs Docker, load balancer, registry, CLI.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
DEBIAN_FRONTEND=noninteractive apt-get install -y -q dnsperf docker.io nftables util-linux >/dev/null
.venv/bin/python bench/dns_bench.py "$@"
.venv/bin/python bench/lb_bench.py
.venv/bin/python bench/registry_bench.py --sandboxes 0
.venv/bin/python bench/cli_bench.py
