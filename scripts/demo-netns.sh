#!/usr/bin/env bash
# The namespace-only svcnet demo (no Docker needed): installs what it needs, starts svcnet's own etcd and agent under a
# throwaway state dir, builds two networks, a service and four sandboxes, shows what
# svcnet sees and what the sandboxes can reach, then cleans everything up. Needs root.
# Every reachability, DNS and VIP line is also a check: the demo exits 1 if any fails.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ $EUID -ne 0 ]]; then
    echo "scripts/demo-netns.sh needs root (network namespaces, bridges); run it with sudo" >&2
    exit 1
fi
scripts/install-deps.sh

export SVCNET_STATE_DIR=$(mktemp -d /tmp/svcnet-demo.XXXXXX)
export SVCNET_PREFIX=/svcnet-demo-$$
# The demo asks only its own names; anything forwarded goes to a closed loopback port
# (instant SERVFAIL), never to this machine's resolver. Set SVCNET_UPSTREAM to override.
export SVCNET_UPSTREAM=${SVCNET_UPSTREAM:-127.0.0.1:9}
svcnet() { .venv/bin/svcnet "$@"; }
step() { printf '\n\033[1m$ svcnet %s\033[0m\n' "$*"; svcnet "$@"; }

cleanup() {
    set +e
    for name in web1 web2 db1 probe; do svcnet rm "demo-$name" >/dev/null 2>&1; done
    svcnet service rm web >/dev/null 2>&1
    svcnet network rm demo-front >/dev/null 2>&1
    svcnet network rm demo-back >/dev/null 2>&1
    sleep 0.5
    [[ -f $SVCNET_STATE_DIR/agent.pid ]] && kill "$(cat "$SVCNET_STATE_DIR/agent.pid")" 2>/dev/null
    sleep 0.5
    # every backend's host rules (the agent picks nftables, iptables or IPVS by the kernel)
    .venv/bin/python -c "from discovery.node.agent import remove_host; remove_host('$SVCNET_PREFIX')" \
        || echo "demo: could not remove the host rules of $SVCNET_PREFIX" >&2
    [[ -f $SVCNET_STATE_DIR/etcd/member.json ]] && \
        kill "$(.venv/bin/python -c "import json;print(json.load(open('$SVCNET_STATE_DIR/etcd/member.json'))['pid'])")" 2>/dev/null
    sleep 0.5
    rm -rf "$SVCNET_STATE_DIR"
    echo; echo "demo cleaned up"
}
trap cleanup EXIT
failures=0
verdict() { # ok? description
    if [[ $1 == yes ]]; then printf '    ok\n'; else printf '    \033[31mFAILED: %s\033[0m\n' "$2"; failures=$((failures + 1)); fi
}

step network create demo-front --subnet 10.210.0.0/24 --subnet6 fd00:210::/64
step network create demo-back --subnet 10.211.0.0/24 --internal
step service create web --network demo-front --publish 18080:80
# each task answers TCP port 80 with its hostname
TASK='import socket
s = socket.create_server(("", 80)); name = socket.gethostname().encode()
while True:
    c, _ = s.accept(); c.sendall(name + b"\n"); c.close()'
step run -d --name demo-web1 --network demo-front --service web -- python3 -c "$TASK"
step run -d --name demo-web2 --network demo-front --service web -- python3 -c "$TASK"
step run -d --name demo-db1 --network demo-back --alias db
step run -d --name demo-probe --network demo-front --network demo-back
step ps
step network ls
step service inspect web
step network inspect demo-front

printf '\n\033[1mreachability\033[0m\n'
web1=$(svcnet ps --format json | .venv/bin/python -c "import json,sys;print([r for r in json.load(sys.stdin) if r['name']=='demo-web1'][0]['endpoints'][0]['ipv4'])")
db1=$(svcnet ps --format json | .venv/bin/python -c "import json,sys;print([r for r in json.load(sys.stdin) if r['name']=='demo-db1'][0]['endpoints'][0]['ipv4'])")
check() { # sandbox address expected(reaches|cannot reach) why
    if svcnet exec "$1" -- ping -c1 -W1 "$2" >/dev/null 2>&1; then got=reaches; else got="cannot reach"; fi
    printf '  %-11s %-13s %-16s (%s)\n' "$1" "$got" "$2" "$4"
    verdict "$([[ $got == "$3" ]] && echo yes)" "$1 should $3 $2"
}
check demo-web2 "$web1" reaches "same network"
check demo-probe "$db1" reaches "probe is on both networks"
check demo-web2 "$db1" "cannot reach" "web2 is not on demo-back"

printf '\n\033[1mDNS from inside the sandboxes (dig @127.0.0.11)\033[0m\n'
ask() { # sandbox name type expected-regex
    local answer
    answer=$(svcnet exec "$1" -- dig +short +tries=1 +time=2 "$2" "$3" 2>/dev/null | sort | tr '\n' ' ' || true)
    printf '  %-11s %-24s -> %s\n' "$1" "$2 $3" "${answer:-(no answer)}"
    verdict "$([[ $answer =~ ^$4\ ?$ ]] && echo yes)" "$2 $3 in $1 should match '$4'"
}
ip4='10\.210\.0\.[0-9]+'
vip=$(svcnet service inspect web --format json | .venv/bin/python -c "import json,sys;print(json.load(sys.stdin)['vips']['demo-front'])")
ask demo-probe web A "${vip//./\\.}"
ask demo-probe tasks.web A "$ip4 $ip4"
ask demo-probe db A '10\.211\.0\.[0-9]+'
ask demo-probe demo-web1 AAAA 'fd00:210::[0-9a-f]+'
ask demo-probe _80._tcp.web SRV '0 0 80 web\.demo-front\.'
ask demo-probe "$(echo "$vip" | awk -F. '{print $4"."$3"."$2"."$1".in-addr.arpa"}')" PTR 'web\.demo-front\.'
ask demo-web2 db A ''
printf '  (demo-web2 is not on demo-back, so "db" is not its name there: it was forwarded, and the\n'
printf '   demo upstream on a closed loopback port gives SERVFAIL: no answer)\n'

printf '\n\033[1mthe VIP: 40 TCP connections from demo-probe to web:80\033[0m\n'
# 40, not a handful: with two tasks, all of 40 fair coin flips landing on one side happens
# once in 5e11 runs; six connections would fail a correct load balancer 3 % of the time.
sleep 1  # the tasks' servers have had time to listen
answered=$(svcnet exec demo-probe -- python3 -c '
import collections, socket
seen = collections.Counter()
for _ in range(40):
    with socket.create_connection(("web", 80), timeout=2) as c:
        seen[c.recv(64).decode().strip()] += 1
print(" ".join(f"{name}={count}" for name, count in sorted(seen.items())))' || true)
printf '  web:80 answered by %s\n' "${answered:-(nothing)}"
verdict "$([[ $answered =~ ^demo-web1=[0-9]+\ demo-web2=[0-9]+$ ]] && echo yes)" \
    "connections to the VIP should reach both tasks, and only them"

printf '\n\033[1mthe published port 18080 (routing mesh): 20 connections each from this host and from demo-probe\033[0m\n'
# to this host's address on demo-front: every local address but loopback answers 18080
COUNT='import collections, socket, sys
seen = collections.Counter()
for _ in range(20):
    with socket.create_connection((sys.argv[1], 18080), timeout=2) as c:
        seen[c.recv(64).decode().strip()] += 1
print(" ".join(f"{name}={count}" for name, count in sorted(seen.items())))'
for who in host demo-probe; do
    if [[ $who == host ]]; then
        answered=$(.venv/bin/python -c "$COUNT" 10.210.0.1 || true)
    else
        answered=$(svcnet exec demo-probe -- python3 -c "$COUNT" 10.210.0.1 || true)
    fi
    printf '  %-10s -> 10.210.0.1:18080 answered by %s\n' "$who" "${answered:-(nothing)}"
    verdict "$([[ $answered =~ ^demo-web1=[0-9]+\ demo-web2=[0-9]+$ ]] && echo yes)" \
        "the published port should reach both tasks from $who"
done

if ((failures)); then
    printf '\n\033[31m%d demo check(s) failed\033[0m\n' "$failures"
    exit 1
fi
printf '\nevery demo check passed\n'
