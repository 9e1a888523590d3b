"""Fashion-MNIST-style datasets for the training examples: loading, validation, pixels.

This module is library code for ``python -m train.lenet``. It depends only on numpy and the
standard library; TensorFlow Datasets is imported lazily, and only when no local copy of the
data is found. It never imports JAX: datasets are numpy arrays, and the caller moves them to
devices.

Where the data comes from (:func:`load_dataset`), first match wins:

1. ``data_dir`` (the program's ``--data-dir`` flag): a directory holding the four MNIST-format
   IDX files. If it is given and the files are not there, that is an error.
2. The environment variable ``JAXBN_DATA_DIR``: the same, or its subdirectory named after the
   dataset (``fashion-mnist/``). It must name an existing directory; one without this
   dataset (a directory of other datasets) is passed over.
3. Debian's ``/usr/share/datasets/<name>/`` (``apt-get install dataset-fashion-mnist``).
4. TensorFlow Datasets' ``tfds.data_source(name)``, which downloads when online.

Every problem with the data raises :class:`DataError` (a :class:`ValueError`) whose message
names the file and says what was expected and what was found. The IDX format itself is
:mod:`train.idx`; batching is :mod:`train.batching`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from train.errors import DataError
from train.idx import IDX_FILES, find_idx_files, read_idx, shape_text

__all__ = [
    "DEBIAN_DATASETS_ROOT",
    "ENV_VAR",
    "PIXEL_STATS",
    "DataError",
    "Dataset",
    "check_image_shape",
    "load_dataset",
    "load_idx_dataset",
    "load_tfds_dataset",
    "pixel_stats",
    "to_float",
]

#: Root of Debian's dataset packages (``dataset-fashion-mnist`` installs
#: ``/usr/share/datasets/fashion-mnist/``). Tests monkeypatch this.
DEBIAN_DATASETS_ROOT = "/usr/share/datasets"

#: Environment variable naming a directory with the IDX files (or with a subdirectory per
#: dataset, e.g. ``$JAXBN_DATA_DIR/fashion-mnist/``).
ENV_VAR = "JAXBN_DATA_DIR"

#: Number of classes of the IDX datasets we know; other names default to 10.
KNOWN_NUM_CLASSES: Mapping[str, int] = {"mnist": 10, "fashion_mnist": 10, "kmnist": 10}
#: Mean and standard deviation of the training pixels in [0, 1] of the datasets we know;
#: :func:`pixel_stats` computes the others.
PIXEL_STATS: Mapping[str, tuple[float, float]] = {
    "fashion_mnist": (0.2860, 0.3530), "mnist": (0.1307, 0.3081)}

_TFDS_CHUNK = 4096
_MAX_TFDS_ERROR_CHARS = 2000


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """An image-classification dataset held in memory as numpy arrays.

    Attributes:
        train_images: ``(N, H, W, 1)`` uint8 training images.
        train_labels: ``(N,)`` int32 training labels in ``[0, num_classes)``.
        test_images: ``(M, H, W, 1)`` uint8 test images.
        test_labels: ``(M,)`` int32 test labels in ``[0, num_classes)``.
        name: Dataset name, e.g. ``"fashion_mnist"``.
        source: Where the data came from: a directory path, or ``"tfds:<name>"``.
        num_classes: Number of classes.
    """

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    name: str
    source: str
    num_classes: int

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """Shape ``(H, W, 1)`` of one image."""
        return tuple(self.train_images.shape[1:])  # type: ignore[return-value]

    def __repr__(self) -> str:
        return (
            f"Dataset(name={self.name!r}, source={self.source!r}, "
            f"num_classes={self.num_classes}, "
            f"train={shape_text(self.train_images.shape)}, "
            f"test={shape_text(self.test_images.shape)})"
        )


# --------------------------------------------------------------------------------------------
# Finding and loading datasets.


def _canonical(name: str) -> str:
    return name.strip().lower().replace("-", "_")


def _dashed(name: str) -> str:
    return _canonical(name).replace("_", "-")


def _candidate_dirs(root: Path, name: str) -> list[Path]:
    return [root, root / _dashed(name)]


def _describe_missing(directory: Path) -> str:
    if not directory.is_dir():
        return "no such directory"
    missing = [
        f"{base}[.gz]"
        for base in IDX_FILES.values()
        if not (directory / (base + ".gz")).is_file() and not (directory / base).is_file()
    ]
    return f"missing {', '.join(missing)}"


def _check_labels(labels: np.ndarray, num_classes: int, where: str) -> None:
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        bad = int(np.flatnonzero((labels < 0) | (labels >= num_classes))[0])
        raise DataError(
            f"{where}: label out of range: expected labels in [0, {num_classes - 1}] "
            f"({num_classes} classes), found {int(labels[bad])} at index {bad}"
        )


def load_idx_dataset(
    directory: str | os.PathLike[str],
    *,
    name: str = "fashion_mnist",
    num_classes: int | None = None,
) -> Dataset:
    """Loads an MNIST-style dataset from the four standard IDX files in ``directory``.

    Args:
        directory: Directory holding ``train-images-idx3-ubyte[.gz]``,
            ``train-labels-idx1-ubyte[.gz]``, ``t10k-images-idx3-ubyte[.gz]`` and
            ``t10k-labels-idx1-ubyte[.gz]``.
        name: Dataset name recorded in the result.
        num_classes: Number of classes; default from :data:`KNOWN_NUM_CLASSES`, else 10.

    Returns:
        The :class:`Dataset`, with ``source`` set to ``str(directory)``.

    Raises:
        DataError: A file is missing or malformed, a split has no images, image and label
            counts differ, train and test images differ in size, or a label is
            ``>= num_classes``.
    """
    directory = Path(directory)
    name = _canonical(name)
    if num_classes is None:
        num_classes = KNOWN_NUM_CLASSES.get(name, 10)
    files = find_idx_files(directory)
    if files is None:
        raise DataError(f"{directory}: {_describe_missing(directory)}")
    arrays: dict[str, np.ndarray] = {}
    for split in ("train", "test"):
        img_path, lbl_path = files[f"{split}_images"], files[f"{split}_labels"]
        images = read_idx(img_path, ndim=3)
        labels = read_idx(lbl_path, ndim=1)
        if not len(images):
            raise DataError(f"{img_path}: empty split: expected at least one image, found 0")
        if len(images) != len(labels):
            raise DataError(
                f"{lbl_path}: count mismatch: expected {len(images)} labels "
                f"(one per image in {img_path}), found {len(labels)}"
            )
        _check_labels(labels, num_classes, str(lbl_path))
        arrays[f"{split}_images"] = images[..., None]
        arrays[f"{split}_labels"] = labels.astype(np.int32)
    train_hw, test_hw = arrays["train_images"].shape[1:3], arrays["test_images"].shape[1:3]
    if train_hw != test_hw:
        raise DataError(
            f"{files['test_images']}: image size mismatch: expected {shape_text(train_hw)} "
            f"like {files['train_images']}, found {shape_text(test_hw)}"
        )
    return Dataset(**arrays, name=name, source=str(directory), num_classes=num_classes)


def _read_records(source: Any) -> list[Any]:
    """Reads every record of a random-access source, in batches when it supports them."""
    n = len(source)
    getitems = getattr(source, "__getitems__", None)
    if getitems is not None and n:
        try:
            first = list(getitems(list(range(min(n, _TFDS_CHUNK)))))
        except TypeError:
            # Some sources (e.g. tfds.testing.mock_data's, TFDS 4.9) have a broken batch read.
            getitems = None
        else:
            records = first
            for start in range(len(first), n, _TFDS_CHUNK):
                records.extend(getitems(list(range(start, min(n, start + _TFDS_CHUNK)))))
            return records
    return [source[i] for i in range(n)]


def _records_to_arrays(records: Sequence[Any], where: str) -> tuple[np.ndarray, np.ndarray]:
    """Stacks TFDS records ``{'image': (H, W, 1) uint8, 'label': int}`` into arrays."""
    if not records:
        raise DataError(f"{where}: empty split: expected at least one example, found 0")
    first = records[0]
    if not isinstance(first, Mapping) or "image" not in first or "label" not in first:
        found = sorted(first) if isinstance(first, Mapping) else type(first).__name__
        raise DataError(f"{where}: expected records with 'image' and 'label', found {found}")
    images = np.stack([np.asarray(r["image"]) for r in records])
    labels = np.asarray([r["label"] for r in records])
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] != 1 or images.dtype != np.uint8:
        raise DataError(
            f"{where}: expected uint8 grayscale images of shape (H, W, 1), "
            f"found {images.dtype} {images.shape[1:]}"
        )
    if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(
            f"{where}: expected one integer label per image, found {labels.dtype} {labels.shape}"
        )
    return images, labels.astype(np.int32)


def load_tfds_dataset(name: str = "fashion_mnist") -> Dataset:
    """Loads a 28x28 grayscale dataset through ``tfds.data_source`` (no TensorFlow needed).

    TFDS downloads and prepares the dataset on first use (this needs network access), then
    reads its ArrayRecord files. Works for ``mnist``, ``fashion_mnist``, ``kmnist``,
    ``emnist`` and other datasets with ``image`` and ``label`` features and ``train`` and
    ``test`` splits.

    Args:
        name: TFDS dataset name.

    Returns:
        The :class:`Dataset`, with ``source`` set to ``"tfds:<name>"``.

    Raises:
        DataError: The records do not look like grayscale images with integer labels.
        Exception: Whatever TFDS raises when it cannot provide the data (not installed,
            offline, unknown name...). :func:`load_dataset` turns these into a
            :class:`DataError`.
    """
    import tensorflow_datasets as tfds  # Lazy: heavy, and only needed without local files.

    name = _canonical(name)
    train_source, test_source = tfds.data_source(name, split=["train", "test"])
    num_classes = KNOWN_NUM_CLASSES.get(name, 10)
    with contextlib.suppress(AttributeError, KeyError, TypeError):
        num_classes = int(train_source.dataset_info.features["label"].num_classes)
    arrays: dict[str, np.ndarray] = {}
    for split, source in (("train", train_source), ("test", test_source)):
        where = f"tfds:{name}[{split}]"
        images, labels = _records_to_arrays(_read_records(source), where)
        _check_labels(labels, num_classes, where)
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels
    if arrays["train_images"].shape[1:] != arrays["test_images"].shape[1:]:
        raise DataError(
            f"tfds:{name}[test]: image size mismatch: expected "
            f"{shape_text(arrays['train_images'].shape[1:])} like the train split, found "
            f"{shape_text(arrays['test_images'].shape[1:])}"
        )
    return Dataset(**arrays, name=name, source=f"tfds:{name}", num_classes=num_classes)


def load_dataset(
    name: str = "fashion_mnist",
    data_dir: str | os.PathLike[str] | None = None,
    *,
    num_classes: int | None = None,
) -> Dataset:
    """Loads an MNIST-style dataset from the first place that has it.

    Lookup order:

    1. ``data_dir`` (``--data-dir``), or its subdirectory ``<name>`` with ``_`` -> ``-``.
       When given, it must hold the files: there is no fallback.
    2. ``$JAXBN_DATA_DIR``, or ``$JAXBN_DATA_DIR/<name with - for _>/``. When set, it must
       be a directory; one without this dataset is passed over.
    3. ``DEBIAN_DATASETS_ROOT/<name with - for _>/``, e.g. ``/usr/share/datasets/fashion-mnist``.
    4. ``tfds.data_source(name)`` (downloads when online).

    A directory counts as holding the data when all four IDX files are present; files that are
    present but malformed raise an error rather than falling through to the next place.

    Args:
        name: Dataset name, e.g. ``"fashion_mnist"`` or ``"mnist"`` (dashes are accepted).
        data_dir: Directory with the four IDX files, or ``None`` to search.
        num_classes: Number of classes for IDX data; default from :data:`KNOWN_NUM_CLASSES`,
            else 10. (TFDS data uses the dataset's own count.)

    Returns:
        The :class:`Dataset`. Its ``source`` says which place it came from.

    Raises:
        DataError: ``data_dir`` lacks the files; ``$JAXBN_DATA_DIR`` is not a directory; a
            file is malformed; a name that neither a directory nor TFDS knows (one line); or
            nothing was found anywhere (the message lists the ways to provide the data and
            TFDS's error).
    """
    name = _canonical(name)
    if data_dir is not None:
        root = Path(data_dir)
        for d in _candidate_dirs(root, name):
            if find_idx_files(d) is not None:
                return load_idx_dataset(d, name=name, num_classes=num_classes)
        raise DataError(
            f"--data-dir {root}: expected the IDX files {', '.join(IDX_FILES.values())} "
            f"(each optionally .gz) in {root} or {root / _dashed(name)}; found {root}: "
            f"{_describe_missing(root)}"
        )

    checked: list[str] = []
    env = os.environ.get(ENV_VAR)
    places: list[tuple[str, Path]] = []
    if env:
        if not Path(env).is_dir():
            raise DataError(
                f"${ENV_VAR}={env}: expected a directory holding the IDX files (or a "
                f"subdirectory {_dashed(name)}/ with them), found "
                f"{'a file' if Path(env).exists() else 'no such directory'}; fix or unset it"
            )
        places += [(f"${ENV_VAR}", d) for d in _candidate_dirs(Path(env), name)]
    else:
        checked.append(f"${ENV_VAR}: not set")
    places.append(("Debian", Path(DEBIAN_DATASETS_ROOT) / _dashed(name)))
    for label, d in places:
        if find_idx_files(d) is not None:
            return load_idx_dataset(d, name=name, num_classes=num_classes)
        checked.append(f"{label}: {d}: {_describe_missing(d)}")

    try:
        return load_tfds_dataset(name)
    except DataError:
        raise
    except Exception as e:  # Any TFDS failure (not installed, offline...) = not available.
        if type(e).__name__ == "DatasetNotFoundError":  # Its message lists TFDS's catalogue.
            raise DataError(
                f"--dataset {name}: unknown dataset: expected a TFDS dataset name or IDX files "
                f"for it, found neither ({'; '.join(checked)}; TFDS: no dataset {name!r})"
            ) from e
        tfds_error = f"{type(e).__name__}: {e}"
        if len(tfds_error) > _MAX_TFDS_ERROR_CHARS:
            tfds_error = tfds_error[:_MAX_TFDS_ERROR_CHARS] + " [...]"
        files = ", ".join(f"{b}.gz" for b in IDX_FILES.values())
        raise DataError(
            f"dataset {name!r} not found. Looked in:\n"
            + "".join(f"  - {c}\n" for c in checked)
            + f"  - TFDS: tfds.data_source({name!r}) failed: {tfds_error}\n"
            "Provide the data in one of these ways:\n"
            f"  1. pass --data-dir DIR, where DIR holds {files} (or uncompressed);\n"
            f"  2. set {ENV_VAR}=DIR (DIR or DIR/{_dashed(name)}/ holding those files);\n"
            f"  3. on Debian/Ubuntu: apt-get install dataset-{_dashed(name)} "
            f"(installs {Path(DEBIAN_DATASETS_ROOT) / _dashed(name)}), or go online so "
            "TFDS can download it."
        ) from e


def check_image_shape(ds: Dataset, expected: tuple[int, int, int], needed_by: str) -> None:
    """Checks that ``ds``'s images have the shape a model takes, naming the file if not.

    Args:
        ds: The dataset.
        expected: ``(H, W, C)`` of one image.
        needed_by: Who needs that shape, for the message (e.g. ``"LeNet"``).

    Raises:
        DataError: The images have another shape; the message names the training images'
            file (or ``tfds:<name>[train]``), the shape expected and the shape found.

    Example:
        >>> ds = Dataset(*(np.zeros((1, 32, 32, 1), np.uint8), np.zeros(1, np.int32)) * 2,
        ...              name="x", source="tfds:x", num_classes=10)
        >>> try:
        ...     check_image_shape(ds, (28, 28, 1), "LeNet")
        ... except DataError as e:
        ...     print(e)
        tfds:x[train]: expected 28x28x1 images (LeNet's input), found 32x32x1
    """
    if ds.image_shape == tuple(expected):
        return
    files = None if ds.source.startswith("tfds:") else find_idx_files(Path(ds.source))
    where = files["train_images"] if files else f"{ds.source}[train]"
    raise DataError(f"{where}: expected {shape_text(expected)} images ({needed_by}'s input), "
                    f"found {shape_text(ds.image_shape)}")


# --------------------------------------------------------------------------------------------
# Pixels.


def to_float(images: np.ndarray) -> np.ndarray:
    """Converts uint8 images to float32 in ``[0, 1]``.

    Args:
        images: uint8 array.

    Returns:
        ``images / 255`` as float32.

    Example:
        >>> to_float(np.array([0, 51, 255], np.uint8))
        array([0. , 0.2, 1. ], dtype=float32)
    """
    return np.asarray(images, np.float32) / np.float32(255.0)


def pixel_stats(
    name: str, data_dir: str | os.PathLike[str] | None = None, *, dataset: Dataset | None = None
) -> tuple[float, float]:
    """Mean and standard deviation of a dataset's training pixels, in ``[0, 1]`` units.

    The training programs standardize their inputs with these. Known datasets
    (:data:`PIXEL_STATS`) need no data; for others the statistics are computed from
    ``dataset``'s training images, or from the dataset loaded with :func:`load_dataset`.

    Args:
        name: Dataset name.
        data_dir: Where to load it from if needed (see :func:`load_dataset`).
        dataset: The loaded dataset, if at hand.

    Returns:
        ``(mean, std)`` of ``train_images / 255``.

    Example:
        >>> pixel_stats("fashion_mnist")
        (0.286, 0.353)
    """
    name = _canonical(name)
    if name in PIXEL_STATS:
        return PIXEL_STATS[name]
    if dataset is None:
        dataset = load_dataset(name, data_dir)
    pixels = dataset.train_images.astype(np.float64) / 255.0
    return float(pixels.mean()), float(pixels.std())
