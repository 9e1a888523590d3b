"""Smoke test of an installed jaxbn wheel, run by ``scripts/check_wheel.sh``.

The script copies this file out of the checkout and runs it with pytest in a fresh virtual
environment that has the wheel (with its framework and ``torch`` extras) installed and not the
repository: every import below must come from site-packages. The name does not start with
``test_``, so the repository's own test run does not collect it.

Environment: ``JAXBN_REPO`` is the checkout (which must not be on ``sys.path``),
``JAXBN_WHEEL_VERSION`` the version in the wheel's file name and ``JAXBN_WHEEL_EXTRAS`` the
extras installed with it (``flax,torch,equinox,haiku`` in CI; the PyTorch test runs only with
``torch``).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbn

REPO = pathlib.Path(os.environ.get("JAXBN_REPO", "/nonexistent")).resolve()
EXTRAS = set(os.environ.get("JAXBN_WHEEL_EXTRAS", "flax,torch,equinox,haiku").split(","))


def _batch(shape=(32, 3), seed=0):
    key = jax.random.key(seed)
    return jax.random.normal(key, shape) * jnp.arange(1.0, 1.0 + shape[-1]) + 4.0


def test_imported_from_site_packages_not_the_checkout():
    where = pathlib.Path(jaxbn.__file__).resolve()
    assert "site-packages" in where.parts, where
    assert REPO not in where.parents, f"jaxbn imported from the checkout: {where}"


def test_repository_programs_are_not_installed():
    for name in ("train", "benchmarks", "tests"):
        assert importlib.util.find_spec(name) is None, f"{name!r} is importable: {name}"


def test_version_and_typing_marker():
    assert jaxbn.__version__ == importlib.metadata.version("jaxbn")
    assert jaxbn.__version__ == os.environ["JAXBN_WHEEL_VERSION"]
    assert (pathlib.Path(jaxbn.__file__).parent / "py.typed").is_file()


def test_functional_core():
    x = _batch()
    params, stats = jaxbn.init(3)
    step = jax.jit(lambda x, p, s: jaxbn.batch_norm(x, p, s, training=True, momentum=0.9))
    y, new_stats = step(x, params, stats)
    np.testing.assert_allclose(y.mean(0), 0.0, atol=1e-5)
    np.testing.assert_allclose(y.var(0), 1.0, rtol=1e-4)
    np.testing.assert_allclose(new_stats.mean, 0.1 * x.mean(0), rtol=1e-6)
    assert int(new_stats.count) == 1
    grads = jax.grad(lambda p: jaxbn.batch_norm(x, p, stats, training=True)[0].sum() ** 2)(
        params)
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))
    for variant in (jaxbn.batch_renorm(x, params, stats, training=True)[0],
                    jaxbn.ghost_batch_norm(x, params, stats, training=True,
                                           virtual_batch_size=8)[0]):
        assert variant.shape == x.shape and bool(jnp.isfinite(variant).all())


def test_linen_matches_flax():
    import flax.linen as nn

    from jaxbn.linen import BatchNorm

    x = _batch()
    ours, theirs = BatchNorm(momentum=0.9), nn.BatchNorm(momentum=0.9)
    variables = ours.init(jax.random.key(0), x, use_running_average=False)
    assert jax.tree.structure(variables) == jax.tree.structure(
        theirs.init(jax.random.key(0), x, use_running_average=False))
    (y, upd), (y_ref, upd_ref) = (
        m.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
        for m in (ours, theirs))
    np.testing.assert_allclose(y, y_ref, rtol=1e-6, atol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), upd, upd_ref)


def test_nnx_matches_flax():
    from flax import nnx

    from jaxbn.nnx import BatchNorm

    x = _batch()
    ours = BatchNorm(3, momentum=0.9, rngs=nnx.Rngs(0))
    theirs = nnx.BatchNorm(3, momentum=0.9, rngs=nnx.Rngs(0))
    np.testing.assert_allclose(ours(x), theirs(x), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ours.var[...], theirs.var[...], rtol=1e-6)
    ours.eval(), theirs.eval()
    np.testing.assert_allclose(ours(x), theirs(x), rtol=1e-6, atol=1e-6)



def test_equinox_matches_equinox():
    if "equinox" not in EXTRAS:
        pytest.skip("installed without the [equinox] extra")
    import equinox as eqx

    from jaxbn.equinox import BatchNorm

    x = _batch()
    outs = []
    for cls in (BatchNorm, eqx.nn.BatchNorm):
        bn, state = eqx.nn.make_with_state(cls)(3, "batch", mode="batch", momentum=0.9)
        y, state = jax.vmap(bn, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(
            x, state)
        outs.append((y, *state.get(bn.batch_state_index)))
    for a, b in zip(*outs, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_haiku_matches_haiku():
    if "haiku" not in EXTRAS:
        pytest.skip("installed without the [haiku] extra")
    import haiku as hk

    from jaxbn.haiku import BatchNorm

    x = _batch()
    outs = []
    for cls in (BatchNorm, hk.BatchNorm):
        f = hk.transform_with_state(lambda x, c=cls: c(True, True, 0.9)(x, is_training=True))
        params, state = f.init(None, x)
        outs.append(f.apply(params, state, None, x))
    assert jax.tree.structure(outs[0]) == jax.tree.structure(outs[1])
    for a, b in zip(jax.tree.leaves(outs[0]), jax.tree.leaves(outs[1]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)  # haiku's one-pass variance


def test_interop_matches_torch():
    if "torch" not in EXTRAS:
        pytest.skip("installed without the [torch] extra")
    import torch

    from jaxbn import interop

    bn = torch.nn.BatchNorm2d(3, momentum=0.1)
    x = np.asarray(_batch((4, 5, 6, 3))).transpose(0, 3, 1, 2).copy()  # NCHW
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        y_ref = bn.train()(torch.from_numpy(x)).numpy()
    params, stats = interop.from_torch(bn.state_dict())
    before = interop.from_torch(torch.nn.BatchNorm2d(3).state_dict())[1]
    y, new_stats = jaxbn.batch_norm(x, params, before, training=True,
                                    **interop.torch_kwargs(momentum=0.1))
    np.testing.assert_allclose(y, y_ref, rtol=1e-6, atol=1e-6 * np.abs(y_ref).max())
    np.testing.assert_allclose(new_stats.var, stats.var, rtol=1e-6)
    back = interop.to_torch(params, stats)
    for k, v in bn.state_dict().items():
        np.testing.assert_array_equal(back[k], v.numpy(), err_msg=k)
