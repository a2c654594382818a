"""The node runtime: one process that wires watch -> View -> DNS + LB + health + leases.

``runtime`` is that wiring, for a source of sandboxes: every local sandbox (``agent``) or
one foreign netns (``sidecar``). ``health`` runs checks, ``api`` is the HTTP server for the
agent's unix-socket API and ``/metrics``, ``client`` the standard-library client the CLI uses.

Uses everything below it: ``state``, ``host``, ``dns`` and ``lb``.
"""
