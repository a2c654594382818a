"""The one place a node's tunable defaults are written down.

The model types (``NodeOptions``, ``ResolverConfig``, ``Ttls``) and the CLI's flags both read
these, so a default changes in one line and ``--help`` always tells the truth. Standard
library only: the CLI imports this at start.
"""

LEASE_TTL = 10  # seconds a dead node's endpoints stay in the registry
DRAIN_GRACE = 30.0  # IPVS: seconds a task that left keeps its established connections
LB_BACKEND = "auto"  # auto | ipvs | nftables | iptables
NETNS_PREFIX = "svcnet-"  # sandboxes' names under /run/netns
VXLAN_PORT = 4789  # IANA's VXLAN port: every host of a cluster must use the same

UPSTREAM_TIMEOUT = 1.5  # seconds per upstream try before the next (Docker waits 4)
DNS_CACHE_BYTES = 32 * 1024 * 1024  # reply caches of every sandbox together (--dns-cache-mb)
MAX_INFLIGHT = 1024  # forwards in flight per sandbox, then REFUSED (as Docker)
TCP_IDLE_TIMEOUT = 5.0  # seconds an idle DNS-over-TCP connection stays open
MAX_TCP_CLIENTS = 128  # DNS-over-TCP connections per sandbox

# TTLs, seconds: a VIP lives as long as its service; a container name can move when the
# container is re-created; a task list changes with every start, stop and health flip; a
# negative answer must not hide a name that is about to exist.
TTL_VIP = 600
TTL_NAME = 60
TTL_TASKS = 5
TTL_NEGATIVE = 5

METRICS_HOST, METRICS_PORT = "127.0.0.1", 9253
METRICS_ADDR = f"{METRICS_HOST}:{METRICS_PORT}"
