"""End-to-end tests of ``python -m train.lenet --precise-bn N --freeze-bn-epochs K`` on tiny data.

Two epochs of eight steps: PreciseBN after each, the second epoch frozen. The statistics are
checked against a float64 reference of the population statistics, the frozen epoch against
the statistics of the switch, and resuming (across the switch, and inside the frozen epoch)
and two devices against the uninterrupted one-device run.
"""

import contextlib
import io
import json
import re

import numpy as np
import pytest

from tests.synthetic import learnable_images
from train import batching, config, data, idx, lenet
from train.checkpoints import load_checkpoint

# The sizes (and settings) of tests/test_lenet.py: in one pytest process the runs share its
# compiled training and evaluation steps.
N_TRAIN, N_TEST, BATCH, EPOCHS = 256, 72, 32, 2
STEPS_PER_EPOCH = N_TRAIN // BATCH
PRECISE_IMAGES = 64  # two batches
PRECISE_FIELDS = ("precise_test_loss", "precise_test_accuracy")


@pytest.fixture(scope="module")
def train_data():
    rng = np.random.default_rng(0)
    return learnable_images(N_TRAIN, rng), learnable_images(N_TEST, rng)


@pytest.fixture(scope="module")
def idx_dir(train_data, tmp_path_factory):
    return idx.write_idx_dataset(tmp_path_factory.mktemp("idx"), *train_data[0], *train_data[1])


def _args(idx_dir, workdir, *extra):
    return ["--data-dir", str(idx_dir), "--workdir", str(workdir), "--batch-size", str(BATCH),
            "--epochs", str(EPOCHS), "--eval-batch-size", "32", "--no-progress",
            "--precise-bn", str(PRECISE_IMAGES), "--freeze-bn-epochs", "1", *map(str, extra)]


def _run(argv):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        result = lenet.main(argv)
    return result, out.getvalue().splitlines()


@pytest.fixture(scope="module")
def straight(idx_dir, tmp_path_factory):
    """The uninterrupted run: (result, stdout lines, workdir)."""
    workdir = tmp_path_factory.mktemp("straight")
    return (*_run(_args(idx_dir, workdir)), workdir)


def _flat(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        out.update(_flat(v, f"{prefix}{k}/") if isinstance(v, dict) else {prefix + k: v})
    return out


def _untimed(line):
    return re.sub(r" (seconds|workdir|checkpoint|metrics|plot)=\S+", "", line)


def test_metrics_report_both_statistics(straight):
    result, lines, workdir = straight
    rows = [json.loads(r) for r in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["bn_frozen"] for r in rows] == [False, True]
    for row in rows:
        assert 0 <= row["precise_test_accuracy"] <= 1 and row["precise_test_loss"] > 0
    # The statistics differ while BN trains with batch statistics ...
    assert rows[0]["precise_test_loss"] != rows[0]["test_loss"]
    # ... and are the same ones in the frozen epoch: the run trains and tests with them.
    assert rows[1]["precise_test_loss"] == rows[1]["test_loss"]
    assert result["precise_test_accuracy"] == rows[1]["precise_test_accuracy"]
    assert result["test_accuracy"] > 0.5  # the tiny data is learnable
    epochs = [line for line in lines if re.match(r"epoch \d/", line)]
    assert "BN frozen for the last 1 epoch(s), with statistics recomputed from 64 training " \
           "images (PreciseBN)" in epochs[1]
    assert all(f"precise_test_accuracy={r['precise_test_accuracy']:.4f}" in line
               for r, line in zip(rows, [epochs[0], epochs[2]], strict=True))
    assert epochs[2].endswith("[BN frozen]") and "[BN frozen]" not in epochs[0]
    assert (f"test_loss={result['test_loss']:.4f} precise_test_accuracy="
            f"{result['precise_test_accuracy']:.4f} precise_test_loss="
            f"{result['precise_test_loss']:.4f} train_accuracy=") in lines[-1]


def test_frozen_epoch_trains_with_the_statistics_of_the_switch(straight):
    _, _, workdir = straight
    before = load_checkpoint(workdir, STEPS_PER_EPOCH)
    after = load_checkpoint(workdir, 2 * STEPS_PER_EPOCH)
    assert before["meta"]["precise_batch_stats"] is True
    ema, precise = _flat(before["state"]["batch_stats"]), _flat(before["precise_batch_stats"])
    assert ema.keys() == precise.keys() and len(ema) == 4
    assert all(not np.allclose(ema[k], precise[k]) for k in ema)
    # The switch recomputes what epoch 1 reported (same weights, same images), and the frozen
    # epoch leaves it unchanged while the weights train.
    frozen = _flat(after["state"]["batch_stats"])
    for k in precise:
        np.testing.assert_array_equal(frozen[k], precise[k], err_msg=k)
        np.testing.assert_array_equal(_flat(after["precise_batch_stats"])[k], precise[k])
    params = _flat(before["state"]["params"]), _flat(after["state"]["params"])
    assert all(not np.array_equal(params[0][k], params[1][k]) for k in params[0])


def _windows(x, size=5):
    return np.lib.stride_tricks.sliding_window_view(x, (size, size), axis=(1, 2))


def _conv_pool(x, layer):
    """VALID 5x5 convolution then 2x2 max-pooling, float64, NHWC."""
    y = np.einsum("bhwcij,ijcf->bhwf", _windows(x), layer["kernel"].astype(np.float64))
    y = y + layer["bias"]
    b, h, w, c = y.shape
    return y.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def _population(values):
    """Mean and biased variance per channel of a list of (B, H, W, C) arrays, pooled."""
    v = np.concatenate([a.reshape(-1, a.shape[-1]) for a in values])
    return v.mean(0), v.var(0)


def test_precise_statistics_are_those_of_the_training_forward_pass(straight, train_data,
                                                                   idx_dir):
    """Epoch 1's statistics against a float64 reference: the first two batches of epoch 1's
    order, through the training-mode forward pass (bn1 normalizing each batch with its own
    statistics), every activation of every batch pooled."""
    _, _, workdir = straight
    ckpt = load_checkpoint(workdir, STEPS_PER_EPOCH)
    params, got = ckpt["state"]["params"], ckpt["precise_batch_stats"]
    mean, std = data.pixel_stats("fashion_mnist", idx_dir)
    images, labels = train_data[0]
    batches = batching.batches(images[..., None], labels, BATCH, seed=0, epoch=0)
    bn1_inputs, bn2_inputs = [], []
    for _ in range(PRECISE_IMAGES // BATCH):
        x, _ = next(batches)
        a = _conv_pool((x.astype(np.float64) / 255 - mean) / std, params["conv1"])
        bn1_inputs.append(a)
        m, v = _population([a])
        a = (a - m) / np.sqrt(v + 1e-5) * params["bn1"]["scale"] + params["bn1"]["bias"]
        bn2_inputs.append(_conv_pool(np.maximum(a, 0), params["conv2"]))
    for name, inputs in (("bn1", bn1_inputs), ("bn2", bn2_inputs)):
        want_mean, want_var = _population(inputs)
        # float32 forward pass vs float64: two convolutions' rounding on bn2's input.
        np.testing.assert_allclose(got[name]["mean"], want_mean, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got[name]["var"], want_var, rtol=1e-5, atol=1e-5)


def test_resume_across_the_switch_equals_the_uninterrupted_run(straight, idx_dir, tmp_path):
    """Stopped at the end of epoch 1 (the switch is the resumed run's to make), then inside
    the frozen epoch (the state holds the frozen statistics), then resumed to the end."""
    result, lines, straight_dir = straight
    workdir = tmp_path / "w"
    _run(_args(idx_dir, workdir, "--max-steps", STEPS_PER_EPOCH))
    _, mid = _run(_args(idx_dir, workdir, "--resume", "--max-steps", STEPS_PER_EPOCH + 3))
    assert any("BN frozen for the last 1 epoch(s)" in line for line in mid)
    resumed, out = _run(_args(idx_dir, workdir, "--resume"))
    assert not any("BN frozen for the last" in line for line in out)  # already frozen
    assert _untimed(out[-1]) == _untimed(lines[-1])
    a, b = load_checkpoint(workdir), load_checkpoint(straight_dir)
    for part in ("params", "batch_stats"):
        flat_a, flat_b = _flat(a["state"][part]), _flat(b["state"][part])
        for k in flat_b:
            np.testing.assert_array_equal(flat_a[k], flat_b[k], err_msg=k)


def test_two_devices_match_one_device(straight, idx_dir, tmp_path):
    """Synchronized BN over two devices: the same PreciseBN statistics, the same run."""
    result, _, straight_dir = straight
    two, _ = _run(_args(idx_dir, tmp_path, "--devices", 2))
    for key in ("train_loss", "test_loss", "test_accuracy", *PRECISE_FIELDS):
        np.testing.assert_allclose(two[key], result[key], rtol=1e-5, atol=1e-6, err_msg=key)
    a, b = load_checkpoint(tmp_path), load_checkpoint(straight_dir)
    assert a["meta"]["config"]["devices"] == 2
    for part in ("state", "precise"):
        flat_a = _flat(a["state"]["batch_stats"] if part == "state" else a["precise_batch_stats"])
        flat_b = _flat(b["state"]["batch_stats"] if part == "state" else b["precise_batch_stats"])
        for k in flat_b:
            # 16 SGD steps amplify float32 rounding from different reduction orders.
            np.testing.assert_allclose(flat_a[k], flat_b[k], rtol=1e-4, atol=1e-5, err_msg=k)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--freeze-bn-epochs", 2], "--freeze-bn-epochs: expected fewer than --epochs=2 (BN "
                                    "trains with batch statistics first), got 2"),
        (["--norm", "none"], "--precise-bn needs Batch Normalization: expected --norm jaxbn "
                             "or flax, got --norm none"),
        (["--precise-bn", -1], "--precise-bn: expected a non-negative integer, got -1"),
    ],
)
def test_bad_flags_exit_with_a_message(idx_dir, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as exc:
        lenet.main(_args(idx_dir, tmp_path, *extra))
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_flags_warn_on_resume_and_share_the_compiled_steps(tmp_path):
    saved = config.Config()
    changed = config.check_resumable(
        {"precise_bn": 0, "freeze_bn_epochs": 0},
        config.Config(precise_bn=512, freeze_bn_epochs=1), tmp_path)
    assert changed == ["precise_bn: 0 -> 512", "freeze_bn_epochs: 0 -> 1"]
    assert config.compile_key(config.Config(precise_bn=512, freeze_bn_epochs=1)) == saved


def test_export_folds_the_precise_statistics(straight, tmp_path, capsys):
    from train import export

    _, _, workdir = straight
    ckpt = load_checkpoint(workdir, STEPS_PER_EPOCH)
    for running, want in ((False, ckpt["precise_batch_stats"]),
                          (True, ckpt["state"]["batch_stats"])):
        variables, _, _ = export.load_checkpoint(workdir, STEPS_PER_EPOCH, running_stats=running)
        got = _flat(variables["batch_stats"])
        for k, v in _flat(want).items():
            np.testing.assert_array_equal(got[k], v, err_msg=k)
    assert export.main(["--workdir", str(workdir), "--step", str(STEPS_PER_EPOCH),
                        "--out", str(tmp_path / "m.npz")]) == 0
    assert "BN (PreciseBN's statistics)" in capsys.readouterr().out


def test_freeze_message_says_how_many_images_were_used(idx_dir, tmp_path):
    """--precise-bn larger than the training set: PreciseBN uses one epoch, and says so."""
    argv = _args(idx_dir, tmp_path, "--max-steps", STEPS_PER_EPOCH + 1)
    argv[argv.index("--precise-bn") + 1] = "100000"
    _, lines = _run(argv)
    (line,) = [x for x in lines if "BN frozen for the last" in x]
    assert line.endswith(f"with statistics recomputed from {N_TRAIN} training images, for "
                         "100000 asked (whole batches, at most one epoch) (PreciseBN)"), line
