"""DNS on 127.0.0.11: wire format (``wire``), View -> name tables (``records``), what a query
means for one sandbox packed into replies (``answers``), the UDP/TCP servers inside each
netns (``resolver``) and forwarding to upstreams (``forward``).

Uses ``state`` (the View) and ``host`` (entering a netns); never ``lb``.
"""
