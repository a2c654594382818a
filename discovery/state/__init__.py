"""Cluster state: what svcnet knows, and how it reaches etcd.

The frozen, self-validating model (``model``), the key layout (``keys``), address choice
(``ipam``), the etcd client with endpoint failover (``etcd``) and a local member for when
none is given (``etcd_local``), transactional writes (``registry``), the owner's lease
(``lease``), the one watch (``watch``) feeding the immutable View (``view``, with one slice
per network that consumers rebuild from only when it changed), and the View
kept on disk so a node restarted without etcd still serves (``snapshot``).

The bottom layer: it imports nothing from the other subpackages.
"""
