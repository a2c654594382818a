# The demo's web, client and db (compose.yaml): svcnet-wait as the entrypoint (it holds the
# command until svcnet serves the container), hostname-server, dig and curl.
ARG BASE=python:3.11-slim-bookworm
FROM ${BASE}
RUN command -v python3 && command -v dig && command -v curl || \
    (apt-get update && apt-get install -y --no-install-recommends python3 dnsutils curl \
     && rm -rf /var/lib/apt/lists/*)
# every file of docker/demo/, executable whatever its mode in the checkout
COPY docker/demo/ /tmp/demo/
RUN install -m 755 /tmp/demo/* /usr/local/bin/ && rm -rf /tmp/demo
ENTRYPOINT ["svcnet-wait", "--"]
CMD ["hostname-server", "80"]
