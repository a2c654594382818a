"""The `svcnet` command. Kept thin: commands that talk to the agent import only the standard
library and ``node.client``; the registry, gRPC and pyroute2 load only for commands that
need them."""
