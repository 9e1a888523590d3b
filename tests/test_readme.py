"""The README's Python examples run as written."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "the README has no python example"
    for block in blocks:
        namespace: dict = {}
        exec(compile(block, str(README), "exec"), namespace)  # noqa: S102
        if "train_step" in namespace:  # the jitted step of "Using jaxbn" really trains
            import jax
            import jax.numpy as jnp
            x = jax.random.normal(jax.random.key(0), (32, 64)) * 2 + 3
            target = jnp.zeros((32, 64))
            p, s, o = namespace["params"], namespace["stats"], namespace["opt_state"]
            p, s, o, loss = namespace["train_step"](p, s, o, x, target)
            assert int(s.count) == 1 and bool(jnp.isfinite(loss))
