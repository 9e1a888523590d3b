# `make run`: set up and train the LeNet-BN on Fashion-MNIST.  `make test`: set up and run the tests.
# `make ci`: everything CI runs (tests, the installed-wheel check, the documentation build,
# the type check, the parity tests compiled for AVX2, and the tests again on the oldest
# supported releases).
.PHONY: setup data run test test-isa test-min lint bench docs typecheck check-wheel ci bench-gpu
PYTEST_ARGS ?=
# pytest-xdist workers for `make test`: three on two cores keep both busy while tests wait on
# subprocesses and timeouts; 0 runs the tests in one process.
PYTEST_WORKERS ?= 3
RUN_ARGS ?=
SPHINX_ARGS ?=

setup:
	@scripts/setup.sh

data:
	@scripts/ensure_data.sh

run: setup data
	.venv/bin/python -m train.lenet $(RUN_ARGS)

test: setup data
	.venv/bin/python -m ruff check jaxbn train tests benchmarks docs/conf.py
	.venv/bin/python -m pytest -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# The parity tests once more, compiled for at most AVX2 (as on a CPU without AVX-512): XLA:CPU's
# vector width sets the order of a reduction's additions, so a tolerance tuned to one CPU's
# rounding fails here rather than on another machine (docs/development.md).
PARITY_TESTS = tests/test_core.py tests/test_linen.py tests/test_nnx.py \
	tests/test_parity_flax.py tests/test_parity_torch.py
test-isa: setup
	XLA_FLAGS="$$XLA_FLAGS --xla_cpu_max_isa=AVX2" .venv/bin/python -m pytest \
	  -n $(PYTEST_WORKERS) --dist loadfile -p no:cacheprovider -q $(PARITY_TESTS)

# The tests against the oldest supported releases (pyproject.toml's lower bounds, pinned in
# scripts/min-versions.txt), in their own .venv-min.
test-min: data
	PYTEST_WORKERS=$(PYTEST_WORKERS) PYTEST_ARGS="$(PYTEST_ARGS)" scripts/test_min.sh

# The documentation site, warnings as errors: docs/_build/html/index.html.
docs: setup
	.venv/bin/python -m sphinx -b html -W --keep-going -q $(SPHINX_ARGS) docs docs/_build/html

# mypy --strict on jaxbn/ (configuration: [tool.mypy] in pyproject.toml).
typecheck: setup
	.venv/bin/python -m mypy

# Build the wheel, install it into a fresh venv outside the checkout, test the installed copy.
check-wheel: setup
	scripts/check_wheel.sh

ci: test test-isa check-wheel docs typecheck test-min

bench: setup
	.venv/bin/python -m benchmarks.bn
	.venv/bin/python -m benchmarks.lenet
	.venv/bin/python -m benchmarks.resnet

# Needs no setup (the GPU machine may have no network): uses a Python that already has CUDA jax.
bench-gpu:
	@scripts/bench_gpu.sh $(BENCH_ARGS)
