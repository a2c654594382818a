#!/usr/bin/env bash
# The IPVS lane: this machine's kernel has no IPVS, so boot Debian's kernel in a VM with
# virtme-ng (over this machine's own filesystem, so the same .venv and etcd run inside)
# and run the load-balancer acceptance tests there: the backend alone driven by the
# agent's sync loop (tests/acceptance/test_lb_backend.py) and the whole agent with real
# traffic (tests/acceptance/test_lb_agent.py: auto picking IPVS, the IPVS sysctls, draining
# with --drain-grace, removal, metrics). SVCNET_EXPECT_LB_BACKEND=ipvs makes a silent
# fallback to iptables a failure. Under emulation everything runs ~35x slower (an agent
# start ~60 s, a CLI call ~5 s): SVCNET_TEST_TIME_SCALE stretches the tests' waits.
# Needs: linux-image-amd64, qemu-system-x86, busybox-static, ipvsadm (apt) and virtme-ng
# (pip, in .venv) -- scripts/install-deps.sh --with-vm-lane installs them.
set -euo pipefail
cd "$(dirname "$0")/../.."
repo=$PWD
kernel=$( (ls /boot/vmlinuz-* 2>/dev/null || true) | sort -V | tail -1)
if [[ -z $kernel ]]; then
    echo "ipvs lane: FAILED: no kernel image under /boot to boot in the VM; apt-get install linux-image-amd64" >&2
    echo "          (scripts/install-deps.sh --with-vm-lane does)" >&2
    exit 1
fi
if ! command -v vng >/dev/null && [[ ! -x $PWD/.venv/bin/vng ]]; then
    echo "ipvs lane: FAILED: virtme-ng (vng) is not installed; scripts/install-deps.sh --with-vm-lane installs it" >&2
    exit 1
fi
export PATH=$repo/.venv/bin:$PATH
result=$(mktemp /tmp/svcnet-ipvs-lane.XXXXXX)
echo "==> ipvs lane: booting $kernel under emulation (KVM fails here on an MSR)"
# the VM's /tmp is its own and the host tree may be read-only in it: the exit code comes
# back on the console
vng --run "$kernel" --disable-kvm --memory 2G --cpus 2 --exec "
    cd $repo && modprobe ip_vs && \
    SVCNET_EXPECT_LB_BACKEND=ipvs SVCNET_TEST_LB_BACKENDS=ipvs SVCNET_TEST_TIME_SCALE=8 SVCNET_ETCD_TIMEOUT=30 \
        .venv/bin/python -m pytest -p no:cacheprovider -ra --durations=5 \
        --timeout 900 -k 'not nftables' tests/acceptance/test_lb_backend.py tests/acceptance/test_lb_agent.py; \
    echo svcnet-ipvs-lane-exit=\$?" 2>&1 | tee "$result"
code=$(grep -o 'svcnet-ipvs-lane-exit=[0-9]*' "$result" | tail -1 | cut -d= -f2)
rm -f "$result"
if [[ -z $code ]]; then
    echo "ipvs lane: the VM did not report a result" >&2
    exit 1
fi
exit "$code"
