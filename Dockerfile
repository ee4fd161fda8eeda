# syntax=docker/dockerfile:1
#
# Images of the shortened service. One Dockerfile, three targets:
#
#   docker build --target api    -t shortened-api    .   # FastAPI + alembic, CPU-only torch (python:3.11-slim)
#   docker build --target flower -t shortened-flower .   # api image + Flower (Celery monitoring)
#   docker build --target worker -t shortened-worker .   # Celery GPU worker (official PyTorch CUDA runtime image)
#
# The api image also runs the database migrations (`alembic upgrade head`): alembic.ini and the
# migration scripts are copied into /app, the working directory.
#
# Build arguments:
#   PYTHON_IMAGE   base of the api/flower images
#   TORCH_VERSION  CPU torch wheel installed in the api image
#   PYTORCH_IMAGE  base of the worker image. Pick a tag whose CUDA version the GPU nodes' driver
#                  supports; the worker keeps the torch that ships in that image (pinned by a
#                  constraint so `pip install .` never replaces it with a PyPI build).
#   FLOWER_VERSION Flower release for the flower target (flower is not a project dependency).

ARG PYTHON_IMAGE=python:3.11-slim
ARG PYTORCH_IMAGE=pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime

# --------------------------------------------------------------------------------------------
# api-build: a virtualenv with CPU torch, the project's dependencies and the project itself.
# --------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS api-build
ARG TORCH_VERSION=2.13.0
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# CPU build of torch first, so the `torch>=...` requirement below is already satisfied and pip
# never pulls the multi-GB CUDA wheels from PyPI.
RUN pip install "torch==${TORCH_VERSION}" --index-url https://download.pytorch.org/whl/cpu
WORKDIR /src
# Dependencies in their own layer: install the project's metadata with empty packages, so that
# a source change does not re-download every dependency. README.md* is optional (glob).
COPY pyproject.toml README.md* ./
RUN mkdir -p shortened service worker \
 && touch shortened/__init__.py service/__init__.py worker/__init__.py \
 && pip install . \
 && pip uninstall -y shortened \
 && rm -rf shortened service worker build ./*.egg-info
COPY . .
RUN pip install --no-deps . \
 && rm -rf build ./*.egg-info \
 && python -c "import torch, shortened; assert torch.version.cuda is None, 'api image must have CPU torch'"

# --------------------------------------------------------------------------------------------
# api: runtime image (no compiler, no build context besides /app for alembic).
# --------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS api
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/home/app \
    SHORTENED_DATA_DIR=/data \
    SHORTENED_API_HOST=0.0.0.0 \
    SHORTENED_API_PORT=8000
RUN groupadd --system --gid 10001 app \
 && useradd --system --uid 10001 --gid app --create-home --home-dir /home/app --shell /usr/sbin/nologin app \
 && mkdir -p /data /app \
 && chown app:app /data /app
COPY --from=api-build /opt/venv /opt/venv
WORKDIR /app
COPY --from=api-build --chown=app:app /src /app
USER 10001:10001
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4).status == 200 else 1)"]
CMD ["uvicorn", "service.main:app", "--host", "0.0.0.0", "--port", "8000", "--proxy-headers", "--forwarded-allow-ips", "*"]

# --------------------------------------------------------------------------------------------
# flower: the api image plus Flower, for `celery -A worker.celery_app flower`.
# --------------------------------------------------------------------------------------------
FROM api AS flower
ARG FLOWER_VERSION=2.2.0
USER 0
RUN pip install "flower==${FLOWER_VERSION}"
USER 10001:10001
EXPOSE 5555
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:5555/healthcheck', timeout=4).status == 200 else 1)"]
CMD ["celery", "-A", "worker.celery_app", "flower", "--port=5555"]

# --------------------------------------------------------------------------------------------
# worker: official PyTorch CUDA runtime image; its torch is kept as is.
# --------------------------------------------------------------------------------------------
FROM ${PYTORCH_IMAGE} AS worker
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/app \
    SHORTENED_DATA_DIR=/data \
    HF_HOME=/data/cache/huggingface \
    SHORTENED_QUEUE=gpu
RUN groupadd --system --gid 10001 app \
 && useradd --system --uid 10001 --gid app --create-home --home-dir /home/app --shell /usr/sbin/nologin app \
 && mkdir -p /data /app \
 && chown app:app /data /app
WORKDIR /app
# Pin the image's own torch (e.g. 2.9.1+cu128) so resolving `torch>=...` keeps it.
RUN python -c "import torch; print(f'torch=={torch.__version__}')" > /tmp/torch-constraint.txt
COPY pyproject.toml README.md* ./
RUN mkdir -p shortened service worker \
 && touch shortened/__init__.py service/__init__.py worker/__init__.py \
 && pip install -c /tmp/torch-constraint.txt '.[cluster]' \
 && pip uninstall -y shortened \
 && rm -rf shortened service worker build ./*.egg-info
COPY --chown=app:app . .
RUN pip install --no-deps -c /tmp/torch-constraint.txt . \
 && rm -rf build ./*.egg-info \
 && python -c "import torch, shortened; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
USER 10001:10001
VOLUME ["/data"]
# Warm shutdown on SIGTERM: the worker stops taking tasks and lets the running one reach its
# next checkpoint; give it time (compose stop_grace_period, k8s terminationGracePeriodSeconds).
STOPSIGNAL SIGTERM
CMD ["celery", "-A", "worker.celery_app", "worker", "-Q", "gpu", "--concurrency", "1", "--prefetch-multiplier", "1", "--max-tasks-per-child", "1", "--loglevel", "INFO"]
