#!/usr/bin/env bash
# Build the images compose.yaml runs, with no registry (as root; dockerd running):
#   svcnet-base:bookworm  Debian packages by debootstrap from this machine's apt mirror, then
#                         `docker import`; built once (again when build_base changes)
#   svcnet:local          the project, installed from wheels built here (docker/svcnet.Dockerfile)
#   svcnet-demo:local     web/client/db: svcnet-wait, hostname-server, dig, curl (docker/demo.Dockerfile)
#   svcnet-etcd:local     etcd (docker/etcd.Dockerfile)
# SVCNET_BASE=python:3.11-slim-bookworm (any Debian-based image with python3) uses that base
# instead of svcnet-base, for machines that can pull; SVCNET_DEBIAN_MIRROR overrides the mirror.
# Safe to run again: the base, the wheels and Docker's build cache are reused.
set -euo pipefail
cd "$(dirname "$0")/.."
started=$SECONDS
BASE=${SVCNET_BASE:-svcnet-base:bookworm}
BASE_PACKAGES=python3,python3-venv,iproute2,iptables,libnftables1,dnsutils,curl,etcd-server,util-linux,procps,kmod,ipvsadm,conntrack,ca-certificates
IMAGES=(svcnet:local svcnet-demo:local svcnet-etcd:local)

mkdir -p build
exec 9>build/images.lock
flock 9  # one run at a time (the tests and the bench run this script too)

if ! docker info >/dev/null 2>&1; then
    echo "images.sh: no Docker engine answers: scripts/docker-setup.sh install && scripts/docker-setup.sh start" >&2
    exit 1
fi

debian_mirror() {  # the Debian mirror this machine's apt uses, if it is Debian
    local uri=${SVCNET_DEBIAN_MIRROR:-}
    if [[ -z $uri ]] && grep -qx 'ID=debian' /etc/os-release 2>/dev/null; then
        uri=$(awk '$1 == "URIs:" {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
        # one-line format: "deb [options] URI suite ...", skipping the security archive
        [[ -n $uri ]] || uri=$(awk '$1 == "deb" && !/security/ {for (i = 2; i <= NF; i++) if ($i ~ /:\/\//) {print $i; exit}}' \
            /etc/apt/sources.list 2>/dev/null || true)
    fi
    echo "${uri:-http://deb.debian.org/debian}"
}

build_base() {  # debootstrap a bookworm rootfs and import it as $BASE
    command -v debootstrap >/dev/null || { echo "images.sh: debootstrap is missing: scripts/docker-setup.sh install" >&2; exit 1; }
    local mirror t0=$SECONDS
    mirror=$(debian_mirror)
    rootfs=$(mktemp -d /var/tmp/svcnet-rootfs.XXXXXX)
    trap cleanup_rootfs EXIT
    echo "==> $BASE: debootstrap bookworm from $mirror (a minute or two; log: $rootfs.log)"
    debootstrap --variant=minbase --include="$BASE_PACKAGES" bookworm "$rootfs" "$mirror" >"$rootfs.log" 2>&1 \
        || { tail -n 20 "$rootfs.log" >&2; exit 1; }
    local python
    python=$(chroot "$rootfs" python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    # Docker writes its own resolv.conf and hostname; apt's lists and caches, logs, docs and
    # translations (35 MB) are of no use in a container, nor in what a derived image installs.
    rm -f "$rootfs"/etc/resolv.conf "$rootfs"/etc/hostname "$rootfs"/var/cache/apt/*.bin \
        "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/cache/debconf/*-old "$rootfs"/var/log/*.log
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* \
        "$rootfs"/usr/share/info/* "$rootfs"/usr/share/locale/*/
    printf 'path-exclude=/usr/share/%s/*\n' doc man info locale >"$rootfs"/etc/dpkg/dpkg.cfg.d/svcnet-slim
    echo "==> $BASE: docker import ($(du -sh "$rootfs" | cut -f1))"
    tar --numeric-owner -C "$rootfs" -c . | docker import \
        --change "LABEL svcnet.recipe=$(base_recipe)" --change "LABEL svcnet.python=$python" \
        --change "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
        --change "ENV LANG=C.UTF-8" --change 'CMD ["bash"]' - "$BASE" >/dev/null
    cleanup_rootfs
    trap - EXIT
    rm -f "$rootfs.log"
    echo "    $BASE built in $((SECONDS - t0)) s"
}

base_recipe() {  # changes with the packages or with build_base's code: the base is rebuilt then
    { echo "$BASE_PACKAGES"; declare -f build_base; } | sha256sum | cut -c1-16
}

cleanup_rootfs() {  # a debootstrap that failed may leave /proc or /sys mounted inside
    awk -v root="$rootfs/" 'index($2, root) == 1 {print $2}' /proc/mounts | sort -r | xargs -r umount -l
    rm -rf --one-file-system "$rootfs"
}

# 1. The base.
network=(--network none)  # everything the builds need is local: prove it
if [[ -n ${SVCNET_BASE:-} ]]; then
    network=()  # a public base may lack the tools: the Dockerfiles apt-get them
else
    if [[ $(docker image inspect -f '{{index .Config.Labels "svcnet.recipe"}}' "$BASE" 2>/dev/null) != "$(base_recipe)" ]]; then
        build_base
    fi
fi

# 2. Wheels of svcnet and everything it needs, for pip in the image without an index.
# All of them when pyproject.toml or the Python changes, else svcnet's alone when its
# sources change; nothing at all (and no network) when neither did.
[[ -x .venv/bin/python ]] || scripts/install-deps.sh
python_version=$(.venv/bin/python -c 'import sys; print("%d.%d" % sys.version_info[:2])')
deps_key=$( (cat pyproject.toml; echo "$python_version") | sha256sum | cut -c1-16)
src_key=$(find pyproject.toml README.md discovery lb -type f ! -name '*.pyc' -print0 | sort -z | xargs -0 sha256sum | sha256sum | cut -c1-16)
wheel() {  # wheel [PIP-OPTION...]
    rm -rf build/lib build/bdist.*  # setuptools' staging: a module deleted since would end up in the wheel
    .venv/bin/python -m pip wheel -q --disable-pip-version-check --wheel-dir build/wheels "$@" . 2>&1 \
        | { grep -v "is ignored: it is neither a file nor a directory" || true; }
    rm -rf build/lib build/bdist.*
}
if [[ $(cat build/wheels.deps-key 2>/dev/null) != "$deps_key" ]] || ! ls build/wheels/*.whl >/dev/null 2>&1; then
    echo "==> wheels of svcnet and its dependencies (build/wheels)"
    rm -rf build/wheels build/wheels.deps-key
    wheel
    echo "$deps_key" >build/wheels.deps-key
elif [[ $(cat build/wheels.src-key 2>/dev/null) != "$src_key" ]]; then
    echo "==> wheel of svcnet (build/wheels)"
    rm -f build/wheels/svcnet-*.whl
    wheel --no-deps
else
    echo "==> wheels up to date (build/wheels)"
fi
echo "$src_key" >build/wheels.src-key
# Wheels for another Python than the image's would send pip to PyPI: allow it the network.
if [[ -z ${SVCNET_BASE:-} && $(docker image inspect -f '{{index .Config.Labels "svcnet.python"}}' "$BASE") != "$python_version" ]]; then
    echo "    .venv has Python $python_version, $BASE another: the svcnet build fetches from PyPI"
    network=()
fi

# 3. The images, by the classic builder: the CLI's default, BuildKit, needs the buildx
# plugin, which Debian's docker.io does not ship (its dockerd 20.10 builds either way).
build() {  # build IMAGE DOCKERFILE
    local t0=$SECONDS old new log=build/${2##*/}.log
    old=$(docker image inspect -f '{{.Id}}' "$1" 2>/dev/null || true)
    if ! DOCKER_BUILDKIT=0 docker build "${network[@]}" --build-arg "BASE=$BASE" -t "$1" -f "$2" . >"$log" 2>&1; then
        echo "images.sh: building $1 failed; the end of $log:" >&2
        tail -n 30 "$log" >&2
        exit 1
    fi
    new=$(docker image inspect -f '{{.Id}}' "$1")
    if [[ $new == "$old" ]]; then
        echo "==> $1: up to date"
    else
        echo "==> $1: built in $((SECONDS - t0)) s"
        # the image it replaces, unless a container still uses it
        [[ -z $old ]] || docker image rm "$old" >/dev/null 2>&1 || true
    fi
}
build svcnet:local docker/svcnet.Dockerfile
build svcnet-demo:local docker/demo.Dockerfile
build svcnet-etcd:local docker/etcd.Dockerfile
# svcnet.Dockerfile's venv stage leaves an untagged image per build: keep the newest (the cache)
docker image ls -q --filter dangling=true --filter label=svcnet.stage=venv | tail -n +2 \
    | xargs -r docker image rm >/dev/null 2>&1 || true

for image in "$BASE" "${IMAGES[@]}"; do
    printf '    %-22s %s\n' "$image" "$(docker image ls --format '{{.Size}}' "$image")"
done
echo "images ready in $((SECONDS - started)) s"
