#!/usr/bin/env bash
# A svcnet cluster on one machine (as root): simulated hosts h1..hN, each a network
# namespace with one underlay interface on a shared bridge, its own etcd member (h1..h3
# form one 3-member cluster; more hosts are its clients) and its own `svcnet agent`.
#
#   scripts/cluster.sh up [N] [--tls]      start N hosts (default 3); returns when every agent is ready;
#                                          --tls: etcd on TLS with client certificates (peers too)
#   scripts/cluster.sh on HOST -- CMD...   run CMD as HOST: in its netns, with its etcd and state dir
#   scripts/cluster.sh client -- CMD...    run CMD in a namespace on the underlay outside the cluster
#   scripts/cluster.sh addr HOST           print HOST's underlay address
#   scripts/cluster.sh kill HOST agent|etcd    SIGKILL it
#   scripts/cluster.sh start HOST agent|etcd   start it again
#   scripts/cluster.sh down                remove everything `up` made, also after a crash
#
# Processes run under `nsenter --net=/run/netns/HOST`, not `ip netns exec`: they keep the
# machine's mount namespace, so an agent's netns pins (bind mounts under its state dir) are
# seen by every other process, as on a real host. Every name starts with "svccl" (netns
# svccl-hN, underlay bridge svccl0, sandboxes /run/netns/svcnet-hN-*), so `down` finds it
# all; the state lives in $SVCNET_CLUSTER_DIR (default /run/svcnet-cluster).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DIR=${SVCNET_CLUSTER_DIR:-/run/svcnet-cluster}
UNDERLAY=192.168.251  # a private /24 that exists only on svccl0 and in the hosts
BRIDGE=svccl0
CLIENT_ADDR=$UNDERLAY.250
ETCD_MEMBERS=3
PYTHON=$ROOT/.venv/bin/python

die() { echo "cluster.sh: $*" >&2; exit 1; }
[[ $EUID -eq 0 ]] || die "needs root (network namespaces, bridges); run it with sudo"

host_addr() { echo "$UNDERLAY.$((10 + ${1#h}))"; }
host_ns() { echo "svccl-$1"; }
hosts() { cat "$DIR/hosts" 2>/dev/null || true; }
check_host() {
    [[ $1 =~ ^h[0-9]+$ ]] || die "no host named '$1': hosts are h1..hN"
    grep -qx "$1" "$DIR/hosts" 2>/dev/null || die "no host $1 in this cluster (up: $(hosts | tr '\n' ' '))"
}
scheme() { if [[ -d $DIR/tls ]]; then echo https; else echo http; fi; }
etcd_endpoints() {
    local i urls=()
    for i in $(seq 1 "$(etcd_count)"); do urls+=("$(scheme)://$(host_addr "h$i"):2379"); done
    (IFS=,; echo "${urls[*]}")
}
tls_env() {
    [[ -d $DIR/tls ]] && echo SVCNET_ETCD_CACERT="$DIR/tls/ca.crt" SVCNET_ETCD_CERT="$DIR/tls/client.crt" \
        SVCNET_ETCD_KEY="$DIR/tls/client.key" ETCDCTL_CACERT="$DIR/tls/ca.crt" ETCDCTL_CERT="$DIR/tls/client.crt" \
        ETCDCTL_KEY="$DIR/tls/client.key"
    return 0
}
etcd_count() { local n; n=$(hosts | wc -l); echo $((n < ETCD_MEMBERS ? n : ETCD_MEMBERS)); }
host_env() {  # the environment a process on HOST sees
    echo SVCNET_ETCD="$(etcd_endpoints)" SVCNET_STATE_DIR="$DIR/$1/state" SVCNET_NODE="$1" \
        SVCNET_NETNS_PREFIX="svcnet-$1-" SVCNET_ADVERTISE_ADDR="$(host_addr "$1")" SVCNET_UPSTREAM=127.0.0.1:9 \
        ETCDCTL_ENDPOINTS="$(etcd_endpoints)" PATH="$ROOT/.venv/bin:$PATH" "$(tls_env)"
}

make_tls() {  # a CA, one certificate for every member (server and peer), one for the clients
    local tls=$DIR/tls sans="IP:127.0.0.1" i
    for i in $(seq 1 "$(etcd_count)"); do sans+=",IP:$(host_addr "h$i")"; done
    mkdir -p "$tls"
    (
        cd "$tls"
        key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:prime256v1 -out "$1" 2>/dev/null; }
        key ca.key
        openssl req -x509 -new -key ca.key -out ca.crt -days 2 -subj /CN=svccl-ca 2>/dev/null
        for who in member client; do
            key "$who.key"
            openssl req -new -key "$who.key" -out "$who.csr" -subj "/CN=svccl-$who" 2>/dev/null
        done
        printf 'subjectAltName=%s\nextendedKeyUsage=serverAuth,clientAuth\n' "$sans" >member.ext
        printf 'extendedKeyUsage=clientAuth\n' >client.ext
        for who in member client; do
            openssl x509 -req -in "$who.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 \
                -extfile "$who.ext" -out "$who.crt" 2>/dev/null
        done
        chmod 600 ./*.key
    )
}

# ---- processes ---------------------------------------------------------------------

spawn() {  # spawn HOST NAME CMD...: run in HOST's netns in the background, pid in $DIR/HOST/NAME.pid
    local host=$1 name=$2
    shift 2
    # shellcheck disable=SC2046
    setsid nsenter --net="/run/netns/$(host_ns "$host")" env $(host_env "$host") "$@" \
        </dev/null >>"$DIR/$host/$name.log" 2>&1 &
    echo $! >"$DIR/$host/$name.pid"
}

ours() {  # ours HOST NAME: the pid of that process if it still runs (and is what we started)
    local pid cmdline
    pid=$(cat "$DIR/$1/$2.pid" 2>/dev/null) || return 1
    [[ -n $pid ]] && alive "$pid" || return 1
    # empty while the process is between nsenter, env and python (execve): still ours
    cmdline=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null)
    [[ -z $cmdline || $cmdline == *"$DIR/$1"* ]] || return 1
    echo "$pid"
}

start_etcd() {
    local host=$1 i peers=() state=new
    for i in $(seq 1 "$(etcd_count)"); do peers+=("h$i=$(scheme)://$(host_addr "h$i"):2380"); done
    [[ -d $DIR/$host/etcd/member ]] && state=existing
    local url tls=()
    url="$(scheme)://$(host_addr "$host")"
    if [[ -d $DIR/tls ]]; then
        tls=(--cert-file "$DIR/tls/member.crt" --key-file "$DIR/tls/member.key" --trusted-ca-file "$DIR/tls/ca.crt"
             --client-cert-auth --peer-cert-file "$DIR/tls/member.crt" --peer-key-file "$DIR/tls/member.key"
             --peer-trusted-ca-file "$DIR/tls/ca.crt" --peer-client-cert-auth)
    fi
    spawn "$host" etcd etcd --name "$host" --data-dir "$DIR/$host/etcd" \
        --listen-client-urls "$url:2379" --advertise-client-urls "$url:2379" \
        --listen-peer-urls "$url:2380" --initial-advertise-peer-urls "$url:2380" \
        --initial-cluster "$(IFS=,; echo "${peers[*]}")" --initial-cluster-state "$state" \
        --initial-cluster-token svccl --heartbeat-interval 50 --election-timeout 500 "${tls[@]}"
}

start_agent() {
    spawn "$1" agent "$PYTHON" -m discovery.cli --log-level info --state-dir "$DIR/$1/state" agent \
        --metrics-addr 127.0.0.1:9253
}

alive() {  # alive PID: running (a zombie is not)
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    stat=${stat##*) }
    [[ ${stat%% *} != Z ]]
}

wait_ready() {  # wait_ready HOST: its agent answers and says ready
    local host=$1 pid
    pid=$(cat "$DIR/$host/agent.pid")  # just written by spawn: no reuse to guard against
    for _ in $(seq 300); do
        if "$PYTHON" - "$DIR/$host/state/agent.sock" <<'EOF' 2>/dev/null; then return 0; fi
import sys
from discovery.node.client import ApiClient
sys.exit(0 if ApiClient(sys.argv[1]).call("GET", "/v1/info")["ready"] else 1)
EOF
        if ! alive "$pid"; then
            local code=unknown
            wait "$pid" 2>/dev/null && code=0 || code=$?  # our child when we just spawned it
            tail -n 15 "$DIR/$host/agent.log" >&2
            die "the agent of $host (pid $pid) exited with status $code; the end of its log is above ($DIR/$host/agent.log)"
        fi
        sleep 0.1
    done
    die "the agent of $host was not ready within 30 s; its log: $DIR/$host/agent.log"
}

wait_etcd() {
    local i
    for _ in $(seq 300); do
        for i in $(seq 1 "$(etcd_count)"); do
            local tls=()
            [[ -d $DIR/tls ]] && tls=(--cacert "$DIR/tls/ca.crt" --cert "$DIR/tls/client.crt" --key "$DIR/tls/client.key")
            nsenter --net="/run/netns/$(host_ns "h$i")" curl -sf --max-time 1 "${tls[@]}" \
                "$(scheme)://$(host_addr "h$i"):2379/health" | grep -q '"health":"true"' && return 0
        done
        sleep 0.1
    done
    die "etcd did not become healthy within 30 s; logs: $DIR/h*/etcd.log"
}

# ---- verbs -------------------------------------------------------------------------

cmd_up() {
    local count=3 with_tls=0 i host arg
    for arg in "$@"; do
        case $arg in
            --tls) with_tls=1 ;;
            *) count=$arg ;;
        esac
    done
    [[ $count =~ ^[0-9]+$ && $count -ge 1 && $count -le 200 ]] || die "up takes a host count, 1 to 200"
    [[ -e $DIR/hosts ]] && die "a cluster is up ($(hosts | tr '\n' ' ')); 'scripts/cluster.sh down' first"
    for tool in etcd ip nsenter curl openssl; do
        command -v "$tool" >/dev/null || { "$ROOT/scripts/install-deps.sh"; break; }
    done
    [[ -x $PYTHON ]] || "$ROOT/scripts/install-deps.sh"
    mkdir -p "$DIR"
    seq 1 "$count" | sed 's/^/h/' >"$DIR/hosts"
    if ((with_tls)); then echo "==> TLS: a CA, member and client certificates ($DIR/tls)"; make_tls; fi
    ip link add "$BRIDGE" type bridge
    ip link set "$BRIDGE" up
    for host in $(hosts) client; do
        local ns addr
        ns=$(host_ns "$host")
        if [[ $host == client ]]; then addr=$CLIENT_ADDR; else addr=$(host_addr "$host"); fi
        ip netns add "$ns"
        ip link add "svccl-$host" type veth peer name eth0 netns "$ns"
        ip link set "svccl-$host" master "$BRIDGE" up
        ip -n "$ns" addr add "$addr/24" dev eth0
        ip -n "$ns" link set eth0 up
        ip -n "$ns" link set lo up
        # a default route, as a real host has (nothing answers at .1: no packet leaves)
        ip -n "$ns" route add default via "$UNDERLAY.1"
        # a host where nothing asks br_netfilter to show every bridged frame to iptables (a new
        # netns starts with it on; Docker's bridge driver keeps it on): svcnet's agent turns it
        # on per bridge where source=keep needs it. The module is loaded first: loading it
        # later (the agent does, for source=keep) would turn the switch on in every netns.
        if [[ $host != client ]]; then
            [[ -e /proc/sys/net/bridge/bridge-nf-call-iptables ]] || modprobe br_netfilter \
                || die "cannot load br_netfilter (source=keep needs it): modprobe br_netfilter"
            nsenter --net="/run/netns/$ns" sh -c 'for f in iptables ip6tables arptables; do
                echo 0 >/proc/sys/net/bridge/bridge-nf-call-$f; done'
        fi
        [[ $host == client ]] || mkdir -p "$DIR/$host/state"
    done
    echo "==> etcd on $(etcd_count) member(s)"
    for i in $(seq 1 "$(etcd_count)"); do start_etcd "h$i"; done
    wait_etcd
    echo "==> agents"
    for host in $(hosts); do start_agent "$host"; done
    for host in $(hosts); do wait_ready "$host"; done
    for host in $(hosts); do echo "$host $(host_addr "$host")"; done
    echo "client $CLIENT_ADDR (outside the cluster)"
}

cmd_on() {
    local host=${1:-}
    check_host "$host"
    shift
    [[ ${1:-} == -- ]] && shift
    (($#)) || die "on $host -- CMD...: give a command"
    # shellcheck disable=SC2046
    exec nsenter --net="/run/netns/$(host_ns "$host")" env $(host_env "$host") "$@"
}

cmd_client() {
    [[ -e $DIR/hosts ]] || die "no cluster is up"
    [[ ${1:-} == -- ]] && shift
    (($#)) || die "client -- CMD...: give a command"
    exec nsenter --net="/run/netns/$(host_ns client)" "$@"
}

cmd_addr() { check_host "${1:-}"; host_addr "$1"; }

cmd_kill() {
    local host=${1:-} what=${2:-} pid
    check_host "$host"
    [[ $what == agent || $what == etcd ]] || die "kill HOST agent|etcd"
    pid=$(ours "$host" "$what") || die "no $what runs on $host"
    kill -KILL "$pid"
    while [[ -e /proc/$pid ]]; do sleep 0.05; done
}

cmd_start() {
    local host=${1:-} what=${2:-}
    check_host "$host"
    case $what in
        agent) ours "$host" agent >/dev/null && die "the agent of $host runs already"
               start_agent "$host"; wait_ready "$host" ;;
        etcd) ((${host#h} <= $(etcd_count))) || die "$host has no etcd member (h1..h$(etcd_count) have)"
              ours "$host" etcd >/dev/null && die "etcd of $host runs already"
              start_etcd "$host" ;;
        *) die "start HOST agent|etcd" ;;
    esac
}

cmd_down() {
    local host pid ns
    for host in $(hosts); do  # the agents first (they must not re-create what goes), then etcd
        for what in agent etcd; do
            if pid=$(ours "$host" "$what"); then kill -KILL "$pid" 2>/dev/null || true; fi
        done
    done
    # sandboxes' processes, then their namespaces (also of hosts a crashed `up` did not list)
    for ns in $(ip netns list | awk '{print $1}' | grep -E '^(svcnet-h[0-9]+-|svccl-)' || true); do
        for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null || true; done
    done
    if [[ -d $DIR ]]; then  # netns pins under the state dirs
        awk -v dir="$DIR/" 'index($2, dir) == 1 {print $2}' /proc/self/mounts | sort -r | xargs -r umount -l
    fi
    for ns in $(ip netns list | awk '{print $1}' | grep -E '^(svcnet-h[0-9]+-|svccl-)' || true); do
        ip netns del "$ns" 2>/dev/null || true
    done
    # the underlay veths now, not when the kernel gets round to freeing the namespaces
    for link in $(ip -o link show | awk -F': ' '{print $2}' | cut -d@ -f1 | grep -E '^svccl' || true); do
        ip link del "$link" 2>/dev/null || true
    done
    rm -rf "$DIR"
    echo "cluster down"
}

verb=${1:-}
shift || true
case $verb in
    up | on | client | addr | kill | start | down) "cmd_$verb" "$@" ;;
    *) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac
