"""svcnet load balancing: traffic to a VIP spread over the service's healthy tasks, in the kernel.

``plan`` turns the View into the desired VIPs per network (pure, per-network and memoized by
View slice); ``nftables`` (map elements through libnftables), ``iptables`` (DNAT with
python-iptables) and ``ipvs`` (fwmark services with pyroute2 + iptables marks) each read a
netns's current rules and apply only the difference;
``conntrack`` forgets UDP flows to tasks that left; ``sync`` is the one loop that applies the
plan to every local sandbox, coalescing changes. ``mesh*`` is the routing mesh on the host.

Uses ``discovery.state`` (the View) and ``discovery.host`` (entering a netns, iptables);
never ``discovery.dns``.
"""
