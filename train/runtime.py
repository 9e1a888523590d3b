"""Process-level settings for fast XLA:CPU training steps: keep freed memory in the heap.

A jitted step on XLA:CPU allocates its temporaries as one buffer per call, and its outputs
as fresh buffers; the LeNet step's temporaries are 35-100 MiB at batch 128-512. glibc's
``malloc`` serves blocks above its mmap threshold (128 KiB, rising adaptively to at most
32 MiB) with a fresh ``mmap`` and returns them to the kernel on ``free``, so every step
page-faults its buffers in again, one minor fault per 4 KiB page (about 8,000 faults per
step at batch 128 and 24,000 at 512, each ~1 us, plus zeroing the pages). A thread's own
malloc arena (every thread gets one up to 8 per core) cannot hold a block above 64 MiB at
all and maps it whatever the settings.

:func:`tune_allocator` therefore tells glibc, through ``mallopt``:

* ``M_MMAP_MAX = 0``: never serve an allocation with its own ``mmap``; every block comes
  from the heap and is reused after ``free``;
* ``M_TRIM_THRESHOLD = 1 GiB``: do not hand freed heap memory back to the kernel until
  that much sits unused at its top (this also stops the adaptive threshold);
* ``M_ARENA_MAX = 1``: one arena (the main, ``brk`` heap) for every thread, so that large
  blocks allocated on XLA's or PyTorch's worker threads are reused too.

The cost is memory: the process keeps its peak heap (for the LeNet program, a few hundred
MiB) until it exits. Call it once at the start of a program, before JAX or PyTorch start
their threads (arenas already created keep serving the threads that own them).
Elsewhere than glibc on Linux (macOS, musl) it does nothing.

Example:
    A program's first lines (``python -m train.lenet`` does this in ``main``)::

        from train import runtime
        runtime.tune_allocator()  # {'M_MMAP_MAX': 0, ...} on glibc, {} elsewhere

    What it sets, where it applies:

    >>> from train import runtime
    >>> runtime.GLIBC_SETTINGS["M_MMAP_MAX"], runtime.GLIBC_SETTINGS["M_ARENA_MAX"]
    (0, 1)
    >>> runtime.glibc_available() in (True, False)
    True
"""

from __future__ import annotations

import ctypes
import platform
import sys

__all__ = ["GLIBC_SETTINGS", "glibc_available", "tune_allocator"]

# mallopt parameter numbers, from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

#: What :func:`tune_allocator` sets: ``mallopt`` parameter name -> value.
GLIBC_SETTINGS = {"M_MMAP_MAX": 0, "M_TRIM_THRESHOLD": 1 << 30, "M_ARENA_MAX": 1}

_PARAMS = {"M_MMAP_MAX": _M_MMAP_MAX, "M_TRIM_THRESHOLD": _M_TRIM_THRESHOLD,
           "M_ARENA_MAX": _M_ARENA_MAX}

_applied: dict[str, int] | None = None


def glibc_available() -> bool:
    """Whether this process runs on Linux with glibc (where ``mallopt`` applies)."""
    return sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


def tune_allocator() -> dict[str, int]:
    """Keeps freed memory in this process's heap (glibc ``mallopt``; see the module doc).

    Idempotent: later calls return what the first one applied.

    Returns:
        The settings applied (:data:`GLIBC_SETTINGS`), or ``{}`` where they do not apply
        (not glibc on Linux).

    Raises:
        RuntimeError: glibc refused a setting (``mallopt`` returned 0).
    """
    global _applied
    if _applied is not None:
        return dict(_applied)
    if not glibc_available():
        _applied = {}
        return {}
    libc = ctypes.CDLL(None)  # The C library already loaded into this process.
    libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    for name, value in GLIBC_SETTINGS.items():
        if libc.mallopt(_PARAMS[name], value) != 1:
            raise RuntimeError(f"mallopt({name}, {value}) failed: expected 1, got 0")
    _applied = dict(GLIBC_SETTINGS)
    return dict(_applied)
