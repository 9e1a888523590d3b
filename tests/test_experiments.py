"""End-to-end test of ``python -m train.experiments --quick`` (train/experiments/) on tiny data.

One in-process run of two experiments (``convergence`` and ``batch_size``, which covers
the eight-device synchronized and per-device BN runs) on synthetic IDX files; the tests below
check what it wrote. About half a minute, most of it compilation.
"""

import math
import re

import numpy as np
import pytest

from tests.synthetic import learnable_images
from train import experiments, idx
from train.experiments import report

N_TRAIN, N_TEST = 256, 64
ONLY = ("convergence", "batch_size")
PLUS_MINUS = re.compile(r"(-?\d+(?:\.\d+)?) ± (\d+(?:\.\d+)?)")
MAX_PNG_BYTES = 60_000


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """``--quick --only convergence,batch_size``: (returned times, output directory)."""
    rng = np.random.default_rng(0)
    idx_dir = idx.write_idx_dataset(
        tmp_path_factory.mktemp("idx"),
        *learnable_images(N_TRAIN, rng),
        *learnable_images(N_TEST, rng),
    )
    out = tmp_path_factory.mktemp("experiments")
    times = experiments.main(
        ["--quick", "--only", ",".join(ONLY), "--out", str(out), "--data-dir", str(idx_dir)]
    )
    return times, out


def test_runs_the_named_experiments(quick_run):
    times, out = quick_run
    assert list(times) == list(ONLY)
    assert all(t > 0 for t in times.values())
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"{n}.{ext}" for n in ONLY for ext in ("md", "png")
    )


@pytest.mark.parametrize("name", ONLY)
def test_plot_is_a_small_png(quick_run, name):
    png = (quick_run[1] / f"{name}.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    assert len(png) < MAX_PNG_BYTES


@pytest.mark.parametrize("name", ONLY)
def test_table_numbers_parse_and_are_finite(quick_run, name):
    text = (quick_run[1] / f"{name}.md").read_text()
    rows = report.parse_table(text)
    assert rows
    cells = [c for row in rows for c in row]
    pairs = [m for c in cells for m in PLUS_MINUS.findall(c)]
    assert pairs, text
    for mean, std in pairs:
        assert math.isfinite(float(mean)) and math.isfinite(float(std))
        assert float(std) >= 0
    assert "nan" not in text.lower()
    assert "--quick" in text  # The regeneration command.


def _column(text, table, header):
    """Cells of column ``header`` in the ``table``-th Markdown table of ``text``."""
    tables = [t for t in text.split("\n\n") if t.startswith("|")]
    lines = tables[table].splitlines()
    names = [c.strip() for c in lines[0].strip("|").split("|")]
    return [report.parse_table(tables[table])[i][names.index(header)]
            for i in range(len(lines) - 2)]


def test_batch_size_cross_checks(quick_run):
    """Synced BN on 8 devices is BN on the global batch; per-device BN is Ghost BN."""
    text = (quick_run[1] / "batch_size.md").read_text()
    one = dict(zip(_column(text, 0, "batch"), _column(text, 0, "BN"), strict=True))
    glob = _column(text, 1, "global batch")
    synced = _column(text, 1, "synced BN, 8 devices")
    local = _column(text, 1, "per-device BN, 8 devices")
    ghost = _column(text, 1, "Ghost BN, 1 device")

    def acc(cell):
        return float(PLUS_MINUS.search(cell).group(1))

    for g, s, lo, gh in zip(glob, synced, local, ghost, strict=True):
        assert abs(acc(lo) - acc(gh)) <= 1.0
        if g in one:
            assert abs(acc(s) - acc(one[g])) <= 1.0


def test_unknown_experiment_exits_2(capsys):
    with pytest.raises(SystemExit) as exc:
        experiments.main(["--only", "convergence,nope"])
    assert exc.value.code == 2
    assert "nope" in capsys.readouterr().err
