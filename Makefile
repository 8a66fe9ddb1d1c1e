# Two commands on a fresh machine: `make demo` and `make test`. Both build .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch (a local file on the dev/CI machines); the GPU machine brings its own.
TORCH ?= torch==2.13.0

.PHONY: venv system-packages test lint demo clean

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[daemon,dev,eval,kernel]"
	touch $@

venv: $(BIN)/.installed

# Debian packages the tests use (GStreamer's RTSP server, systemd-analyze, a C++ compiler).
system-packages:
	@bash .ci/system-packages

lint: venv
	$(BIN)/ruff check .

test: system-packages venv lint
	$(BIN)/pytest -m "not gpu" -q

demo: venv
	$(BIN)/python -m codetr_stream.daemon.demo

clean:
	rm -rf $(VENV)
