#!/usr/bin/env bash
# The svcnet demo on Docker (as root): installs the engine and the compose plugin if missing
# (and starts dockerd if none runs), builds the images without any registry, brings up
# compose.yaml (etcd, the svcnet agent, 3 web replicas behind a VIP, a client, and a db
# served by a svcnet sidecar), shows from inside the client what svcnet answers and who
# serves the VIP, scales web to 5, then `docker compose down` and checks that nothing of
# svcnet is left on the host. Every line marked ok/FAIL is a check: exit 1 if any fails.
# No Docker here? scripts/demo-netns.sh shows the same with network namespaces only.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ $EUID -ne 0 ]]; then
    echo "scripts/demo.sh needs root (the Docker engine, bridges, iptables); run it with sudo" >&2
    exit 1
fi
scripts/docker-setup.sh install
scripts/docker-setup.sh start
failures=0
check() {  # check WHAT EXPECTED ACTUAL
    if [[ $2 == "$3" ]]; then printf '  ok    %s: %s\n' "$1" "$3"
    else printf '  FAIL  %s: wanted %s, got %s\n' "$1" "$2" "$3"; failures=$((failures + 1)); fi
}
show() { printf '\n\033[1m$ %s\033[0m\n' "$*"; "$@"; }
client() { docker compose exec -T client "$@"; }
down() {
    printf '\n\033[1m$ docker compose down\033[0m\n'
    docker compose down --timeout 5 2>&1 | tail -n 3
}
trap 'set +e; down; scripts/docker-setup.sh stop' EXIT

scripts/images.sh
show docker compose up -d --wait
show docker compose ps --format 'table {{.Service}}\t{{.Name}}\t{{.Status}}'

echo; echo "== DNS inside the client (127.0.0.11 is svcnet's)"
show client cat /etc/resolv.conf
check "TXT probe.svcnet.internal" '"svcnet"' "$(client dig +short TXT probe.svcnet.internal)"
vip=$(client dig +short web)
check "web is one VIP" 1 "$(wc -w <<<"$vip")"
show client dig +short web
show client dig +short tasks.web
check "tasks.web lists 3 replicas" 3 "$(client dig +short tasks.web | wc -l)"
check "db (registered by its sidecar) resolves" 1 "$(client dig +short db | wc -l)"

echo; echo "== Traffic: the VIP spreads over the replicas, db answers by name"
seen=$(for _ in $(seq 30); do client curl -s --max-time 2 http://web/; done | sort | uniq -c)
echo "$seen"
check "replicas reached through the VIP" 3 "$(wc -l <<<"$seen")"
check "curl http://db/ answers" db "$(client curl -s --max-time 2 http://db/)"

echo; echo "== The published port: web publishes 18088 on this host (routing mesh)"
seen=$(for _ in $(seq 30); do curl -s --max-time 2 http://10.233.0.1:18088/; done | sort | uniq -c)
echo "$seen"
check "replicas reached through this host's port 18088" 3 "$(wc -l <<<"$seen")"

echo; echo "== Scale web to 5"
show docker compose up -d --scale web=5
start=$(date +%s%N)
until [[ $(client dig +short tasks.web | wc -l) == 5 ]]; do
    (( $(date +%s%N) - start < 10000000000 )) || break
    sleep 0.05
done
echo "  tasks.web lists 5 after $(( ($(date +%s%N) - start) / 1000000 )) ms"
check "tasks.web after scaling" 5 "$(client dig +short tasks.web | wc -l)"
show docker compose exec -T svcnet svcnet ps

down
echo; echo "== What svcnet left on the host (nothing)"
prefix=/svcnet-compose
tag=$(.venv/bin/python -c "from discovery.host import firewall; print(firewall.chain_names('$prefix')[0].split('-')[-1])")
check "svcnet bridges" 0 "$(ip -d -o link show type bridge | grep -c "svcnet:$prefix:" || true)"
veths() { ip -o link show type veth | grep -cE ': sv[0-9a-f]{10}@' || true; }
# a container's veth pair goes with its netns, which the kernel frees in the background once
# its last process and pin are gone: give it up to 10 s (seen taking over a second in CI)
for _ in $(seq 50); do [[ $(veths) == 0 ]] && break; sleep 0.2; done
check "svcnet veths" 0 "$(veths)"
check "svcnet chains (legacy)" 0 "$( (iptables-legacy-save; iptables-legacy-save -t nat; iptables-legacy-save -t raw; iptables-legacy-save -t mangle) 2>/dev/null | grep -c "$tag" || true)"
check "svcnet chains (nft)" 0 "$(iptables-nft-save 2>/dev/null | grep -c "$tag" || true)"
check "svcnet mesh table (nftables)" 0 "$(nft list tables 2>/dev/null | grep -ci "svcnet-mesh-$tag" || true)"
containers=$(docker ps -aq --filter label=com.docker.compose.project=svcnet | wc -l) || containers="? (docker ps failed)"
check "svcnet containers" 0 "$containers"
trap - EXIT
scripts/docker-setup.sh stop  # only a dockerd that docker-setup.sh started
if ((failures)); then echo "demo: $failures check(s) failed" >&2; exit 1; fi
echo; echo "demo: every check passed"
