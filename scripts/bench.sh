#!/usr/bin/env bash
# Install what the benchmarks need and run them (as root): DNS vs Docker, load balancer, registry, CLI,
# across hosts (scripts/cluster.sh). bench/compose_bench.py needs the Docker lane's setup: see README.
# `scripts/bench.sh scale [ARGS]` runs only bench/scale_bench.py (10,000 services, 100 sandboxes),
# whose last line is one JSON object.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
.venv/bin/python -m pip install -q -e '.[bench]' --config-settings editable_mode=compat  # py-spy, for --profile
if [[ ${1:-} == scale ]]; then
    shift
    exec .venv/bin/python bench/scale_bench.py "$@"
fi
DEBIAN_FRONTEND=noninteractive apt-get install -y -q dnsperf docker.io nftables util-linux iperf3 >/dev/null
.venv/bin/python bench/dns_bench.py "$@"
.venv/bin/python bench/lb_bench.py
.venv/bin/python bench/registry_bench.py --sandboxes 0
.venv/bin/python bench/cli_bench.py
.venv/bin/python bench/cluster_bench.py
.venv/bin/python bench/cluster_floors.py
