#!/usr/bin/env bash
# Install what svcnet needs on a Debian/Ubuntu machine, as root: system packages and a
# virtualenv at .venv with svcnet and its test extras. Safe to run again.
# --with-vm-lane adds what the IPVS lane needs: a kernel with IPVS and qemu to boot it.
set -euo pipefail
cd "$(dirname "$0")/.."

# Everything the agent, the CLI, the demo and the tests run: kmod (modprobe ip_vs),
# ipvsadm, conntrack and libnftables1 (the nftables backend) are optional at run time (the agent falls back and says what to
# install), but a fresh machine gets them so the demo shows the full dataplane.
APT_PACKAGES=(etcd-server etcd-client iproute2 iptables nftables libnftables1 dnsutils iputils-ping conntrack kmod ipvsadm curl openssl
              python3 python3-venv python3-dev gcc procps util-linux)
if [[ ${1:-} == --with-vm-lane ]]; then
    APT_PACKAGES+=(linux-image-amd64 qemu-system-x86 busybox-static)
fi

# shellcheck source=scripts/lib/apt.sh
source scripts/lib/apt.sh
apt_install "${APT_PACKAGES[@]}"

if [[ ! -x .venv/bin/python ]]; then
    echo "==> creating .venv"
    python3 -m venv .venv
fi
echo "==> pip install -e .[test]"
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
# compat mode: a plain .pth entry, not setuptools' import hook, which costs every CLI call ~10 ms
.venv/bin/python -m pip install -q --no-warn-script-location -e '.[test]' --config-settings editable_mode=compat
