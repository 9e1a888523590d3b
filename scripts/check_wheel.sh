#!/usr/bin/env bash
# Builds jaxbn's sdist and wheel, checks that the wheel holds the library only, installs it
# into a fresh virtual environment outside the checkout, and runs the library's doctests and
# tests/wheel_smoke.py against the installed copy.
#
# The fresh environment installs the versions that .venv has (a constraints file from its
# `pip freeze`), so pip takes them from its cache or the local package index instead of
# resolving anew (torch: .venv's CPU wheel, scripts/dev-constraints.txt).
#
# WHEEL_PYTHON (default: the interpreter .venv was made from) and WHEEL_EXTRAS (default
# flax,torch,equinox,haiku) choose the fresh environment, e.g. WHEEL_PYTHON=python3.12
# WHEEL_EXTRAS=flax,equinox,haiku.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
dev=$repo/.venv/bin/python
work=$(mktemp -d "${TMPDIR:-/tmp}/jaxbn-wheel.XXXXXX")
trap 'rm -rf "$work"' EXIT
step() { printf '== %s (%ds)\n' "$1" "$SECONDS"; }

step "build sdist and wheel"
"$dev" -m build --outdir "$work/dist" . >"$work/build.log" 2>&1 || { cat "$work/build.log"; exit 1; }
wheel=$(ls "$work"/dist/jaxbn-*.whl)
version=$(basename "$wheel" | cut -d- -f2)
echo "built $(basename "$wheel") and $(basename "$(ls "$work"/dist/jaxbn-*.tar.gz)")"

step "wheel and sdist contents"
"$dev" - "$wheel" "$version" "$work"/dist/jaxbn-*.tar.gz <<'EOF'
import sys, tarfile, zipfile
wheel, version, sdist = sys.argv[1:]
tops = {n.split("/")[1] for n in tarfile.open(sdist).getnames() if n.count("/") >= 1}
stray = sorted(tops & {"train", "tests", "benchmarks", "docs"})
assert not stray, f"the sdist holds the repository's programs: {stray}"
names = zipfile.ZipFile(wheel).namelist()
top = sorted({n.split("/")[0] for n in names})
expected = ["jaxbn", f"jaxbn-{version}.dist-info"]
assert top == expected, f"wheel top level: expected {expected}, got {top}"
assert "jaxbn/py.typed" in names, "jaxbn/py.typed is missing from the wheel"
assert f"jaxbn-{version}.dist-info/licenses/LICENSE" in names, "LICENSE is missing"
print(f"wheel: {len(names)} files, top level {top}; sdist: {sorted(tops)}")
EOF

step "fresh virtual environment, the wheel without extras"
base=${WHEEL_PYTHON:-$("$dev" -c 'import sys; print(sys._base_executable)')}
extras=${WHEEL_EXTRAS-flax,torch,equinox,haiku}
"$base" -m venv "$work/venv"
py=$work/venv/bin/python
"$dev" -m pip freeze --exclude-editable | grep -v '^jaxbn' >"$work/constraints.txt"
pip_install() {  # quiet unless it fails
  "$py" -m pip install -q --disable-pip-version-check -c "$work/constraints.txt" "$@" \
    >"$work/pip.log" 2>&1 || { cat "$work/pip.log"; exit 1; }
}
pip_install "$wheel"
cd "$work"  # nothing of the checkout on sys.path from here on
"$py" - <<'EOF'
import importlib.util
import platform
import jax.numpy as jnp
import jaxbn
y, _ = jaxbn.batch_norm(jnp.arange(6.0).reshape(3, 2), *jaxbn.init(2), training=True)
assert jnp.allclose(y.mean(0), 0, atol=1e-6), y
missing = [m for m in ("flax", "torch", "equinox", "haiku")
           if importlib.util.find_spec(m) is not None]
assert not missing, f"expected no framework in this environment, found {missing}"
print(f"import jaxbn {jaxbn.__version__} (Python {platform.python_version()}) "
      "without flax or torch: ok")
EOF

# flatbuffers: jax.export's serialization, which jaxbn._serialization's doctest runs.
step "the [$extras] extras, pytest and flatbuffers"
pip_install "$wheel${extras:+[$extras]}" pytest flatbuffers
cp "$repo/tests/wheel_smoke.py" "$work/"
printf '[pytest]\ndoctest_optionflags = NORMALIZE_WHITESPACE ELLIPSIS\n' >"$work/pytest.ini"

step "doctests and smoke test of the installed copy"
JAXBN_REPO=$repo JAXBN_WHEEL_VERSION=$version JAXBN_WHEEL_EXTRAS=$extras JAX_PLATFORMS=cpu \
  "$py" -m pytest -q -p no:cacheprovider -c "$work/pytest.ini" --rootdir "$work" \
  --doctest-modules --pyargs jaxbn "$work/wheel_smoke.py"
step "done"
