"""End-to-end tests of ``python -m train.lenet`` on tiny data, and of its pieces.

Runs with the same settings share their compiled steps (``train.prepare.build`` is cached), so
most runs here cost well under a second after the first.
"""

import contextlib
import dataclasses
import functools
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest

from tests.synthetic import learnable_images
from train import config, data, idx, lenet, prepare, steps
from train import workdir as workdir_mod
from train.checkpoints import load_checkpoint
from train.errors import EXIT_CODES, EXIT_INTERRUPTED, ConfigError, DivergedError
from train.metrics import TIME_FIELDS

REAL_DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
N_TRAIN, N_TEST, BATCH = 256, 72, 32
STEPS_PER_EPOCH = N_TRAIN // BATCH
FINAL_LINE = re.compile(
    r"^final: epochs=(?P<epochs>[\d.]+) steps=(?P<steps>\d+) "
    r"test_accuracy=(?P<acc>[01]\.\d{4}) test_loss=(?P<loss>\d+\.\d{4}) "
    r"train_accuracy=[01]\.\d{4} seconds=\d+\.\d workdir=(?P<workdir>\S+) "
    r"checkpoint=(?P<checkpoint>\S+) metrics=(?P<metrics>\S+) plot=(?P<plot>\S+)$"
)
METRIC_KEYS = {
    "epoch", "step", "train_loss", "train_accuracy", "test_loss", "test_accuracy",
    "images_per_sec", "train_seconds", "lr", "dataset",
}


@pytest.fixture(scope="module")
def idx_dir(tmp_path_factory):
    rng = np.random.default_rng(0)
    directory = tmp_path_factory.mktemp("idx")
    return idx.write_idx_dataset(
        directory, *learnable_images(N_TRAIN, rng), *learnable_images(N_TEST, rng)
    )


def _args(idx_dir, workdir, *extra):
    return [
        "--data-dir", str(idx_dir), "--workdir", str(workdir), "--batch-size", str(BATCH),
        "--epochs", "2", "--eval-batch-size", "32", "--no-progress", *map(str, extra),
    ]


@pytest.fixture(scope="module")
def straight(idx_dir, tmp_path_factory):
    """An uninterrupted two-epoch run: (result, stdout lines, workdir)."""
    workdir = tmp_path_factory.mktemp("straight")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        result = lenet.main(_args(idx_dir, workdir))
    return result, out.getvalue().splitlines(), workdir


def _same_metrics(a, b, **tol):
    for key in ("step", "epoch", "train_loss", "train_accuracy", "test_loss", "test_accuracy"):
        if tol:
            np.testing.assert_allclose(a[key], b[key], err_msg=key, **tol)
        else:
            assert a[key] == b[key], key


def _same_params(workdir_a, workdir_b, **tol):
    a, b = load_checkpoint(workdir_a), load_checkpoint(workdir_b)
    for part in ("params", "batch_stats"):
        flat_a = dict(_flatten(a["state"][part]))
        flat_b = dict(_flatten(b["state"][part]))
        assert flat_a.keys() == flat_b.keys()
        for k in flat_a:
            np.testing.assert_allclose(flat_a[k], flat_b[k], err_msg=k, **tol)


def _flatten(tree, prefix=""):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _flatten(v, f"{prefix}{k}/")
        else:
            yield prefix + k, v


# ------------------------------------------------------------------------------------------
# The whole loop.


def test_end_to_end_outputs(straight):
    result, lines, workdir = straight
    # The last line is the machine-readable summary, and agrees with the returned metrics.
    match = FINAL_LINE.match(lines[-1])
    assert match, lines[-1]
    assert float(match["epochs"]) == 2 and int(match["steps"]) == 2 * STEPS_PER_EPOCH
    assert float(match["acc"]) == pytest.approx(result["test_accuracy"], abs=1e-4)
    assert float(match["loss"]) == pytest.approx(result["test_loss"], abs=1e-4)
    assert match["workdir"] == str(workdir)
    # Where things went is printed before it.
    assert f"checkpoint: {match['checkpoint']}" in lines
    assert f"metrics: {match['metrics']}" in lines and f"plot: {match['plot']}" in lines
    assert sum(line.startswith("epoch ") for line in lines) == 2
    # The tiny data is learnable: well above chance after two epochs.
    assert result["test_accuracy"] > 0.5
    # metrics.jsonl: one row per epoch.
    rows = [json.loads(r) for r in Path(match["metrics"]).read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and set(rows[0]) == METRIC_KEYS
    assert rows[-1]["test_accuracy"] == result["test_accuracy"]
    assert Path(match["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Checkpoints: one per epoch; the latest is the final state.
    assert Path(match["checkpoint"]) == workdir / "checkpoints" / str(2 * STEPS_PER_EPOCH)
    ckpt = load_checkpoint(workdir)
    assert int(ckpt["state"]["step"]) == 2 * STEPS_PER_EPOCH
    assert ckpt["meta"]["metrics"]["test_accuracy"] == result["test_accuracy"]
    assert ckpt["meta"]["config"]["norm"] == "jaxbn" and ckpt["rng"].dtype == np.uint32
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) \
        == [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]
    # Gradients reach every parameter, and BN's running statistics move: all change in epoch 2.
    first = load_checkpoint(workdir, STEPS_PER_EPOCH)["state"]
    for part in ("params", "batch_stats"):
        before, after = dict(_flatten(first[part])), dict(_flatten(ckpt["state"][part]))
        assert before.keys() == after.keys() and len(before) == {"params": 12, "batch_stats": 4}[
            part]
        unchanged = [k for k in before if np.array_equal(before[k], after[k])]
        assert not unchanged, unchanged


def test_tfds_mock_data(tmp_path, monkeypatch, capsys):
    tfds = pytest.importorskip("tensorflow_datasets")
    monkeypatch.delenv(data.ENV_VAR, raising=False)
    monkeypatch.setattr(data, "DEBIAN_DATASETS_ROOT", str(tmp_path / "none"))
    with tfds.testing.mock_data(num_examples=64, policy=tfds.testing.MockPolicy.USE_CODE):
        result = lenet.main([
            "--workdir", str(tmp_path / "w"), "--batch-size", "16", "--epochs", "1",
            "--no-progress",
        ])
    out = capsys.readouterr().out
    assert "tfds:fashion_mnist" in out and "64 train / 64 test" in out
    assert FINAL_LINE.match(out.splitlines()[-1])
    assert result["step"] == 4 and 0 <= result["test_accuracy"] <= 1


# ------------------------------------------------------------------------------------------
# Resuming.


def test_resume_equals_uninterrupted_run(straight, idx_dir, tmp_path, capsys):
    result, _, straight_dir = straight
    workdir = tmp_path / "w"
    # An empty workdir with --resume starts from scratch; --max-steps stops after epoch 1.
    first = lenet.main(_args(idx_dir, workdir, "--resume", "--max-steps", STEPS_PER_EPOCH))
    assert "no checkpoint" in capsys.readouterr().out and first["epoch"] == 1
    resumed = lenet.main(_args(idx_dir, workdir, "--resume"))
    assert f"resumed from {workdir / 'checkpoints' / str(STEPS_PER_EPOCH)}" in \
        capsys.readouterr().out
    _same_metrics(resumed, result)
    _same_params(workdir, straight_dir, rtol=0, atol=0)
    rows = (workdir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["epoch"] for r in rows] == [1, 2]
    # Resuming a finished run trains nothing and reports the same final metrics.
    again = lenet.main(_args(idx_dir, workdir, "--resume"))
    _same_metrics(again, result)


def test_resume_refuses_a_different_model(straight, idx_dir, tmp_path, capsys):
    _, _, straight_dir = straight
    workdir = tmp_path / "w"
    lenet.main(_args(idx_dir, workdir, "--max-steps", 2))
    with pytest.raises(SystemExit) as exc:
        lenet.main(_args(idx_dir, workdir, "--resume", "--norm", "none"))
    assert exc.value.code == 2
    assert "made with norm='jaxbn', got norm='none'" in capsys.readouterr().err


def test_fresh_run_archives_the_previous_run(idx_dir, tmp_path, capsys):
    """No --resume: the previous run's outputs move to previous/<time>/, none is deleted."""
    workdir = tmp_path / "w"
    first = lenet.main(_args(idx_dir, workdir, "--max-steps", STEPS_PER_EPOCH + 2))
    assert _steps(workdir / "checkpoints") == [STEPS_PER_EPOCH, STEPS_PER_EPOCH + 2]
    first_metrics = (workdir / "metrics.jsonl").read_text()
    capsys.readouterr()
    lenet.main(_args(idx_dir, workdir, "--max-steps", 3))
    out = capsys.readouterr().out
    match = re.search(r"^starting from scratch: moved the previous run's checkpoints "
                      r"\[(\d+), (\d+)\], metrics.jsonl, curves.png to (\S+) \(pass --resume",
                      out, re.MULTILINE)
    assert match, out
    archive = Path(match[3])
    assert archive.parent == workdir / workdir_mod.PREVIOUS
    assert re.fullmatch(r"\d{8}-\d{6}", archive.name), archive.name
    # The new run's outputs are its own ...
    assert _steps(workdir / "checkpoints") == [3]
    assert len((workdir / "metrics.jsonl").read_text().splitlines()) == 1
    # ... and the old ones are intact, loadable where they went.
    assert _steps(archive / "checkpoints") == [STEPS_PER_EPOCH, STEPS_PER_EPOCH + 2]
    assert (archive / "metrics.jsonl").read_text() == first_metrics
    assert (archive / "curves.png").read_bytes()[:4] == b"\x89PNG"
    old = load_checkpoint(archive)
    assert old["meta"]["step"] == STEPS_PER_EPOCH + 2
    assert old["meta"]["metrics"]["test_loss"] == first["test_loss"]
    # Twice in the same second (`make run` twice): a second archive, not a clash.
    lenet.main(_args(idx_dir, workdir, "--max-steps", 2))
    lenet.main(_args(idx_dir, workdir, "--max-steps", 1))
    archives = sorted((workdir / workdir_mod.PREVIOUS).iterdir())
    assert len(archives) == 3 and len({a.name for a in archives}) == 3
    assert sorted(s for a in archives for s in _steps(a / "checkpoints")) == [
        2, 3, STEPS_PER_EPOCH, STEPS_PER_EPOCH + 2]
    # --resume leaves the checkpoint it resumes from where it is.
    capsys.readouterr()
    lenet.main(_args(idx_dir, workdir, "--max-steps", 2, "--resume"))
    assert "moved" not in capsys.readouterr().out
    assert len(list((workdir / workdir_mod.PREVIOUS).iterdir())) == 3
    assert _steps(workdir / "checkpoints") == [1, 2]


def test_archive_previous_run_moves_only_what_exists(tmp_path):
    assert workdir_mod.archive_previous_run(tmp_path / "none") is None
    (tmp_path / "checkpoints").mkdir()
    assert workdir_mod.archive_previous_run(tmp_path) is None  # an empty checkpoints/ stays
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    # --resume without a checkpoint starts from scratch: its stale metrics move too.
    moved = workdir_mod.archive_previous_run(tmp_path, resume=True)
    assert moved is not None and [p.name for p in moved.iterdir()] == ["metrics.jsonl"]
    assert (tmp_path / "checkpoints").is_dir() and not (tmp_path / "metrics.jsonl").exists()


def _steps(directory):
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def test_ctrl_c_keeps_a_loadable_checkpoint(straight, idx_dir, tmp_path, monkeypatch, capsys):
    result, _, _ = straight
    workdir = tmp_path / "w"
    interrupt_at = STEPS_PER_EPOCH + 3  # In epoch 2, just after epoch 1's checkpoint.

    def on_step(epoch, step):
        if step == interrupt_at:
            raise KeyboardInterrupt

    original = lenet.train_and_evaluate
    monkeypatch.setattr(lenet, "train_and_evaluate", functools.partial(original, on_step=on_step))
    with pytest.raises(SystemExit) as exc:
        lenet.main(_args(idx_dir, workdir))
    assert exc.value.code == EXIT_INTERRUPTED
    checkpoint = workdir.absolute() / "checkpoints" / str(STEPS_PER_EPOCH)
    assert f"interrupted; the latest checkpoint, {checkpoint}, is complete" in \
        capsys.readouterr().err
    ckpt = load_checkpoint(workdir)
    assert ckpt["meta"]["step"] == STEPS_PER_EPOCH and ckpt["meta"]["epoch"] == 1
    assert not list((workdir / "checkpoints").glob("*tmp*"))
    monkeypatch.setattr(lenet, "train_and_evaluate", original)
    resumed = lenet.main(_args(idx_dir, workdir, "--resume"))
    _same_metrics(resumed, result)


def test_interrupt_mid_epoch_then_resume_mid_epoch(straight, idx_dir, tmp_path, capsys):
    """A checkpoint in the middle of an epoch (--max-steps) resumes at the same batch, with
    the epoch's running sums: the final line and the last metrics row are those of an
    uninterrupted run in every field but time and paths."""
    result, lines, straight_dir = straight
    workdir = tmp_path / "w"
    lenet.main(_args(idx_dir, workdir, "--max-steps", STEPS_PER_EPOCH + 3))
    capsys.readouterr()
    lenet.main(_args(idx_dir, workdir, "--resume"))
    out = capsys.readouterr().out
    assert f"resumed from {workdir / 'checkpoints' / str(STEPS_PER_EPOCH + 3)}" in out

    def untimed(line):
        return re.sub(r" (seconds|workdir|checkpoint|metrics|plot)=\S+", "", line)

    assert untimed(out.splitlines()[-1]) == untimed(lines[-1])
    rows = [json.loads(r) for r in (workdir / "metrics.jsonl").read_text().splitlines()]
    want = json.loads((straight_dir / "metrics.jsonl").read_text().splitlines()[-1])
    for key in want.keys() - set(TIME_FIELDS):
        assert rows[-1][key] == want[key], key
    assert [r["step"] for r in rows] == [STEPS_PER_EPOCH, STEPS_PER_EPOCH + 3,
                                         2 * STEPS_PER_EPOCH]
    _same_params(workdir, straight_dir, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------
# Divergence.


def test_nan_stops_and_keeps_the_last_good_checkpoint(idx_dir, tmp_path, capsys):
    workdir = tmp_path / "w"
    lenet.main(_args(idx_dir, workdir, "--max-steps", STEPS_PER_EPOCH))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        lenet.main(_args(idx_dir, workdir, "--resume", "--lr", "1e30"))
    assert exc.value.code == DivergedError.exit_code
    captured = capsys.readouterr()
    assert re.search(r"error: training diverged: .*step \d+ \(epoch 2", captured.err)
    assert f"Last good checkpoint: {workdir / 'checkpoints' / str(STEPS_PER_EPOCH)}" in \
        captured.err
    assert not captured.out.splitlines()[-1].startswith("final:")
    ckpt = load_checkpoint(workdir)
    assert ckpt["meta"]["step"] == STEPS_PER_EPOCH
    assert all(np.isfinite(v).all() for _, v in _flatten(ckpt["state"]["params"]))
    assert [p.name for p in (workdir / "checkpoints").iterdir()] == [str(STEPS_PER_EPOCH)]


# ------------------------------------------------------------------------------------------
# Devices.


def test_four_devices_match_one_device(straight, idx_dir, tmp_path):
    one = lenet.main(_args(idx_dir, tmp_path / "one", "--max-steps", 3))
    four = lenet.main(_args(idx_dir, tmp_path / "four", "--max-steps", 3, "--devices", 4))
    _same_metrics(one, four, rtol=1e-5, atol=1e-6)
    _same_params(tmp_path / "one", tmp_path / "four", rtol=1e-4, atol=1e-6)


def test_fast_conv_trains_like_flax_conv(straight, idx_dir, tmp_path):
    flax_conv = lenet.main(_args(idx_dir, tmp_path / "flax", "--max-steps", 3, "--conv", "flax"))
    fast_conv = lenet.main(_args(idx_dir, tmp_path / "fast", "--max-steps", 3, "--conv", "fast"))
    _same_metrics(flax_conv, fast_conv, rtol=1e-4, atol=1e-5)


def test_fused_bn_trains_like_unfused(straight, idx_dir, tmp_path):
    """--fused-bn: the same run to float rounding (two epochs; the losses are averages of
    float32 sums, and 16 SGD steps compound their rounding, hence 1e-4 relative)."""
    unfused, _, unfused_dir = straight
    fused = lenet.main(_args(idx_dir, tmp_path / "fused", "--fused-bn"))
    assert fused["test_accuracy"] == unfused["test_accuracy"]
    _same_metrics(fused, unfused, rtol=1e-4, atol=1e-6)
    _same_params(tmp_path / "fused", unfused_dir, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--fused-bn", "--norm", "flax"], "--fused-bn fuses jaxbn's BN with the activation"),
        (["--devices", 3], "--batch-size 32 must be divisible by --devices 3"),
        (["--devices", 16], "--devices 16: expected 16 devices, got 8 (cpu). For fake CPU "
                            "devices, start Python with XLA_FLAGS="),
        (["--batch-size", 512], "--batch-size 512: expected at most the number of training "
                                "images, got 256"),
        (["--epochs", 0], "--epochs: expected a positive integer, got 0"),
    ],
)
def test_bad_options_exit_with_a_message(idx_dir, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as exc:
        lenet.main(_args(idx_dir, tmp_path, *extra))
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


# ------------------------------------------------------------------------------------------
# Pieces.


def test_defaults_and_flags():
    args = config.parse_args([])
    assert args.config == config.Config() and args.workdir == "runs/lenet"
    args = config.parse_args([
        "--optimizer", "adam", "--schedule", "step", "--norm", "flax", "--bn-position",
        "after_relu", "--activation", "tanh", "--devices", "2", "--train-subset", "10",
        "--workdir", "/x", "--weight-decay", "0", "--resume", "--no-progress", "--debug",
    ])
    c = args.config
    assert (c.optimizer, c.schedule, c.norm, c.bn_position, c.activation, c.devices,
            c.train_subset, c.weight_decay, c.resume, c.progress, c.debug) == (
        "adam", "step", "flax", "after_relu", "tanh", 2, 10, 0.0, True, False, True)
    assert args.workdir == "/x"
    with pytest.raises(SystemExit):
        config.parse_args(["--norm", "layer"])


def test_every_config_field_is_a_flag_with_help():
    """The flags, their help and defaults come from the Config fields: none is missed."""
    parser = config.build_parser()
    actions = {a.dest: a for a in parser._actions}
    for field in dataclasses.fields(config.Config):
        action = actions[field.name]
        assert action.help == field.metadata["option"].help and action.help, field.name
        assert action.default == field.default, field.name
    assert config.parse_args([]).config == config.Config()


def test_help_lists_the_exit_codes(capsys):
    with pytest.raises(SystemExit) as exc:
        lenet.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "exit status:" in out
    for code, meaning in EXIT_CODES.items():
        assert re.search(rf"^\s+{code}\s+{re.escape(meaning[:30])}", out, re.MULTILINE), code


LENET_DOCS = Path(__file__).resolve().parents[1] / "docs" / "lenet.md"


def _docs_table(header):
    """The Markdown table of docs/lenet.md that starts with ``header``."""
    page = LENET_DOCS.read_text()
    table = page[page.index(header):]
    return table[:table.index("\n\n")]


def test_docs_document_every_exit_status():
    rows = dict(re.findall(r"^\| (\d+) \| (.+) \|$", _docs_table("| exit status | meaning |"),
                           re.MULTILINE))
    assert {int(code): meaning.replace("`", "") for code, meaning in rows.items()} == EXIT_CODES


def test_docs_document_every_flag_with_its_default():
    rows = re.findall(r"^\| `(--[a-z-]+)[^|]*\| ([^|]+) \|", _docs_table("| flag | default |"),
                      re.MULTILINE)
    documented = {flag: default.strip("` ") for flag, default in rows}
    parser = config.build_parser()
    flags = {a.option_strings[0]: a.default for a in parser._actions
             if a.option_strings and a.dest != "help"}
    assert {f: "—" if d is None else str(d) for f, d in flags.items()} == documented


def test_resume_rules_and_compile_key_come_from_the_fields(tmp_path):
    saved = dataclasses.asdict(config.Config())
    # Options that fix the state's shapes refuse; others warn; where and how fast: silence.
    for name, value in (("norm", "none"), ("optimizer", "adam"), ("dataset", "mnist")):
        with pytest.raises(ConfigError, match=f"made with {name}="):
            config.check_resumable(saved, config.Config(**{name: value}), tmp_path)
    changed = config.check_resumable(
        saved, config.Config(lr=0.1, seed=1, devices=2, max_steps=3, data_dir="/d"), tmp_path)
    assert changed == ["lr: 0.05 -> 0.1", "seed: 0 -> 1"]
    # The compiled steps do not depend on the seed, the data or when to stop ...
    quiet = config.Config(seed=4, data_dir="/d", max_steps=3, eval_batch_size=8, resume=True,
                          train_subset=5, test_subset=6, progress=False, debug=True)
    assert config.compile_key(quiet) == config.Config()
    # ... but on the model, the optimizer and its schedule.
    for name, value in (("lr", 0.1), ("norm", "none"), ("epochs", 3), ("devices", 2)):
        assert config.compile_key(config.Config(**{name: value})) != config.Config(), name


def test_multi_process_flags_are_not_config():
    argv = ["--coordinator", "10.0.0.1:1234", "--num-processes", "2", "--process-id", "1",
            "--devices", "8"]
    args = config.parse_args(argv)
    assert args.config == config.Config(devices=8) and args.workdir == "runs/lenet"
    assert (args.coordinator, args.num_processes, args.process_id) == ("10.0.0.1:1234", 2, 1)


def test_bad_multi_process_settings_exit_with_a_message(idx_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        lenet.main(_args(idx_dir, tmp_path, "--coordinator", "127.0.0.1:1", "--num-processes",
                         2, "--process-id", 2))
    assert exc.value.code == 2
    assert "error: process_id must be in [0, 1] for 2 processes, got 2" in capsys.readouterr().err


def test_devices_must_divide_over_the_processes(monkeypatch):
    from train import devices, distributed

    monkeypatch.setattr(distributed, "planned_process_count", lambda: 2)
    with pytest.raises(ConfigError, match="--devices 3 must be divisible by the number "
                                                  r"of processes \(2\)"):
        devices.ensure_devices(3)


def test_eval_batch_size_is_rounded_up_to_the_devices(idx_dir):
    _, _, eval_batch_size = prepare.load(
        config.Config(data_dir=str(idx_dir), batch_size=BATCH, eval_batch_size=30), 4)
    assert eval_batch_size == 32
    _, _, eval_batch_size = prepare.load(
        config.Config(data_dir=str(idx_dir), batch_size=BATCH, eval_batch_size=1000), 8)
    assert eval_batch_size == N_TEST  # 72: the whole test set, a multiple of 8


@pytest.mark.parametrize(
    ("schedule", "expected"),
    [
        ("constant", [0.1, 0.1, 0.1, 0.1]),
        ("cosine", [0.1, 0.05, 0.0, 0.0]),
        ("step", [0.1, 0.01, 0.001, 0.001]),
    ],
)
def test_schedules(schedule, expected):
    s = steps.make_schedule(config.Config(lr=0.1, epochs=2, schedule=schedule), 10)
    np.testing.assert_allclose([float(s(i)) for i in (0, 10, 20, 30)], expected, atol=1e-7)


def test_warmup():
    s = steps.make_schedule(
        config.Config(lr=0.1, epochs=3, warmup_epochs=1, schedule="constant"), 10)
    np.testing.assert_allclose([float(s(i)) for i in (0, 5, 10, 29)], [0, 0.05, 0.1, 0.1],
                               atol=1e-7)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"optimizer": "rmsprop"}, "--optimizer: expected one of sgd, adam, got 'rmsprop'"),
        ({"lr": 0.0}, "--lr: expected a finite number > 0, got 0.0"),
        ({"lr": float("inf")}, "--lr: expected a finite number > 0, got inf"),
        ({"warmup_epochs": 5}, "--warmup-epochs: expected in [0, --epochs=5), got 5"),
        ({"warmup_epochs": float("nan")}, "--warmup-epochs: expected in [0, --epochs=5), got"),
        ({"weight_decay": -1.0}, "--weight-decay: expected a finite number >= 0, got -1.0"),
        ({"weight_decay": float("nan")}, "--weight-decay: expected a finite number >= 0, got "
                                         "nan"),
        ({"bn_momentum": 1.5}, "--bn-momentum: expected a number in [0, 1], got 1.5"),
        ({"max_steps": 0}, "--max-steps: expected a positive integer, got 0"),
        ({"seed": -1}, "--seed: expected an integer in [0, 4294967295], got -1"),
    ],
)
def test_validate(kwargs, message):
    with pytest.raises(ValueError) as exc:
        config.validate(config.Config(**kwargs))
    assert message in str(exc.value)


def test_weight_decay_only_on_kernels():
    import jax.numpy as jnp
    import optax

    params = {"conv1": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)},
              "bn1": {"scale": jnp.ones(2), "bias": jnp.ones(2)}}
    zeros = {k: {n: jnp.zeros_like(v) for n, v in d.items()} for k, d in params.items()}
    for optimizer in ("sgd", "adam"):
        tx = steps.make_optimizer(
            config.Config(optimizer=optimizer, weight_decay=0.1, schedule="constant"), 10)
        updates, _ = tx.update(zeros, tx.init(params), params)
        params_after = optax.apply_updates(params, updates)
        assert float(params_after["conv1"]["kernel"][0, 0]) < 1, optimizer
        for k, n in (("conv1", "bias"), ("bn1", "scale"), ("bn1", "bias")):
            assert float(params_after[k][n][0]) == 1, (optimizer, k, n)


# ------------------------------------------------------------------------------------------
# Real data.


@pytest.mark.skipif(
    not REAL_DEBIAN_DIR.is_dir(),
    reason=f"{REAL_DEBIAN_DIR} absent (apt-get install dataset-fashion-mnist)",
)
def test_real_fashion_mnist_subset(tmp_path, monkeypatch):
    """One epoch on 3000 real images: well above chance (0.1) on 2000 real test images
    (0.75 here; the full default run is in the README)."""
    monkeypatch.delenv(data.ENV_VAR, raising=False)
    monkeypatch.setattr(data, "DEBIAN_DATASETS_ROOT", str(REAL_DEBIAN_DIR.parent))
    result = lenet.main([
        "--workdir", str(tmp_path), "--train-subset", "3000", "--test-subset", "2000",
        "--epochs", "1", "--no-progress", "--lr", "0.1",
    ])
    assert result["test_accuracy"] > 0.6
