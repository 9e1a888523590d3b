"""Tests for train.idx, train.data and train.batching: IDX reading/writing and validation,
dataset lookup, TFDS, batching, pixel statistics."""

from __future__ import annotations

import gzip
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from train import batching, data, idx
from train.data import DataError

TRAIN_IMAGES = "train-images-idx3-ubyte"
TRAIN_LABELS = "train-labels-idx1-ubyte"
REAL_DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")


def _tiny(seed: int = 0, n_train: int = 6, n_test: int = 3, size: int = 28):
    rng = np.random.default_rng(seed)
    return (
        rng.integers(0, 256, (n_train, size, size), dtype=np.uint8),
        rng.integers(0, 10, n_train, dtype=np.uint8),
        rng.integers(0, 256, (n_test, size, size), dtype=np.uint8),
        rng.integers(0, 10, n_test, dtype=np.uint8),
    )


def _write_tiny(directory: Path, seed: int = 0, n_train: int = 6, **kw) -> Path:
    return idx.write_idx_dataset(directory, *_tiny(seed, n_train), **kw)


def _idx_bytes(
    dims: tuple[int, ...],
    payload_len: int | None = None,
    *,
    dtype: int = 0x08,
    ndim: int | None = None,
    magic_prefix: bytes = b"\x00\x00",
) -> bytes:
    ndim = len(dims) if ndim is None else ndim
    header = magic_prefix + bytes([dtype, ndim]) + b"".join(d.to_bytes(4, "big") for d in dims)
    n = int(np.prod(dims)) if payload_len is None else payload_len
    return header + bytes(n % 256 for n in range(n))


def _write(path: Path, content: bytes) -> Path:
    if path.name.endswith(".gz"):
        path.write_bytes(gzip.compress(content))
    else:
        path.write_bytes(content)
    return path


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """No $JAXBN_DATA_DIR, an empty Debian root, and a TFDS that fails as if offline."""
    import tensorflow_datasets as tfds

    monkeypatch.delenv(data.ENV_VAR, raising=False)
    debian_root = tmp_path / "debian-root"
    debian_root.mkdir()
    monkeypatch.setattr(data, "DEBIAN_DATASETS_ROOT", str(debian_root))

    def offline(*args, **kwargs):
        raise ConnectionError("simulated offline: name resolution failed")

    monkeypatch.setattr(tfds, "data_source", offline)
    return debian_root


# ------------------------------------------------------------------------------------------
# IDX round trip and error paths.


@pytest.mark.parametrize("compress", [True, False])
def test_round_trip(tmp_path, compress):
    arrays = _tiny()
    idx.write_idx_dataset(tmp_path, *arrays, compress=compress)
    suffix = ".gz" if compress else ""
    assert (tmp_path / (TRAIN_IMAGES + suffix)).is_file()
    ds = data.load_idx_dataset(tmp_path)
    np.testing.assert_array_equal(ds.train_images[..., 0], arrays[0])
    np.testing.assert_array_equal(ds.train_labels, arrays[1])
    np.testing.assert_array_equal(ds.test_images[..., 0], arrays[2])
    np.testing.assert_array_equal(ds.test_labels, arrays[3])
    assert ds.train_images.shape == (6, 28, 28, 1) and ds.train_images.dtype == np.uint8
    assert ds.train_labels.dtype == np.int32 and ds.test_labels.dtype == np.int32
    assert (ds.name, ds.source, ds.num_classes) == ("fashion_mnist", str(tmp_path), 10)
    assert ds.image_shape == (28, 28, 1)
    assert "6x28x28x1" in repr(ds)


def test_write_idx_header_and_reproducible_gzip(tmp_path):
    a = np.arange(24, dtype=np.int64).reshape(2, 3, 4)
    p1 = idx.write_idx(tmp_path / "a-idx3-ubyte.gz", a)
    p2 = idx.write_idx(tmp_path / "b-idx3-ubyte.gz", a)
    assert p1.read_bytes() == p2.read_bytes()
    raw = gzip.decompress(p1.read_bytes())
    assert raw[:16] == bytes.fromhex("00000803 00000002 00000003 00000004")
    np.testing.assert_array_equal(idx.read_idx(p1, ndim=3), a)
    with pytest.raises(ValueError, match=r"\[0, 255\]"):
        idx.write_idx(tmp_path / "c", np.array([256]))


def test_bad_magic(tmp_path):
    p = _write(tmp_path / TRAIN_IMAGES, _idx_bytes((2, 28, 28), magic_prefix=b"\x12\x34"))
    with pytest.raises(DataError) as e:
        idx.read_idx(p, ndim=3)
    msg = str(e.value)
    assert str(p) in msg and "expected 0x00000803" in msg and "found 0x12340803" in msg


def test_gzip_content_without_gz_suffix_gets_a_hint(tmp_path):
    p = tmp_path / TRAIN_IMAGES
    p.write_bytes(gzip.compress(_idx_bytes((2, 28, 28))))
    with pytest.raises(DataError, match=r"bad magic number.*gzip-compressed"):
        idx.read_idx(p, ndim=3)


def test_wrong_dtype_byte(tmp_path):
    p = _write(tmp_path / (TRAIN_IMAGES + ".gz"), _idx_bytes((2, 28, 28), dtype=0x0D))
    with pytest.raises(DataError) as e:
        idx.read_idx(p, ndim=3)
    msg = str(e.value)
    assert str(p) in msg and "expected 0x08 (unsigned byte)" in msg and "found 0x0D (float)" in msg


def test_wrong_ndim(tmp_path):
    p = _write(tmp_path / (TRAIN_IMAGES + ".gz"), _idx_bytes((2, 784)))
    with pytest.raises(DataError) as e:
        idx.read_idx(p, ndim=3)
    msg = str(e.value)
    assert str(p) in msg and "dimensions" in msg and "expected 3, found 2" in msg


def test_truncated_payload(tmp_path):
    p = _write(tmp_path / (TRAIN_IMAGES + ".gz"), _idx_bytes((60000, 28, 28), 1000))
    with pytest.raises(DataError) as e:
        idx.read_idx(p, ndim=3)
    assert str(e.value) == (
        f"{p}: truncated: header says 60000x28x28 = 47040000 bytes of pixels, file has 1000"
    )


def test_truncated_header(tmp_path):
    p = _write(tmp_path / TRAIN_IMAGES, _idx_bytes((2, 28, 28))[:10])
    with pytest.raises(DataError, match=r"truncated header: expected 16 bytes.*file has 10"):
        idx.read_idx(p, ndim=3)


def test_trailing_bytes(tmp_path):
    p = _write(tmp_path / (TRAIN_LABELS + ".gz"), _idx_bytes((5,), 7))
    with pytest.raises(DataError) as e:
        idx.read_idx(p, ndim=1)
    msg = str(e.value)
    assert str(p) in msg and "trailing data" in msg
    assert "header says 5 = 5 bytes of labels, file has 7 (2 extra)" in msg


@pytest.mark.parametrize("kind", ["not_gzip", "truncated_gzip"])
def test_corrupt_gzip(tmp_path, kind):
    p = tmp_path / (TRAIN_IMAGES + ".gz")
    good = gzip.compress(_idx_bytes((2, 28, 28)))
    p.write_bytes(b"this is not gzip" if kind == "not_gzip" else good[: len(good) // 2])
    with pytest.raises(DataError) as e:
        idx.read_idx(p, ndim=3)
    msg = str(e.value)
    assert str(p) in msg and "corrupt gzip" in msg and "expected a complete gzip stream" in msg


def test_image_label_count_mismatch(tmp_path):
    _write_tiny(tmp_path)
    lbl = idx.write_idx(tmp_path / (TRAIN_LABELS + ".gz"), np.zeros(5, np.uint8))
    with pytest.raises(DataError) as e:
        data.load_idx_dataset(tmp_path)
    msg = str(e.value)
    assert str(lbl) in msg and "expected 6 labels" in msg and "found 5" in msg


def test_label_out_of_range(tmp_path):
    _write_tiny(tmp_path)
    lbl = idx.write_idx(tmp_path / (TRAIN_LABELS + ".gz"), np.array([0, 1, 2, 10, 3, 4]))
    with pytest.raises(DataError) as e:
        data.load_idx_dataset(tmp_path)
    msg = str(e.value)
    assert str(lbl) in msg and "expected labels in [0, 9]" in msg
    assert "found 10 at index 3" in msg


def test_train_test_image_size_mismatch(tmp_path):
    _write_tiny(tmp_path)
    idx.write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", np.zeros((3, 32, 32), np.uint8))
    with pytest.raises(DataError, match=r"image size mismatch: expected 28x28.*found 32x32"):
        data.load_idx_dataset(tmp_path)


def test_raw_file_used_when_gz_absent(tmp_path):
    _write_tiny(tmp_path, compress=False)
    files = idx.find_idx_files(tmp_path)
    assert files is not None and all(not p.name.endswith(".gz") for p in files.values())
    (tmp_path / TRAIN_LABELS).unlink()
    assert idx.find_idx_files(tmp_path) is None


# ------------------------------------------------------------------------------------------
# Lookup.


def test_missing_files_in_data_dir(tmp_path, isolated):
    d = tmp_path / "given"
    d.mkdir()
    idx.write_idx(d / (TRAIN_IMAGES + ".gz"), np.zeros((1, 28, 28), np.uint8))
    _write_tiny(isolated / "fashion-mnist")  # Available elsewhere, but --data-dir wins.
    with pytest.raises(DataError) as e:
        data.load_dataset(data_dir=d)
    msg = str(e.value)
    assert str(d) in msg and "--data-dir" in msg
    assert "missing train-labels-idx1-ubyte[.gz], t10k-images-idx3-ubyte[.gz]" in msg
    assert TRAIN_IMAGES + "[.gz]" not in msg.split("missing")[1]


def test_data_dir_that_does_not_exist(tmp_path, isolated):
    d = tmp_path / "nope"
    with pytest.raises(DataError, match=rf"{d}: no such directory"):
        data.load_dataset(data_dir=d)


def test_nothing_found(tmp_path, monkeypatch, isolated):
    (tmp_path / "empty-env-dir").mkdir()
    monkeypatch.setenv(data.ENV_VAR, str(tmp_path / "empty-env-dir"))
    with pytest.raises(DataError) as e:
        data.load_dataset("fashion_mnist")
    msg = str(e.value)
    assert "--data-dir DIR" in msg
    assert data.ENV_VAR in msg and str(tmp_path / "empty-env-dir") in msg
    assert "apt-get install dataset-fashion-mnist" in msg
    assert str(isolated / "fashion-mnist") in msg
    assert "simulated offline: name resolution failed" in msg and "ConnectionError" in msg
    assert isinstance(e.value.__cause__, ConnectionError)


@pytest.mark.parametrize("kind", ["missing", "file"])
def test_env_var_that_is_not_a_directory_is_an_error(tmp_path, monkeypatch, isolated, kind):
    """$JAXBN_DATA_DIR set to nothing usable is an error, not a silent fall-back."""
    _write_tiny(isolated / "fashion-mnist")  # Debian's copy is there, and is not used.
    env = tmp_path / "env"
    if kind == "file":
        env.write_text("")
    monkeypatch.setenv(data.ENV_VAR, str(env))
    found = "a file" if kind == "file" else "no such directory"
    with pytest.raises(DataError, match=rf"\$JAXBN_DATA_DIR={env}: expected a directory .*"
                                        rf"found {found}; fix or unset it"):
        data.load_dataset()


def test_pixel_stats(tmp_path):
    assert data.pixel_stats("fashion-mnist") == data.PIXEL_STATS["fashion_mnist"]
    ds = data.load_idx_dataset(_write_tiny(tmp_path / "d"), name="kmnist")
    pixels = ds.train_images / 255.0
    assert data.pixel_stats("kmnist", dataset=ds) == (pixels.mean(), pixels.std())
    assert data.pixel_stats("kmnist", data_dir=tmp_path / "d") == (pixels.mean(), pixels.std())


def test_lookup_order(tmp_path, monkeypatch, isolated):
    given, env = tmp_path / "given", tmp_path / "env"
    debian = isolated / "fashion-mnist"
    _write_tiny(given, n_train=4)
    _write_tiny(env, n_train=5)
    _write_tiny(debian, n_train=6)
    monkeypatch.setenv(data.ENV_VAR, str(env))

    ds = data.load_dataset(data_dir=given)
    assert (ds.source, len(ds.train_images)) == (str(given), 4)
    ds = data.load_dataset()
    assert (ds.source, len(ds.train_images)) == (str(env), 5)
    monkeypatch.delenv(data.ENV_VAR)
    ds = data.load_dataset("fashion-mnist")
    assert (ds.source, len(ds.train_images), ds.name) == (str(debian), 6, "fashion_mnist")


def test_env_var_subdirectory_and_fallthrough(tmp_path, monkeypatch, isolated):
    env = tmp_path / "env"
    _write_tiny(env / "fashion-mnist", n_train=5)
    _write_tiny(isolated / "mnist", n_train=7)
    monkeypatch.setenv(data.ENV_VAR, str(env))
    ds = data.load_dataset("fashion_mnist")
    assert (ds.source, len(ds.train_images)) == (str(env / "fashion-mnist"), 5)
    # $JAXBN_DATA_DIR has no mnist: the Debian directory is next.
    ds = data.load_dataset("mnist")
    assert (ds.source, ds.name, len(ds.train_images)) == (str(isolated / "mnist"), "mnist", 7)


def test_data_dir_subdirectory(tmp_path, isolated):
    _write_tiny(tmp_path / "fashion-mnist")
    ds = data.load_dataset(data_dir=tmp_path)
    assert ds.source == str(tmp_path / "fashion-mnist")


def test_corrupt_files_do_not_fall_through(tmp_path, monkeypatch, isolated):
    env = tmp_path / "env"
    _write_tiny(env)
    _write_tiny(isolated / "fashion-mnist")
    bad = env / (TRAIN_LABELS + ".gz")
    bad.write_bytes(b"garbage")
    monkeypatch.setenv(data.ENV_VAR, str(env))
    with pytest.raises(DataError, match=str(bad)):
        data.load_dataset()


# ------------------------------------------------------------------------------------------
# TFDS.


def test_tfds_mock_data_source(tmp_path, monkeypatch):
    import tensorflow_datasets as tfds

    monkeypatch.delenv(data.ENV_VAR, raising=False)
    monkeypatch.setattr(data, "DEBIAN_DATASETS_ROOT", str(tmp_path))
    # USE_CODE: no metadata files, no network, no TensorFlow.
    with tfds.testing.mock_data(num_examples=7, policy=tfds.testing.MockPolicy.USE_CODE):
        ds = data.load_dataset("fashion_mnist")
    assert ds.source == "tfds:fashion_mnist" and ds.num_classes == 10
    assert ds.train_images.shape == (7, 28, 28, 1) and ds.train_images.dtype == np.uint8
    assert ds.test_images.shape == (7, 28, 28, 1)
    assert ds.train_labels.dtype == np.int32 and ds.train_labels.shape == (7,)
    assert ds.train_labels.min() >= 0 and ds.train_labels.max() < 10
    assert len(np.unique(ds.train_images.reshape(7, -1), axis=0)) == 7  # Distinct records.


class _FakeSource:
    """A random-access source with a working batched read, like ArrayRecord's."""

    def __init__(self, records):
        self.records, self.batched_reads = records, 0

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        raise AssertionError("expected batched reads")

    def __getitems__(self, keys):
        self.batched_reads += 1
        return [self.records[k] for k in keys]


def _fake_tfds(monkeypatch, train, test):
    import tensorflow_datasets as tfds

    sources = [_FakeSource(train), _FakeSource(test)]
    monkeypatch.setattr(data, "_TFDS_CHUNK", 4)
    monkeypatch.setattr(tfds, "data_source", lambda name, split: sources)
    return sources


def test_tfds_batched_reads(monkeypatch):
    rec = lambda i: {"image": np.full((28, 28, 1), i, np.uint8), "label": np.int64(i % 10)}
    sources = _fake_tfds(monkeypatch, [rec(i) for i in range(10)], [rec(i) for i in range(3)])
    ds = data.load_tfds_dataset("mnist")
    assert sources[0].batched_reads == 3 and sources[1].batched_reads == 1
    np.testing.assert_array_equal(ds.train_images[:, 0, 0, 0], np.arange(10))
    np.testing.assert_array_equal(ds.train_labels, np.arange(10) % 10)
    assert (ds.source, ds.name, ds.num_classes) == ("tfds:mnist", "mnist", 10)


def test_tfds_bad_records(monkeypatch):
    rgb = [{"image": np.zeros((32, 32, 3), np.uint8), "label": 1}]
    _fake_tfds(monkeypatch, rgb, rgb)
    with pytest.raises(DataError, match=r"tfds:cifar10\[train\]: expected uint8 grayscale"):
        data.load_tfds_dataset("cifar10")
    bad_label = [{"image": np.zeros((28, 28, 1), np.uint8), "label": 12}]
    _fake_tfds(monkeypatch, bad_label, bad_label)
    with pytest.raises(DataError, match=r"tfds:mnist\[train\]: label out of range.*found 12"):
        data.load_tfds_dataset("mnist")


# ------------------------------------------------------------------------------------------
# Batching.


def _epoch(x, y, **kw):
    return list(batching.batches(x, y, kw.pop("batch_size", 8), **kw))


def test_batches_deterministic():
    x = np.arange(50 * 2).reshape(50, 2)
    y = np.arange(50)
    a = _epoch(x, y, seed=3, epoch=1)
    b = _epoch(x, y, seed=3, epoch=1)
    assert len(a) == batching.num_batches(50, 8) == 6
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
        np.testing.assert_array_equal(xa[:, 0] // 2, ya)  # Images and labels stay paired.
    c = _epoch(x, y, seed=3, epoch=2)
    d = _epoch(x, y, seed=4, epoch=1)
    assert not np.array_equal(a[0][1], c[0][1]) and not np.array_equal(a[0][1], d[0][1])
    # Resuming at epoch 1 does not depend on having run epoch 0.
    order = np.random.default_rng([3, 1]).permutation(50)
    np.testing.assert_array_equal(np.concatenate([yb for _, yb in a]), order[:48])


def test_batches_no_shuffle_and_remainder():
    x = y = np.arange(10)
    got = [
        yb.tolist()
        for _, yb in batching.batches(x, y, 4, seed=0, epoch=0, shuffle=False, drop_remainder=False)
    ]
    assert got == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert batching.num_batches(10, 4, drop_remainder=False) == 3
    assert batching.num_batches(10, 4) == 2


def test_batches_shards_concatenate_to_global_batch():
    x = np.arange(40)[:, None] * np.ones((1, 3))
    y = np.arange(40)
    full = _epoch(x, y, seed=7, epoch=5, batch_size=12, drop_remainder=False)
    shards = [
        _epoch(
            x, y, seed=7, epoch=5, batch_size=12, drop_remainder=False, shard_index=i, num_shards=4
        )
        for i in range(4)
    ]
    assert all(len(s) == len(full) == 4 for s in shards)
    for b, (xf, yf) in enumerate(full):
        np.testing.assert_array_equal(np.concatenate([s[b][1] for s in shards]), yf)
        np.testing.assert_array_equal(np.concatenate([s[b][0] for s in shards]), xf)
    assert [len(s[0][1]) for s in shards] == [3, 3, 3, 3]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_size": 10, "num_shards": 4}, "not divisible"),
        ({"shard_index": 2, "num_shards": 2}, "shard_index"),
        ({"batch_size": 0}, "positive"),
        ({"seed": -1}, "non-negative"),
    ],
)
def test_batches_errors(kwargs, match):
    x = y = np.arange(20)
    kw = {"batch_size": 8, "seed": 0, "epoch": 0, **kwargs}
    with pytest.raises(ValueError, match=match):
        next(batching.batches(x, y, **kw))


def test_to_float():
    out = data.to_float(np.array([[0, 255]], np.uint8))
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, [[0.0, 1.0]])


# ------------------------------------------------------------------------------------------
# The module and the real data.


def test_module_does_not_import_jax_or_tfds():
    code = (
        "import sys, train.data; print('jax' in sys.modules, 'tensorflow_datasets' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert out.stdout.split() == ["False", "False"]


@pytest.mark.skipif(
    not REAL_DEBIAN_DIR.is_dir(),
    reason=f"{REAL_DEBIAN_DIR} absent (apt-get install dataset-fashion-mnist)",
)
def test_real_debian_fashion_mnist(monkeypatch):
    monkeypatch.delenv(data.ENV_VAR, raising=False)
    monkeypatch.setattr(data, "DEBIAN_DATASETS_ROOT", str(REAL_DEBIAN_DIR.parent))
    ds = data.load_dataset("fashion_mnist")
    assert ds.source == str(REAL_DEBIAN_DIR)
    assert ds.train_images.shape == (60000, 28, 28, 1) and ds.train_images.dtype == np.uint8
    assert ds.test_images.shape == (10000, 28, 28, 1)
    assert ds.train_labels.shape == (60000,) and ds.test_labels.shape == (10000,)
    for labels, per_class in ((ds.train_labels, 6000), (ds.test_labels, 1000)):
        np.testing.assert_array_equal(np.bincount(labels, minlength=10), [per_class] * 10)
    assert ds.num_classes == 10 and ds.train_images.max() == 255
