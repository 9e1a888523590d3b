#!/usr/bin/env bash
# `make test-min`: the tests against the oldest releases jaxbn supports.
#
# Creates .venv-min, installs jaxbn's dependencies (extras flax, torch, equinox, haiku,
# train, test) with every lower bound of pyproject.toml pinned exactly
# (scripts/min-versions.txt), checks that pip installed those versions, and runs the test
# suite there, as `make test` does. The tests import jaxbn from the checkout. Idempotent:
# reinstalls only when pyproject.toml or scripts/min-versions.txt changed. PYTHON picks the
# interpreter (default python3); PYTEST_WORKERS and PYTEST_ARGS as for `make test`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
venv=.venv-min
stamp=$venv/.jaxbn-min-installed
[ -x $venv/bin/python ] || "$PY" -m venv $venv
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ scripts/min-versions.txt -nt "$stamp" ]; then
  $venv/bin/python -m pip install -q --upgrade pip
  $venv/bin/python -m pip install -q -c scripts/min-versions.txt ".[flax,torch,equinox,haiku,train,test]"
  touch "$stamp"
fi
$venv/bin/python - <<'PY'
import importlib.metadata as md, re
pins = dict(re.match(r"([\w.-]+)==(\S+)", line).groups()
            for line in open("scripts/min-versions.txt") if re.match(r"[\w.-]+==", line))
got = {name: md.version(name) for name in pins}
wrong = {n: (pins[n], v) for n, v in got.items() if v.split("+")[0] != pins[n]}
assert not wrong, f"expected the pinned versions, got (pinned, installed): {wrong}"
print("test-min: " + ", ".join(f"{n} {v}" for n, v in got.items()))
PY
exec $venv/bin/python -m pytest -n "${PYTEST_WORKERS:-3}" --dist loadfile ${PYTEST_ARGS:-}
