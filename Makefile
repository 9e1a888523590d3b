# `make run`: set up and train the LeNet-BN on Fashion-MNIST.  `make test`: set up and run the tests.
.PHONY: setup data run test lint bench bench-gpu
PYTEST_ARGS ?=
RUN_ARGS ?=

setup:
	@scripts/setup.sh

data:
	@scripts/ensure_data.sh

run: setup data
	.venv/bin/python -m train.lenet $(RUN_ARGS)

test: setup data
	.venv/bin/python -m ruff check jaxbn train tests benchmarks
	.venv/bin/python -m pytest $(PYTEST_ARGS)

bench: setup
	.venv/bin/python -m benchmarks.bn
	.venv/bin/python -m benchmarks.lenet
	.venv/bin/python -m benchmarks.resnet

# Needs no setup (the GPU machine may have no network): uses a Python that already has CUDA jax.
bench-gpu:
	@scripts/bench_gpu.sh $(BENCH_ARGS)
