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
	@$(BIN)/pip install -q -e ".[daemon,dev,kernel]" $(QUIET)
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
