"""What a run reports: ``metrics.jsonl`` (a row per epoch), ``curves.png``, and its lines.

Rows are dicts with ``epoch``, ``step``, ``train_loss``, ``train_accuracy``, ``test_loss``,
``test_accuracy`` (with the running statistics), ``images_per_sec``, ``train_seconds``, ``lr``
and ``dataset``; with ``--precise-bn`` also ``precise_test_loss`` and
``precise_test_accuracy`` (with PreciseBN's statistics), and with ``--freeze-bn-epochs``
``bn_frozen`` (whether the epoch trained with BN frozen). Files are replaced atomically
(:func:`train.workdir.write_atomic`), so a full disk leaves the previous version.

Example:
    >>> row = {"epoch": 1.0, "step": 10, "train_loss": 0.5, "train_accuracy": 0.8,
    ...        "test_loss": 0.4, "test_accuracy": 0.85, "images_per_sec": 900.0,
    ...        "train_seconds": 1.5, "lr": 0.05}
    >>> epoch_line(row, epochs=2)
    'epoch 1/2: train_loss=0.5000 train_accuracy=0.8000 test_loss=0.4000 test_accuracy=0.8500 images/s=900 lr=0.05 (1.5 s)'
    >>> epoch_line({**row, "precise_test_loss": 0.3, "precise_test_accuracy": 0.9}, epochs=2)
    'epoch 1/2: train_loss=0.5000 train_accuracy=0.8000 test_loss=0.4000 test_accuracy=0.8500 precise_test_loss=0.3000 precise_test_accuracy=0.9000 images/s=900 lr=0.05 (1.5 s)'
"""  # noqa: E501

from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from train.workdir import write_atomic

__all__ = ["TIME_FIELDS", "epoch_line", "final_line", "read_metrics", "write_metrics",
           "write_plot"]

#: Row fields that measure time: the only ones a resumed run may report differently.
TIME_FIELDS = ("images_per_sec", "train_seconds")


def read_metrics(path: Path, max_step: int) -> list[dict[str, Any]]:
    """The rows of ``path`` up to ``max_step`` (none if the file does not exist)."""
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r["step"] <= max_step]


def write_metrics(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """Writes ``rows`` as JSON lines, replacing ``path``."""
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))


def write_plot(rows: Sequence[Mapping[str, Any]], path: Path) -> None:
    """Plots loss and accuracy (train and test) against the epoch into a PNG.

    Args:
        rows: Metrics rows, as in ``metrics.jsonl``.
        path: Destination PNG.
    """
    from matplotlib.figure import Figure  # Lazy: slow to import; Figure draws with Agg.

    fig = Figure(figsize=(10, 4))
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.12, top=0.88, wspace=0.25)
    epochs = [r["epoch"] for r in rows]
    for ax, name in zip(fig.subplots(1, 2), ("loss", "accuracy"), strict=True):
        for split in ("train", "test", "precise_test"):
            if f"{split}_{name}" in rows[-1]:
                ax.plot(epochs, [r.get(f"{split}_{name}", math.nan) for r in rows], "o-",
                        label=split.replace("precise_test", "test (PreciseBN)"))
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("LeNet on " + rows[-1].get("dataset", ""))
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    write_atomic(path, png.getvalue())


def _precise(row: Mapping[str, Any]) -> str:
    """``precise_test_loss=... precise_test_accuracy=... `` when the row has them."""
    if "precise_test_accuracy" not in row:
        return ""
    return (f"precise_test_loss={row['precise_test_loss']:.4f} "
            f"precise_test_accuracy={row['precise_test_accuracy']:.4f} ")


def epoch_line(row: Mapping[str, Any], epochs: int) -> str:
    """The line printed after each epoch."""
    return (
        f"epoch {row['epoch']:g}/{epochs}: train_loss={row['train_loss']:.4f} "
        f"train_accuracy={row['train_accuracy']:.4f} test_loss={row['test_loss']:.4f} "
        f"test_accuracy={row['test_accuracy']:.4f} {_precise(row)}"
        f"images/s={row['images_per_sec']:.0f} lr={row['lr']:.3g} "
        f"({row['train_seconds']:.1f} s){' [BN frozen]' if row.get('bn_frozen') else ''}"
    )


def final_line(result: Mapping[str, Any]) -> str:
    """The last line of ``python -m train.lenet``: the run's summary, machine-readable.

    Args:
        result: What :func:`train.train.train_and_evaluate` returns.
    """
    return (
        f"final: epochs={result['epoch']:g} steps={result['step']} "
        f"test_accuracy={result['test_accuracy']:.4f} test_loss={result['test_loss']:.4f} "
        + (f"precise_test_accuracy={result['precise_test_accuracy']:.4f} "
           f"precise_test_loss={result['precise_test_loss']:.4f} "
           if "precise_test_accuracy" in result else "")
        + f"train_accuracy={result['train_accuracy']:.4f} seconds={result['seconds']:.1f} "
        f"workdir={result['workdir']} checkpoint={result['checkpoint']} "
        f"metrics={result['metrics']} plot={result['plot']}"
    )
