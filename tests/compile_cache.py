"""How a test session and every process it starts compile: once, and without LLVM's optimizer.

Many tests run the same programs again: the training program in fresh processes (two per
multi-process run, again to resume), the same LeNet step in several in-process runs. With JAX's
persistent compilation cache in a directory made for the session, each program is compiled
once per session; later processes load it. The directory is new for every session and removed
at its end, so no test ever sees a compiled program from an earlier version of the code.

The tests check values, not speed, and most of their time is compilation: they compile with
XLA's backend optimization level 0 (:data:`XLA_FLAG`), which skips LLVM's optimization passes
(about a fifth less CPU time). The operations and their order are XLA's, unchanged; benchmarks
and the training program are never run this way outside the tests.
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
#: Added to ``XLA_FLAGS`` of the session and of the processes it starts.
XLA_FLAG = "--xla_backend_optimization_level=0"


def enable() -> None:
    """Sets the variables for this process and its children; call before JAX starts.

    A cache directory given by the caller's environment (the session's, in a pytest-xdist
    worker) is kept; only the process that made it removes it.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    if "--xla_backend_optimization_level" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {XLA_FLAG}".strip()
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
    """The cache's variables and ``XLA_FLAGS`` (:data:`XLA_FLAG` and ``xla_flags``), for a
    subprocess's clean environment."""
    env = {k: os.environ[k] for k in VARIABLES if k in os.environ}
    env["XLA_FLAGS"] = " ".join([XLA_FLAG, *xla_flags])
    return env
