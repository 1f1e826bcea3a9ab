# syntax=docker/dockerfile:1
# Credence's serving image: credence-serve on port 8000, configured by CREDENCE_* variables,
# serving the checkpoints under /models (a volume; or baked in, below). CPU PyTorch by default.
#
#   docker build -t credence-serve .
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 \
#     -t credence-serve:cuda .                        # CUDA: run with --gpus all
#   docker build --build-context models=./models -t credence-serve:baked .
#   podman build --build-context wheels=/opt/wheels --build-arg TORCH_SOURCE=wheels ...
#                                                     # torch from a local wheel folder
#
# BASE may be any Debian-based image: one without Python 3.11 and venv gets bookworm's python3.
ARG BASE=python:3.11-slim-bookworm

# Extra build contexts, empty unless given as --build-context NAME=DIR.
FROM scratch AS wheels
FROM scratch AS models

FROM ${BASE} AS python
# Debian's python3 is whatever the base's release ships; pinning it would tie the file to one.
# hadolint ignore=DL3008
RUN if ! python3 -c 'import ensurepip' 2>/dev/null; then \
      apt-get update \
      && apt-get install -y --no-install-recommends python3 python3-venv \
      && rm -rf /var/lib/apt/lists/*; \
    fi
ENV PATH=/opt/venv/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1

FROM python AS deps
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# index: torch from TORCH_INDEX_URL; wheels: torch from the `wheels` build context (its
# dependencies from the package index)
ARG TORCH_SOURCE=index
# a CA bundle for pip where a proxy re-signs TLS (mounted into the build, e.g. podman -v)
ARG PIP_CERT
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/venv
RUN --mount=type=bind,from=wheels,target=/wheels \
    if [ "$TORCH_SOURCE" = wheels ]; then \
      PIP_NO_INDEX=1 PIP_FIND_LINKS=/wheels PIP_NO_DEPS=1 pip install "torch==${TORCH_VERSION}"; \
    else export PIP_INDEX_URL="$TORCH_INDEX_URL"; fi \
    && pip install "torch==${TORCH_VERSION}"
WORKDIR /src
COPY pyproject.toml ./
# The dependencies alone, in layers that editing the source leaves cached.
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > requirements.txt \
    && pip install -r requirements.txt

# Credence itself, on its own path: a small layer of its own in the image.
FROM deps AS app
ARG PIP_CERT
COPY README.md ./
COPY training ./training
COPY service ./service
RUN pip install --no-deps --target /opt/app .

# The runtime starts from the environment rather than copying it: a cached COPY of its
# 1.3 GB is hashed again on every build. pip and the requirements go (pip's 10 MB stay
# in a lower layer, out of sight).
FROM deps AS venv
RUN pip uninstall -y pip && rm -rf /src

# Only the environment and the package: no sources, no build tools, no pip.
FROM venv AS runtime
WORKDIR /tmp
RUN groupadd --system --gid 10001 credence \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin credence
COPY --from=app /opt/app /opt/app
# owned by the server's user, so that a volume created from it is writable by a trainer
COPY --from=models --chown=10001:10001 / /models/
USER 10001:10001
ENV PATH=/opt/app/bin:$PATH PYTHONPATH=/opt/app
ENV CREDENCE_MODEL_DIR=/models CREDENCE_HOST=0.0.0.0 CREDENCE_PORT=8000 CREDENCE_DEVICE=auto
VOLUME ["/models"]
EXPOSE 8000
# Liveness on the port the server listens on (set it with CREDENCE_PORT, not --port).
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('CREDENCE_PORT', '8000'), timeout=2)"]
ENTRYPOINT ["credence-serve"]
