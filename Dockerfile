# syntax=docker/dockerfile:1.7
# llm-pool's container image; deploy/README.md says how to build, run and deploy it.
#
#   docker build -t llm-pool .                                   # CPU (the Makefile's flags)
#   docker build -t llm-pool:cuda --build-arg VARIANT=cuda .     # NVIDIA GPUs, CUDA 12
#
# The build stage runs `make install`, the very install a developer and CI run: the locked
# dependencies, llama-cpp-python and llama-server built from source with the Makefile's
# portable CPU flags (LLAMA_CMAKE_ARGS), plus LLAMA_CMAKE_EXTRA for the CUDA variant.  Only
# the finished checkout and its venv reach the runtime stage: no compiler, no cache.

ARG VARIANT=cpu
ARG PYTHON_IMAGE=python:3.12-slim-bookworm
ARG CUDA_VERSION=12.6.3

# ---------------------------------------------------------------- build bases, one per variant
FROM ${PYTHON_IMAGE} AS build-cpu
ENV LLAMA_CMAKE_EXTRA=""
# Debian's package versions are the base image's (pinned by its tag); pinning each one again
# would break the build at every point release of the base image.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential cmake ninja-build \
 && rm -rf /var/lib/apt/lists/*

FROM nvidia/cuda:${CUDA_VERSION}-devel-ubuntu24.04 AS build-cuda
# CUDAARCHS (CMake's default for CMAKE_CUDA_ARCHITECTURES), not a -D flag: the Makefile passes
# LLAMA_CMAKE_ARGS through a shell, where a ';'-separated list would end the command.
ARG CUDA_ARCHITECTURES="80;86;89;90"
ENV CUDAARCHS=${CUDA_ARCHITECTURES} \
    LLAMA_CMAKE_EXTRA="-DGGML_CUDA=ON -DCMAKE_EXE_LINKER_FLAGS=-Wl,--allow-shlib-undefined"
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential cmake ninja-build \
 && rm -rf /var/lib/apt/lists/*

# ---------------------------------------------------------------- build: make install
# A stage of this file, chosen by VARIANT (hadolint takes it for an untagged image).
# hadolint ignore=DL3006
FROM build-${VARIANT} AS build
WORKDIR /opt/llm-pool
COPY . .
# The cache mount keeps the llama-cpp-python wheel and llama-server between image builds
# (15-20 min on 2 cores the first time), as ~/.cache/llm-pool does on a developer's machine;
# the venv holds its own copies, so nothing of the cache is needed at run time.
RUN --mount=type=cache,target=/root/.cache/llm-pool \
    make install PYTHON=python3 LLAMA_CMAKE_EXTRA="${LLAMA_CMAKE_EXTRA}"

# ---------------------------------------------------------------- runtime bases, one per variant
# The venv links to its base interpreter by path, so each runtime base has the Python of its
# build base at the same place.
FROM ${PYTHON_IMAGE} AS runtime-cpu

FROM nvidia/cuda:${CUDA_VERSION}-runtime-ubuntu24.04 AS runtime-cuda
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 \
 && rm -rf /var/lib/apt/lists/*

# ---------------------------------------------------------------- runtime
# hadolint ignore=DL3006
FROM runtime-${VARIANT}
# A fixed non-root uid, so a pod's securityContext (runAsUser: 10001) and volume ownership
# can name it; /var/lib/llm-pool holds what the server writes (the ledger, models).
RUN groupadd --system --gid 10001 llm-pool \
 && useradd --system --uid 10001 --gid llm-pool --home-dir /var/lib/llm-pool --no-create-home \
      --shell /usr/sbin/nologin llm-pool \
 && mkdir -p /var/lib/llm-pool/ledger /var/lib/llm-pool/models /etc/llm-pool \
 && chown -R llm-pool:llm-pool /var/lib/llm-pool
COPY --from=build /opt/llm-pool /opt/llm-pool
COPY deploy/pool.toml /etc/llm-pool/pool.toml
ENV PATH=/opt/llm-pool/.venv/bin:${PATH} \
    LLM_POOL_SETTINGS_PATH=/etc/llm-pool/pool.toml \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
WORKDIR /opt/llm-pool
USER 10001:10001
EXPOSE 8000
# SIGTERM starts the graceful stop (drain service.shutdown_drain_s): give `docker stop` a
# --time (-t) longer than that.
STOPSIGNAL SIGTERM
# Liveness only: /health/ready is 503 while models load, which is not a reason to restart.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
  CMD ["/opt/llm-pool/.venv/bin/python", "-c", "import urllib.request as u; u.urlopen('http://127.0.0.1:8000/health/live', timeout=4)"]
ENTRYPOINT ["llm-pool"]
CMD ["serve"]
