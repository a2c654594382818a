# etcd from the distribution (Debian's etcd-server) for compose.yaml's registry, and curl
# for its healthcheck; both already in svcnet-base (this RUN then only checks).
ARG BASE=python:3.11-slim-bookworm
FROM ${BASE}
RUN command -v etcd && command -v curl || \
    (apt-get update && apt-get install -y --no-install-recommends etcd-server curl \
     && rm -rf /var/lib/apt/lists/*)
ENTRYPOINT ["etcd"]
