#!/usr/bin/env bash
# Install everything, then run the whole test suite (unit, integration on a real etcd,
# acceptance on real namespaces and bridges). Needs root. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ $EUID -ne 0 ]]; then
    echo "scripts/test.sh needs root (network namespaces, bridges, iptables); run it with sudo" >&2
    exit 1
fi
scripts/install-deps.sh
echo "==> ruff"
.venv/bin/ruff check discovery lb tests bench
echo "==> pytest"
exec .venv/bin/python -m pytest -p no:cacheprovider -ra "$@" tests
