# HyperNAT: one command per job.  Each target sets up what it needs.
#   make demo   run the gateway's main job on the default configuration
#   make test   run the test suite (and the benchmarks once each, untimed), then the
#               agent/rules/messages tests again on the pure .py sources (in build/pure-py:
#               a copy of the tree without the compiled .py modules, tools/pure_py_tree.py)
#   make bench  run the benchmarks, save, and compare with the last saved run; as root the
#               testbed ones too (bench_e2e, bench_bulk, bench_latency, bench_cps: HyperNAT vs
#               Linux's NAT vs the no-op forwarder, each printing its same-run *_RATIOS line;
#               `make test` runs them once, small, and checks the traffic went through)
#   make portability  build the fast path for aarch64 and run its tests there (qemu-user, in a
#               cached arm64 Debian root); run them on x86 with -funsigned-char too
#   make debug / annotate   rebuild with bounds checks / write Cython's HTML annotation
#   make soak   the testbed under a steady stream of new and closing connections, minutes
#               (as root; not part of `make test`): SOAK_DURATION (s), SOAK_RATE (conn/s), SOAK_HOSTS
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
CONFIG ?= conf/testbed.yaml

.PHONY: demo test bench build debug annotate portability deps clean soak

$(VENV)/.ok: requirements-dev.txt
	bash tools/install-deps.sh
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

deps: $(VENV)/.ok

# compiles in parallel (setup.py); HYPERNAT_COMPILE_PY=0 make build: no compiled slow path
build: deps $(VENV)/.editable
	$(PY) setup.py -q build_ext --inplace

# The package installed in the venv in editable mode (once): the console scripts
# hypernat, hypernat-nic, hypernat-coord in $(VENV)/bin, running this tree's code.
# (HYPERNAT_BUILD_ONLY=none: pip compiles no extension; `build` compiles them in the
# tree right after, and the compiled slow path takes minutes: not twice)
$(VENV)/.editable: setup.py | $(VENV)/.ok
	HYPERNAT_BUILD_ONLY=none $(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

debug: deps
	HYPERNAT_DEBUG=1 $(PY) setup.py -q build_ext --inplace --force

annotate: deps
	HYPERNAT_ANNOTATE=1 $(PY) setup.py -q build_ext --inplace --force

demo: build
	$(PY) -m hypernat.cli demo --config $(CONFIG)

test: build
	$(PY) -m pytest -q tests
	$(PY) -m pytest -q benchmarks --benchmark-disable
	$(PY) tools/pure_py_tree.py build/pure-py
	cd build/pure-py && HYPERNAT_NO_EXTENSIONS=1 HYPERNAT_COMPILE_PY=0 PYTHONPATH=. $(abspath $(PY)) -m pytest -q \
	    -p no:cacheprovider tests/test_agent.py tests/test_rules.py tests/test_messages*.py tests/test_compiled.py

bench: build
	$(PY) tools/bench.py

SOAK_DURATION ?= 300
SOAK_RATE     ?= 40
SOAK_HOSTS    ?= 24
soak: build
	$(PY) tools/soak.py --duration $(SOAK_DURATION) --rate $(SOAK_RATE) --hosts $(SOAK_HOSTS) $(SOAK_ARGS)

# install-deps again: its packages may be newer than an existing venv (it installs only what is missing)
portability: deps
	bash tools/install-deps.sh
	bash tools/portability.sh

clean:
	rm -rf build hypernat/*.so hypernat/**/*.so hypernat/*.c hypernat/**/*.c hypernat/_verdicts.pxi hypernat/_wire_reasons.pxi hypernat/_compiled \
	    hypernat/*.so.sha256 hypernat/**/*.so.sha256

# make report   regenerate the paper's evaluation (Fig 4/5, Table I, Fig 6, §III-C) into benchmarks/results/
.PHONY: report
report: build
	$(PY) -m hypernat.cli report
