"""How a test session and every process it starts compile: once, and without LLVM's optimizer.

Many tests run the same programs again: the training program in fresh processes (two per
multi-process run, again to resume), the same LeNet step in several in-process runs. With JAX's
persistent compilation cache in a directory made for the session, each program is compiled
once per session; later processes load it. The directory is new for every session and removed
at its end, so no test ever sees a compiled program from an earlier version of the code.

The tests check values, not speed, and most of their time is compilation: they compile with
the flags :data:`XLA_FLAGS`, which make XLA:CPU's code generation cheaper: LLVM's optimization
passes skipped (about a fifth less CPU time), fused loops emitted by XLA's classic LLVM IR
emitters instead of its newer MLIR fusion emitters, and each program's LLVM code generated as
one module rather than split for parallel code generation (together about half the CPU time of
compile-heavy tests: test_core, test_transforms and test_conv took 96 s of CPU with XLA's
defaults, 47 s with these). The HLO, its fusions and the order of its operations are XLA's,
unchanged; the parity tests hold to the same tolerances either way. Benchmarks and the training
program never run this way outside the tests.
"""

import atexit
import os
import shutil
import tempfile

#: The variables that configure the cache; a test that gives a subprocess a clean
#: environment keeps these (see :func:`variables`).
VARIABLES = ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS",
             "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES")
#: Programs that compile faster than this are not worth a file.
MIN_COMPILE_TIME_S = 0.1
#: Added to ``XLA_FLAGS`` of the session and of the processes it starts (each unless the
#: caller's ``XLA_FLAGS`` already sets it; none, and removed, if :data:`DEFAULTS_VARIABLE` is set).
XLA_FLAGS = ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false",
             "--xla_cpu_parallel_codegen_split_count=1")
#: Set (to anything) in a session's environment to compile with XLA's own defaults instead
#: (tests/test_xla_defaults.py).
DEFAULTS_VARIABLE = "JAXBN_TEST_XLA_DEFAULTS"


def enable() -> None:
    """Sets the variables for this process and its children; call before JAX starts.

    A cache directory given by the caller's environment (the session's, in a pytest-xdist
    worker) is kept; only the process that made it removes it.
    """
    flags = os.environ.get("XLA_FLAGS", "").split()
    if os.environ.get(DEFAULTS_VARIABLE):  # e.g. inherited from a session that added them
        flags = [f for f in flags if f not in XLA_FLAGS]
    names = {f.split("=")[0] for f in flags}
    flags += [f for f in _session_flags() if f.split("=")[0] not in names]
    os.environ["XLA_FLAGS"] = " ".join(flags)
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return
    path = tempfile.mkdtemp(prefix="jaxbn-test-xla-cache-")
    owner = os.getpid()
    atexit.register(lambda: os.getpid() == owner and shutil.rmtree(path, ignore_errors=True))
    os.environ.update({
        "JAX_COMPILATION_CACHE_DIR": path,
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": str(MIN_COMPILE_TIME_S),
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    })


def variables(*xla_flags: str) -> dict[str, str]:
    """The cache's variables and ``XLA_FLAGS`` (:data:`XLA_FLAGS` and ``xla_flags``), for a
    subprocess's clean environment."""
    env = {k: os.environ[k] for k in VARIABLES if k in os.environ}
    env["XLA_FLAGS"] = " ".join([*_session_flags(), *xla_flags])
    if os.environ.get(DEFAULTS_VARIABLE):
        env[DEFAULTS_VARIABLE] = os.environ[DEFAULTS_VARIABLE]
    return env


def _session_flags() -> tuple[str, ...]:
    return () if os.environ.get(DEFAULTS_VARIABLE) else XLA_FLAGS
