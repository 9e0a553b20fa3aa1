# The two commands a fresh machine needs: `make demo` and `make test`. Everything else is a step of theirs.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip
STAMP := $(VENV)/.installed
PACKAGES := apps/contracts apps/trainer apps/server apps/stack apps/delivery apps/cli
PYPROJECTS := $(foreach p,$(PACKAGES),$(p)/pyproject.toml)
# torch 2.13.0 is installed from the machine's local CPU wheel where one is provided.
export PIP_FIND_LINKS ?= $(wildcard /opt/wheels)
# Where the demo writes its data, runs, reports and registry (laid out like the cluster volumes).
DEMO_DIR ?= .rlops/demo

.PHONY: help venv system lint test test-fast demo clean constraints frontend-class

help:
	@echo "make demo   set everything up and run the whole loop on this machine"
	@echo "make test   every test (lint included)"
	@echo "make lint   ruff + mypy"

venv: $(STAMP)

$(STAMP): constraints.txt requirements-dev.txt infra/requirements.txt $(PYPROJECTS)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade "pip==$$(sed -n 's/^pip==//p' constraints.txt)"
	# The constraints file pins every transitive version; torch 2.13.0 comes from the local CPU wheel.
	$(PIP) install --quiet -c constraints.txt -r requirements-dev.txt $(foreach p,$(PACKAGES),-e $(p))
	@touch $@

# Re-pin after changing a dependency range: installs afresh from the package index, then records every
# version as name==version (`pip list --format=freeze` never writes a direct reference, as `pip freeze`
# does for a wheel installed from a path). The new file replaces constraints.txt only if every line is
# such a pin (.ci/pins.py); the rlops packages themselves are not pinned.
constraints:
	rm -rf $(VENV)-pin && $(PYTHON) -m venv $(VENV)-pin
	$(VENV)-pin/bin/pip install --quiet --no-cache-dir -r requirements-dev.txt $(foreach p,$(PACKAGES),./$(p))
	{ echo "# Every transitive version, pinned. Regenerate with 'make constraints'."; \
	  $(VENV)-pin/bin/pip list --format=freeze | grep -v '^rlops-' | sed 's/+cpu$$//'; } > constraints.txt.new
	$(PYTHON) .ci/pins.py env $(VENV)-pin/bin/python
	$(PYTHON) .ci/pins.py constraints constraints.txt.new
	mv constraints.txt.new constraints.txt
	rm -rf $(VENV)-pin

# rlops' batcher for the TorchServe frontend, built against TorchServe's jar; the class is committed (the
# server runs on a Java runtime without a compiler) and a test checks that it is built from the source.
FRONTEND_SRC := apps/server/src/rlops_server/torchserve/frontend/ContinuousBatching.java
frontend-class: $(STAMP) system
	@tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	javac --release 11 -Xlint:all -Werror -cp "$$($(BIN)/python -c 'import ts, pathlib; print(pathlib.Path(ts.__file__).parent / "frontend" / "model-server.jar")')" \
	  -d "$$tmp" $(FRONTEND_SRC) && cp "$$tmp/org/pytorch/serve/wlm/ContinuousBatching.class" $(dir $(FRONTEND_SRC))

# OS packages: TorchServe needs Java 17 (and its compiler, for the batcher's build check); the local monitoring stack and the rule tests need Prometheus,
# promtool, Alertmanager and amtool; the testinfra checks of the running stack read ss and ps. Installed with apt where it is
# available and we are root; otherwise say what is missing.
APT_NEEDS := java:openjdk-17-jre-headless javac:openjdk-17-jdk-headless prometheus:prometheus promtool:prometheus \
	prometheus-alertmanager:prometheus-alertmanager amtool:prometheus-alertmanager ss:iproute2 ps:procps
system:
	@missing=""; for need in $(APT_NEEDS); do \
	  command -v "$${need%%:*}" >/dev/null 2>&1 || missing="$$missing $${need#*:}"; \
	done; \
	if [ -n "$$missing" ]; then \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$(echo $$missing | tr ' ' '\n' | sort -u); \
	  else \
	    echo "missing OS packages:$$missing (install them with your package manager)"; exit 1; \
	  fi; \
	fi

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/hadolint apps/trainer/Dockerfile apps/server/Dockerfile

test: lint system
	$(BIN)/pytest

# Everything but the slow tests (training runs, Ray), for quick iterations.
test-fast: $(STAMP) system
	$(BIN)/pytest -m "not slow"

demo: $(STAMP) system
	$(BIN)/rlops demo --dir $(DEMO_DIR)

clean:
	rm -rf $(VENV) .rlops .pytest_cache .mypy_cache .ruff_cache
