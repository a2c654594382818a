"""svcnet discovery: the registry, networks, sandboxes and (later) the 127.0.0.11 resolver."""

__version__ = "0.1.0"
