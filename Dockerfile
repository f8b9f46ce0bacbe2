# syntax=docker/dockerfile:1.7
# imgcls images. Targets (docs/deployment.md):
#   serve (default)  `imgcls serve`: ONNX Runtime + LiteRT, no TensorFlow; model repository mounted at /models
#   bundled          serve + a model repository copied in:  --build-arg MODEL_REPOSITORY=models (a folder in the context)
#   trainer          `imgcls` with the train,export,lite extras (TensorFlow, tf2onnx, Lite weights): train/export Jobs
# Build args:
#   BASE_IMAGE       a Python 3.11 image with `python3 -m venv` (default the official slim image)
#   PIP_INDEX, PIP_EXTRA_INDEX   optional package index URLs (no credentials: they stay in the image history)
# A TLS-intercepting proxy's CA reaches pip as the build secret `pip_ca` (never a layer):
#   docker buildx build --secret id=pip_ca,src=/etc/ssl/certs/ca-certificates.crt .
#   buildah bud --isolation chroot --secret id=pip_ca,src=/etc/ssl/certs/ca-certificates.crt .

ARG BASE_IMAGE=python:3.11-slim-bookworm

# checkov:skip=CKV_DOCKER_7: the base is the BASE_IMAGE build argument, whose default is a version tag (python:3.11-slim-bookworm); checkov does not resolve ARG defaults
FROM ${BASE_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    LANG=C.UTF-8


# ---- dependencies of the serving image, in /opt/venv (wheels only: nothing is compiled) ----
FROM base AS build
ARG PIP_INDEX=""
ARG PIP_EXTRA_INDEX=""
WORKDIR /src
# Requirements first, source after: a code change keeps the (large) dependency layer cached.
COPY pyproject.toml ./
COPY scripts/pyproject_requirements.py scripts/
RUN --mount=type=secret,id=pip_ca \
    set -eu; \
    if [ -s /run/secrets/pip_ca ]; then export PIP_CERT=/run/secrets/pip_ca; fi; \
    python3 -m venv /opt/venv; \
    python3 scripts/pyproject_requirements.py > /tmp/requirements.txt; \
    /opt/venv/bin/pip install --only-binary=:all: ${PIP_INDEX:+--index-url "$PIP_INDEX"} \
        ${PIP_EXTRA_INDEX:+--extra-index-url "$PIP_EXTRA_INDEX"} -r /tmp/requirements.txt
COPY README.md ./
COPY imgcls/ imgcls/
COPY training/ training/
COPY export/ export/
COPY service/ service/
COPY client/ client/
# The base install: `pip install .` without extras (no TensorFlow).
RUN --mount=type=secret,id=pip_ca \
    set -eu; \
    if [ -s /run/secrets/pip_ca ]; then export PIP_CERT=/run/secrets/pip_ca; fi; \
    /opt/venv/bin/pip install --no-deps ${PIP_INDEX:+--index-url "$PIP_INDEX"} \
        ${PIP_EXTRA_INDEX:+--extra-index-url "$PIP_EXTRA_INDEX"} . \
    && /opt/venv/bin/imgcls --version


# ---- dependencies of the trainer image: the train,export,lite extras (TensorFlow, Lite weights) ----
FROM base AS build-train
ARG PIP_INDEX=""
ARG PIP_EXTRA_INDEX=""
WORKDIR /src
COPY pyproject.toml ./
COPY scripts/pyproject_requirements.py scripts/
RUN --mount=type=secret,id=pip_ca \
    set -eu; \
    if [ -s /run/secrets/pip_ca ]; then export PIP_CERT=/run/secrets/pip_ca; fi; \
    python3 -m venv /opt/venv; \
    python3 scripts/pyproject_requirements.py train export lite > /tmp/requirements.txt; \
    /opt/venv/bin/pip install ${PIP_INDEX:+--index-url "$PIP_INDEX"} \
        ${PIP_EXTRA_INDEX:+--extra-index-url "$PIP_EXTRA_INDEX"} -r /tmp/requirements.txt
COPY README.md ./
COPY imgcls/ imgcls/
COPY training/ training/
COPY export/ export/
COPY service/ service/
COPY client/ client/
RUN --mount=type=secret,id=pip_ca \
    set -eu; \
    if [ -s /run/secrets/pip_ca ]; then export PIP_CERT=/run/secrets/pip_ca; fi; \
    /opt/venv/bin/pip install --no-deps ${PIP_INDEX:+--index-url "$PIP_INDEX"} \
        ${PIP_EXTRA_INDEX:+--extra-index-url "$PIP_EXTRA_INDEX"} . \
    && /opt/venv/bin/imgcls --version


# ---- what every runtime image shares: the non-root user, paths, no compilers ----
FROM base AS runtime-base
RUN useradd --system --uid 10001 --user-group --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin imgcls \
    && mkdir -p /models
ENV PATH=/opt/venv/bin:$PATH \
    IMGCLS_MODEL_REPOSITORY=/models \
    IMGCLS_HOST=0.0.0.0 \
    IMGCLS_PORT=50051 \
    IMGCLS_METRICS_PORT=8000 \
    IMGCLS_HTTP_PORT=8080
WORKDIR /tmp


# ---- the serving image ----
FROM runtime-base AS runtime
COPY --from=build /opt/venv /opt/venv
USER 10001:10001
# 50051 gRPC (imgcls.v1.Inference, grpc.health.v1, reflection), 8000 Prometheus /metrics, 8080 HTTP (docs/http.md)
EXPOSE 50051 8000 8080
# Standard grpc.health.v1 check of the whole server (Kubernetes uses its native gRPC probes instead).
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python3", "-c", "import os, grpc; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; ch = grpc.insecure_channel('127.0.0.1:' + os.environ.get('IMGCLS_PORT', '50051')); r = g.HealthStub(ch).Check(h.HealthCheckRequest(service=''), timeout=4); raise SystemExit(r.status != h.HealthCheckResponse.SERVING)"]
ENTRYPOINT ["imgcls", "serve"]


# ---- train and export Jobs: `imgcls train ...`, `imgcls export ...` ----
FROM runtime-base AS trainer
COPY --from=build-train /opt/venv /opt/venv
USER 10001:10001
# Keras looks for weights and datasets under $HOME/.keras: point HOME at a writable volume.
ENV HOME=/work
HEALTHCHECK NONE
ENTRYPOINT ["imgcls"]
CMD ["--help"]


# ---- serving image with a model repository baked in (read-only, owned by root) ----
FROM runtime AS bundled
ARG MODEL_REPOSITORY=models
COPY ${MODEL_REPOSITORY}/ /models/


# ---- default target ----
FROM runtime AS serve
LABEL org.opencontainers.image.title="imgcls" \
      org.opencontainers.image.description="imgcls serve: gRPC image classification (ONNX Runtime, LiteRT), model repository at /models"
