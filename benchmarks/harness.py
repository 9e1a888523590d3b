"""Guarded measurement shared by the benchmarks: threads, load, page faults, paired ratios.

A timing on a shared machine means something only if both sides ran under the same thread
settings, nothing else competed for the cores while they ran, and the comparison cancels the
machine's drift. This module gives the benchmarks one way to do each:

* :func:`configure_threads` pins the process to ``n`` CPUs **before** JAX and PyTorch start
  their thread pools: XLA:CPU sizes its intra-op pool by the CPUs the process may run on
  (``sched_getaffinity``), PyTorch by ``torch.set_num_threads``/``OMP_NUM_THREADS``, so the
  same affinity mask and the same count pin both. OpenMP's wait policy is left at its default
  (PyTorch's threads spin briefly after each parallel region, then sleep): made passive, they
  fall asleep between operators and PyTorch's LeNet step takes 1.5x as long, which would be
  no fair anchor. The spinning is kept from one side's sample into the other's by
  :func:`interleaved`'s ``settle_s``.
* :class:`LoadGuard` measures the CPU time that *other* processes take (per process, from
  ``/proc/<pid>/stat``; the system total from ``/proc/stat``) over a quiet probe before timing
  and over each timed window, with ``/proc/loadavg``. A window in which other processes took
  more than ``max_foreign_cores`` cores marks the result ``reliable: false``, and the guard
  prints a warning naming the biggest competitors.
* :func:`interleaved` times several zero-argument callables in rounds ``B P1 B P2 ... Pk B``
  (peers in a fresh random order each round), each peer against the mean of the two base
  samples around it, and returns per-call times, ``base / peer`` time ratios and minor page
  faults per call (``getrusage``'s ``ru_minflt``); :func:`summary` gives median and quartiles.
* :func:`machine_info` names the machine (CPU model, cores, memory, accelerator) for the
  JSON and the tables; :func:`run_processes` repeats a benchmark in fresh processes.

Example:
    >>> from benchmarks import harness
    >>> harness.summary([3.0, 1.0, 2.0, 4.0, 5.0])
    {'median': 3.0, 'q1': 2.0, 'q3': 4.0, 'n': 5}
    >>> res = harness.interleaved({"a": lambda: None, "b": lambda: None}, "a", rounds=3,
    ...                           warmup=1, sample_s=1e-4, max_inner=5)
    >>> sorted(res.ratios), len(res.ratios["b"]), len(res.faults["a"]) > 0
    (['b'], 3, True)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

_HZ = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

#: Other processes may use at most this many cores (averaged over a timed window) before the
#: window's numbers count as unreliable.
MAX_FOREIGN_CORES = 0.15


# ----------------------------------------------------------------------------------------
# Threads.


def usable_cpus() -> list[int]:
    """The CPUs this process may run on (all of them where affinity is not supported)."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def configure_threads(threads: int | None = None, *, wait_policy: str | None = None) -> int:
    """Pins this process to ``threads`` CPUs and sets PyTorch's thread environment to match.

    Call before JAX's CPU backend is initialised (the first array op) and before ``torch`` is
    imported; call :func:`pin_torch` after importing torch. Variables already set by the
    user win (``OMP_NUM_THREADS``, ``OMP_WAIT_POLICY``).

    Args:
        threads: number of CPUs to use; ``None`` uses all usable ones.
        wait_policy: ``OMP_WAIT_POLICY`` for PyTorch's OpenMP threads (``'PASSIVE'``,
            ``'ACTIVE'``), or ``None`` for OpenMP's default (spin briefly, then sleep),
            PyTorch's fastest setting on CPU.

    Returns:
        The number of threads both sides will use.

    Raises:
        ValueError: if ``threads`` is not in ``1..len(usable_cpus())``.
    """
    cpus = usable_cpus()
    n = len(cpus) if threads is None else threads
    if not 1 <= n <= len(cpus):
        raise ValueError(f"threads: expected 1..{len(cpus)} (usable CPUs), got {threads}")
    if n < len(cpus) and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cpus[:n])
    os.environ.setdefault("OMP_NUM_THREADS", str(n))
    os.environ.setdefault("MKL_NUM_THREADS", str(n))
    if wait_policy is not None:
        os.environ.setdefault("OMP_WAIT_POLICY", wait_policy)
    return n


def pin_torch(torch: Any, threads: int) -> dict[str, Any]:
    """Sets PyTorch's intra-op threads to ``threads``; returns what it reports."""
    torch.set_num_threads(threads)
    with contextlib.suppress(RuntimeError):  # allowed once, before any inter-op work
        torch.set_num_interop_threads(1)
    return {"torch_threads": torch.get_num_threads(),
            "torch_interop_threads": torch.get_num_interop_threads()}


def thread_settings(threads: int) -> dict[str, Any]:
    """What both sides were told, for the JSON."""
    return {"threads": threads, "affinity": usable_cpus(),
            **{k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY",
                                                "XLA_FLAGS", "GLIBC_TUNABLES", "LD_PRELOAD")}}


# ----------------------------------------------------------------------------------------
# The machine.


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (``platform.processor()`` elsewhere)."""
    for line in _read("/proc/cpuinfo").splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """CPU model, core counts, memory, kernel and (if JAX is imported) the accelerator."""
    mem_kib = 0
    for line in _read("/proc/meminfo").splitlines():
        if line.startswith("MemTotal:"):
            mem_kib = int(line.split()[1])
    info: dict[str, Any] = {
        "cpu_model": cpu_model(), "cpu_count": os.cpu_count(), "usable_cpus": len(usable_cpus()),
        "memory_GiB": round(mem_kib / 2**20, 1), "kernel": platform.release(),
        "python": platform.python_version(),
    }
    jax = sys.modules.get("jax")
    if jax is not None:
        dev = jax.devices()[0]
        info.update(platform=dev.platform, device_kind=getattr(dev, "device_kind", ""),
                    device_count=jax.device_count(), jax=jax.__version__)
    return info


def machine_name(info: dict[str, Any]) -> str:
    """One line for a table's header: the accelerator (if any), the CPU and its cores."""
    cpu = f"{info['cpu_model']}, {info['usable_cpus']}/{info['cpu_count']} cores"
    if info.get("platform") not in (None, "cpu"):
        return f"{info['device_kind']} ({info['platform']}); host {cpu}"
    return cpu


# ----------------------------------------------------------------------------------------
# Load.


def _loadavg() -> list[float]:
    parts = _read("/proc/loadavg").split()
    return [float(p) for p in parts[:3]] if parts else []


def _system_jiffies() -> tuple[int, int]:
    """``(busy, total)`` jiffies of all CPUs from ``/proc/stat``."""
    line = _read("/proc/stat").split("\n", 1)[0].split()
    if not line or line[0] != "cpu":
        return 0, 0
    vals = [int(v) for v in line[1:9]]
    idle = vals[3] + vals[4]  # idle + iowait
    return sum(vals) - idle, sum(vals)


def _processes() -> dict[int, tuple[int, str, int]]:
    """``{pid: (ppid, comm, utime + stime jiffies)}`` of every visible process."""
    out = {}
    for entry in os.scandir("/proc") if os.path.isdir("/proc") else ():
        if not entry.name.isdigit():
            continue
        text = _read(f"/proc/{entry.name}/stat")
        if not text:
            continue
        # comm is in parentheses and may contain spaces: split after the last ')'.
        head, _, rest = text.rpartition(")")
        fields = rest.split()
        try:
            out[int(entry.name)] = (int(fields[1]), head.split("(", 1)[1],
                                    int(fields[11]) + int(fields[12]))
        except (IndexError, ValueError):
            continue
    return out


def _own_tree(procs: dict[int, tuple[int, str, int]]) -> set[int]:
    """This process and its descendants (e.g. compile workers)."""
    mine = {os.getpid()}
    changed = True
    while changed:
        changed = False
        for pid, (ppid, _, _) in procs.items():
            if ppid in mine and pid not in mine:
                mine.add(pid)
                changed = True
    return mine


@dataclasses.dataclass
class _Snapshot:
    wall: float
    busy: int
    total: int
    procs: dict[int, tuple[int, str, int]]


def _snapshot() -> _Snapshot:
    busy, total = _system_jiffies()
    return _Snapshot(time.perf_counter(), busy, total, _processes())


class LoadGuard:
    """Watches other processes' CPU use around timed windows.

    Example:
        >>> g = LoadGuard(max_foreign_cores=64.0, verbose=False)
        >>> _ = g.probe(0.05)
        >>> with g.window("x"):
        ...     pass
        >>> g.reliable, len(g.windows)
        (True, 2)
    """

    def __init__(self, max_foreign_cores: float = MAX_FOREIGN_CORES, verbose: bool = True):
        self.max_foreign_cores = max_foreign_cores
        self.verbose = verbose
        self.windows: list[dict[str, Any]] = []
        self.start_loadavg = _loadavg()

    def _measure(self, label: str, a: _Snapshot, b: _Snapshot) -> dict[str, Any]:
        wall = max(b.wall - a.wall, 1e-9)
        mine = _own_tree(b.procs)
        others = []
        for pid, (_, comm, jif) in b.procs.items():
            if pid in mine:
                continue
            d = jif - a.procs[pid][2] if pid in a.procs else jif  # started in the window
            if d > 0:
                others.append((d / _HZ / wall, pid, comm))
        others.sort(reverse=True)
        foreign = sum(c for c, _, _ in others)
        own = sum(b.procs[p][2] - a.procs.get(p, (0, "", b.procs[p][2]))[2]
                  for p in mine if p in b.procs) / _HZ / wall
        sys_busy = (b.busy - a.busy) / _HZ / wall if b.total > a.total else None
        rec = {"label": label, "seconds": round(wall, 3), "loadavg": _loadavg(),
               "foreign_cores": round(foreign, 3), "own_cores": round(own, 3),
               "system_busy_cores": None if sys_busy is None else round(sys_busy, 3),
               "top": [{"pid": p, "comm": c, "cores": round(x, 3)} for x, p, c in others[:3]],
               "ok": foreign <= self.max_foreign_cores}
        self.windows.append(rec)
        if not rec["ok"] and self.verbose:
            who = ", ".join(f"{t['comm']}[{t['pid']}] {t['cores']:.2f}" for t in rec["top"])
            print(f"  WARNING: {label}: other processes used {foreign:.2f} cores "
                  f"(> {self.max_foreign_cores}; {who}); marking results unreliable",
                  file=sys.stderr, flush=True)
        return rec

    def probe(self, seconds: float = 0.5) -> dict[str, Any]:
        """Measures other processes' CPU use over ``seconds`` of idling (before timing)."""
        a = _snapshot()
        time.sleep(seconds)
        return self._measure("before", a, _snapshot())

    def window(self, label: str) -> _Window:
        """A context manager that records other processes' CPU use while it is open."""
        return _Window(self, label)

    @property
    def reliable(self) -> bool:
        """True when no recorded window had a competing process."""
        return all(w["ok"] for w in self.windows)

    def report(self) -> dict[str, Any]:
        """The guard's verdict and windows, for the JSON."""
        foreign = [w["foreign_cores"] for w in self.windows]
        return {"reliable": self.reliable, "max_foreign_cores": self.max_foreign_cores,
                "loadavg_start": self.start_loadavg, "loadavg_end": _loadavg(),
                "foreign_cores_max": max(foreign, default=0.0),
                "foreign_cores_median": statistics.median(foreign) if foreign else 0.0,
                "unreliable_windows": [w["label"] for w in self.windows if not w["ok"]],
                "windows": self.windows}


class _Window:
    def __init__(self, guard: LoadGuard, label: str):
        self.guard, self.label = guard, label
        self.result: dict[str, Any] | None = None

    def __enter__(self) -> _Window:
        self.start = _snapshot()
        return self

    def __exit__(self, *exc: object) -> None:
        self.result = self.guard._measure(self.label, self.start, _snapshot())


# ----------------------------------------------------------------------------------------
# Timing.


def minor_faults() -> int:
    """Minor page faults of this process so far (all threads)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _calibrate(call: Callable[[], Any], target_s: float, max_inner: int) -> int:
    t0 = time.perf_counter()
    call()
    dt = max(time.perf_counter() - t0, 1e-6)
    return int(max(1, min(max_inner, math.ceil(target_s / dt))))


def _sample(call: Callable[[], Any], inner: int) -> tuple[float, float]:
    """Seconds and minor page faults per call, over ``inner`` back-to-back calls."""
    f0 = minor_faults()
    t0 = time.perf_counter()
    for _ in range(inner):
        call()
    dt = time.perf_counter() - t0
    return dt / inner, (minor_faults() - f0) / inner


@dataclasses.dataclass
class Interleaved:
    """What :func:`interleaved` measured; lists have one entry per sample (or round)."""

    times: dict[str, list[float]]  # seconds per call
    ratios: dict[str, list[float]]  # base time / peer time, one per round
    faults: dict[str, list[float]]  # minor page faults per call
    inner: dict[str, int]  # calls per sample
    foreign_cores: list[float]  # other processes' cores per round (empty without a guard)

    def stats(self) -> dict[str, Any]:
        """Medians and quartiles of everything, for the JSON."""
        return {"ms": {k: summary([t * 1e3 for t in v]) for k, v in self.times.items()},
                "ratio": {k: summary(v) for k, v in self.ratios.items()},
                "faults_per_call": {k: summary(v) for k, v in self.faults.items()},
                "inner": self.inner, "foreign_cores_per_round": self.foreign_cores}


def interleaved(calls: dict[str, Callable[[], Any]], base: str, *, rounds: int, warmup: int = 2,
                sample_s: float = 0.02, max_inner: int = 50, guard: LoadGuard | None = None,
                label: str = "", seed: int = 0, settle_s: float = 0.0) -> Interleaved:
    """Times ``calls`` in interleaved rounds against ``base``.

    Each round runs the peers in a fresh random order with a ``base`` sample before the first,
    between any two and after the last (``B P1 B P2 ... Pk B``); a peer's ratio compares it
    with the mean of the two ``base`` samples around it, which cancels drift on the time scale
    of one sample. One sample is the mean of ``inner`` back-to-back calls, ``inner`` chosen
    after warm-up so that a sample lasts at least ``sample_s`` (at most ``max_inner`` calls).
    Each call must finish its work before returning (``block_until_ready``, a CUDA sync).

    Args:
        calls: zero-argument callables by name; must contain ``base``.
        base: the name every other call is compared with.
        rounds: number of rounds.
        warmup: untimed calls of each callable first.
        sample_s: minimum seconds per sample.
        max_inner: maximum calls per sample.
        guard: if given, each round is a :meth:`LoadGuard.window`.
        label: prefix of the guard windows' labels.
        seed: seed of the peers' order.
        settle_s: seconds to sleep (untimed) before each sample, so that threads still
            spinning after one callable's sample (OpenMP's, XLA's) have gone to sleep before
            the next callable's sample starts.

    Returns:
        An :class:`Interleaved`.

    Raises:
        ValueError: if ``base`` is not in ``calls`` or ``rounds < 1``.
    """
    if base not in calls:
        raise ValueError(f"base: expected one of {sorted(calls)}, got {base!r}")
    if rounds < 1:
        raise ValueError(f"rounds: expected >= 1, got {rounds}")
    for call in calls.values():
        for _ in range(warmup):
            call()
    inner = {k: _calibrate(c, sample_s, max_inner) for k, c in calls.items()}
    peers = [k for k in calls if k != base]
    times: dict[str, list[float]] = {k: [] for k in calls}
    faults: dict[str, list[float]] = {k: [] for k in calls}
    ratios: dict[str, list[float]] = {k: [] for k in peers}
    foreign: list[float] = []
    rng = random.Random(seed)

    def record(name: str) -> float:
        if settle_s > 0:
            time.sleep(settle_s)
        t, f = _sample(calls[name], inner[name])
        times[name].append(t)
        faults[name].append(f)
        return t

    for r in range(rounds):
        window = guard.window(f"{label} round {r}".strip()) if guard else None
        if window:
            window.__enter__()
        prev = record(base)
        for k in rng.sample(peers, len(peers)):
            t = record(k)
            nxt = record(base)
            ratios[k].append((prev + nxt) / 2 / t)
            prev = nxt
        if window:
            window.__exit__(None, None, None)
            foreign.append(window.result["foreign_cores"])
    return Interleaved(times, ratios, faults, inner, foreign)


def quantile(values: Sequence[float], q: float) -> float:
    """The ``q``-quantile of ``values`` (nearest rank)."""
    v = sorted(values)
    return v[round(q * (len(v) - 1))]


def summary(values: Sequence[float]) -> dict[str, Any]:
    """``{'median', 'q1', 'q3', 'n'}`` of ``values`` (``None``s when empty)."""
    if not values:
        return {"median": None, "q1": None, "q3": None, "n": 0}
    return {"median": statistics.median(values), "q1": quantile(values, 0.25),
            "q3": quantile(values, 0.75), "n": len(values)}


# ----------------------------------------------------------------------------------------
# Processes.


def run_processes(module: str, argv: Sequence[str] | None, n: int, *,
                  json_flag: str = "--json", env: dict[str, str] | None = None,
                  timeout: float | None = None) -> list[dict[str, Any]]:
    """Runs ``python -m module *argv --json TMP`` ``n`` times in fresh processes, in turn.

    Fresh processes give independent allocator, page-cache and thread-pool states; the
    median over processes is what a user sees on a new run.

    Args:
        module: module to run (``benchmarks.resnet``).
        argv: the parent's arguments (``None``: ``sys.argv[1:]``); ``--processes`` and
            ``json_flag`` are dropped from them (:func:`strip_flags`).
        n: number of processes.
        json_flag: the flag that sets the module's JSON output path.
        env: extra environment variables for the children.
        timeout: seconds per child.

    Returns:
        The parsed JSON of each child, in order.

    Raises:
        RuntimeError: if a child fails.
    """
    argv = strip_flags(list(sys.argv[1:] if argv is None else argv), "--processes", json_flag)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(n):
            path = Path(tmp) / f"{i}.json"
            cmd = [sys.executable, "-m", module, *argv, json_flag, str(path)]
            proc = subprocess.run(cmd, env={**os.environ, **(env or {})}, timeout=timeout,
                                  check=False)
            if proc.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}")
            results.append(json.loads(path.read_text()))
    return results


def fmt(value: float | None, spec: str = ".2f", width: int = 0) -> str:
    """Formats a number, or ``-`` for ``None``, right-aligned in ``width``."""
    text = "-" if value is None else format(value, spec)
    return f"{text:>{width}}"


def strip_flags(argv: list[str], *flags: str) -> list[str]:
    """``argv`` without ``flags`` and their values (``--f v`` and ``--f=v`` forms).

    What a parent passes on to the fresh processes of :func:`run_processes`.

    Example:
        >>> strip_flags(["--quick", "--json", "x.json", "--processes=3"], "--processes", "--json")
        ['--quick']
    """
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in flags:
            skip = True
            continue
        if any(a.startswith(f + "=") for f in flags):
            continue
        out.append(a)
    return out


def add_model_args(ap: argparse.ArgumentParser, json_default: Path) -> None:
    """The options the training-step benchmarks (LeNet, ResNet) share.

    ``--max-inner``, ``--processes`` (fresh processes, merged), ``--threads``, ``--malloc``
    (the training program's allocator settings or glibc's), ``--no-torch``, ``--json`` (default
    ``json_default``) and ``--show`` (print saved results, measure nothing).

    Example:
        >>> ap = argparse.ArgumentParser()
        >>> add_model_args(ap, Path("out.json"))
        >>> args = ap.parse_args(["--processes", "3"])
        >>> args.processes, args.malloc, args.json.name
        (3, 'tuned', 'out.json')
    """
    ap.add_argument("--max-inner", type=int, default=20, help="steps per sample, at most")
    ap.add_argument("--processes", type=int, default=1,
                    help="repeat in this many fresh processes and merge (median of medians)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads for both sides")
    ap.add_argument("--malloc", choices=("tuned", "default"), default="tuned",
                    help="tuned: the training program's allocator settings (train.runtime)")
    ap.add_argument("--no-torch", action="store_true", help="skip PyTorch")
    ap.add_argument("--json", type=Path, default=json_default, help="output JSON path")
    ap.add_argument("--show", type=Path, nargs="+", default=None, metavar="JSON",
                    help="measure nothing: print the tables of these saved results")


def torch_for(platform: str) -> tuple[Any, str | None]:
    """PyTorch and its device name for JAX's ``platform`` (``"cpu"``, ``"gpu"``), if usable.

    Returns:
        ``(torch, "cpu" | "cuda")``, or ``(None, None)`` when torch is missing or has no device
        for that platform.
    """
    try:
        import torch
    except ImportError:
        return None, None
    if platform == "cpu":
        return torch, "cpu"
    if platform == "gpu" and torch.cuda.is_available():
        return torch, "cuda"
    return None, None


def start_model_run(args: argparse.Namespace) -> tuple[dict[str, Any], int, str, Any, str | None]:
    """The set-up the training-step benchmarks share, in the order it must happen.

    Applies ``--malloc`` and ``--threads`` before JAX's CPU backend starts, turns JAX's
    persistent compilation cache off (compile times are a first compile's), then finds
    PyTorch for JAX's platform (unless ``--no-torch``) and pins its threads on CPU.

    Returns:
        ``(meta, threads, platform, torch, torch_device)``: ``meta`` holds the machine, thread and
        allocator settings and the arguments (JSON-ready); ``torch`` is ``None`` when it is not
        timed.
    """
    from train import runtime

    malloc = runtime.tune_allocator() if args.malloc == "tuned" else {}
    threads = configure_threads(args.threads)
    import jax

    # Compile times are a first compile's: never loaded from a persistent cache.
    jax.config.update("jax_enable_compilation_cache", False)
    platform = jax.devices()[0].platform
    torch, device = (None, None) if args.no_torch else torch_for(platform)
    meta: dict[str, Any] = {"machine": machine_info(), "threads": thread_settings(threads),
                            "malloc": malloc,
                            "args": {k: (str(v) if isinstance(v, Path) else v)
                                     for k, v in vars(args).items()}}
    if torch is not None:
        meta["torch"] = torch.__version__
        meta["torch_device"] = device
        if device == "cpu":
            meta["threads"].update(pin_torch(torch, threads))
    return meta, threads, platform, torch, device

