#!/usr/bin/env bash
# Install everything, then run the whole test suite (unit, integration on a real etcd,
# acceptance on real namespaces and bridges), the namespace-only demo (from the state a
# user has: the suite must have stopped every etcd and agent it started), then the Docker
# lane (a dockerd of its own if none runs: `agent --docker` with plain `docker run`, then
# compose.yaml, then the README's demo, scripts/demo.sh), then the IPVS lane in a VM (this
# kernel has no IPVS). Needs root. Extra args go to pytest; SVCNET_SKIP_VM_LANE=1 leaves
# the VM out, SVCNET_SKIP_DOCKER_LANE=1 the Docker lane, SVCNET_SKIP_DEMO=1 both demos.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ $EUID -ne 0 ]]; then
    echo "scripts/test.sh needs root (network namespaces, bridges, iptables); run it with sudo" >&2
    exit 1
fi
if [[ ${SVCNET_SKIP_VM_LANE:-0} != 1 ]]; then
    scripts/install-deps.sh --with-vm-lane
else
    scripts/install-deps.sh
fi
echo "==> ruff"
.venv/bin/ruff check discovery lb tests bench
echo "==> pytest"
.venv/bin/python -m pytest -p no:cacheprovider -ra --ignore=tests/docker "$@" tests
if [[ ${SVCNET_SKIP_DEMO:-0} != 1 ]]; then
    echo "==> demo lane: scripts/demo-netns.sh"
    leftover=$(pgrep -af -- '-m discovery\.cli|etcd .*pytest-of-' || true)
    if [[ -n $leftover ]]; then
        echo "demo lane: the test suite left processes running (a test must stop what it starts):" >&2
        echo "$leftover" >&2
        exit 1
    fi
    scripts/demo-netns.sh
fi
if [[ ${SVCNET_SKIP_DOCKER_LANE:-0} != 1 ]]; then
    echo "==> docker lane"
    scripts/docker-setup.sh install
    scripts/docker-setup.sh start
    trap 'scripts/docker-setup.sh stop' EXIT
    .venv/bin/python -m pytest -p no:cacheprovider -ra "$@" tests/docker
    if [[ ${SVCNET_SKIP_DEMO:-0} != 1 ]]; then
        echo "==> docker lane: scripts/demo.sh (the README's first command)"
        scripts/demo.sh
    fi
    scripts/docker-setup.sh stop
    trap - EXIT
fi
if [[ ${SVCNET_SKIP_VM_LANE:-0} != 1 ]]; then
    echo "==> ipvs lane (VM)"
    tests/vm/ipvs-lane.sh
fi
