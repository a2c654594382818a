#!/usr/bin/env bash
# Build the images compose.yaml runs, with no registry (as root; dockerd running):
#   svcnet-base:bookworm  the distribution's packages, by debootstrap from this machine's
#                         apt mirror, then `docker import` (skipped if it exists, or if
#                         SVCNET_BASE names a base to use instead, e.g. python:3.11-slim-bookworm)
#   svcnet:local          the project, installed from wheels built here (docker/svcnet.Dockerfile)
#   svcnet-demo:local     web/client/db: svcnet-wait, hostname-server, dig, curl (docker/demo.Dockerfile)
#   svcnet-etcd:local     etcd (docker/etcd.Dockerfile)
# Safe to run again: the base is reused and Docker's build cache makes the rest quick.
set -euo pipefail
cd "$(dirname "$0")/.."
started=$SECONDS
BASE=${SVCNET_BASE:-svcnet-base:bookworm}
BASE_PACKAGES=python3,python3-venv,iproute2,iptables,dnsutils,curl,etcd-server,util-linux,procps,kmod,ipvsadm,conntrack,ca-certificates

apt_mirror() {  # the Debian mirror this machine's apt uses
    local uri
    uri=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
    [[ -z $uri ]] && uri=$(awk '$1 == "deb" && $2 !~ /security/ {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
    echo "${uri:-http://deb.debian.org/debian}"
}

if [[ -z ${SVCNET_BASE:-} ]] && ! docker image inspect "$BASE" >/dev/null 2>&1; then
    command -v debootstrap >/dev/null || { echo "images.sh: debootstrap is missing: scripts/docker-setup.sh install" >&2; exit 1; }
    rootfs=$(mktemp -d /var/tmp/svcnet-rootfs.XXXXXX)
    trap 'rm -rf "$rootfs"' EXIT
    echo "==> $BASE: debootstrap bookworm from $(apt_mirror) (about a minute)"
    debootstrap --variant=minbase --include="$BASE_PACKAGES" bookworm "$rootfs" "$(apt_mirror)" >"$rootfs.log" 2>&1 \
        || { tail -n 20 "$rootfs.log" >&2; exit 1; }
    rm -f "$rootfs.log" "$rootfs/etc/resolv.conf" "$rootfs/etc/hostname"  # Docker writes its own
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb
    echo "==> $BASE: docker import"
    tar -C "$rootfs" -c . | docker import - "$BASE" >/dev/null
    rm -rf "$rootfs"
    trap - EXIT
fi

echo "==> wheels of svcnet and what it needs (build/wheels)"
[[ -x .venv/bin/python ]] || scripts/install-deps.sh
mkdir -p build/wheels
.venv/bin/python -m pip wheel -q --disable-pip-version-check --wheel-dir build/wheels . 2>&1 \
    | { grep -v "is ignored: it is neither a file nor a directory" || true; }

build() {  # build IMAGE DOCKERFILE
    echo "==> $1"
    # the classic builder (BuildKit is a separate plugin); no network: everything is local
    if ! DOCKER_BUILDKIT=0 docker build --network none --build-arg "BASE=$BASE" -t "$1" -f "$2" . \
            >"build/$1.log" 2>&1; then
        tail -n 30 "build/$1.log" >&2
        echo "images.sh: building $1 failed; the whole log is build/$1.log" >&2
        exit 1
    fi
}
build svcnet:local docker/svcnet.Dockerfile
build svcnet-demo:local docker/demo.Dockerfile
build svcnet-etcd:local docker/etcd.Dockerfile
docker image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep -E '^svcnet(-base|-demo|-etcd)?:' | sed 's/^/  /' || true
echo "images ready in $((SECONDS - started)) s"
