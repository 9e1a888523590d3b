"""The IDX file format of MNIST-style datasets: reading, writing and finding the four files.

An IDX file is a big-endian header (magic number ``0x000008NN``: unsigned bytes, ``NN``
dimensions; then one 4-byte size per dimension) followed by the raw bytes; the datasets ship
them gzip-compressed. Every problem raises :class:`train.errors.DataError` naming the file
and saying what was expected and what was found. Like :mod:`train.data`, this module needs
only numpy and the standard library.
"""

from __future__ import annotations

import gzip
import os
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from train.errors import DataError

__all__ = ["IDX_FILES", "find_idx_files", "read_idx", "shape_text", "write_idx",
           "write_idx_dataset"]

#: Standard IDX file names (without ``.gz``), keyed by role.
IDX_FILES: Mapping[str, str] = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


_UBYTE = 0x08
_DTYPE_NAMES = {
    0x08: "unsigned byte",
    0x09: "signed byte",
    0x0B: "short",
    0x0C: "int",
    0x0D: "float",
    0x0E: "double",
}


def shape_text(shape: Sequence[int]) -> str:
    """A shape as the messages write it.

    Example:
        >>> shape_text((60000, 28, 28))
        '60000x28x28'
    """
    return "x".join(str(d) for d in shape)


def _read_bytes(path: Path) -> bytes:
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise DataError(
            f"{path}: corrupt gzip file: expected a complete gzip stream, "
            f"decompression failed with {type(e).__name__}: {e}"
        ) from e
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e}") from e


def read_idx(path: str | os.PathLike[str], ndim: int | None = None) -> np.ndarray:
    """Reads an unsigned-byte IDX file (the MNIST format), gzip-compressed or raw.

    The file is compressed when its name ends in ``.gz``. The header is validated: the magic
    number must be ``0x000008NN`` (data type 0x08 = unsigned byte, ``NN`` dimensions), and the
    payload must hold exactly the product of the dimensions in bytes.

    Args:
        path: The IDX file, e.g. ``train-images-idx3-ubyte.gz``.
        ndim: Expected number of dimensions (3 for images, 1 for labels), or ``None`` to accept
            what the header says.

    Returns:
        A read-only uint8 array (a view of the file's bytes) with the shape the header gives.

    Raises:
        DataError: The file is missing, not valid gzip, or its header or length is wrong.

    Example:
        >>> import tempfile, numpy as np
        >>> with tempfile.TemporaryDirectory() as d:
        ...     p = write_idx(f"{d}/labels-idx1-ubyte.gz", np.array([3, 1, 4], np.uint8))
        ...     read_idx(p, ndim=1)
        array([3, 1, 4], dtype=uint8)
    """
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise DataError(
            f"{path}: truncated header: expected at least 4 bytes of magic number, "
            f"file has {len(data)}"
        )
    magic = int.from_bytes(data[:4], "big")
    expected_magic = f"0x000008{ndim:02X}" if ndim is not None else "0x000008NN"
    if data[0] != 0 or data[1] != 0:
        hint = " (it looks gzip-compressed; name it *.gz)" if data[:2] == b"\x1f\x8b" else ""
        raise DataError(
            f"{path}: bad magic number: expected {expected_magic} (IDX), found 0x{magic:08X}{hint}"
        )
    dtype_code, file_ndim = data[2], data[3]
    if dtype_code != _UBYTE:
        found = _DTYPE_NAMES.get(dtype_code, "unknown")
        raise DataError(
            f"{path}: wrong data type in magic number 0x{magic:08X}: expected 0x08 "
            f"(unsigned byte), found 0x{dtype_code:02X} ({found})"
        )
    if ndim is not None and file_ndim != ndim:
        raise DataError(
            f"{path}: wrong number of dimensions in magic number 0x{magic:08X}: "
            f"expected {ndim}, found {file_ndim}"
        )
    header_len = 4 + 4 * file_ndim
    if len(data) < header_len:
        raise DataError(
            f"{path}: truncated header: expected {header_len} bytes for {file_ndim} "
            f"dimensions, file has {len(data)}"
        )
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(file_ndim))
    expected = int(np.prod(shape, dtype=np.int64))
    found = len(data) - header_len
    what = {3: "pixels", 1: "labels"}.get(file_ndim, "data")
    if found < expected:
        raise DataError(
            f"{path}: truncated: header says {shape_text(shape)} = {expected} bytes of {what}, "
            f"file has {found}"
        )
    if found > expected:
        raise DataError(
            f"{path}: trailing data: header says {shape_text(shape)} = {expected} bytes of "
            f"{what}, file has {found} ({found - expected} extra)"
        )
    return np.frombuffer(data, np.uint8, offset=header_len).reshape(shape)


def write_idx(path: str | os.PathLike[str], array: np.ndarray) -> Path:
    """Writes an array as an unsigned-byte IDX file (gzip-compressed if ``path`` ends in .gz).

    Meant for tests and small tools that need tiny MNIST-format datasets; see also
    :func:`write_idx_dataset`. The gzip header holds no timestamp or file name, so the output
    is reproducible.

    Args:
        path: Destination file. Parent directories are created.
        array: Integer array with values in ``[0, 255]`` and 1 to 255 dimensions.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: The array is not integer, has values outside ``[0, 255]``, or has no
            dimensions.

    Example:
        >>> import tempfile, numpy as np
        >>> with tempfile.TemporaryDirectory() as d:
        ...     p = write_idx(f"{d}/x-idx3-ubyte", np.zeros((2, 3, 4), np.uint8))
        ...     p.read_bytes()[:4].hex(), read_idx(p).shape
        ('00000803', (2, 3, 4))
    """
    path = Path(path)
    array = np.asarray(array)
    if not (1 <= array.ndim <= 255):
        raise ValueError(f"IDX needs 1 to 255 dimensions, got shape {array.shape}")
    if array.dtype != np.uint8:
        if not np.issubdtype(array.dtype, np.integer) and array.dtype != np.bool_:
            raise ValueError(f"IDX ubyte needs integers, got dtype {array.dtype}")
        if array.size and (array.min() < 0 or array.max() > 255):
            raise ValueError(
                f"IDX ubyte needs values in [0, 255], got [{array.min()}, {array.max()}]"
            )
        array = array.astype(np.uint8)
    header = bytes([0, 0, _UBYTE, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape
    )
    payload = header + np.ascontiguousarray(array).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(payload, mtime=0) if path.name.endswith(".gz") else payload)
    return path


def write_idx_dataset(
    directory: str | os.PathLike[str],
    train_images: np.ndarray,
    train_labels: np.ndarray,
    test_images: np.ndarray,
    test_labels: np.ndarray,
    *,
    compress: bool = True,
) -> Path:
    """Writes the four standard IDX files of an MNIST-style dataset into ``directory``.

    The result loads with :func:`train.data.load_idx_dataset` or
    ``train.data.load_dataset(data_dir=directory)``.

    Args:
        directory: Destination directory, created if needed.
        train_images: ``(N, H, W)`` or ``(N, H, W, 1)`` images with values in ``[0, 255]``.
        train_labels: ``(N,)`` labels in ``[0, 255]``.
        test_images: ``(M, H, W)`` or ``(M, H, W, 1)`` images.
        test_labels: ``(M,)`` labels.
        compress: Write ``*.gz`` files (as distributed) rather than raw ones.

    Returns:
        ``directory`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: An array has the wrong rank or values outside ``[0, 255]``.

    Example:
        >>> import tempfile, numpy as np
        >>> rng = np.random.default_rng(0)
        >>> with tempfile.TemporaryDirectory() as d:
        ...     _ = write_idx_dataset(
        ...         d, rng.integers(0, 256, (5, 28, 28)), np.arange(5),
        ...         rng.integers(0, 256, (2, 28, 28)), np.array([9, 0]))
        ...     files = find_idx_files(d)
        ...     read_idx(files["train_images"]).shape, read_idx(files["test_labels"])
        ((5, 28, 28), array([9, 0], dtype=uint8))
    """
    directory = Path(directory)
    suffix = ".gz" if compress else ""
    arrays = {
        "train_images": train_images,
        "train_labels": train_labels,
        "test_images": test_images,
        "test_labels": test_labels,
    }
    for role, array in arrays.items():
        array = np.asarray(array)
        if role.endswith("images"):
            if array.ndim == 4 and array.shape[-1] == 1:
                array = array[..., 0]
            if array.ndim != 3:
                raise ValueError(f"{role}: expected (N, H, W[, 1]), got shape {array.shape}")
        elif array.ndim != 1:
            raise ValueError(f"{role}: expected (N,), got shape {array.shape}")
        write_idx(directory / (IDX_FILES[role] + suffix), array)
    return directory



def find_idx_files(directory: str | os.PathLike[str]) -> dict[str, Path] | None:
    """Finds the four standard IDX files in ``directory``.

    Each file may be gzip-compressed (``name.gz``, preferred when both exist) or raw.

    Args:
        directory: Directory to look in.

    Returns:
        A dict mapping each role in :data:`IDX_FILES` to its path, or ``None`` when any of the
        four is missing.
    """
    directory = Path(directory)
    found: dict[str, Path] = {}
    for role, base in IDX_FILES.items():
        for candidate in (directory / (base + ".gz"), directory / base):
            if candidate.is_file():
                found[role] = candidate
                break
        else:
            return None
    return found
