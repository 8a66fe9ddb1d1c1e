# codetr-stream daemon image. Build: `make image` (podman) or the docker line in the README
# ("Container image"). Any Debian/Ubuntu base with python3 >= 3.11 works (Debian 12+, Ubuntu
# 24.04+): torch's CUDA wheels bring the CUDA user space (cuBLAS, cuDNN, NVRTC, ...) and the host's
# NVIDIA container toolkit mounts the driver (libcuda) and NVDEC (libnvcuvid), so no vendor CUDA
# base image is needed.
ARG BASE_IMAGE=docker.io/library/debian:bookworm-slim

FROM ${BASE_IMAGE} AS build
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# A CA bundle for pip other than the base's (a TLS-inspecting proxy's: mount the host's bundle
# into the build and name it here; an ARG, so it is in no layer of the final image).
ARG PIP_CERT
# torch alone first: the largest layer, kept in the build cache while the project changes. TORCH
# is the requirement, TORCH_PIP_ARGS where pip looks for it: by default PyPI, whose Linux torch is
# the CUDA build; `--find-links /wheels` with a wheel folder mounted there (podman build
# -v DIR:/wheels:ro) takes a local wheel, e.g. the CPU build for the test image (`make image-cpu`).
ARG TORCH=torch==2.11.0
ARG TORCH_PIP_ARGS=""
# hadolint ignore=DL3013,SC2086
RUN pip install --no-cache-dir ${TORCH_PIP_ARGS} "${TORCH}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY compile compile
COPY plugin plugin
COPY daemon daemon
# The project's own version ranges (pyproject.toml) are the pins here.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[daemon,gpu]"

FROM ${BASE_IMAGE}
# tini as PID 1: forwards SIGTERM/SIGHUP to the daemon and reaps orphans.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 tini \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --user-group --no-create-home \
        --home-dir /var/lib/codetr-stream --shell /usr/sbin/nologin codetr-stream \
 && mkdir -p /etc/codetr-stream /var/lib/codetr-stream/engines /var/cache/codetr-stream \
 && chown -R codetr-stream:codetr-stream /var/lib/codetr-stream /var/cache/codetr-stream
COPY --from=build /opt/venv /opt/venv
COPY docker/entrypoint.sh /usr/local/bin/codetr-stream-entrypoint
# `video` makes the NVIDIA container runtime mount libnvcuvid (NVDEC) and libnvidia-encode (which
# PyNvVideoCodec loads at import) next to the CUDA driver.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility,video \
    XDG_CACHE_HOME=/var/cache/codetr-stream \
    TORCHINDUCTOR_CACHE_DIR=/var/cache/codetr-stream/inductor \
    TRITON_CACHE_DIR=/var/cache/codetr-stream/triton \
    CODETR_STREAM_HEALTH_URL=http://127.0.0.1:8090/healthz
# Numeric, so Kubernetes' runAsNonRoot can check it.
USER 10001:10001
WORKDIR /var/lib/codetr-stream
# Engines (built at first start or mounted) and compile caches survive container replacement.
VOLUME ["/var/lib/codetr-stream", "/var/cache/codetr-stream"]
# 8090: /healthz, /metrics, /snapshot/<stream>.jpg; 5555: ZeroMQ detections (as in streams.yaml).
EXPOSE 8090 5555
# The first start may compile the engine: a long start period before failures count.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20m --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ['CODETR_STREAM_HEALTH_URL'], timeout=4)"]
ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/codetr-stream-entrypoint"]
CMD ["run", "--config", "/etc/codetr-stream/streams.yaml"]
