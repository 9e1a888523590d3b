"""End-to-end tests: ``python -m train.lenet`` loses nothing when things go wrong.

A second run on a busy workdir, damaged checkpoints, a read-only or full disk, a workdir
that cannot exist, Ctrl-C pressed again and again during a save, bad flags and environment:
each case runs the program (``lenet.main``) on tiny data and checks its exit status, its
one-line message, what is left on disk, and that ``--resume`` then ends exactly where an
uninterrupted run ends. Runs share their compiled steps (same settings), so each costs about
a second.
"""

import contextlib
import errno
import io
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests.synthetic import learnable_images
from train import idx, lenet

N_TRAIN, N_TEST, BATCH = 256, 72, 32
SPE = N_TRAIN // BATCH  # steps per epoch
REPO = Path(__file__).resolve().parents[1]
#: A LeNet checkpoint takes about 3.3 MB: this disk holds one, not two.
SMALL_DISK = "5m"
EXIT_BUSY, EXIT_NO_INTACT, EXIT_STORAGE = 3, 4, 5
EXIT_INTERRUPTED, EXIT_TERMINATED = 130, 143


@pytest.fixture(scope="module")
def idx_dir(tmp_path_factory):
    rng = np.random.default_rng(0)
    return idx.write_idx_dataset(tmp_path_factory.mktemp("idx"), *learnable_images(N_TRAIN, rng),
                                 *learnable_images(N_TEST, rng))


def _args(idx_dir, workdir, *extra):
    return ["--data-dir", str(idx_dir), "--workdir", str(workdir), "--batch-size", str(BATCH),
            "--epochs", "2", "--eval-batch-size", "32", "--no-progress", *map(str, extra)]


def _final(out: str) -> str:
    """The ``final:`` line without its wall time and paths."""
    (line,) = [x for x in out.splitlines() if x.startswith("final:")]
    return re.sub(r" (seconds|workdir|checkpoint|metrics|plot)=\S+", "", line)


def _main(capsys, *argv) -> tuple[int, str, str]:
    """Runs the program; returns (exit status, stdout, stderr)."""
    capsys.readouterr()
    try:
        lenet.main(list(argv))
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def _error_line(err: str) -> str:
    """The one ``error:`` line; nothing else on stderr looks like a traceback or a log."""
    assert "Traceback" not in err and "ERROR:absl" not in err, err
    lines = [x for x in err.splitlines() if x.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def _steps(workdir: Path) -> list[int]:
    """The steps of everything in ``workdir/checkpoints`` (unfinished saves would fail)."""
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir())


def _unfinished(workdir: Path) -> list[Path]:
    return sorted((workdir / "checkpoints").glob("*orbax-checkpoint-tmp*"))


@pytest.fixture(scope="module")
def straight(idx_dir, tmp_path_factory):
    """The final line of an uninterrupted two-epoch run (without time and paths)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        lenet.main(_args(idx_dir, tmp_path_factory.mktemp("straight")))
    return _final(out.getvalue())


def _resumes_to_the_end(capsys, idx_dir, workdir, straight, checkpoint: Path) -> None:
    code, out, _ = _main(capsys, *_args(idx_dir, workdir, "--resume"))
    assert code == 0
    assert f"resumed from {checkpoint} " in out, out
    assert _final(out) == straight


# ------------------------------------------------------------------------------------------
# 1. A busy workdir.


def test_second_run_on_a_busy_workdir_is_refused(idx_dir, tmp_path, capsys, monkeypatch,
                                                  straight):
    """While a run trains, another one on its workdir exits 3 naming the first (pid, host),
    and touches nothing: the first run ends as an uninterrupted one does."""
    workdir = tmp_path / "w"
    second = {}

    def start_second_run(epoch, step):
        if step == SPE + 1:  # One checkpoint exists; the first run is still training.
            second["result"] = _main(capsys, *_args(idx_dir, workdir))

    original = lenet.train_and_evaluate
    monkeypatch.setattr(lenet, "train_and_evaluate",
                        lambda *a, **k: original(*a, on_step=start_second_run, **k))
    code, out, _ = _main(capsys, *_args(idx_dir, workdir))
    monkeypatch.setattr(lenet, "train_and_evaluate", original)
    assert code == 0 and _final(out) == straight
    second_code, _, second_err = second["result"]
    assert second_code == EXIT_BUSY
    assert re.fullmatch(
        rf"error: --workdir {re.escape(str(workdir))} is in use by another run \(pid "
        rf"{os.getpid()} on host {re.escape(socket.gethostname())}, started \S+\); wait for "
        r"it to end or pass another --workdir", _error_line(second_err))
    assert not (workdir / "previous").exists()  # Nothing of the first run was moved.
    assert _steps(workdir) == [SPE, 2 * SPE]


def test_the_lock_goes_with_its_holder_even_on_sigkill(idx_dir, tmp_path, capsys):
    workdir = tmp_path / "w"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from train.workdir import WorkdirLock; "
         f"WorkdirLock({str(workdir)!r}).acquire(); print('locked', flush=True); "
         "time.sleep(120)"], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        code, _, err = _main(capsys, *_args(idx_dir, workdir, "--max-steps", 2))
        assert code == EXIT_BUSY and f"(pid {holder.pid} on host" in _error_line(err)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    code, _, _ = _main(capsys, *_args(idx_dir, workdir, "--max-steps", 2))
    assert code == 0


# ------------------------------------------------------------------------------------------
# 3. Damaged checkpoints.


def _largest_state_file(checkpoint: Path) -> Path:
    return max((p for p in (checkpoint / "state").rglob("*") if p.is_file()),
               key=lambda p: p.stat().st_size)


def _damage(checkpoint: Path, how: str) -> None:
    if how == "truncated":
        big = _largest_state_file(checkpoint)
        os.truncate(big, big.stat().st_size // 3)
    elif how == "empty metadata":
        (checkpoint / "meta" / "metadata").write_text("")
    elif how == "no state":
        shutil.rmtree(checkpoint / "state")
    else:  # One bit flipped, the size unchanged: Orbax restores it without complaint.
        big = _largest_state_file(checkpoint)
        data = bytearray(big.read_bytes())
        data[len(data) // 2] ^= 0x10
        big.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def two_checkpoints(idx_dir, tmp_path_factory):
    """A run stopped at step SPE + 3: checkpoints at SPE (epoch 1) and SPE + 3."""
    workdir = tmp_path_factory.mktemp("two") / "w"
    with contextlib.redirect_stdout(io.StringIO()):
        lenet.main(_args(idx_dir, workdir, "--max-steps", SPE + 3))
    return workdir


@pytest.mark.parametrize("how", ["truncated", "empty metadata", "no state", "bit flip"])
def test_a_damaged_checkpoint_is_skipped_with_its_reason(idx_dir, two_checkpoints, tmp_path,
                                                         capsys, straight, how):
    workdir = tmp_path / "w"
    shutil.copytree(two_checkpoints, workdir)
    newest = workdir.absolute() / "checkpoints" / str(SPE + 3)
    _damage(newest, how)
    code, out, err = _main(capsys, *_args(idx_dir, workdir, "--resume"))
    assert code == 0, err
    reason = {"truncated": "unreadable state", "empty metadata": "unreadable metadata",
              "no state": "unreadable state", "bit flip": "checksum mismatch"}[how]
    (line,) = [x for x in err.splitlines() if "damaged" in x]
    assert line.startswith(f"warning: checkpoint {newest} is damaged: {reason}"), line
    assert line.endswith(f"moving it to {workdir.absolute() / 'damaged'}; trying the previous "
                         "one"), line
    assert "Traceback" not in err
    assert f"resumed from {newest.parent / str(SPE)} " in out
    assert _final(out) == straight
    assert (workdir / "damaged" / str(SPE + 3)).is_dir()  # Kept, out of the way.


def test_no_intact_checkpoint_is_a_clear_error(idx_dir, two_checkpoints, tmp_path, capsys):
    workdir = tmp_path / "w"
    shutil.copytree(two_checkpoints, workdir)
    _damage(workdir / "checkpoints" / str(SPE + 3), "no state")
    _damage(workdir / "checkpoints" / str(SPE), "bit flip")
    code, _, err = _main(capsys, *_args(idx_dir, workdir, "--resume"))
    assert code == EXIT_NO_INTACT
    assert _error_line(err).startswith(
        f"error: --resume: no intact checkpoint in {workdir.absolute() / 'checkpoints'}: "
        f"{SPE + 3}: unreadable state")


# ------------------------------------------------------------------------------------------
# 4. A workdir that cannot be written.


@contextlib.contextmanager
def _tmpfs(path: Path, options: str):
    path.mkdir(parents=True, exist_ok=True)
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                           capture_output=True, text=True)
    if mount.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({mount.stderr.strip() or 'not root'}); "
                    "test_simulated_full_disk_during_a_save covers the same path")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.fixture
def read_only_dir(tmp_path):
    if os.geteuid() != 0:
        path = tmp_path / "ro"
        path.mkdir()
        path.chmod(0o555)
        yield path
        path.chmod(0o755)
        return
    with _tmpfs(tmp_path / "ro", "ro,size=1m") as path:
        yield path


@pytest.mark.parametrize("where", ["read-only", "through a file", "under /proc"])
def test_a_workdir_that_cannot_be_written(idx_dir, tmp_path, capsys, request, where):
    if where == "read-only":
        workdir = request.getfixturevalue("read_only_dir")
        path, cause = workdir / ".lock", r"(Read-only file system \(EROFS\)|Permission denied)"
    elif where == "through a file":
        (tmp_path / "file").write_text("")
        workdir = path = tmp_path / "file" / "run"
        cause = r"Not a directory \(ENOTDIR\)"
    else:
        workdir = path = Path(f"/proc/jaxbn-test-{os.getpid()}/run")
        cause = r"No such file or directory \(ENOENT\)"
    code, out, err = _main(capsys, *_args(idx_dir, workdir))
    assert code == EXIT_STORAGE
    assert re.fullmatch(rf"error: cannot [-a-z ]+ {re.escape(str(path))}: {cause}",
                        _error_line(err)), err
    assert "final:" not in out
    code, _, err = _main(capsys, *_args(idx_dir, workdir, "--debug"))
    assert code == EXIT_STORAGE and "Traceback" in err  # --debug shows where.


def _check_full_disk_outcome(capsys, idx_dir, workdir, err, straight, tmp_path):
    """The second save failed: one line, no unfinished save, checkpoint 1 intact."""
    checkpoints = workdir.absolute() / "checkpoints"
    assert re.fullmatch(rf"error: cannot save checkpoint {checkpoints / str(2 * SPE)}: No "
                        r"space left on device \(ENOSPC\)", _error_line(err)), err
    assert not _unfinished(workdir)
    assert _steps(workdir) == [SPE]
    resumed = tmp_path / "resumed"
    shutil.copytree(workdir, resumed, ignore=shutil.ignore_patterns(".lock"))
    _resumes_to_the_end(capsys, idx_dir, resumed, straight,
                        resumed.absolute() / "checkpoints" / str(SPE))


# In this long-lived process, TensorStore may complete the failed save's last callbacks on
# Orbax's closed event loop after the run has returned; the program itself prints nothing
# then (it has exited), and drops them while it runs (train.checkpoints.quiet_orbax).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_full_disk_during_a_save(idx_dir, tmp_path, capsys, straight):
    with _tmpfs(tmp_path / "disk", f"size={SMALL_DISK}") as disk:
        workdir = disk / "w"
        code, _, err = _main(capsys, *_args(idx_dir, workdir))
        assert code == EXIT_STORAGE
        _check_full_disk_outcome(capsys, idx_dir, workdir, err, straight, tmp_path)


# In this long-lived process, TensorStore may complete the failed save's last callbacks on
# Orbax's closed event loop after the run has returned; the program itself prints nothing
# then (it has exited), and drops them while it runs (train.checkpoints.quiet_orbax).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_simulated_full_disk_during_a_save(idx_dir, tmp_path, capsys, monkeypatch, straight):
    """The same, with the disk filling up inside Orbax's background save (any machine)."""
    original = ocp.JsonCheckpointHandler._save_fn

    async def save(self, item, directory):
        if item["step"] == 2 * SPE:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory))
        return await original(self, item, directory)

    monkeypatch.setattr(ocp.JsonCheckpointHandler, "_save_fn", save)
    workdir = tmp_path / "w"
    code, _, err = _main(capsys, *_args(idx_dir, workdir))
    monkeypatch.setattr(ocp.JsonCheckpointHandler, "_save_fn", original)
    assert code == EXIT_STORAGE
    _check_full_disk_outcome(capsys, idx_dir, workdir, err, straight, tmp_path)


# ------------------------------------------------------------------------------------------
# 5. Ctrl-C, again and again, during the first save.


def test_repeated_ctrl_c_during_the_first_save_tells_the_truth(idx_dir, tmp_path, capsys,
                                                               monkeypatch, straight):
    original = ocp.JsonCheckpointHandler._save_fn

    async def slow_save(self, item, directory):
        if item["step"] == SPE:
            time.sleep(1.5)  # In Orbax's background thread: the first save takes a while.
        return await original(self, item, directory)

    def press_ctrl_c_five_times():
        for _ in range(5):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)

    def on_step(epoch, step):
        if step == SPE + 1:  # The first checkpoint's save has just started.
            threading.Thread(target=press_ctrl_c_five_times).start()
            # The training waits here for the first press (however long the machine takes to
            # run the thread); the other four come while the save is being finished.
            time.sleep(60)
            raise AssertionError("Ctrl-C did not interrupt the training")

    monkeypatch.setattr(ocp.JsonCheckpointHandler, "_save_fn", slow_save)
    # Ctrl-C as in a terminal: a session started in the background (`pytest &`) inherits
    # SIGINT ignored, and Python then installs no handler for it.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    original_run = lenet.train_and_evaluate
    monkeypatch.setattr(lenet, "train_and_evaluate",
                        lambda *a, **k: original_run(*a, on_step=on_step, **k))
    workdir = tmp_path / "w"
    try:
        code, out, err = _main(capsys, *_args(idx_dir, workdir))
    finally:
        signal.signal(signal.SIGINT, previous)
    monkeypatch.undo()
    assert code == EXIT_INTERRUPTED
    assert "cannot schedule new futures" not in out + err
    match = re.search(r"^interrupted; the latest checkpoint, (\S+), is complete: continue with "
                      "--resume$", err, re.MULTILINE)
    assert match, err
    checkpoint = Path(match[1])
    assert checkpoint.parent == workdir.absolute() / "checkpoints" and checkpoint.is_dir()
    assert not _unfinished(workdir)
    _resumes_to_the_end(capsys, idx_dir, workdir, straight, checkpoint)


def test_sigterm_during_the_first_save_stops_like_ctrl_c(idx_dir, tmp_path, capsys,
                                                       monkeypatch, straight):
    """What a scheduler sends to preempt a job: the save in progress finishes, the message
    names the complete checkpoint, exit status 143, and --resume ends where an
    uninterrupted run ends."""
    original = ocp.JsonCheckpointHandler._save_fn

    async def slow_save(self, item, directory):
        if item["step"] == SPE:
            time.sleep(1.5)  # In Orbax's background thread: the first save takes a while.
        return await original(self, item, directory)

    def send_sigterm_twice():
        for _ in range(2):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.1)

    def on_step(epoch, step):
        if step == SPE + 1:  # The first checkpoint's save has just started.
            threading.Thread(target=send_sigterm_twice).start()
            time.sleep(60)
            raise AssertionError("SIGTERM did not stop the training")

    def unhandled(signum, frame):  # Where the program handles none, instead of dying.
        raise AssertionError("the program did not handle SIGTERM")

    monkeypatch.setattr(ocp.JsonCheckpointHandler, "_save_fn", slow_save)
    previous = signal.signal(signal.SIGTERM, unhandled)
    original_run = lenet.train_and_evaluate
    monkeypatch.setattr(lenet, "train_and_evaluate",
                        lambda *a, **k: original_run(*a, on_step=on_step, **k))
    workdir = tmp_path / "w"
    try:
        code, out, err = _main(capsys, *_args(idx_dir, workdir))
        assert signal.getsignal(signal.SIGTERM) is unhandled  # Restored after the run.
    finally:
        signal.signal(signal.SIGTERM, previous)
    monkeypatch.undo()
    assert code == EXIT_TERMINATED
    match = re.search(r"^terminated \(SIGTERM\); the latest checkpoint, (\S+), is complete: "
                      "continue with --resume$", err, re.MULTILINE)
    assert match, err
    checkpoint = Path(match[1])
    assert checkpoint == workdir.absolute() / "checkpoints" / str(SPE) and checkpoint.is_dir()
    assert not _unfinished(workdir)
    _resumes_to_the_end(capsys, idx_dir, workdir, straight, checkpoint)


def test_resume_after_a_save_that_never_finished_says_so(idx_dir, tmp_path, capsys):
    """A run killed during its first save leaves only Orbax's temporary directory."""
    workdir = tmp_path / "w"
    (workdir / "checkpoints" / f"{SPE}.orbax-checkpoint-tmp-1234").mkdir(parents=True)
    (workdir / "metrics.jsonl").write_text('{"epoch": 1, "step": 8}\n')
    code, out, _ = _main(capsys, *_args(idx_dir, workdir, "--resume", "--max-steps", 2))
    assert code == 0
    line = out.splitlines()[0]
    assert line.startswith(f"--resume: no checkpoint to resume from in {workdir / 'checkpoints'}"
                           "; starting from scratch: moved the previous run's checkpoints [] "
                           f"(with an unfinished save, {SPE}.orbax-checkpoint-tmp-1234), "
                           "metrics.jsonl to "), line
    assert "pass --resume" not in out


# ------------------------------------------------------------------------------------------
# 6. Flags and environment.


def test_weight_decay_nan_is_refused(idx_dir, tmp_path, capsys):
    code, _, err = _main(capsys, *_args(idx_dir, tmp_path, "--weight-decay", "nan"))
    assert code == 2
    assert _error_line(err) == "error: --weight-decay: expected a finite number >= 0, got nan"


def test_data_dir_variable_that_does_not_exist_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("JAXBN_DATA_DIR", "/nonexistent")
    code, _, err = _main(capsys, "--workdir", str(tmp_path), "--max-steps", "1",
                         "--no-progress")
    assert code == 2
    assert _error_line(err).startswith("error: $JAXBN_DATA_DIR=/nonexistent: expected a "
                                       "directory holding the IDX files")


def _run_program(*argv, timeout=120, env=None) -> subprocess.CompletedProcess:
    """``python -m train.lenet`` in a fresh process, where JAX has not started yet."""
    env = {**os.environ, **(env or {})}
    env.pop("XLA_FLAGS", None)  # No fake devices made in advance: the program makes them.
    return subprocess.run([sys.executable, "-m", "train.lenet", *argv], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_more_devices_than_the_machine_holds_is_refused_at_once(idx_dir, tmp_path):
    """Thousands of fake CPU devices on a few cores would miss XLA's collective deadlines
    (or exhaust memory) after minutes: refused before any device is made."""
    from train.devices import max_fake_devices

    limit, _ = max_fake_devices()
    n = 2 * limit  # Divides the batch, so only the device limit can refuse it.
    started = time.monotonic()
    run = _run_program(*_args(idx_dir, tmp_path / "w", "--devices", n, "--batch-size", n),
                       timeout=60)
    assert run.returncode == 2, run.stderr[-2000:]
    assert re.fullmatch(rf"error: --devices {n}: expected at most {limit} fake CPU devices per "
                        r"process on this machine \(.+\); more would miss XLA's collective "
                        r"deadlines or run out of memory. Use fewer devices \(or more "
                        r"processes\)", _error_line(run.stderr)), run.stderr
    assert time.monotonic() - started < 30


def test_the_device_limit_follows_cores_and_memory(monkeypatch):
    from train import devices

    monkeypatch.setattr(devices, "_available_memory", lambda: 1 << 40)
    limit, reason = devices.max_fake_devices()
    assert limit == devices.FAKE_DEVICES_PER_CORE * len(os.sched_getaffinity(0))
    assert reason.startswith(f"{devices.FAKE_DEVICES_PER_CORE} per CPU core")
    monkeypatch.setattr(devices, "_available_memory", lambda: 5 * devices.FAKE_DEVICE_BYTES + 1)
    assert devices.max_fake_devices() == (5, "0.1 GiB of available memory at 16 MiB each")


@pytest.mark.parametrize("how", ["no test images", "32x32 images"])
def test_unusable_data_is_refused_before_training(tmp_path, capsys, how):
    """Found at the start, not after an epoch: exit 2, one line naming the file."""
    rng = np.random.default_rng(0)
    train_images, train_labels = learnable_images(64, rng)
    test_images, test_labels = learnable_images(8, rng)
    if how == "no test images":
        test_images, test_labels = test_images[:0], test_labels[:0]
        name, message = "t10k-images-idx3-ubyte.gz", "empty split: expected at least one " \
                                                       "image, found 0"
    else:
        train_images, test_images = (np.pad(x, ((0, 0), (2, 2), (2, 2)))
                                     for x in (train_images, test_images))
        name, message = "train-images-idx3-ubyte.gz", "expected 28x28x1 images (LeNet's " \
                                                        "input), found 32x32x1"
    data_dir = idx.write_idx_dataset(tmp_path / "data", train_images, train_labels,
                                     test_images, test_labels)
    code, out, err = _main(capsys, *_args(data_dir, tmp_path / "w"))
    assert code == 2
    assert _error_line(err) == f"error: {data_dir / name}: {message}"
    assert "epoch" not in out and not (tmp_path / "w" / "checkpoints").exists(), out


@pytest.mark.parametrize("flags, message", [
    (["--optimizer", "rmsprop"],
     "argument --optimizer: invalid choice: 'rmsprop' (choose from 'sgd', 'adam')"),
    (["--bogus-flag"], "unrecognized arguments: --bogus-flag"),
    (["--epochs", "1.5"], "argument --epochs: invalid int value: '1.5'"),
])
def test_flags_argparse_rejects_are_one_line(tmp_path, capsys, flags, message):
    code, out, err = _main(capsys, "--workdir", str(tmp_path), *flags)
    assert code == 2 and not out
    assert err == f"error: {message}; see python -m train.lenet --help\n"


def test_a_seed_beyond_32_bits_is_refused(tmp_path, capsys):
    code, _, err = _main(capsys, "--workdir", str(tmp_path), "--seed",
                         "99999999999999999999999")
    assert code == 2
    assert _error_line(err) == ("error: --seed: expected an integer in [0, 4294967295], got "
                                "99999999999999999999999")


def test_a_workdir_that_is_a_file_is_not_a_directory(idx_dir, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    code, _, err = _main(capsys, *_args(idx_dir, tmp_path / "file"))
    assert code == EXIT_STORAGE
    assert _error_line(err) == (f"error: cannot use --workdir {tmp_path / 'file'}: Not a "
                                "directory (ENOTDIR)")


def test_an_unknown_dataset_is_one_line(tmp_path, capsys, monkeypatch):
    pytest.importorskip("tensorflow_datasets")
    from train import data

    monkeypatch.delenv("JAXBN_DATA_DIR", raising=False)
    monkeypatch.setattr(data, "DEBIAN_DATASETS_ROOT", str(tmp_path))
    code, _, err = _main(capsys, "--workdir", str(tmp_path / "w"), "--dataset",
                         "nonexistent_ds", "--no-progress")
    assert code == 2
    assert err.count("\n") == 1, err  # Not TFDS's catalogue of datasets.
    assert _error_line(err) == (
        "error: --dataset nonexistent_ds: unknown dataset: expected a TFDS dataset name or "
        f"IDX files for it, found neither ($JAXBN_DATA_DIR: not set; Debian: "
        f"{tmp_path / 'nonexistent-ds'}: no such directory; TFDS: no dataset "
        "'nonexistent_ds')")
