# Two commands on a fresh machine: `make demo` and `make test`. Both build .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch (a local file on the dev/CI machines); the GPU machine brings its own.
TORCH ?= torch==2.13.0

.PHONY: venv system-packages test lint demo clean

# pip's output (and the build backend's warnings) goes to .venv/install.log, shown if a step fails.
QUIET = >>$(VENV)/install.log 2>&1 || { cat $(VENV)/install.log; exit 1; }

$(BIN)/.installed: pyproject.toml
	@echo "building $(VENV) (a few minutes the first time; log: $(VENV)/install.log)"
	@$(PY) -m venv $(VENV)
	@: >$(VENV)/install.log
	@$(BIN)/pip install -q --upgrade pip $(QUIET)
	@$(BIN)/pip install -q "$(TORCH)" $(QUIET)
	@$(BIN)/pip install -q -e ".[daemon,dev,eval,kernel]" $(QUIET)
	@touch $@

venv: $(BIN)/.installed

# Debian packages the tests use (GStreamer's RTSP server, systemd-analyze, a C++ compiler).
system-packages:
	@bash .ci/system-packages

lint: venv
	$(BIN)/ruff check -q .

test: system-packages venv lint
	$(BIN)/pytest -m "not gpu" -q

demo: venv
	$(BIN)/python -m codetr_stream.daemon.demo $(DEMO_ARGS)

clean:
	rm -rf $(VENV)

# The container image (README "Container image"), built with podman. BASE_IMAGE: any Debian/Ubuntu
# with python3 >= 3.11; IMAGE_TORCH and IMAGE_TORCH_PIP_ARGS: which torch and where pip finds it
# (default: PyPI's CUDA build). `--format docker` keeps the HEALTHCHECK (OCI images drop it).
# The host's CA bundle is mounted (never copied into a layer) and given to pip, so pip in the
# build trusts what the host trusts (a TLS-inspecting proxy on our machines).
.PHONY: image base-image image-cpu
IMAGE ?= localhost/codetr-stream:latest
BASE_IMAGE ?= docker.io/library/debian:bookworm-slim
IMAGE_TORCH ?= torch==2.11.0
IMAGE_TORCH_PIP_ARGS ?=
IMAGE_BUILD_FLAGS ?=
HOST_CA ?= $(wildcard /etc/ssl/certs/ca-certificates.crt)

image:
	podman build --format docker --network host \
	  $(if $(HOST_CA),-v $(HOST_CA):/run/host-ca.crt:ro --build-arg PIP_CERT=/run/host-ca.crt) \
	  --build-arg BASE_IMAGE=$(BASE_IMAGE) --build-arg TORCH="$(IMAGE_TORCH)" \
	  --build-arg TORCH_PIP_ARGS="$(IMAGE_TORCH_PIP_ARGS)" $(IMAGE_BUILD_FLAGS) -t $(IMAGE) .

# The CPU test image (tests/test_container.py): a debootstrapped Debian base (no registry needed)
# and the CPU torch wheel from the machine's local wheel folder (pip's find-links here).
IMAGE_CPU ?= localhost/codetr-stream:cpu
LOCAL_BASE ?= localhost/debian-bookworm:local
WHEELS ?= /opt/wheels

base-image:
	sh docker/base-image.sh $(LOCAL_BASE)

image-cpu: base-image
	$(MAKE) image IMAGE=$(IMAGE_CPU) BASE_IMAGE=$(LOCAL_BASE) \
	  IMAGE_TORCH="$(TORCH)+cpu" IMAGE_TORCH_PIP_ARGS="--find-links /wheels" \
	  IMAGE_BUILD_FLAGS="-v $(WHEELS):/wheels:ro"
