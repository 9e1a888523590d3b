"""Tables and plots of the experiments (:mod:`train.experiments`): Markdown cells of
``mean ± std`` over seeds, the table files, and small matplotlib figures.

Example:
    >>> pm([0.5, 0.7], scale=100.0)
    '60.0 ± 14.1'
    >>> print(table(["lr", "BN"], [["0.1", "91.0 ± 0.2"]]))
    | lr | BN |
    |---|---|
    | 0.1 | 91.0 ± 0.2 |
"""

from __future__ import annotations

import math
import os
import platform
import warnings
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np

from train.experiments.runner import Result

__all__ = [
    "accuracy_cell",
    "band",
    "environment",
    "errorbar",
    "figure",
    "jitter",
    "loss_cell",
    "mean_std",
    "nan_errorbar",
    "parse_table",
    "plural",
    "pm",
    "runs_cell",
    "save_figure",
    "smooth",
    "steps_to_reach",
    "table",
    "write_table",
]

FIGSIZE = (5.0, 3.5)
WIDE_FIGSIZE = (8.0, 3.5)
DPI = 80


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    a = np.asarray(values, np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def smooth(losses: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average; the first ``window - 1`` steps average what there is."""
    c = np.cumsum(np.insert(np.asarray(losses, np.float64), 0, 0.0))
    n = np.arange(1, len(losses) + 1)
    lo = np.maximum(n - window, 0)
    return (c[n] - c[lo]) / (n - lo)


def jitter(curve: Sequence[float]) -> float:
    """Mean absolute change between consecutive values of the curve's second half (at least
    its last two values; NaN for fewer than two).

    Example:
        >>> round(jitter([0.1, 0.5, 0.80, 0.82, 0.80, 0.83]), 6)
        0.025
    """
    tail = np.asarray(curve, np.float64)[min(len(curve) // 2, len(curve) - 2):]
    return float(np.mean(np.abs(np.diff(tail)))) if len(tail) > 1 else math.nan


def steps_to_reach(steps_: Sequence[int], curve: Sequence[float], target: float) -> float:
    """The first step at which ``curve`` reaches ``target`` (NaN if it never does).

    Example:
        >>> steps_to_reach([0, 10, 20], [0.1, 0.7, 0.9], 0.7)
        10.0
    """
    hit = np.nonzero(np.asarray(curve) >= target)[0]
    return float(steps_[hit[0]]) if len(hit) else math.nan


def pm(values: Sequence[float], scale: float = 1.0, digits: int = 1) -> str:
    """``'mean ± std'`` of ``values * scale``."""
    mean, std = mean_std(np.asarray(values) * scale)
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def accuracy_cell(results: Sequence[Result]) -> str:
    """Test accuracy in percent, mean ± std, with the count of diverged runs."""
    cell = pm([r.test_accuracy for r in results], 100.0)
    n = sum(r.diverged for r in results)
    return f"{cell} ({n}/{len(results)} diverged)" if n else cell


def loss_cell(results: Sequence[Result], attr: str = "test_loss") -> str:
    """``attr`` (a loss) as mean ± std, or how many runs diverged."""
    n = sum(r.diverged for r in results)
    if n:
        return f"diverged ({n}/{len(results)})"
    return pm([getattr(r, attr) for r in results], digits=3)


def plural(n: float, word: str) -> str:
    """``n`` and ``word``, with an ``s`` unless ``n`` is 1.

    Example:
        >>> plural(1, "epoch"), plural(0.5, "epoch")
        ('1 epoch', '0.5 epochs')
    """
    return f"{n:g} {word}" + ("" if n == 1 else "s")


def runs_cell(values: Sequence[float], scale: float = 100.0, digits: int = 1) -> str:
    """``values`` (one per run, NaN for a run that diverged) as mean ± std of the finite ones,
    with the count of diverged runs.

    Example:
        >>> runs_cell([0.5, 0.7, float("nan")])
        '60.0 ± 14.1 (1/3 diverged)'
    """
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return "diverged"
    cell = pm(finite, scale, digits)
    return cell if len(finite) == len(values) else \
        f"{cell} ({len(values) - len(finite)}/{len(values)} diverged)"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return "\n".join(lines)


def environment() -> str:
    """The machine and software, for the tables' footers."""
    return (f"{os.cpu_count()}-core {platform.machine()} CPU, jax {jax.__version__}, "
            f"{platform.python_implementation()} {platform.python_version()}")


def write_table(out: Path, name: str, title: str, body: str, notes: Sequence[str],
                seeds: Sequence[int], seconds: float, quick: bool) -> Path:
    """Writes ``<out>/<name>.md``: the title, the tables, the notes and how to regenerate it."""
    mode = " --quick" if quick else ""
    footer = [
        *notes,
        f"{len(seeds)} seed(s) ({', '.join(map(str, seeds))}); cells are mean ± sample "
        "standard deviation over the seeds; accuracies in percent, evaluated in inference "
        "mode (train=False) with the running statistics unless a column says otherwise.",
        f"Regenerate: `python -m train.experiments --only {name} --seeds {len(seeds)}{mode}`. "
        f"Here it took {seconds:.0f} s (not counting runs shared with experiments before it "
        f"in the same process) on a {environment()}.",
    ]
    path = out / f"{name}.md"
    path.write_text(f"### {title}\n\n{body}\n\n" + "\n".join(f"- {n}" for n in footer) + "\n")
    return path


def parse_table(text: str) -> list[list[str]]:
    """The body rows of the first Markdown table in ``text``, as lists of cell strings.

    Example:
        >>> parse_table("| a | b |\\n|---|---|\\n| 1 | 2.0 ± 0.1 |\\n")
        [['1', '2.0 ± 0.1']]
    """
    rows = [line for line in text.splitlines() if line.startswith("|")]
    return [[c.strip() for c in row.strip("|").split("|")] for row in rows[2:]]


def figure(wide: bool = False, ncols: int = 1):
    """A small figure with ``ncols`` gridded axes: ``(fig, axes)``."""
    from matplotlib.figure import Figure  # Lazy: slow to import; Figure draws with Agg.

    fig = Figure(figsize=WIDE_FIGSIZE if wide else FIGSIZE)
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
    return fig, axes


def save_figure(fig, path: Path) -> Path:
    """Saves ``fig`` as a palette PNG; returns ``path``."""
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    _compress_png(path)
    return path


def _compress_png(path: Path, colors: int = 128) -> None:
    """Rewrites a PNG with a palette of ``colors`` colors: about a third of the bytes, so the
    committed plots stay small (the translucent bands otherwise need full RGBA)."""
    from PIL import Image  # Lazy: matplotlib's dependency, only needed here.

    with Image.open(path) as image:
        quantized = image.convert("RGB").quantize(colors=colors)
    quantized.save(path, optimize=True)


def band(ax, x, curves: Sequence[np.ndarray], label: str, **kw) -> None:
    """Mean line and ±1 std band of curves of possibly different lengths (NaN padded)."""
    n = max(len(c) for c in curves)
    a = np.full((len(curves), n), np.nan)
    for i, c in enumerate(curves):
        a[i, : len(c)] = c
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # All-NaN columns after divergence.
        mean, std = np.nanmean(a, 0), np.nanstd(a, 0)
    (line,) = ax.plot(x[:n], mean, label=label, lw=1.2, **kw)
    ax.fill_between(x[:n], mean - std, mean + std, color=line.get_color(), alpha=0.2, lw=0)


def errorbar(ax, x, results: Sequence[Sequence[Result]], label: str, **kw) -> None:
    """Test accuracy (percent) against ``x``, mean and ±1 std over each point's runs."""
    acc = [[100 * r.test_accuracy for r in rs] for rs in results]
    mean = [np.mean(a) for a in acc]
    std = [np.std(a, ddof=1) if len(a) > 1 else 0.0 for a in acc]
    kw = {"marker": "o", "ms": 3, "capsize": 2, "lw": 1.2, **kw}
    ax.errorbar(x, mean, yerr=std, label=label, **kw)


def nan_errorbar(ax, x, values: Sequence[Sequence[float]], label: str, **kw) -> None:
    """Mean and ±1 std of each point's ``values`` against ``x``, NaNs (diverged runs) left
    out: NaN where all are, no bar where one is left."""
    mean = [np.nanmean(v) if np.isfinite(v).any() else np.nan for v in values]
    std = [np.nanstd(v, ddof=1) if np.isfinite(v).sum() > 1 else 0.0 for v in values]
    kw = {"marker": "o", "ms": 3, "capsize": 2, "lw": 1.2, **kw}
    ax.errorbar(x, mean, yerr=std, label=label, **kw)
