"""svcnet load balancing: VIP and routing-mesh dataplane (IPVS or iptables).

The plan and backends land with the VIP load-balancing issue; the package exists now so
the distribution's layout is the one DESIGN.md describes.
"""
