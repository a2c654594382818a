"""svcnet: service discovery (DNS at 127.0.0.11) and VIP load balancing for containers, on etcd.

The subpackages, each allowed to import only those below it:

    cli/    the `svcnet` command: a thin client of the node API and of state/
    node/   the runtime (agent: every local sandbox; sidecar: one netns), health, API, metrics
    dns/    wire format, name records, answers, the 127.0.0.11 resolver, forwarding
    host/   kernel plumbing on one host: netns, veths, bridges, sandboxes, firewall
    state/  the model, keys, IPAM, the etcd client, registry, lease, watch and the View

``lb`` (beside this package) sits at the level of ``dns``: on ``state`` and ``host``, never
on ``dns``. ``errors``, ``log``, ``metrics`` and ``procs`` here are for everyone.
"""

__version__ = "0.1.0"
