"""The training program's configuration: every option defined once, as a :class:`Config` field.

Each field carries an :class:`Option` in its metadata: the flag's help text and choices, the
check of its value, what ``--resume`` does when the value differs from the checkpoint's, and
whether the value changes the compiled training step. Everything else is derived from these
definitions: the flags and ``--help`` (:func:`build_parser`), :class:`Config`'s docstring,
the checks (:func:`validate`), the resume rules (:func:`check_resumable`) and the cache key
of the compiled steps (:func:`compile_key`).

Example:
    >>> args = parse_args(["--epochs", "2", "--workdir", "/tmp/run"])
    >>> args.config.epochs, args.workdir
    (2, '/tmp/run')
    >>> compile_key(Config(seed=3, max_steps=7)) == compile_key(Config())
    True
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import math
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from train import distributed
from train.errors import ConfigError, exit_codes_help
from train.model import ACTIVATIONS, BN_POSITIONS, CONVS, NORMS

__all__ = [
    "FREEZE_IMAGES",
    "OPTIMIZERS",
    "SCHEDULES",
    "CommandLine",
    "Config",
    "MAX_SEED",
    "OneLineErrorParser",
    "Option",
    "Resume",
    "build_parser",
    "check_resumable",
    "compile_key",
    "field_error",
    "parse_args",
    "validate",
]

OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("constant", "cosine", "step")
#: Where ``python -m train.lenet`` writes unless ``--workdir`` says otherwise.
DEFAULT_WORKDIR = "runs/lenet"
#: Training images PreciseBN uses at the FrozenBN switch when ``--precise-bn`` is 0
#: (Wu & Johnson, 2021, find 10^3 to 10^4 enough).
FREEZE_IMAGES = 10_240


class Resume(enum.Enum):
    """What ``--resume`` does when an option differs from the checkpoint's."""

    #: The option fixes the shapes of the state: the checkpoint cannot be restored.
    REFUSE = "refuse"
    #: The run will differ from an uninterrupted one: say so on stderr.
    WARN = "warn"
    #: The option does not change the result (where data is, speed, output): say nothing.
    ALLOW = "allow"


@dataclasses.dataclass(frozen=True)
class Option:
    """How a :class:`Config` field appears on the command line and behaves across runs.

    Attributes:
        help: The flag's help text (and the field's description).
        choices: The allowed values, or ``None``.
        check: ``check(value)`` returns what was expected (``"a positive integer"``) when
            the value is bad, else ``None``.
        resume: What ``--resume`` does when the value differs from the checkpoint's.
        compiled: Whether the value changes the compiled training or evaluation step.
    """

    help: str
    choices: tuple[Any, ...] | None = None
    check: Callable[[Any], str | None] | None = None
    resume: Resume = Resume.WARN
    compiled: bool = True


def _option(default: Any, help: str, **kwargs: Any) -> Any:
    return dataclasses.field(default=default, metadata={"option": Option(help, **kwargs)})


def _positive_int(value: int | None) -> str | None:
    return None if value is None or value > 0 else "a positive integer"


def _non_negative_int(value: int) -> str | None:
    return None if value >= 0 else "a non-negative integer"


def _positive(value: float) -> str | None:
    return None if math.isfinite(value) and value > 0 else "a finite number > 0"


def _non_negative(value: float) -> str | None:
    return None if math.isfinite(value) and value >= 0 else "a finite number >= 0"


#: Seeds are unsigned 32-bit integers (``jax.random.key`` and numpy take them all).
MAX_SEED = 2**32 - 1


def _seed(value: int) -> str | None:
    return None if 0 <= value <= MAX_SEED else f"an integer in [0, {MAX_SEED}]"


def _fraction(value: float) -> str | None:
    return None if 0 <= value <= 1 else "a number in [0, 1]"


@dataclasses.dataclass(frozen=True)
class Config:
    dataset: str = _option("fashion_mnist", "dataset name (fashion_mnist, mnist, ...; see "
                           "train.data)", resume=Resume.REFUSE)
    data_dir: str | None = _option(None, "directory with the four IDX files (default: search "
                                   "$JAXBN_DATA_DIR, Debian's, TFDS)", resume=Resume.ALLOW,
                                   compiled=False)
    epochs: int = _option(5, "epochs (also the length of the learning-rate schedule)",
                          check=_positive_int)
    batch_size: int = _option(128, "global batch size, split evenly over --devices",
                              check=_positive_int)
    optimizer: str = _option("sgd", "sgd (momentum 0.9, L2 on the kernels) or adam (AdamW)",
                             choices=OPTIMIZERS, resume=Resume.REFUSE)
    lr: float = _option(0.05, "peak learning rate", check=_positive)
    schedule: str = _option("cosine", "learning-rate schedule: constant, cosine (to 0) or "
                            "step (x0.1 at 50%% and 75%%)", choices=SCHEDULES)
    warmup_epochs: float = _option(0.0, "linear warm-up from 0 to --lr, in epochs (may be "
                                   "fractional; less than --epochs)")
    weight_decay: float = _option(5e-4, "decay of the conv and dense kernels (not biases or "
                                  "BN)", check=_non_negative)
    norm: str = _option("jaxbn", "batch norm implementation: jaxbn, flax, or none (no BN)",
                        choices=NORMS, resume=Resume.REFUSE)
    bn_position: str = _option("before_relu", "BN before or after the activation",
                               choices=BN_POSITIONS)
    activation: str = _option("relu", "nonlinearity", choices=tuple(ACTIVATIONS))
    bn_momentum: float = _option(0.9, "BN running-average decay (flax convention; PyTorch's "
                                 "0.1 is 0.9)", check=_fraction)
    precise_bn: int = _option(0, "PreciseBN: after each epoch (and at the end), recompute "
                              "BN's statistics from N training images with the weights fixed "
                              "(rounded up to whole batches), then evaluate and checkpoint "
                              "with them; the metrics report the test accuracy with both "
                              "these and the running averages. 0: off",
                              check=_non_negative_int, compiled=False)
    freeze_bn_epochs: int = _option(0, "FrozenBN: train the last K epochs with BN normalizing "
                                    "with population statistics, recomputed by PreciseBN "
                                    "(from --precise-bn images, or "
                                    f"{FREEZE_IMAGES} if 0) when they start and fixed from "
                                    "then on. 0: off", check=_non_negative_int,
                                    compiled=False)
    fused_bn: bool = _option(False, "fuse each BN with the activation after it "
                             "(jaxbn.linen.BatchNormAct: same results, less memory); needs "
                             "--norm jaxbn and --bn-position before_relu",
                             resume=Resume.ALLOW)
    conv: str = _option("fast", "fast: train.conv (im2col, custom VJP; fastest on CPU); "
                        "flax: flax.linen.Conv", choices=CONVS)
    seed: int = _option(0, "initialization and data-order seed", check=_seed, compiled=False)
    devices: int = _option(1, "data-parallel devices (synchronized BN), over all processes; "
                           "fake CPU devices are created if needed", check=_positive_int,
                           resume=Resume.ALLOW)
    resume: bool = _option(False, "continue from the latest intact checkpoint in --workdir "
                           "(without it, a previous run's outputs there are moved to "
                           "--workdir/previous/<timestamp>/)", resume=Resume.ALLOW,
                           compiled=False)
    max_steps: int | None = _option(None, "stop after this many training steps in all",
                                    check=_positive_int, resume=Resume.ALLOW, compiled=False)
    eval_batch_size: int = _option(1000, "evaluation batch size (rounded up to a multiple of "
                                   "--devices)", check=_positive_int, resume=Resume.ALLOW,
                                   compiled=False)
    train_subset: int | None = _option(None, "use only the first N training images",
                                       check=_positive_int, compiled=False)
    test_subset: int | None = _option(None, "use only the first N test images",
                                      check=_positive_int, compiled=False)
    progress: bool = _option(True, "show a progress bar", resume=Resume.ALLOW, compiled=False)
    debug: bool = _option(False, "on an error, show the traceback and Orbax's log (without "
                          "it: one line)", resume=Resume.ALLOW, compiled=False)


def _options() -> dict[str, Option]:
    return {f.name: f.metadata["option"] for f in dataclasses.fields(Config)}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


Config.__doc__ = (
    "Hyperparameters of a run: the command-line flags, less ``--workdir`` and the\n"
    "    multi-process settings.\n\n    Attributes:\n" + "".join(
        f"        {name}: {opt.help.replace('%%', '%')}.\n" for name, opt in _options().items()
    )
)


def field_error(config: Config, name: str) -> str | None:
    """The error message for field ``name`` of ``config``, or ``None`` if its value is good.

    Args:
        config: The configuration.
        name: A field name.

    Returns:
        ``"--flag: expected ..., got ..."``, or ``None``.

    Example:
        >>> field_error(Config(optimizer="rmsprop"), "optimizer")
        "--optimizer: expected one of sgd, adam, got 'rmsprop'"
    """
    option, value = _options()[name], getattr(config, name)
    if option.choices is not None and value not in option.choices:
        expected = "one of " + ", ".join(map(str, option.choices))
    elif option.check is not None:
        expected = option.check(value)
    else:
        expected = None
    return None if expected is None else f"{_flag(name)}: expected {expected}, got {value!r}"


def validate(config: Config) -> None:
    """Checks the options that do not depend on the data.

    Args:
        config: The run's configuration.

    Raises:
        ConfigError: An option is out of range; the message names the flag.
    """
    for name in _options():
        error = field_error(config, name)
        if error is not None:
            raise ConfigError(error)
    if not 0 <= config.warmup_epochs < config.epochs:
        raise ConfigError(
            f"--warmup-epochs: expected in [0, --epochs={config.epochs}), "
            f"got {config.warmup_epochs}"
        )
    if not config.freeze_bn_epochs < config.epochs:
        raise ConfigError(
            f"--freeze-bn-epochs: expected fewer than --epochs={config.epochs} (BN trains "
            f"with batch statistics first), got {config.freeze_bn_epochs}"
        )
    if config.norm == "none" and (config.precise_bn or config.freeze_bn_epochs):
        flag = "--precise-bn" if config.precise_bn else "--freeze-bn-epochs"
        raise ConfigError(
            f"{flag} needs Batch Normalization: expected --norm jaxbn or flax, got --norm none"
        )
    if config.fused_bn and (config.norm, config.bn_position) != ("jaxbn", "before_relu"):
        raise ConfigError(
            f"--fused-bn fuses jaxbn's BN with the activation after it: expected --norm jaxbn "
            f"--bn-position before_relu, got --norm {config.norm} --bn-position "
            f"{config.bn_position}")
    if config.batch_size % config.devices:
        raise ConfigError(
            f"--batch-size {config.batch_size} must be divisible by --devices "
            f"{config.devices} (each device gets batch_size / devices examples); got "
            f"remainder {config.batch_size % config.devices}"
        )


def compile_key(config: Config) -> Config:
    """``config`` with the fields that do not change the compiled steps set to defaults.

    Runs whose keys are equal can share compiled steps.
    """
    default = Config()
    return dataclasses.replace(config, **{
        name: getattr(default, name) for name, option in _options().items()
        if not option.compiled})


def check_resumable(saved: Mapping[str, Any], config: Config, checkpoint: Path) -> list[str]:
    """Compares the options a checkpoint was made with to this run's.

    Args:
        saved: The checkpoint's ``config`` (options it lacks are not compared).
        config: This run's configuration.
        checkpoint: The checkpoint, for the message.

    Returns:
        ``"name: saved -> now"`` for each option that differs and makes the run differ from
        an uninterrupted one.

    Raises:
        ConfigError: An option that fixes the state's shapes differs.
    """
    changed = []
    for name, option in _options().items():
        now = getattr(config, name)
        if name not in saved or saved[name] == now or option.resume is Resume.ALLOW:
            continue
        if option.resume is Resume.REFUSE:
            raise ConfigError(
                f"--resume: checkpoint {checkpoint} was made with {name}={saved[name]!r}, "
                f"got {name}={now!r}; pass the same value or use another --workdir"
            )
        changed.append(f"{name}: {saved[name]!r} -> {now!r}")
    return changed


# --------------------------------------------------------------------------------------------
# Command line.


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter,
                     argparse.RawDescriptionHelpFormatter):
    """Shows defaults, and keeps the epilog's lines (the exit statuses) as written."""


class OneLineErrorParser(argparse.ArgumentParser):
    """An :class:`argparse.ArgumentParser` whose errors are one line, as the program's are.

    ``error: <what argparse found>; see <prog> --help`` on stderr and exit status 2, instead
    of the usage followed by the error.

    Example:
        >>> import contextlib, io
        >>> err = io.StringIO()
        >>> with contextlib.redirect_stderr(err):
        ...     try:
        ...         OneLineErrorParser(prog="prog").parse_args(["--bogus"])
        ...     except SystemExit as e:
        ...         print(e.code)
        2
        >>> print(err.getvalue(), end="")
        error: unrecognized arguments: --bogus; see prog --help
    """

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"error: {' '.join(message.split())}; see {self.prog} --help\n")


def _flag_type(name: str) -> type:
    hint = typing.get_type_hints(Config)[name]
    if isinstance(hint, types.UnionType):
        (hint,) = [a for a in typing.get_args(hint) if a is not type(None)]
    return hint


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m train.lenet``: one flag per :class:`Config` field, plus
    ``--workdir`` and the multi-process settings."""
    parser = OneLineErrorParser(
        prog="python -m train.lenet",
        description="Train the seed's LeNet with Batch Normalization and report test accuracy.",
        formatter_class=_HelpFormatter,
        epilog=exit_codes_help(),
    )
    for field in dataclasses.fields(Config):
        option, kind = field.metadata["option"], _flag_type(field.name)
        kwargs: dict[str, Any] = {"default": field.default, "help": option.help}
        if kind is bool:
            kwargs["action"] = "store_true" if not field.default else \
                argparse.BooleanOptionalAction
        else:
            kwargs.update(type=kind, choices=option.choices)
        parser.add_argument(_flag(field.name), **kwargs)
    parser.add_argument("--workdir", default=DEFAULT_WORKDIR,
                        help="checkpoints, metrics.jsonl and curves.png (locked while a run "
                             "uses it)")
    group = parser.add_argument_group(
        "multi-process runs",
        "Every process runs the same command. Each setting defaults to its JAXBN_* "
        "environment variable, else to what jax.distributed.initialize detects (SLURM, "
        "Cloud TPU, Open MPI); with none, the run is single-process.",
    )
    group.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                       help="address of process 0, reachable by all "
                            f"(${distributed.ENV_COORDINATOR})")
    group.add_argument("--num-processes", type=int, default=None,
                       help=f"number of processes (${distributed.ENV_NUM_PROCESSES})")
    group.add_argument("--process-id", type=int, default=None,
                       help=f"this process's id, 0 .. N-1 (${distributed.ENV_PROCESS_ID})")
    return parser


class CommandLine(NamedTuple):
    """What the command line says: the configuration, the workdir and where the process runs."""

    config: Config
    workdir: str
    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None


def parse_args(argv: Sequence[str] | None = None) -> CommandLine:
    """Parses the command line of ``python -m train.lenet``.

    Args:
        argv: Arguments without the program name; ``None`` for ``sys.argv[1:]``.

    Returns:
        The :class:`CommandLine`.
    """
    args = vars(build_parser().parse_args(argv))
    config = Config(**{name: args.pop(name) for name in _options()})
    return CommandLine(config, **args)
