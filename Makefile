# pyvirtiofsd: the two commands a newcomer needs are `make run` and `make test`.
# Every target installs what is missing first (system packages, virtualenv).

SHELL      := /bin/bash
PYTHON     ?= python3
VENV       ?= .venv
PY         := $(VENV)/bin/python
STAMP      := $(VENV)/.installed
export PYVIRTIOFSD_BUILD_DIR ?= $(CURDIR)/build

# `make run` options: SHARE=dir[:tag] (repeatable with spaces), BACKEND=, CMD=,
# KERNEL=6.12|6.1 (the guest kernel version; default: vm/kernel.py's)
SHARE      ?= $(CURDIR):src
BACKEND    ?=
CMD        ?=
KERNEL     ?=
RUN_ARGS   ?=

PYTEST     := $(PY) -m pytest
# The VM suite runs on the default kernel (6.12); on 6.1 the per-device
# window tests, and the pyvirtiofsd round trip and hot-plug as a smoke test.
VM_TESTS_6_1 := tests/vm/test_swiotlb_kernel.py tests/vm/test_per_device_dma.py \
	tests/vm/test_window_mismatch.py tests/vm/test_pyvirtiofsd.py

.PHONY: all deps system-deps venv guest run test unit-test vm-test sanitize fuzz lint bench clean distclean

all: deps guest

deps: system-deps venv

system-deps:
	@scripts/install-system-deps.sh

venv: $(STAMP)

$(STAMP): pyproject.toml setup.py dma/build_core.py $(wildcard dma/src/*.c dma/src/*.h) | system-deps
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "installing pyvirtiofsd and its Python dependencies into $(VENV)"
	@$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	@$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	@touch $@

# Build (or find cached) both guest kernels (6.12 and 6.1) and the initramfs.
guest: deps
	@$(PY) -m pyvirtiofsd.vm.cli build

# Boot the dev guest with SHARE mounted under /mnt/<tag>. Interactive shell when
# stdin is a terminal; otherwise runs CMD (or a smoke command) and exits.
run: deps
	@$(PY) -m pyvirtiofsd.vm.cli run $(foreach s,$(SHARE),--share $(s)) \
		$(if $(BACKEND),--backend $(BACKEND)) $(if $(KERNEL),--kernel-version $(KERNEL)) \
		$(if $(CMD),--cmd "$(CMD)") $(RUN_ARGS)

# Every test, VM tests included. A run that collects nothing fails (pytest exit 5).
test: deps guest
	scripts/sanitize.sh
	$(PYTEST) tests
	PYVIRTIOFSD_KERNEL_VERSION=6.1 $(PYTEST) $(VM_TESTS_6_1)

unit-test: deps
	$(PYTEST) -m "not vm" tests

vm-test: deps guest
	$(PYTEST) -m vm tests

# Benchmarks against the C and the Rust virtiofsd, results in build/bench/<stamp>/:
# SUITE=daemon (the daemon alone over its socket, no guest), SUITE=guest (dd in a
# VM, also vs 9p and per DMA mode), SUITE=all (default: daemon + guest),
# SUITE=dma (two shares and a NIC loaded at once per DMA mode, bounce memory
# shrunk until the shared pool fails, 1 vs 2 request queues; --dma-quick for a
# short run). E.g.
# make bench SUITE=daemon BENCH_ARGS="--duration 1 --rounds 3"
# make bench SUITE=dma BENCH_ARGS="--dma-quick"
SUITE      ?= all
bench: deps $(if $(filter daemon,$(SUITE)),,guest)
	@$(PY) -m pyvirtiofsd.bench --suite $(SUITE) $(BENCH_ARGS)

# The C core's tests under ASan + UBSan (a report fails the run); part of `make test`.
sanitize: deps
	scripts/sanitize.sh

# Long fuzzing run, all of it under ASan + UBSan (scripts/sanitize.sh builds the
# C core with both and fails on any report). The fast driver (tests/fuzz/driver.py)
# gives vhost-user decode + handler state machine, the descriptor walker + chain
# I/O, and FUSE decode/dispatch against a temporary share FUZZ_INPUTS inputs each
# (figures: inputs, inputs/s, line coverage, crashes in build/fuzz/<harness>.json);
# then the hypothesis harnesses (corpus in tests/fuzz/corpus) FUZZ_EXAMPLES examples.
# FUZZ_SECONDS bounds each driver harness instead. `make test` runs all of it briefly.
FUZZ_INPUTS   ?= 1000000
FUZZ_EXAMPLES ?= 2000
FUZZ_SECONDS  ?=
fuzz: deps
	PYVIRTIOFSD_FUZZ_INPUTS=$(FUZZ_INPUTS) PYVIRTIOFSD_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) \
		PYVIRTIOFSD_FUZZ_SECONDS=$(FUZZ_SECONDS) \
		scripts/sanitize.sh tests/fuzz --hypothesis-show-statistics

lint: deps
	$(VENV)/bin/ruff check .
	scripts/typecheck.sh

clean:
	rm -rf build/runs build/initramfs .pytest_cache

distclean: clean
	rm -rf build $(VENV) dma/_core*.so
