"""The mistakes users make: each gets a clear error naming what was expected and got.

(Or, where the input has one obvious meaning — NumPy integers, a concrete scalar array, a
traced hyperparameter — it is accepted, and that is pinned here too.)
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbn

X = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)
PARAMS, STATS = jaxbn.init(3)
train = partial(jaxbn.batch_norm, training=True)


# ----------------------------------------------------------------------------------------
# State of the wrong type or layout.


@pytest.mark.parametrize("params, got", [
    ((jnp.ones(3), jnp.zeros(3)), "tuple"),
    ({"scale": jnp.ones(3), "bias": jnp.zeros(3)}, "dict"),
])
def test_params_of_the_wrong_type(params, got):
    with pytest.raises(TypeError, match=rf"params must be a BatchNormParams or None, got {got}"):
        train(X, params, None)


def test_stats_of_the_wrong_type():
    with pytest.raises(TypeError, match=r"stats must be a BatchStats or None, got tuple"):
        train(X, None, tuple(STATS))


def test_params_and_stats_swapped():
    with pytest.raises(TypeError, match=r"got BatchStats \(params and stats swapped\? .*"
                                        r"batch_norm\(x, params, stats\)"):
        train(X, STATS, PARAMS)


def test_integer_running_statistics():
    stats = STATS._replace(mean=jnp.zeros(3, jnp.int32))
    with pytest.raises(ValueError, match=r"stats.mean must be a floating-point array, got "
                                         r"dtype int32; integer statistics would truncate"):
        train(X, None, stats)


def test_count_of_the_wrong_shape():
    with pytest.raises(ValueError, match=r"stats.count must be an integer scalar \(shape \(\)\), "
                                         r"got shape \(3,\) and dtype int32"):
        train(X, None, STATS._replace(count=jnp.zeros(3, jnp.int32)))


# ----------------------------------------------------------------------------------------
# Integers and hyperparameters.


def test_numpy_integers_are_ints():
    """np.int64 feature counts and axes mean what the int means (flax accepts them too)."""
    assert jax.tree.map(jnp.shape, jaxbn.init(np.int64(4))) == jax.tree.map(jnp.shape,
                                                                             jaxbn.init(4))
    y, _ = train(X.T, None, None, axis=np.int64(0))
    np.testing.assert_array_equal(y, train(X.T, None, None, axis=0)[0])


@pytest.mark.parametrize("bad", [4.0, True, "4"])
def test_num_features_not_an_int(bad):
    with pytest.raises(TypeError, match=rf"num_features must be an int, got "
                                        rf"{type(bad).__name__}"):
        jaxbn.init(bad)


def test_axis_not_an_int():
    with pytest.raises(TypeError, match=r"axis must be an int, got float 1.0"):
        train(X, None, None, axis=1.0)


def test_momentum_as_a_string():
    with pytest.raises(TypeError, match=r"momentum must be a number, got str '0.9'"):
        train(X, None, STATS, momentum="0.9")


@pytest.mark.parametrize("name", ["momentum", "epsilon"])
def test_hyperparameter_as_a_vector(name):
    with pytest.raises(TypeError, match=rf"{name} must be a real scalar, got an array of "
                                        rf"shape \(3,\)"):
        train(X, None, STATS, **{name: jnp.full(3, 0.5)})


def test_concrete_scalar_arrays_are_numbers():
    """jnp.array(0.9) is the number 0.9: used, and range-checked like one."""
    y, s = train(X, None, STATS, momentum=jnp.array(0.9), epsilon=np.float32(1e-3))
    y_ref, s_ref = train(X, None, STATS, momentum=0.9, epsilon=1e-3)
    np.testing.assert_allclose(y, y_ref, rtol=1e-6)  # float32(0.9) is not 0.9 exactly
    np.testing.assert_allclose(s.mean, s_ref.mean, rtol=1e-6)
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\].*got Array\(1.5"):
        train(X, None, STATS, momentum=jnp.array(1.5))


def test_epsilon_that_is_zero_in_float32():
    with pytest.raises(ValueError, match=r"epsilon must be > 0 in the statistics' dtype "
                                         r"float32, got 1e-50, which rounds to 0"):
        train(X, None, None, epsilon=1e-50)


def test_traced_hyperparameters_in_inference_and_renorm():
    """Traced epsilon (inference) and r_max/d_max (renorm) are used as given, unchecked."""
    ev = jax.jit(lambda e: jaxbn.batch_norm(X, PARAMS, STATS, training=False, epsilon=e)[0])
    np.testing.assert_allclose(ev(1e-3), jaxbn.batch_norm(X, PARAMS, STATS, training=False,
                                                           epsilon=1e-3)[0], rtol=1e-6)
    assert not np.isfinite(np.asarray(ev(-1.0))).any()  # documented: unchecked (var 1 - 1)
    rn = jax.jit(lambda r, d: jaxbn.batch_renorm(X, PARAMS, STATS, training=True, r_max=r,
                                                 d_max=d)[0])
    np.testing.assert_allclose(rn(1.5, 0.5), jaxbn.batch_renorm(
        X, PARAMS, STATS, training=True, r_max=1.5, d_max=0.5)[0], rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------
# Synchronization.


def test_unbound_axis_name():
    with pytest.raises(ValueError, match=r"axis_name 'batch' is not bound here: call "
                                         r"batch_norm under a transformation"):
        train(X, None, None, axis_name="batch")


@pytest.mark.parametrize("groups", [[[0, 1], [1, 2, 3]], [[0, 1, 2], [3]], [[0, 1]]])
def test_groups_that_do_not_partition_the_axis(groups):
    f = jax.vmap(partial(train, params=None, stats=None, axis_name="d",
                         axis_index_groups=groups), axis_name="d")
    with pytest.raises(ValueError, match=r"axis_index_groups must partition the 4 indices of "
                                         r"axis 'd' into groups of equal size"):
        f(np.stack([X] * 4))


# ----------------------------------------------------------------------------------------
# Building blocks.


def test_fold_without_statistics():
    with pytest.raises(ValueError, match=r"fold needs running statistics .* got NoneType"):
        jaxbn.fold(PARAMS, None)


def test_fold_with_mismatched_sizes():
    with pytest.raises(ValueError, match=r"params.scale has shape \(3,\) but stats.mean has "
                                         r"shape \(4,\)"):
        jaxbn.fold(PARAMS, jaxbn.init(4)[1])


def test_update_stats_with_mismatched_sizes():
    m = jaxbn.moments(np.ones((4, 5), np.float32))
    with pytest.raises(ValueError, match=r"batch.mean has shape \(5,\) but stats.mean has "
                                         r"shape \(3,\)"):
        jaxbn.update_stats(STATS, m)


def test_renorm_with_one_value_per_feature():
    """The same rule as batch_norm (it used to go through with a zero variance)."""
    with pytest.raises(ValueError, match=r"expected more than 1 value per feature .* shape "
                                         r"\(1, 3\)"):
        jaxbn.batch_renorm(X[:1], PARAMS, STATS, training=True)


def test_moments_of_an_empty_batch_are_zero():
    """The docstring's promise: count 0, mean 0, variance 0 (not NaN)."""
    for fast in (False, True):
        m = jaxbn.moments(np.zeros((0, 3), np.float32), fast_variance=fast)
        np.testing.assert_array_equal(np.stack(m), np.zeros((3, 3)))


def test_fully_masked_feature_outputs_bias():
    """Documented choice: bias (finite), stats kept; flax returns and stores NaN there."""
    mask = np.ones(X.shape, bool)
    mask[:, 1] = False
    y, new = train(X, PARAMS._replace(bias=jnp.array([1.0, 2.0, 3.0])), STATS, mask=mask)
    np.testing.assert_array_equal(y[:, 1], np.full(4, 2.0))
    assert new.mean[1] == STATS.mean[1] and new.var[1] == STATS.var[1]
    bn = nn.BatchNorm(use_running_average=False)
    y_flax, upd = bn.init_with_output(jax.random.key(0), X, mask=mask)
    assert np.isnan(np.asarray(y_flax[:, 1])).all()


def test_submodules_are_lazy_attributes():
    """jaxbn.linen / .nnx / .equinox / .haiku / .interop work after `import jaxbn`, which
    imports none of flax, equinox, haiku or torch."""
    code = ("import sys, jaxbn; assert not {'flax', 'torch', 'equinox', 'haiku'} & set("
            "sys.modules); jaxbn.linen.BatchNorm, jaxbn.nnx.BatchNorm, jaxbn.interop.from_torch;"
            "assert 'torch' not in sys.modules and 'haiku' not in sys.modules;"
            "jaxbn.equinox.BatchNorm, jaxbn.haiku.BatchNorm\n"
            "try:\n jaxbn.linnen\nexcept AttributeError as e:\n assert 'linnen' in str(e)\n"
            "else:\n raise SystemExit('no AttributeError')")
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.path.dirname(os.path.dirname(jaxbn.__file__))}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


# ----------------------------------------------------------------------------------------
# Interop and PreciseBN arguments.


@pytest.mark.parametrize("kwargs, got", [
    ({"momentum": "0.1"}, "momentum: expected a real number, got str '0.1'"),
    ({"eps": "1e-5"}, "eps: expected a real number, got str '1e-5'"),
    ({"momentum": True}, "momentum: expected a real number, got bool True"),
    ({"eps": np.ones(2)}, "eps: expected a real number, got ndarray"),
])
def test_torch_kwargs_of_the_wrong_type(kwargs, got):
    """A string is not converted behind the user's back (a NumPy scalar is a number)."""
    from jaxbn import interop

    with pytest.raises(TypeError, match=re.escape(got)):
        interop.torch_kwargs(**kwargs)
    assert interop.torch_kwargs(np.float64(0.25), eps=np.float32(0.5)) == {
        "axis": 1, "momentum": 0.75, "unbiased_running_var": True, "epsilon": 0.5}


@pytest.mark.parametrize("moments_fn, got", [
    (lambda x: jnp.mean(x, axis=0), "an array of shape (20,) and dtype float32"),
    (lambda x: (jnp.mean(x, axis=0), jnp.var(x, axis=0)),
     "a tuple of 2 (an array of shape (20,) and dtype float32, an array of shape (20,) and "
     "dtype float32)"),
])
def test_precise_moments_fn_returning_arrays(moments_fn, got):
    """The message names what came back (not one tracer type name per feature)."""
    stats = jaxbn.init(20)[1]
    with pytest.raises(ValueError) as exc:
        jaxbn.precise_batch_stats(moments_fn, stats, [jnp.ones((4, 20))])
    message = str(exc.value)
    assert message == ("moments_fn must return Moments for every BatchStats of stats (e.g. "
                       f"jaxbn.moments(x), or a tuple of them); layer 0 got {got}.")
    assert "Tracer" not in message


def test_update_stats_without_statistics():
    with pytest.raises(TypeError, match=r"stats must be a BatchStats, got NoneType; build it "
                                        r"with BatchStats\(mean, var, count\) or jaxbn.init"):
        jaxbn.update_stats(None, jaxbn.moments(X))


@pytest.mark.parametrize("fn", [
    lambda x: train(x, None, None),
    lambda x: jaxbn.moments(x),
    lambda x: jaxbn.normalize(x, 0.0, 1.0),
])
def test_a_scalar_input(fn):
    with pytest.raises(ValueError, match=r"expected an input of rank >= 1 \(a batch with a "
                                         r"feature axis\), got a scalar \(shape \(\)\)"):
        fn(jnp.float32(1.0))
