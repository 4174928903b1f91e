# A first image: thali installed with CPU-only torch. The deployment issue adds serving on a port.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    NO_ALBUMENTATIONS_UPDATE=1

WORKDIR /opt/thali
COPY pyproject.toml README.md ./
COPY core ./core
COPY plugins ./plugins
COPY domains ./domains
COPY registry ./registry
COPY api ./api
COPY ui ./ui

# The CPU wheels of torch keep the image about 4 GB smaller than the default CUDA build.
RUN pip install --extra-index-url https://download.pytorch.org/whl/cpu . \
    && useradd --create-home thali
USER thali
# The model registry: a folder in the image by default; mount a volume here, or point THALI_REGISTRY
# at an object store (s3://bucket/models with the `s3` extra) to share it between servers.
ENV THALI_REGISTRY=/home/thali/model-registry

ENTRYPOINT ["thali"]
CMD ["plugins"]
