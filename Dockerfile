# syntax=docker/dockerfile:1
# thali images. The default target (the last stage) serves the bundled registry:
#
#   docker build -t thali .                          # serving image: no torch, ~1 GB
#   docker run -p 8000:8000 thali                    # REST API on :8000, Swagger UI at /docs
#   docker run -p 8000:8000 -e THALI_REGISTRY=s3://bucket/models thali   # another registry (extra s3)
#   docker build --target train -t thali-train .     # + torch/timm/albumentations: thali train, export
#
# GPU serving (CUDA base, onnxruntime-gpu in place of onnxruntime; run with --gpus all):
#   docker build --build-arg BASE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04 \
#                --build-arg ORT_PACKAGE=onnxruntime-gpu -t thali-gpu .
# THALI_EXTRAS adds extras to the serving install, e.g. --build-arg THALI_EXTRAS=s3.
ARG BASE=python:3.11-slim

# ---- base: Python 3.11+ with venv, and tini to be PID 1 (forwards signals, reaps children) ----------
FROM ${BASE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    NO_ALBUMENTATIONS_UPDATE=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini \
    && if ! command -v python3 >/dev/null; then \
         apt-get install -y --no-install-recommends python3 python3-venv; fi \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 10001 --user-group thali

# ---- build: the serving install into /opt/venv (no torch) -------------------------------------------
FROM base AS build
ARG ORT_PACKAGE=onnxruntime
ARG THALI_EXTRAS=
WORKDIR /src
COPY pyproject.toml README.md ./
COPY core ./core
COPY plugins ./plugins
COPY domains ./domains
COPY registry ./registry
COPY api ./api
COPY ui ./ui
COPY testing ./testing
RUN python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install ".${THALI_EXTRAS:+[$THALI_EXTRAS]}" \
    && if [ "$ORT_PACKAGE" != "onnxruntime" ]; then \
         /opt/venv/bin/pip uninstall -y onnxruntime && /opt/venv/bin/pip install "$ORT_PACKAGE"; fi

# ---- train: the training extra on top (CPU torch wheels unless TORCH_INDEX is changed) --------------
FROM build AS train
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN /opt/venv/bin/pip install --extra-index-url "$TORCH_INDEX" ".[train]"
USER thali
WORKDIR /home/thali
ENV PATH=/opt/venv/bin:$PATH \
    THALI_REGISTRY=/home/thali/model-registry
ENTRYPOINT ["tini", "--", "thali"]
CMD ["--help"]

# ---- serve (default): the serving install, the bundled registry, gunicorn under tini ---------------
FROM base AS serve
COPY --from=build /opt/venv /opt/venv
COPY models /opt/thali/models
USER thali
WORKDIR /home/thali
# THALI_REGISTRY: a folder (mount a volume) or an object store URL; THALI_DOMAINS, THALI_ADMIN_KEY, ...
# (see README, "Settings") configure the service.
ENV PATH=/opt/venv/bin:$PATH \
    THALI_REGISTRY=/opt/thali/models
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python3", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4).status != 200)"]
# tini is PID 1; `thali serve` is its child and runs the gunicorn master in-process: `docker stop`
# (SIGTERM) lets requests in flight finish (graceful timeout 30 s) before the workers exit.
STOPSIGNAL SIGTERM
ENTRYPOINT ["tini", "--", "thali"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
