"""The `svcnet` command line.

Cluster-wide objects (networks, services) are written to etcd directly; anything on this
host (sandboxes) goes through the local agent's API, which is started on demand.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from discovery import __version__, defaults
from discovery.errors import AgentUnavailableError, NotFoundError, SvcnetError

if TYPE_CHECKING:
    from discovery.node.client import ApiClient

# Everything else is imported where it is used: `svcnet --help` and `svcnet ps` are paid
# for in start-up time, so they load the standard library's smallest parts and the API
# client; etcd's client (gRPC), asyncio, pyroute2 and the registry load only for the
# commands that need them.

DEFAULT_STATE_DIR = "/var/lib/svcnet"

MAIN_EPILOG = """\
examples:
  svcnet network create front --subnet 10.10.0.0/24
  svcnet service create web --network front --publish 80
  svcnet run -d --name web1 --network front --service web -- python3 -m http.server 80
  svcnet exec web1 -- ip addr
  svcnet ps
  svcnet rm web1

With no --etcd, svcnet starts (and then reuses) a single-member etcd under --state-dir.
Commands on this host's sandboxes go through `svcnet agent`, started on demand.
"""


PUBLISH_METAVAR = "PUBLISHED:TARGET[/udp][,mode=host][,source=keep]"
PUBLISH_HELP = ("publish a port (repeatable). mode=ingress (default): PUBLISHED on every node's addresses "
                "reaches the healthy tasks on any node (the routing mesh; tasks see the node's own address "
                "on the network, unless source=keep: then they see the client's, and replies go back "
                "through the node the client reached). mode=host: only nodes running a task answer, "
                "with their own tasks. TARGET alone (no PUBLISHED) only declares the port for SRV answers")


class _Formatter(argparse.RawDescriptionHelpFormatter):
    pass


def _global_options(parser: argparse.ArgumentParser, suppress: bool) -> None:
    def default(value):
        return argparse.SUPPRESS if suppress else value

    group = parser.add_argument_group("global options")
    group.add_argument("--etcd", metavar="URL[,URL...]", default=default(os.environ.get("SVCNET_ETCD")),
                       help="etcd endpoints (env SVCNET_ETCD); default: a local etcd under --state-dir")
    group.add_argument("--prefix", default=default(os.environ.get("SVCNET_PREFIX", "/svcnet")),
                       help="etcd key prefix (env SVCNET_PREFIX; default /svcnet)")
    group.add_argument("--node", default=default(os.environ.get("SVCNET_NODE", os.uname().nodename)),
                       help="this node's name (env SVCNET_NODE; default: the hostname)")
    group.add_argument("--state-dir", type=Path,
                       default=default(Path(os.environ.get("SVCNET_STATE_DIR", DEFAULT_STATE_DIR))),
                       help=f"local state: agent socket, sandboxes, local etcd (env SVCNET_STATE_DIR; default {DEFAULT_STATE_DIR})")
    group.add_argument("--log-level", default=default(os.environ.get("SVCNET_LOG_LEVEL", "warning")),
                       choices=["debug", "info", "warning", "error"], help="log verbosity (default warning)")
    for flag, env, what in (("--etcd-cacert", "SVCNET_ETCD_CACERT", "the CA that signed etcd's certificates"),
                            ("--etcd-cert", "SVCNET_ETCD_CERT", "this client's certificate (etcd --client-cert-auth)"),
                            ("--etcd-key", "SVCNET_ETCD_KEY", "that certificate's key")):
        group.add_argument(flag, metavar="FILE", default=default(os.environ.get(env)),
                           help=f"TLS to etcd (https:// URLs): {what} (env {env})")


def _command(sub, name: str, help_text: str, example: str, func) -> argparse.ArgumentParser:
    parser = sub.add_parser(name, help=help_text, description=help_text, formatter_class=_Formatter,
                            epilog=f"example:\n  {example}")
    _global_options(parser, suppress=True)
    parser.set_defaults(func=func)
    return parser


def _group(top, name: str, help_text: str, description: str):
    """A command with actions of its own (`svcnet network create ...`)."""
    parser = top.add_parser(name, help=help_text, description=description)
    actions = parser.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True
    return actions


def _format_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--format", choices=["table", "json"], default="table", help="output format")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="svcnet",
        description="Service discovery and virtual-IP load balancing for containers, on etcd.",
        formatter_class=_Formatter, epilog=MAIN_EPILOG,
    )
    parser.add_argument("--version", action="version", version=f"svcnet {__version__}")
    _global_options(parser, suppress=False)
    top = parser.add_subparsers(dest="command", metavar="COMMAND")
    top.required = True

    node_sub = _group(top, "node", "list, inspect and forget nodes (hosts with an agent)",
                      "A node is registered by its agent and is ready while the agent holds its lease; "
                      "a node whose agent died stays listed as down until `svcnet node rm`.")
    p = _command(node_sub, "ls", "list nodes, ready or down", "svcnet node ls --format json", cmd_node_ls)
    _format_option(p)
    p = _command(node_sub, "inspect", "show one node with its endpoints", "svcnet node inspect h1", cmd_node_inspect)
    p.add_argument("name")
    _format_option(p)
    p = _command(node_sub, "rm", "forget a node that is down", "svcnet node rm h4", cmd_node_rm)
    p.add_argument("name")

    network_sub = _group(top, "network", "create, list, inspect and remove networks",
                         "Networks are cluster-wide: stored in etcd, a bridge on each node.")
    p = _command(network_sub, "create", "create a network",
                 "svcnet network create front --subnet 10.10.0.0/24 --subnet6 fd00:10::/64", cmd_network_create)
    p.add_argument("name", help="network name (a DNS label)")
    p.add_argument("--subnet", required=True, help="IPv4 subnet in CIDR form, e.g. 10.10.0.0/24")
    p.add_argument("--subnet6", help="optional IPv6 subnet, e.g. fd00:10::/64")
    p.add_argument("--gateway", help="IPv4 gateway (default: the first address of the subnet)")
    p.add_argument("--internal", action="store_true", help="no traffic in or out of the network beyond its members")
    p.add_argument("--driver", default="bridge", help="network driver (default bridge)")
    p = _command(network_sub, "ls", "list networks", "svcnet network ls --format json", cmd_network_ls)
    _format_option(p)
    p = _command(network_sub, "inspect", "show one network with its endpoints", "svcnet network inspect front",
                 cmd_network_inspect)
    p.add_argument("name")
    _format_option(p)
    p = _command(network_sub, "rm", "remove a network (refused while anything is attached)",
                 "svcnet network rm front", cmd_network_rm)
    p.add_argument("name")

    service_sub = _group(top, "service", "create, list, inspect and remove services",
                         "A service gives its tasks one name and (mode vip) one VIP per network.")
    p = _command(service_sub, "create", "create a service",
                 "svcnet service create web --network front --publish 8080:80 --publish 53:53/udp,mode=host",
                 cmd_service_create)
    p.add_argument("name")
    p.add_argument("--network", action="append", required=True, help="network the service is on (repeatable)")
    p.add_argument("--endpoint-mode", choices=["vip", "dnsrr"], default="vip",
                   help="vip: the name resolves to one virtual IP (default); dnsrr: to the task IPs")
    p.add_argument("--alias", action="append", default=[], help="another DNS name for the service (repeatable)")
    p.add_argument("--publish", action="append", default=[], metavar=PUBLISH_METAVAR, help=PUBLISH_HELP)
    p.add_argument("--flow-timeout", metavar="tcp=SECONDS,udp=SECONDS",
                   help="how long an idle connection through the VIP keeps its task (conntrack timeout; "
                        "nftables backend). Default: the kernel's, 5 days for established TCP, 120 s for UDP")
    p = _command(service_sub, "update", "publish or withdraw ports of a live service",
                 "svcnet service update web --publish-add 8443:443 --publish-rm 8080", cmd_service_update)
    p.add_argument("name")
    p.add_argument("--publish-add", action="append", default=[], metavar=PUBLISH_METAVAR,
                   help="publish another port (repeatable), as --publish of 'service create' takes it")
    p.add_argument("--publish-rm", action="append", default=[], metavar="PUBLISHED[/udp]",
                   help="stop publishing this port (repeatable); open connections go on, new ones are refused")
    p = _command(service_sub, "ls", "list services", "svcnet service ls", cmd_service_ls)
    _format_option(p)
    p = _command(service_sub, "inspect", "show one service with its tasks", "svcnet service inspect web",
                 cmd_service_inspect)
    p.add_argument("name")
    _format_option(p)
    p = _command(service_sub, "rm", "remove a service (refused while it has tasks)", "svcnet service rm web",
                 cmd_service_rm)
    p.add_argument("name")

    p = _command(top, "run", "create a sandbox on networks and run a command in it",
                 "svcnet run -d --name web1 --network front --service web --alias www -- python3 -m http.server 80",
                 cmd_run)
    _sandbox_options(p)
    p.add_argument("--hostname", help="hostname inside the sandbox (default: --name)")
    p.add_argument("--ip", help="IPv4 address on the first network (default: the next free one)")
    health = p.add_argument_group("health check", "the agent runs CMD inside the sandbox; until it passes, the "
                                  "task is in no DNS answer and gets no VIP traffic")
    health.add_argument("--health-cmd", metavar="CMD", help="shell command; exit 0 means healthy")
    health.add_argument("--health-interval", type=float, default=5.0, metavar="SECONDS",
                        help="seconds between checks (default %(default)s)")
    health.add_argument("--health-timeout", type=float, default=None, metavar="SECONDS",
                        help="a check running longer fails and is killed with its process group "
                             "(default: the interval, at least 1 s)")
    health.add_argument("--health-retries", type=int, default=3, metavar="N",
                        help="failures in a row before the task counts as unhealthy (default %(default)s)")
    p.add_argument("--restart", default="no", metavar="POLICY",
                   help="with -d: no (default), on-failure[:N], always or unless-stopped, as Docker; "
                        "a command that ends leaves DNS answers and VIPs within a second either way")
    p.add_argument("-d", "--detach", action="store_true",
                   help="leave the sandbox running in the background (the agent starts COMMAND); "
                        "without it COMMAND runs in the foreground and the sandbox is removed when it exits")
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="-- COMMAND [ARG...]")

    p = _command(top, "attach", "attach an existing network namespace (a container made elsewhere)",
                 "svcnet attach --netns /proc/4242/ns/net --name db --network back", cmd_attach)
    p.add_argument("--netns", required=True, help="path of the netns, e.g. /proc/PID/ns/net or /run/netns/NAME")
    _sandbox_options(p)
    p.add_argument("--ip", help="IPv4 address on the first network")

    p = _command(top, "exec", "run a command inside a sandbox", "svcnet exec web1 -- ip addr", cmd_exec)
    p.add_argument("name")
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="-- COMMAND [ARG...]")

    p = _command(top, "ps", "list this node's sandboxes", "svcnet ps --format json", cmd_ps)
    _format_option(p)

    p = _command(top, "rm", "remove sandboxes: process, veths, netns and registry entries",
                 "svcnet rm web1 web2", cmd_rm)
    p.add_argument("names", nargs="+")

    p = _command(top, "agent", "run the per-host agent in the foreground",
                 "svcnet --log-level info agent --lease-ttl 10 --upstream 192.0.2.53", cmd_agent)
    p.description = ("Run the per-host agent in the foreground: it owns this node's sandboxes and their lease, "
                     "keeps bridges and rules in step with the registry, and answers DNS on 127.0.0.11:53 inside "
                     "every local sandbox. The CLI starts it on demand (passing the SVCNET_* environment on).")
    p.add_argument("--lease-ttl", type=int, default=defaults.LEASE_TTL,
                   help="seconds a dead agent's endpoints stay in the registry (default %(default)s)")
    p.add_argument("--docker", nargs="?", const="on", default=os.environ.get("SVCNET_DOCKER", "off"),
                   metavar="off|on|URL",
                   help="serve Docker containers labelled svcnet.networks=NET[,NET] (and svcnet.service, "
                        "svcnet.aliases, svcnet.hostname, svcnet.name): each gets a veth on those networks, "
                        "its names registered and 127.0.0.11 answered inside it. Run them with "
                        "network_mode: none and dns: [127.0.0.11], or dockerd answers 127.0.0.11 itself. "
                        "'on' is unix:///var/run/docker.sock (env SVCNET_DOCKER; default %(default)s)")
    p.add_argument("--advertise-addr", default=os.environ.get("SVCNET_ADVERTISE_ADDR"), metavar="IP",
                   help="the address other hosts reach this node on, and its VXLAN endpoint (env "
                        "SVCNET_ADVERTISE_ADDR; default: the source address of the default route)")
    p.add_argument("--vxlan-port", type=int, default=int(os.environ.get("SVCNET_VXLAN_PORT", defaults.VXLAN_PORT)),
                   metavar="PORT", help="UDP port of overlay networks' VXLAN, the same on every host "
                                        "(env SVCNET_VXLAN_PORT; default %(default)s)")
    p.add_argument("--netns-prefix", default=os.environ.get("SVCNET_NETNS_PREFIX", defaults.NETNS_PREFIX),
                   metavar="PREFIX",
                   help="name the sandboxes' network namespaces /run/netns/PREFIX<name>: several agents on one "
                        "machine (scripts/cluster.sh's hosts) need different ones (env SVCNET_NETNS_PREFIX; "
                        "default %(default)s)")
    p.add_argument("--remove-on-exit", action="store_true",
                   default=os.environ.get("SVCNET_REMOVE_ON_EXIT", "") not in ("", "0", "false"),
                   help="on SIGTERM, if none of its sandboxes runs any more (a compose project going down: "
                        "its containers stop first), remove them, the bridges and the firewall rules: the host "
                        "is left as before the agent. While one still runs (a restart) everything stays, as "
                        "without the flag, and the next agent serves it again (env SVCNET_REMOVE_ON_EXIT)")
    _resolver_options(p, "SVCNET_METRICS_ADDR", DEFAULT_METRICS_ADDR)
    _lb_options(p)

    p = _command(top, "sidecar", "register one existing netns and answer its DNS (one process per sandbox)",
                 "svcnet sidecar --netns /proc/4242/ns/net --name db --network back --service db", cmd_sidecar)
    p.description = ("Attach a network namespace made by someone else (a compose service, a pod) to svcnet "
                     "networks, register it under this process's own lease, and answer 127.0.0.11:53 inside it. "
                     "SIGTERM deregisters and detaches; if the process is killed, its names vanish when the "
                     "lease (--lease-ttl) runs out.")
    p.add_argument("--netns", required=True, metavar="PATH|NAME",
                   help="the netns: /proc/PID/ns/net, /run/netns/NAME, or NAME under /run/netns; "
                        "/proc/self/ns/net with --host-netns when the sidecar runs inside it")
    p.add_argument("--host-netns", metavar="PATH|parent",
                   help="run in this netns (where svcnet's bridges and etcd are) after taking --netns: for a "
                        "sidecar container sharing its app's netns (compose network_mode: service:APP with "
                        "pid: host). 'parent': the netns of the nearest parent process outside --netns (the "
                        "container runtime's shim, in the host's)")
    _sandbox_options(p)
    p.add_argument("--hostname", help="hostname to register (default: --name)")
    p.add_argument("--ip", help="IPv4 address on the first network")
    p.add_argument("--lease-ttl", type=int, default=defaults.LEASE_TTL,
                   help="seconds this sandbox's names outlive a killed sidecar (default %(default)s)")
    _resolver_options(p, "SVCNET_SIDECAR_METRICS_ADDR", "")
    _lb_options(p)
    return parser


def _lb_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("load balancer", "traffic to a service's VIP goes to its healthy tasks")
    group.add_argument("--lb-backend", choices=["auto", "ipvs", "nftables", "iptables"],
                       default=os.environ.get("SVCNET_LB_BACKEND", defaults.LB_BACKEND),
                       help="auto: IPVS when the kernel has it, else nftables (map elements: flat cost at "
                            "10,000 services), else iptables DNAT (env SVCNET_LB_BACKEND)")
    group.add_argument("--drain-grace", type=float, default=defaults.DRAIN_GRACE, metavar="SECONDS",
                       help="IPVS: a task that left keeps its established connections this long "
                            "(default %(default)s)")


DEFAULT_METRICS_ADDR = defaults.METRICS_ADDR


def _resolver_options(parser: argparse.ArgumentParser, metrics_env: str, metrics_default: str) -> None:
    group = parser.add_argument_group(
        "resolver", "DNS on 127.0.0.11:53. Local names answer from memory; everything else is forwarded.")
    upstream_env = [u for u in os.environ.get("SVCNET_UPSTREAM", "").split(",") if u]
    group.add_argument("--upstream", action="append", default=None, metavar="IP[:PORT]",
                       help="upstream resolver, tried in order (repeatable; env SVCNET_UPSTREAM, comma-separated; "
                            "default: the nameservers of the host's /etc/resolv.conf, minus 127.0.0.11)")
    group.set_defaults(upstream_env=upstream_env)
    group.add_argument("--upstream-timeout", type=float, default=defaults.UPSTREAM_TIMEOUT, metavar="SECONDS",
                       help="wait this long for one upstream before trying the next (default %(default)s; "
                            "Docker waits 4)")
    group.add_argument("--max-inflight", type=int, default=defaults.MAX_INFLIGHT, metavar="N",
                       help="forwarded queries in flight per sandbox before REFUSED (default %(default)s)")
    group.add_argument("--tcp-idle-timeout", type=float, default=defaults.TCP_IDLE_TIMEOUT, metavar="SECONDS",
                       help="close a DNS TCP connection idle this long (default %(default)s)")
    group.add_argument("--ttl-vip", type=int, default=defaults.TTL_VIP, metavar="SECONDS",
                       help="TTL of a service's VIP: stable for the service's life (default %(default)s)")
    group.add_argument("--ttl-name", type=int, default=defaults.TTL_NAME, metavar="SECONDS",
                       help="TTL of container names, aliases and PTRs: a re-created container moves "
                            "(default %(default)s)")
    group.add_argument("--ttl-tasks", type=int, default=defaults.TTL_TASKS, metavar="SECONDS",
                       help="TTL of task lists (dnsrr services, tasks.<svc>, SRV): they change often "
                            "(default %(default)s)")
    group.add_argument("--ttl-negative", type=int, default=defaults.TTL_NEGATIVE, metavar="SECONDS",
                       help="TTL of NODATA/NXDOMAIN: a name about to appear must not stay hidden "
                            "(default %(default)s)")
    group.add_argument("--dns-cache-mb", type=float, default=defaults.DNS_CACHE_BYTES / 2**20, metavar="MB",
                       help="memory for memoized replies, every sandbox together; least used go first "
                            "(default %(default)g; svcnet_dns_cache_bytes in /metrics)")
    group.add_argument("--metrics-addr", default=os.environ.get(metrics_env, metrics_default), metavar="HOST:PORT",
                       help="serve Prometheus metrics here; '' turns them off; port 0 picks one "
                            f"(env {metrics_env}; default {metrics_default or 'off'})")


def _resolver_config(args):
    from discovery.dns.answers import Ttls
    from discovery.dns.forward import Upstream, from_resolv_conf
    from discovery.dns.resolver import ResolverConfig

    texts = args.upstream if args.upstream is not None else args.upstream_env
    upstreams = [Upstream.parse(t) for t in texts] if texts else from_resolv_conf()
    for value, flag in ((args.upstream_timeout, "--upstream-timeout"), (args.tcp_idle_timeout, "--tcp-idle-timeout")):
        if value <= 0:
            raise SvcnetError(f"{flag} must be more than 0 seconds")
    if args.max_inflight < 1:
        raise SvcnetError("--max-inflight must be at least 1")
    ttls = Ttls(args.ttl_vip, args.ttl_name, args.ttl_tasks, args.ttl_negative)
    if min(ttls.vip, ttls.name, ttls.tasks, ttls.negative) < 0:
        raise SvcnetError("TTLs cannot be negative")
    if args.dns_cache_mb < 0:
        raise SvcnetError("--dns-cache-mb cannot be negative (0 memoizes nothing)")
    return ResolverConfig(tuple(upstreams), args.upstream_timeout, args.max_inflight, args.tcp_idle_timeout,
                          ttls=ttls, cache_bytes=int(args.dns_cache_mb * 2**20))


def _metrics_address(args) -> tuple[str, int] | None:
    from discovery.metrics import parse_address

    if not args.metrics_addr:
        return None
    try:
        return parse_address(args.metrics_addr)
    except ValueError as exc:
        raise SvcnetError(str(exc)) from None


def _sandbox_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--name", required=True, help="container name (a DNS label, unique per network)")
    parser.add_argument("--network", action="append", required=True,
                        help="network to attach to (repeatable; the first holds the default route)")
    parser.add_argument("--service", help="make this sandbox a task of SERVICE")
    parser.add_argument("--alias", action="append", default=[], help="extra DNS name on every network (repeatable)")


# ---- plumbing --------------------------------------------------------------------------


def _etcd_url(args) -> str:
    if args.etcd:
        return args.etcd
    from discovery.state.etcd_local import ensure_local_etcd
    return ensure_local_etcd(args.state_dir)


def _with_registry(args, action):
    import asyncio

    from discovery.state.etcd import connect
    from discovery.state.keys import KeyLayout
    from discovery.state.registry import Registry

    async def run():
        client = await connect(_etcd_url(args))
        try:
            return await action(Registry(client, KeyLayout(args.prefix)))
        finally:
            await client.close()
    return asyncio.run(run())


def _prefix(text: str) -> str:
    """The key prefix as the registry spells it (one leading slash, none trailing)."""
    return "/" + text.strip("/")


def _agent(args) -> ApiClient:
    """A client for the local agent, starting the agent if none runs on this state dir."""
    from discovery.node.client import ApiClient

    client = ApiClient(args.state_dir / "agent.sock")
    try:
        info = client.call("GET", "/v1/info")
    except AgentUnavailableError:
        info = _start_agent(args, client)
    expected = _prefix(args.prefix)
    if info["prefix"] != expected:
        raise SvcnetError(
            f"the agent at {client.socket_path} serves prefix {info['prefix']}, not {expected}; "
            "use another --state-dir to run a second agent"
        )
    return client


def _agent_running(state_dir: Path) -> int | None:
    """The PID of the agent holding this state dir's lock (running, maybe not serving yet)."""
    import fcntl

    try:
        fd = os.open(state_dir / "agent.lock", os.O_RDWR)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            return int((state_dir / "agent.pid").read_text())
        except (OSError, ValueError):
            return 0
    finally:
        os.close(fd)  # closing drops the lock if we took it
    return None


def _start_agent(args, client: ApiClient, timeout: float = 30.0) -> dict:
    """Start the agent, or wait for the one that holds the lock to open its socket."""
    args.state_dir.mkdir(parents=True, exist_ok=True)
    log_path = args.state_dir / "agent.log"
    holder = _agent_running(args.state_dir)
    process = None
    if holder is None:
        argv = [sys.executable, "-m", "discovery.cli", "--etcd", _etcd_url(args), "--prefix", args.prefix,
                "--node", args.node, "--state-dir", str(args.state_dir), "--log-level", "info", "agent"]
        import subprocess

        with open(log_path, "ab") as output:
            process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=output, stderr=output,
                                       start_new_session=True)
        print(f"svcnet: started the agent (pid {process.pid}, log {log_path})", file=sys.stderr)
    else:
        print(f"svcnet: waiting for the agent (pid {holder or 'unknown'}) to open {client.socket_path}",
              file=sys.stderr)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            if _agent_running(args.state_dir) is not None:  # another CLI's agent won the lock
                process = None
                continue
            raise AgentUnavailableError(f"the agent exited with code {process.returncode}; see {log_path}")
        if process is None and _agent_running(args.state_dir) is None:
            raise AgentUnavailableError(f"the agent on {args.state_dir} stopped before serving; see {log_path}")
        try:
            return client.call("GET", "/v1/info")
        except AgentUnavailableError:
            time.sleep(0.05)
    raise AgentUnavailableError(f"the agent did not open {client.socket_path} within {timeout:.0f}s; see {log_path}")


def _print(rows: list[dict], columns: list[tuple[str, str]], fmt: str, raw: object) -> None:
    if fmt == "json":
        print(json.dumps(raw, indent=2, sort_keys=True))
        return
    table = [[header for header, _ in columns]]
    table += [["" if row.get(key) is None else str(row[key]) for _, key in columns] for row in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(columns))]
    for row in table:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)).rstrip())


def _strip_dashdash(command: list[str]) -> list[str]:
    return command[1:] if command[:1] == ["--"] else command


# ---- nodes -----------------------------------------------------------------------------


def _node_rows(args) -> list[dict]:
    async def action(registry):
        return await registry.list_nodes(), await registry.list_endpoints()
    nodes, endpoints = _with_registry(args, action)
    rows = []
    for node, alive in sorted(nodes, key=lambda item: item[0].name):
        row = dict(node.to_dict(), status="ready" if alive else "down")
        row["endpoints"] = sorted(f"{e.network}/{e.container}" for e in endpoints if e.node == node.name)
        row["tasks"] = len(row["endpoints"])
        rows.append(row)
    return rows


def cmd_node_ls(args) -> int:
    rows = _node_rows(args)
    _print(rows, [("NAME", "name"), ("STATUS", "status"), ("ADDRESS", "advertise_addr"), ("VTEP", "vtep"),
                  ("ENDPOINTS", "tasks"), ("VERSION", "version")], args.format, rows)
    return 0


def cmd_node_inspect(args) -> int:
    row = next((r for r in _node_rows(args) if r["name"] == args.name), None)
    if row is None:
        raise NotFoundError(f"no node named {args.name!r}; 'svcnet node ls' lists them")
    if args.format == "json":
        print(json.dumps(row, indent=2, sort_keys=True))
        return 0
    for key in ("name", "status", "advertise_addr", "vtep", "version", "started_at"):
        print(f"{key + ':':16} {row[key]}")
    addresses = ",".join(f"{net}={ip}" for net, ip in sorted((row.get("addresses") or {}).items()))
    print(f"{'addresses:':16} {addresses or '-'}   (its own address on each overlay network)")
    print("endpoints:")
    for endpoint in row["endpoints"]:
        print(f"  {endpoint}")
    return 0


def cmd_node_rm(args) -> int:
    _with_registry(args, lambda r: r.remove_node(args.name))
    print(args.name)
    return 0


# ---- networks --------------------------------------------------------------------------


def cmd_network_create(args) -> int:
    from discovery.state.model import Network

    network = Network.create(args.name, args.subnet, args.subnet6, args.gateway, args.internal, args.driver)
    _with_registry(args, lambda r: r.create_network(network))
    print(network.name)
    return 0


def cmd_network_ls(args) -> int:
    async def action(registry):
        _, networks = await registry.list_networks()
        return networks
    networks = sorted(_with_registry(args, action), key=lambda n: n.name)
    rows = [dict(n.to_dict(), internal="yes" if n.internal else "no") for n in networks]
    _print(rows, [("NAME", "name"), ("DRIVER", "driver"), ("SUBNET", "subnet"), ("GATEWAY", "gateway"),
                  ("SUBNET6", "subnet6"), ("INTERNAL", "internal")], args.format, [n.to_dict() for n in networks])
    return 0


def cmd_network_inspect(args) -> int:
    async def action(registry):
        network = await registry.get_network(args.name)
        endpoints = await registry.list_endpoints(network.name)
        services = [s for s in await registry.list_services() if network.name in s.networks]
        return network, endpoints, services
    network, endpoints, services = _with_registry(args, action)
    data = network.to_dict()
    data["endpoints"] = [e.to_dict() for e in sorted(endpoints, key=lambda e: e.container)]
    data["services"] = {s.name: str(s.vips.get(network.name) or s.endpoint_mode) for s in services}
    if args.format == "json":
        print(json.dumps(data, indent=2, sort_keys=True))
        return 0
    for key in ("name", "driver", "subnet", "gateway", "subnet6", "gateway6", "internal", "vni"):
        print(f"{key + ':':10} {data[key]}")
    print("services:")
    for name, vip in sorted(data["services"].items()):
        print(f"  {name:20} {vip}")
    print("endpoints:")
    for endpoint in data["endpoints"]:
        print(f"  {endpoint['container']:20} {endpoint['ipv4']:16} {endpoint['ipv6'] or '':24} "
              f"node={endpoint['node']} health={endpoint['health']}")
    return 0


def cmd_network_rm(args) -> int:
    _with_registry(args, lambda r: r.remove_network(args.name))
    print(args.name.lower())
    return 0


# ---- services --------------------------------------------------------------------------


def cmd_service_create(args) -> int:
    from discovery.state.model import FlowTimeout, PortSpec, Service

    ports = tuple(PortSpec.parse(text) for text in args.publish)
    flow_timeout = FlowTimeout.parse(args.flow_timeout) if args.flow_timeout else None
    service = Service(args.name, tuple(args.network), args.endpoint_mode, tuple(args.alias), ports,
                      flow_timeout=flow_timeout)
    if flow_timeout is not None:
        _refuse_without_nftables(args)
    stored = _with_registry(args, lambda r: r.create_service(service))
    vips = " ".join(f"{net}={ip}" for net, ip in stored.vips.items())
    print(f"{stored.name} {vips}".rstrip())
    return 0


def _refuse_without_nftables(args) -> None:
    """--flow-timeout is a conntrack timeout policy, which svcnet sets with nftables: refuse
    it when this node's agent runs another backend (one not running yet is not asked)."""
    from discovery.node.client import ApiClient

    try:
        backend = ApiClient(args.state_dir / "agent.sock", timeout=5).call("GET", "/v1/info").get("lb_backend")
    except AgentUnavailableError:
        return
    if backend not in (None, "nftables"):
        raise SvcnetError(f"--flow-timeout needs the nftables load-balancer backend; this node's agent runs "
                          f"{backend}: restart it with --lb-backend nftables (apt-get install libnftables1), "
                          "or leave --flow-timeout out")


def _service_row(service) -> dict:
    return {
        "name": service.name, "mode": service.endpoint_mode, "networks": ",".join(service.networks),
        "vips": ",".join(f"{n}={ip}" for n, ip in service.vips.items()) or "-",
        "ports": ",".join(str(p) for p in service.ports) or "-",
        "aliases": ",".join(service.aliases) or "-",
        "flow_timeout": str(service.flow_timeout) if service.flow_timeout else "-",
    }


def cmd_service_update(args) -> int:
    from discovery.state.model import PortSpec

    if not args.publish_add and not args.publish_rm:
        raise SvcnetError("nothing to update: give --publish-add PUBLISHED:TARGET or --publish-rm PUBLISHED[/udp]")
    add = [PortSpec.parse(text) for text in args.publish_add]
    remove = [PortSpec.parse_published(text) for text in args.publish_rm]
    service = _with_registry(args, lambda r: r.update_ports(args.name, add, remove))
    print(f"{service.name} {','.join(str(p) for p in service.ports) or '-'}")
    return 0


def cmd_service_ls(args) -> int:
    services = sorted(_with_registry(args, lambda r: r.list_services()), key=lambda s: s.name)
    _print([_service_row(s) for s in services],
           [("NAME", "name"), ("MODE", "mode"), ("NETWORKS", "networks"), ("VIPS", "vips"),
            ("PORTS", "ports"), ("ALIASES", "aliases")], args.format, [s.to_dict() for s in services])
    return 0


def cmd_service_inspect(args) -> int:
    async def action(registry):
        service = await registry.get_service(args.name)
        tasks = [e for e in await registry.list_endpoints() if e.service == service.name]
        return service, tasks
    service, tasks = _with_registry(args, action)
    data = service.to_dict()
    data["tasks"] = [t.to_dict() for t in sorted(tasks, key=lambda t: (t.container, t.network))]
    if args.format == "json":
        print(json.dumps(data, indent=2, sort_keys=True))
        return 0
    for key, value in _service_row(service).items():
        print(f"{key + ':':14} {value}")
    print("tasks:")
    for task in data["tasks"]:
        print(f"  {task['container']:20} {task['network']:12} {task['ipv4']:16} node={task['node']} health={task['health']}")
    return 0


def cmd_service_rm(args) -> int:
    _with_registry(args, lambda r: r.remove_service(args.name))
    print(args.name.lower())
    return 0


# ---- sandboxes -------------------------------------------------------------------------


def _sandbox_body(args, command: list[str], detach: bool, netns: str | None = None) -> dict:
    body = {
        "name": args.name, "networks": args.network, "service": args.service, "aliases": args.alias,
        "hostname": getattr(args, "hostname", None), "ip": args.ip, "netns": netns,
        "command": command, "detach": detach,
    }
    if getattr(args, "restart", "no") != "no":
        if not detach:
            raise SvcnetError("--restart needs -d (a foreground command ends with the sandbox)")
        body["restart"] = args.restart
    if getattr(args, "health_cmd", None):
        body["health"] = {"cmd": args.health_cmd, "interval": args.health_interval, "retries": args.health_retries,
                          "timeout": args.health_timeout}
    return body


def cmd_run(args) -> int:
    command = _strip_dashdash(args.command)
    if not command and not args.detach:
        raise SvcnetError("give a COMMAND after -- (or -d to create an idle sandbox)")
    agent = _agent(args)
    record = agent.call("POST", "/v1/sandboxes", _sandbox_body(args, command if args.detach else [], args.detach))
    if args.detach:
        print(record["name"])
        return 0
    return _run_foreground(agent, record, command)


def _run_foreground(agent: ApiClient, record: dict, command: list[str]) -> int:
    """Run COMMAND in the sandbox with our terminal; remove the sandbox when it exits."""
    import signal
    import subprocess

    from discovery.host.nsexec import sandbox_argv

    process = subprocess.Popen(sandbox_argv(record, command))
    forward = lambda signum, frame: process.send_signal(signum)  # noqa: E731
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, forward)
    try:
        code = process.wait()
    finally:
        agent.call("DELETE", f"/v1/sandboxes/{record['name']}")
    return code if code >= 0 else 128 - code


def cmd_attach(args) -> int:
    agent = _agent(args)
    record = agent.call("POST", "/v1/sandboxes", _sandbox_body(args, [], False, netns=args.netns))
    print(record["name"])
    return 0


def cmd_exec(args) -> int:
    command = _strip_dashdash(args.command)
    if not command:
        raise SvcnetError("give a COMMAND after --, e.g. svcnet exec NAME -- ip addr")
    record = _agent(args).call("GET", f"/v1/sandboxes/{args.name}")
    from discovery.host.nsexec import sandbox_argv

    argv = sandbox_argv(record, command)
    os.execvp(argv[0], argv)
    return 127  # not reached


def cmd_ps(args) -> int:
    records = _agent(args).call("GET", "/v1/sandboxes")
    rows = []
    for record in records:
        addresses = ",".join(f"{e['network']}={e['ipv4']}" for e in record["endpoints"])
        health = record.get("health", "healthy") if record.get("health_check") else "-"
        rows.append({"name": record["name"], "service": record["service"] or "-", "addresses": addresses,
                     "status": record["status"], "health": health, "pid": record["pid"] or "-",
                     "command": " ".join(record["command"]) or "-"})
    _print(rows, [("NAME", "name"), ("SERVICE", "service"), ("ADDRESSES", "addresses"), ("STATUS", "status"),
                  ("HEALTH", "health"), ("PID", "pid"), ("COMMAND", "command")], args.format, records)
    return 0


def cmd_rm(args) -> int:
    agent = _agent(args)
    failed = 0
    for name in args.names:
        try:
            agent.call("DELETE", f"/v1/sandboxes/{name}")
            print(name.lower())
        except SvcnetError as exc:
            print(f"svcnet: {exc}", file=sys.stderr)
            failed = 1
    return failed


def _node_options(args):
    """The one definition of what a node (agent or sidecar) takes from the command line."""
    from discovery.node.runtime import NodeOptions

    return NodeOptions(
        _etcd_url(args), _prefix(args.prefix), args.node, args.state_dir, args.lease_ttl,
        resolver=_resolver_config(args), metrics_addr=_metrics_address(args),
        metrics_addr_explicit=args.metrics_addr not in (DEFAULT_METRICS_ADDR, ""),
        lb_backend=args.lb_backend, drain_grace=args.drain_grace,
        docker=_docker_url(getattr(args, "docker", "off")),
        remove_on_exit=getattr(args, "remove_on_exit", False),
        netns_prefix=getattr(args, "netns_prefix", defaults.NETNS_PREFIX),
        advertise_addr=getattr(args, "advertise_addr", None),
        vxlan_port=getattr(args, "vxlan_port", defaults.VXLAN_PORT),
    )


def _docker_url(choice: str) -> str | None:
    from discovery.node.docker import engine_url

    return engine_url(choice)


def cmd_agent(args) -> int:
    from discovery.node.agent import run_agent

    if args.lease_ttl < 2:
        raise SvcnetError("--lease-ttl must be at least 2 seconds")
    if args.advertise_addr:
        import ipaddress
        try:
            ipaddress.ip_address(args.advertise_addr)
        except ValueError:
            raise SvcnetError(f"--advertise-addr {args.advertise_addr!r} is not an IP address") from None
    return run_agent(_node_options(args))


def cmd_sidecar(args) -> int:
    from discovery.host import netns
    from discovery.node.sidecar import SidecarSpec, run_sidecar

    path = netns.netns_path(args.netns)
    if not netns.netns_exists(path):
        raise SvcnetError(f"network namespace {path!r} does not exist; give /proc/PID/ns/net of the container")
    if args.host_netns:
        try:
            path = netns.leave_for(path, args.host_netns)
        except OSError as exc:
            raise SvcnetError(f"--host-netns: {exc}") from None
    spec = SidecarSpec(path, args.name, tuple(args.network), args.service, tuple(args.alias), args.hostname, args.ip)
    return run_sidecar(_node_options(args), spec)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for option, env in (("etcd_cacert", "SVCNET_ETCD_CACERT"), ("etcd_cert", "SVCNET_ETCD_CERT"),
                        ("etcd_key", "SVCNET_ETCD_KEY")):
        if getattr(args, option, None):  # read by the etcd client, and inherited by an agent started on demand
            os.environ[env] = str(Path(getattr(args, option)).resolve())
    if args.func not in (cmd_ps, cmd_rm, cmd_exec):  # agent-only commands print, they do not log
        from discovery import log

        log.setup(args.log_level)
    if os.geteuid() != 0 and args.func not in (cmd_network_ls, cmd_service_ls):
        print("svcnet: warning: not running as root; network namespaces and bridges need root", file=sys.stderr)
    try:
        return args.func(args)
    except SvcnetError as exc:
        print(f"svcnet: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
