# svcnet: the agent and sidecar image. scripts/images.sh builds it on svcnet-base:bookworm
# (debootstrap, no registry) with the wheels it built in build/wheels; the default BASE is
# for machines that can pull, and without wheels pip fetches svcnet's dependencies.
ARG BASE=python:3.11-slim-bookworm

FROM ${BASE} AS base
# What the agent runs besides Python: already in svcnet-base (this RUN then only checks).
RUN command -v ip && command -v iptables && command -v nsenter && command -v dig && command -v curl \
    && command -v modprobe && ldconfig -p | grep -q libnftables.so.1 || \
    (apt-get update && apt-get install -y --no-install-recommends iproute2 iptables libnftables1 util-linux \
     dnsutils curl kmod ipvsadm conntrack && rm -rf /var/lib/apt/lists/*)

# The venv is built in a stage of its own so that the wheels stay out of the image.
FROM base AS venv
LABEL svcnet.stage=venv
COPY pyproject.toml README.md /src/
COPY discovery /src/discovery
COPY lb /src/lb
# build/wheel[s] is a pattern and pyproject.toml is there for it to match something: a
# context without wheels (not built by scripts/images.sh) builds too, from /src.
COPY pyproject.toml build/wheel[s] /wheels/
# Without an index from the wheels; if there are none, or none for this Python, from PyPI.
# pip and setuptools (22 MB) then go: svcnet needs neither to run.
RUN python3 -m venv /opt/svcnet && \
    if ls /wheels/*.whl >/dev/null 2>&1 && \
        /opt/svcnet/bin/pip install -q --no-cache-dir --no-index --find-links /wheels svcnet; then :; \
    else /opt/svcnet/bin/pip install -q --no-cache-dir --find-links /wheels /src; fi && \
    /opt/svcnet/bin/python -m pip uninstall -q -y pip setuptools && \
    /opt/svcnet/bin/svcnet --help >/dev/null

FROM base
COPY --from=venv /opt/svcnet /opt/svcnet
ENV PATH=/opt/svcnet/bin:$PATH
ENTRYPOINT ["svcnet"]
CMD ["--help"]
