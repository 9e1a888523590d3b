"""One persistent XLA compilation cache for a test session and every process it starts.

Many tests run the same programs again: the training program in fresh processes (two per
multi-process run, again to resume), the same LeNet step in several in-process runs. With JAX's
persistent compilation cache in a directory made for the session, each program is compiled
once per session; later processes load it. The directory is new for every session and removed
at its end, so no test ever sees a compiled program from an earlier version of the code.
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


def enable() -> None:
    """Sets the cache's variables for this process and its children; before JAX starts.

    A directory given by the caller's environment (a parent test session's) is kept.
    """
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


def variables() -> dict[str, str]:
    """The cache's variables as set in this process, for a subprocess's clean environment."""
    return {k: os.environ[k] for k in VARIABLES if k in os.environ}
