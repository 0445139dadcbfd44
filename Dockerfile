# syntax=docker/dockerfile:1
# The sparkgate gateway in a container. Engines are NOT inside this image: with `runtime: docker` the
# gateway starts each engine as a sibling container through the host's Docker socket, so the engine
# images (vLLM, SGLang, ...) must be pulled or built on the host. `runtime: process` entries need their
# engine installed in this image, which it is not (see compose/README.md).
#
#   docker build -t sparkgate:local .
#   docker run -d --init --network host -e SPARKGATE_HOST=127.0.0.1 \
#       -v /var/run/docker.sock:/var/run/docker.sock \
#       -v "$PWD/models.d:/etc/sparkgate/models.d:ro" -v sparkgate-stats:/var/lib/sparkgate sparkgate:local
#
# That serves this machine only (host networking: the host's loopback), with no keys. To serve the LAN, keys are
# required (the gateway refuses a non-loopback address without them), in place of SPARKGATE_HOST=127.0.0.1:
#       -e SPARKGATE_API_KEYS='[{"key": "sk-change-me", "name": "me"}]' -e SPARKGATE_ADMIN_KEY=sk-admin-change-me
# (or an env file: --env-file ./sparkgate.env).
#
# compose/docker-compose.yml does the same with healthcheck, restart policy and optional extras.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/sparkgate
# Only what the package build needs (.dockerignore keeps the rest out of the context).
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY waker ./waker
COPY stats ./stats
RUN pip install . && mkdir -p /etc/sparkgate/models.d /var/lib/sparkgate

# Defaults for a container. Settings are SPARKGATE_* env vars (README.md); override them with
# `-e` / an env file. 0.0.0.0 is for a published port on a bridge network; `sparkgate serve` refuses to
# bind a non-loopback address without API keys (SPARKGATE_API_KEYS / SPARKGATE_API_KEYS_FILE) unless
# given --insecure-no-auth. The compose file uses host networking and 127.0.0.1 instead.
ENV SPARKGATE_HOST=0.0.0.0 \
    SPARKGATE_PORT=8009 \
    SPARKGATE_CONFIG_DIR=/etc/sparkgate/models.d \
    SPARKGATE_STATS_DB=/var/lib/sparkgate/stats.sqlite3

VOLUME ["/var/lib/sparkgate"]
EXPOSE 8009

# Runs as root, on purpose: the gateway drives the Docker daemon through /var/run/docker.sock, and
# access to that socket is root-equivalent anyway (a user in the `docker` group can start a privileged
# container). A non-root user would need the socket's group id at build time for no real gain.
# Treat this container like any process with Docker access: only trusted models.d, keys for clients.

# /health answers 200 without a key. `sparkgate health` probes where the gateway listens: SPARKGATE_HOST and
# SPARKGATE_PORT as the gateway reads them, a wildcard address (0.0.0.0, ::) on loopback, one address on itself.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["sparkgate", "health"]

# SIGTERM stops the gateway and every engine it started; SIGHUP re-reads models.d. Run with --init
# (compose: `init: true`) so signals are forwarded and process-runtime children are reaped.
STOPSIGNAL SIGTERM
CMD ["sparkgate", "serve"]
