# Set-up on a fresh CPU-only machine: `make demo` and `make test` create .venv, install the CPU
# build of torch 2.13.0 there (GPU users: install your own CUDA torch into .venv first; it is kept),
# install fastmath with its test extras, then run.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fastmath-installed
PYTEST := $(PY) -m pytest -q -p no:cacheprovider

.PHONY: demo test test-core test-kernels install clean

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/fastmath train
	$(VENV)/bin/fastmath sample --n 256

# Test groups and their CI budgets (2 cores): core < 20 min, kernels (Triton interpreter) < 15 min.
test: $(STAMP)
	$(MAKE) test-core
	$(MAKE) test-kernels

test-core: $(STAMP)
	$(PYTEST) tests --ignore=tests/kernels

# Twice: as interpreted (truncating bf16 casts, one bf16 ulp allowed), then with bf16 casts rounded to
# nearest even and the GPU's pass rule (FASTMATH_TEST_RTNE=1; the benchmark smoke runs need no second pass).
test-kernels: $(STAMP)
	TRITON_INTERPRET=1 FASTMATH_KERNELS=1 $(PYTEST) tests/kernels
	FASTMATH_TEST_RTNE=1 TRITON_INTERPRET=1 FASTMATH_KERNELS=1 $(PYTEST) tests/kernels --ignore=tests/kernels/test_bench_smoke.py

clean:
	rm -rf $(VENV) build *.egg-info
