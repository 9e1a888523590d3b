"""The Python examples of the README and of the getting-started guide run as written."""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = ("README.md", "docs/getting_started.md")


def _python_blocks(page):
    return re.findall(r"```python\n(.*?)```", (ROOT / page).read_text(), flags=re.S)


@pytest.mark.parametrize("page", PAGES)
def test_python_blocks_run(page):
    blocks = _python_blocks(page)
    assert blocks, f"{page} has no python example"
    steps = 0
    for block in blocks:
        namespace: dict = {}
        exec(compile(block, str(ROOT / page), "exec"), namespace)  # noqa: S102
        if "train_step" in namespace:  # the jitted step of the functional example really trains
            import jax
            import jax.numpy as jnp
            x = jax.random.normal(jax.random.key(0), (32, 64)) * 2 + 3
            target = jnp.zeros((32, 64))
            p, s, o = namespace["params"], namespace["stats"], namespace["opt_state"]
            p, s, o, loss = namespace["train_step"](p, s, o, x, target)
            assert int(s.count) == 1 and bool(jnp.isfinite(loss))
            steps += 1
    assert steps == 1, f"{page}: expected one functional training-step example, got {steps}"


def test_the_readme_and_the_guide_show_the_same_first_examples():
    """The README's two examples are the guide's first two, word for word."""
    readme, guide = _python_blocks("README.md"), _python_blocks("docs/getting_started.md")
    assert readme == guide[:2]
