"""What a compiled ResNet training step holds at its memory peak, from XLA's own analysis.

``memory_analysis()`` gives one number, the step's temporary bytes. This script compiles the
step of :mod:`benchmarks.resnet` with XLA's dumps on (``xla_dump_to`` as a compiler
option), reads the buffer live ranges XLA computed for its schedule, and lists what is
live at the peak, grouped by what produced it:

* ``forward``: values computed in the forward pass and kept for the backward pass (the
  saved activations), by layer;
* ``backward``: values of the backward pass (cotangents, weight gradients), by layer;
* ``layout copy``: copies XLA inserted to change a layout (``copy``, ``transpose_copy``;
  no JAX operation behind them), e.g. a convolution's input transposed for its kernel
  gradient, or a kernel transposed for the input gradient;
* ``unattributed``: other values without a JAX operation behind them (XLA left a fusion
  it made without the metadata that names one);
* ``update``: the rest of the step (the loss, the optimizer's update), by layer;
* ``argument``: the step's parameters, statistics, optimizer state and batch (not
  temporaries; listed for completeness).

Example::

    python -m benchmarks.peak_buffers --model resnet18 --norm inplace --dtype float32 \\
        --batch 32 --scheduler memory

``--norm`` is one of ``flax``, ``jaxbn``, ``fused``, ``inplace``
(:func:`benchmarks.resnet.flax_resnet`); ``--scheduler`` one of
:data:`benchmarks.resnet.CPU_SCHEDULERS`.
"""

from __future__ import annotations

import argparse
import collections
import re
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

from benchmarks import resnet


class Buffer(NamedTuple):
    """One value live at the peak: its bytes, HLO name, shape, group and layer.

    ``offset``: where it lives in the step's temporary allocation (what
    ``temp_size_in_bytes`` counts), or ``None`` when it lives in an argument's donated
    buffer or an output's.
    """

    size: int
    name: str
    shape: str
    group: str
    layer: str
    offset: int | None

    @property
    def temp(self) -> bool:
        """Whether the value lives in the temporary allocation."""
        return self.offset is not None


_INSTR = re.compile(r"^\s*(?:ROOT )?%(\S+) = (\S+) (\w[\w-]*)\(")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_LAYER = re.compile(r"/((?:BatchNormAct|BatchNorm|Conv|Dense)_\d+)/")
_LIVE = re.compile(r"^\s*(\S+?)\{[^}]*\}: (\d+) bytes")
_ALLOCATION = re.compile(r"^allocation \d+: .*$", re.M)
_VALUE = re.compile(r"value: <\d+ (\S+?)(?:\{[^}]*\})? @\d+> \(size=\d+,offset=(\d+)\)")


def _temp_offsets(assignment: str) -> dict[str, int]:
    """``name -> offset`` of the values XLA placed in the temporary allocation."""
    heads = list(_ALLOCATION.finditer(assignment))
    out: dict[str, int] = {}
    for head, nxt in zip(heads, [*heads[1:], None], strict=True):
        if "preallocated-temp" in head.group(0):
            block = assignment[head.end():nxt.start() if nxt else len(assignment)]
            out.update((name, int(offset)) for name, offset in _VALUE.findall(block))
    return out


def occupied(rows: Sequence[Buffer]) -> int:
    """Bytes of the temporary allocation that the live values cover.

    Not their sum: a value XLA computes in place shares its operand's bytes, and at the
    instruction that makes it both are live.
    """
    total, end = 0, 0
    for start, stop in sorted((r.offset, r.offset + r.size) for r in rows
                              if r.offset is not None):
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total


def _entry_instructions(hlo: str) -> dict[str, tuple[str, str, str]]:
    """``name -> (shape, opcode, op_name)`` for the entry computation's instructions."""
    out: dict[str, tuple[str, str, str]] = {}
    entry = hlo[hlo.index("\nENTRY "):]
    for line in entry.splitlines()[1:]:
        m = _INSTR.match(line)
        if m:
            op = _OP_NAME.search(line)
            out[m.group(1)] = (m.group(2), m.group(3), op.group(1) if op else "")
    return out


def classify(name: str, opcode: str, op_name: str) -> tuple[str, str]:
    """The group and layer of one HLO value (see the module docstring)."""
    if opcode == "parameter":
        return "argument", name.split("__")[0] if "__" in name else name
    layer_m = _LAYER.search(op_name)
    layer = layer_m.group(1) if layer_m else "-"
    if not op_name:
        if opcode == "copy" or name.startswith(("copy", "transpose_copy")):
            return "layout copy", "-"
        return "unattributed", "-"
    if "transpose(" in op_name:
        return "backward", layer
    if "jvp(" in op_name:
        return "forward", layer
    return "update", layer


def peak_buffers(dump: Path) -> tuple[int, list[Buffer]]:
    """The peak's position and the values live there, from one step's XLA dump."""
    live_range = next(dump.glob("*jit_step.*after_optimizations-live-range.txt")).read_text()
    hlo = next(dump.glob("*jit_step.*after_optimizations.txt")).read_text()
    assignment = next(dump.glob("*jit_step.*after_optimizations-buffer-assignment.txt"))
    offsets = _temp_offsets(assignment.read_text())
    instrs = _entry_instructions(hlo)
    head = re.search(r"Live ranges at (\d+) \(peak\):", live_range)
    if head is None:
        raise RuntimeError(f"no peak in {dump}: XLA's live-range dump changed format")
    rows = []
    for line in live_range[head.end():].splitlines():
        m = _LIVE.match(line)
        if not m:
            if line.strip():
                break
            continue
        name, size = m.group(1), int(m.group(2))
        shape, opcode, op_name = instrs.get(name, ("?", "?", ""))
        group, layer = classify(name, opcode, op_name)
        rows.append(Buffer(size, name, shape, group, layer, offsets.get(name)))
    return int(head.group(1)), sorted(rows, key=lambda r: (r.size, r.name), reverse=True)


def analyse(model_name: str, norm: str, dtype_name: str, batch: int,
            scheduler: str = "default", size: int | None = None, width: int = 64,
            blocks: int | None = None) -> dict[str, Any]:
    """Compiles the step with dumps on; returns its memory and the peak's buffers."""
    import jax.numpy as jnp

    if scheduler not in resnet.CPU_SCHEDULERS:
        raise SystemExit(f"--scheduler: expected one of {list(resnet.CPU_SCHEDULERS)}, "
                         f"got {scheduler!r}")
    model = resnet.flax_resnet(model_name, norm=norm, dtype=jnp.dtype(dtype_name), width=width,
                               blocks=blocks)
    size = size or resnet.SPECS[model_name][3]
    with tempfile.TemporaryDirectory() as tmp:
        options = dict(resnet.CPU_SCHEDULERS[scheduler], xla_dump_to=tmp)
        mem = resnet._compile_memory(model, batch, size, options)
        at, rows = peak_buffers(Path(tmp))
    return {"memory": mem, "peak_at": at, "buffers": rows}


def summary(rows: Sequence[Buffer]) -> dict[str, tuple[int, int]]:
    """Bytes live at the peak per group: ``(in the temporary allocation, elsewhere)``."""
    out: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    for r in rows:
        out[r.group][0 if r.temp else 1] += r.size
    return {k: (v[0], v[1]) for k, v in out.items()}


def print_report(res: dict[str, Any], min_mib: float, out=sys.stdout) -> None:
    def mib(b: int) -> str:
        return f"{b / 2**20:7.1f}"

    print(f"compiled temp {mib(res['memory']['temp_bytes'])} MiB; live in it at the peak "
          f"(instruction {res['peak_at']}): {mib(occupied(res['buffers']))} MiB", file=out)
    print(f"  {'group':12s} {'temp MiB':>8s} {'in argument buffers MiB':>24s}", file=out)
    for group, (t, a) in sorted(summary(res["buffers"]).items(), key=lambda kv: -sum(kv[1])):
        print(f"  {group:12s} {mib(t):>8s} {mib(a):>24s}", file=out)
    print(f"\nbuffers of at least {min_mib} MiB (temp: in the temporary allocation):", file=out)
    for r in res["buffers"]:
        if r.size >= min_mib * 2**20:
            print(f"  {mib(r.size)}  {r.group:12s} {r.layer:16s} {r.shape:30s} "
                  f"{'temp' if r.temp else '    '}  {r.name}", file=out)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="resnet18", choices=sorted(resnet.SPECS))
    ap.add_argument("--norm", default="jaxbn", choices=["flax", "jaxbn", *resnet.FUSED])
    ap.add_argument("--dtype", default="float32", choices=list(resnet.DTYPES))
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=None, help="input size (default: the model's)")
    ap.add_argument("--scheduler", default="default", choices=list(resnet.CPU_SCHEDULERS))
    ap.add_argument("--min-mib", type=float, default=1.0, help="list buffers at least this big")
    args = ap.parse_args(argv)
    res = analyse(args.model, args.norm, args.dtype, args.batch, args.scheduler, args.size)
    print_report(res, args.min_mib)
    return res


if __name__ == "__main__":
    main()
