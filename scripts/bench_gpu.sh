#!/usr/bin/env bash
# `make bench-gpu`: runs the GPU benchmarks (python -m benchmarks.gpu) with a Python whose JAX
# sees a GPU: $PYTHON if set, else this checkout's .venv if its jaxlib has CUDA, else the
# machine's python3. Installs and downloads nothing. Arguments go to benchmarks.gpu
# (e.g. --cpu-smoke, which needs no GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
want=gpu
for a in "$@"; do [ "$a" = --cpu-smoke ] && want=cpu; done
has_backend() {
  "$1" -c "import sys, jax, flax, optax; sys.exit(jax.default_backend() != '$want')" 2>/dev/null
}
py=
for cand in ${PYTHON:-} .venv/bin/python python3; do
  if command -v "$cand" >/dev/null 2>&1 && has_backend "$cand"; then py=$cand; break; fi
done
if [ -z "$py" ]; then
  echo "bench-gpu: no Python here has jax, flax and optax with a '$want' backend" \
       "(tried ${PYTHON:-} .venv/bin/python python3); set PYTHON=/path/to/python" >&2
  exit 1
fi
echo "bench-gpu: using $py" >&2
exec "$py" -m benchmarks.gpu "$@"
