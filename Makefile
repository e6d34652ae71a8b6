# Every target sets up what it needs: a fresh machine runs each with one command.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PYPROJECT_SUM := $(shell sha1sum pyproject.toml | cut -c1-12)
STAMP := $(VENV)/.installed-$(PYPROJECT_SUM)
# relayd and its runtime dependencies only: what `make demo` needs (the test tools are not)
DEMO_STAMP := $(VENV)/.runtime-$(PYPROJECT_SUM)
BENCH_STAMP := $(VENV)/.bench-$(PYPROJECT_SUM)
PYTEST_ARGS ?=
# The C data plane, a build product of relayd/_fastpath.c (hatch_build.py holds the command).
FASTPATH := relayd/_fastpath.so

.PHONY: all venv test test-python lint lint-python lint-system terraform-check \
        demo bench bench-quick dist ami image soak fuzz clean system-deps

all: test

$(STAMP): pyproject.toml
	@echo "venv: installing relayd with the test and lint tools (pytest, mypy, ruff, hypothesis) into $(VENV)"
	rm -f $(VENV)/.installed-* $(VENV)/.bench-*
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

$(DEMO_STAMP): pyproject.toml
	@echo "demo: installing relayd and its runtime dependencies (attrs, cattrs, hypercorn, trio) into $(VENV), and building its C data plane; the test tools come with make test"
	rm -f $(VENV)/.runtime-*
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e .
	touch $@

venv: $(STAMP) $(FASTPATH)

# The benchmarks' extra (matplotlib for the --docs plot, py-spy for --profile).
$(BENCH_STAMP): $(STAMP)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev,bench]'
	touch $@

# Rebuilt when the C source changes, without a new venv. Without a C compiler: one warning,
# and relayd runs its Python data path (RELAYD_REQUIRE_FASTPATH=1 makes that an error).
$(FASTPATH): relayd/_fastpath.c hatch_build.py | $(BIN)/python
	$(BIN)/python hatch_build.py

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Debian packages for the real-system tests (namespaces, nspawn boots, unit checks).
system-deps:
	bash .ci/system-deps.sh

test: $(STAMP) system-deps lint terraform-check test-python

test-python: $(STAMP) $(FASTPATH)
	$(BIN)/pytest $(PYTEST_ARGS)

lint: lint-python lint-system

lint-python: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

lint-system: system-deps
	bash .ci/lint-system.sh

terraform-check: $(STAMP)
	bash .ci/terraform-check.sh

# A venv made by `make venv` has everything the demo needs; otherwise the runtime part only.
demo: $(if $(wildcard $(STAMP)),$(STAMP),$(DEMO_STAMP)) $(FASTPATH)
	@echo "demo: starting relayd demo (Ctrl-C stops it)"
	$(BIN)/relayd demo

bench: $(BENCH_STAMP) $(FASTPATH) system-deps
	$(BIN)/python -m bench.codec
	$(BIN)/python -m bench.emit
	$(BIN)/python -m bench.capture
	$(BIN)/python -m bench.relay

bench-quick: $(BENCH_STAMP) $(FASTPATH) system-deps
	$(BIN)/python -m bench.codec --quick
	$(BIN)/python -m bench.relay --quick

# Failure trials (tests/helpers/trials.py): TRIALS of every host and fault, then the table of
# docs/EXACTLY_ONCE.md; TRIALS_ARGS="--capture-hosts 2 --arbitration deribit" once merged.
TRIALS ?= 20
TRIALS_ARGS ?=

soak: $(STAMP) $(FASTPATH) system-deps
	RELAYD_SOAK=1 $(BIN)/pytest -m slow tests/chaos tests/test_emit_roles_netns.py $(PYTEST_ARGS)
	$(BIN)/python -m tests.helpers.trials table --trials $(TRIALS) $(TRIALS_ARGS)
	# A/B capture hosts with deribit arbitration: one active emitter (the claim), exactly once
	$(BIN)/python -m tests.helpers.trials table --trials $(TRIALS) --capture-hosts 2 --arbitration deribit

fuzz: $(STAMP) $(FASTPATH)
	RELAYD_FUZZ_EXAMPLES=200000 $(BIN)/pytest tests/test_fuzz.py tests/test_wire.py tests/test_config.py $(PYTEST_ARGS)
	# the C data plane against the Python decoder, plain and under ASan/UBSan: about 13 min
	RELAYD_FUZZ_EXAMPLES=20000 $(BIN)/pytest tests/test_fastpath_fuzz.py $(PYTEST_ARGS)
	# the C upstream counter against relayd.arbitration's UpstreamMonitor, plain and sanitized
	RELAYD_FUZZ_EXAMPLES=20000 $(BIN)/pytest tests/test_upstream_check.py -k specification $(PYTEST_ARGS)

dist: $(STAMP)
	rm -rf dist
	$(BIN)/pip wheel --quiet --no-deps --wheel-dir dist .
	@if ls dist/relayd-*-none-any.whl >/dev/null 2>&1; then \
	  echo "WARNING: dist: a pure-Python wheel (no C compiler): relayd will run its Python data path" >&2; fi

ami: dist
	cd packer && packer init . && packer build .

# The container image (podman, as root), on the Debian 12 rootfs the boot test debootstraps
# (no registry needed); container/build-image.sh --base IMAGE builds on another base.
image: $(STAMP) system-deps
	PYTHON=$(BIN)/python bash container/build-image.sh --rootfs "$$($(BIN)/python tests/appliance/rootfs.py)"

clean:
	rm -rf $(VENV) dist build .mypy_cache .ruff_cache .pytest_cache .hypothesis
	rm -f $(FASTPATH)
