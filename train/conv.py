"""2-D convolution (NHWC input, HWIO kernel, stride 1) with a fast XLA:CPU gradient.

XLA:CPU (jax 0.10) handles LeNet-sized convolutions poorly in training: the
kernel gradient becomes a convolution with the batch as the contracted feature
dimension, the input gradient a fully padded convolution, both far slower than
a matmul of the same FLOP count, and the forward convolution materialises a
full-batch im2col buffer internally (64 MiB for LeNet's second layer at batch
512), which above glibc's 32 MiB mmap threshold is mapped fresh and
page-faulted on every call.  On the CPU backend :func:`conv2d` is therefore a
``jax.custom_vjp`` that works on batch chunks whose im2col matrix is about at most
``_CHUNK_BYTES`` (4 MiB; ``lax.map``/``lax.scan`` over chunks, a single chunk
for small batches), and inside a chunk uses only matmuls in the orientation
XLA:CPU's dot is fast at, plus fused shifted sums:

* ``KW * C_in >= 32`` ("wide", e.g. LeNet's conv2): with the width-only patches
  ``xw`` of shape ``(B, H, Wo, KW*C)`` (5x the input, not 25x),

  - forward: ``z = xw @ K2`` with ``K2: (KW*C, KH*O)``, then
    ``y[:, h] = sum_i z[:, h + i, :, i]``;
  - kernel gradient: one matmul ``xw^T @ G`` where ``G: (H*B*Wo, KH*O)`` stacks
    the output cotangent shifted down by ``i`` rows for each kernel row ``i``;
* thin layers (LeNet's conv1, ``C_in = 1``): forward is XLA's own convolution,
  the kernel gradient ``patches^T @ g`` with the channel-major patch matrix
  ``(KH*KW*C, B*Ho*Wo)``;
* input gradient (all layers): ``g @ kernel^T`` into patch space, then col2im
  as two fused shifted-sum folds (kernel rows, then kernel columns).  When the
  input needs no gradient (a first layer) XLA removes this loop entirely.

Residuals are just ``x`` and the kernel; patches are recomputed per chunk in the
backward pass.  This keeps the jitted training step's temporary buffer small,
which matters on XLA:CPU: the step's temporaries are one allocation, and once it
exceeds glibc's 32 MiB mmap threshold it is mapped and page-faulted afresh on
every step (about 1 us per 4 KiB page; 13k faults/step for flax's LeNet at
batch 128).
On other backends (GPU/TPU: cuDNN and friends beat anything written here)
:func:`conv2d` is plain ``lax.conv_general_dilated``; the choice is made from
``jax.default_backend()`` at trace time.

:class:`Conv` is a ``flax.linen`` module with the parameter layout of
``flax.linen.Conv`` (``kernel`` ``(KH, KW, C_in, features)``, ``bias``
``(features,)``, same default initialisers), so parameters transfer unchanged.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["Conv", "conv2d"]

PaddingLike = str | int | Sequence[int | tuple[int, int]]

_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")

# Upper bound (bytes) for one batch chunk's im2col matrix (B*Ho*Wo x KH*KW*C).
# Small enough to stay far below glibc's 32 MiB mmap threshold and mostly in
# cache, large enough for the per-chunk ops to use both cores.  Measured on a
# 2-core EPYC for LeNet's conv2 fwd+bwd (batch 128 / 512): 4 MiB 5.8 / 21 ms,
# 1 MiB 7.9 / 31 ms, 16 MiB 17 / 40 ms.
_CHUNK_BYTES = 4 << 20


def _pairs(padding: PaddingLike, kernel_hw: tuple[int, int]) -> tuple[tuple[int, int], ...]:
    """Returns explicit ``((lo, hi), (lo, hi))`` padding for stride 1.

    Args:
        padding: ``'VALID'``, ``'SAME'``, an int (same on all sides), or a length-2
            sequence of ints or ``(lo, hi)`` pairs, as accepted by ``flax.linen.Conv``.
        kernel_hw: ``(KH, KW)``.

    Returns:
        A tuple of two ``(lo, hi)`` pairs.

    Raises:
        ValueError: on an unsupported padding specification.
    """
    if isinstance(padding, str):
        mode = padding.upper()
        if mode == "VALID":
            return ((0, 0), (0, 0))
        if mode == "SAME":
            # lax.padtype_to_pads for stride 1: total k - 1, the extra one at the end.
            return tuple(((k - 1) // 2, (k - 1) - (k - 1) // 2) for k in kernel_hw)
        raise ValueError(f"Unsupported padding {padding!r}; use 'VALID', 'SAME' or explicit pairs.")
    if isinstance(padding, int):
        return ((padding, padding), (padding, padding))
    if isinstance(padding, Sequence) and len(padding) == 2:
        pairs = []
        for p in padding:
            if isinstance(p, int):
                pairs.append((p, p))
            elif isinstance(p, Sequence) and len(p) == 2:
                pairs.append((int(p[0]), int(p[1])))
            else:
                break
        if len(pairs) == 2:
            return tuple(pairs)
    raise ValueError(
        f"Invalid padding {padding!r}: expected 'VALID', 'SAME', an int, "
        "or two ints / (lo, hi) pairs."
    )


def _num_chunks(batch: int, bytes_per_example: int) -> int:
    """Number of batch chunks so that one chunk's intermediate fits ``_CHUNK_BYTES``.

    Prefers a divisor of ``batch`` (no padding) within 2x of the minimum count;
    otherwise the last chunk is zero-padded (never a whole chunk of padding).
    """
    if batch * bytes_per_example <= _CHUNK_BYTES:
        return 1
    least = min(batch, math.ceil(batch * bytes_per_example / _CHUNK_BYTES))
    for n in range(least, min(batch, 2 * least) + 1):
        if batch % n == 0:
            return n
    return math.ceil(batch / math.ceil(batch / least))


def _split(a: jax.Array, n: int) -> jax.Array:
    """Reshapes ``(B, ...)`` to ``(n, ceil(B / n), ...)``, zero-padding the batch."""
    size = -(-a.shape[0] // n)
    if size * n != a.shape[0]:
        a = jnp.pad(a, ((0, size * n - a.shape[0]),) + ((0, 0),) * (a.ndim - 1))
    return a.reshape(n, size, *a.shape[1:])


def _merge(a: jax.Array, batch: int) -> jax.Array:
    """Inverse of :func:`_split`."""
    return a.reshape(-1, *a.shape[2:])[:batch]


def _map_chunks(fn: Callable[[jax.Array], jax.Array], a: jax.Array, n: int) -> jax.Array:
    """Applies ``fn`` to ``n`` consecutive batch chunks of ``a`` sequentially."""
    if n == 1:
        return fn(a)
    return _merge(lax.map(fn, _split(a, n)), a.shape[0])


def _lax_valid(x: jax.Array, kernel: jax.Array) -> jax.Array:
    return lax.conv_general_dilated(
        x, kernel, (1, 1), "VALID", dimension_numbers=_DIMENSION_NUMBERS
    )


def _patches_t(x: jax.Array, kh: int, kw: int) -> jax.Array:
    """Channel-major im2col: ``(KH*KW*C, B*Ho*Wo)``, rows ordered like HWIO's ``(i, j, c)``."""
    b, h, w, c = x.shape
    ho, wo = h - kh + 1, w - kw + 1
    xt = jnp.moveaxis(x, 3, 0)  # (C, B, H, W): a bitcast when C == 1
    rows = [xt[:, :, i : i + ho, j : j + wo] for i in range(kh) for j in range(kw)]
    return jnp.stack(rows).reshape(kh * kw * c, b * ho * wo)


def _width_patches(x: jax.Array, kw: int) -> jax.Array:
    """Width-only im2col: ``(B, H, W, C) -> (B, H, Wo, KW*C)``, entry ``(j, c)`` = ``x[w+j, c]``."""
    wo = x.shape[2] - kw + 1
    return jnp.concatenate([x[:, :, j : j + wo, :] for j in range(kw)], axis=-1)


def _fwd_wide(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """Forward as one ``(B*H*Wo, KW*C) @ (KW*C, KH*O)`` matmul plus a KH-term shifted sum."""
    kh, kw, c, o = kernel.shape
    b, h, _, _ = x.shape
    ho = h - kh + 1
    xw = _width_patches(x, kw)  # (B, H, Wo, KW*C)
    k2 = jnp.transpose(kernel, (1, 2, 0, 3)).reshape(kw * c, kh * o)  # (j, c) x (i, o)
    z = (xw @ k2).reshape(*xw.shape[:3], kh, o)  # z[b, h, w, i] = row h's contribution to y[h - i]
    out = z[:, 0:ho, :, 0, :]
    for i in range(1, kh):
        out = out + z[:, i : i + ho, :, i, :]
    return out


def _dk_wide(x: jax.Array, g: jax.Array, kh: int, kw: int) -> jax.Array:
    """Kernel gradient as one ``(KW*C, H*B*Wo) @ (H*B*Wo, KH*O)`` matmul.

    Row ``i`` of the kernel pairs input row ``h + i`` with output row ``h``; stacking
    the output cotangent shifted down by ``i`` rows (zero-padded to ``H``) for every
    ``i`` turns the ``KH`` row-offset products into a single matmul against the
    width-only patches, which are never sliced.
    """
    b, h, _, c = x.shape
    _, ho, wo, o = g.shape
    xw = _width_patches(jnp.transpose(x, (1, 0, 2, 3)), kw)  # (H, B, Wo, KW*C)
    gt = jnp.transpose(g, (1, 0, 2, 3))  # (Ho, B, Wo, O)
    gs = jnp.stack([jnp.pad(gt, ((i, h - ho - i), (0, 0), (0, 0), (0, 0))) for i in range(kh)], 3)
    d = xw.reshape(-1, kw * c).T @ gs.reshape(-1, kh * o)  # (j, c) x (i, o)
    return jnp.transpose(d.reshape(kw, c, kh, o), (2, 0, 1, 3)).reshape(kh * kw * c, o)


def _dk_narrow(x: jax.Array, g: jax.Array, kh: int, kw: int) -> jax.Array:
    """Kernel gradient as ``patches^T (KH*KW*C, B*Ho*Wo) @ g (B*Ho*Wo, O)``."""
    return _patches_t(x, kh, kw) @ g.reshape(-1, g.shape[-1])


def _input_grad(g: jax.Array, kernel: jax.Array, h: int, w: int) -> jax.Array:
    """Input cotangent: ``g @ kernel^T`` to patch space, then col2im as two folds.

    The folds (over kernel rows, then kernel columns) are zero-padded shifted sums
    that XLA fuses into two loops.
    """
    kh, kw, _, _ = kernel.shape
    _, ho, wo, _ = g.shape
    dp = lax.dot_general(g, kernel, (((3,), (3,)), ((), ())))  # (B, Ho, Wo, KH, KW, C)
    rows = None
    for i in range(kh):
        term = jnp.pad(dp[:, :, :, i], ((0, 0), (i, h - ho - i), (0, 0), (0, 0), (0, 0)))
        rows = term if rows is None else rows + term  # (B, H, Wo, KW, C)
    out = None
    for j in range(kw):
        term = jnp.pad(rows[:, :, :, j], ((0, 0), (0, 0), (j, w - wo - j), (0, 0)))
        out = term if out is None else out + term
    return out


# Below this many matmul columns (KW * C_in; 5 for LeNet's first layer) the
# width-patch matmuls are too thin: use XLA's convolution forward and the
# channel-major patch matrix for the kernel gradient instead.
_WIDE_MIN = 32


def _fwd_chunk(x: jax.Array, kernel: jax.Array) -> jax.Array:
    if kernel.shape[1] * kernel.shape[2] >= _WIDE_MIN:
        return _fwd_wide(x, kernel)
    return _lax_valid(x, kernel)


def _dk_chunk(x: jax.Array, g: jax.Array, kernel: jax.Array) -> jax.Array:
    kh, kw = kernel.shape[:2]
    if kw * kernel.shape[2] >= _WIDE_MIN:
        return _dk_wide(x, g, kh, kw)
    return _dk_narrow(x, g, kh, kw)


def _chunks_for(x: jax.Array, kernel: jax.Array) -> int:
    """Batch chunks for a conv of ``x`` with ``kernel``, sized by the im2col matrix."""
    b, h, w, c = x.shape
    kh, kw = kernel.shape[:2]
    return _num_chunks(b, (h - kh + 1) * (w - kw + 1) * kh * kw * c * x.dtype.itemsize)


def _forward(x: jax.Array, kernel: jax.Array) -> jax.Array:
    return _map_chunks(lambda xc: _fwd_chunk(xc, kernel), x, _chunks_for(x, kernel))


@jax.custom_vjp
def _conv_valid_cpu(x: jax.Array, kernel: jax.Array) -> jax.Array:
    return _forward(x, kernel)


def _conv_valid_cpu_fwd(x, kernel):
    return _forward(x, kernel), (x, kernel)


def _conv_valid_cpu_bwd(res, g):
    x, kernel = res
    h, w = x.shape[1:3]
    n = _chunks_for(x, kernel)
    # Kernel gradient: per-chunk matmuls accumulated in a scan, which starts from the first
    # chunk's (so the carry has the data's type, shard_map's varying axes included). The
    # input gradient is a separate loop so that, when unused (first layer), dead code
    # elimination removes it whole.
    if n == 1:
        dk = _dk_chunk(x, g, kernel)
    else:
        xs, gs = _split(x, n), _split(g, n)

        def body(acc, xg):
            return acc + _dk_chunk(xg[0], xg[1], kernel), None

        dk, _ = lax.scan(body, _dk_chunk(xs[0], gs[0], kernel), (xs[1:], gs[1:]))
    dx = _map_chunks(lambda gc: _input_grad(gc, kernel, h, w), g, n)
    return dx.astype(x.dtype), dk.reshape(kernel.shape).astype(kernel.dtype)


_conv_valid_cpu.defvjp(_conv_valid_cpu_fwd, _conv_valid_cpu_bwd)


@functools.partial(jax.jit, static_argnums=2)
def _conv_cpu(x: jax.Array, kernel: jax.Array, pads: tuple[tuple[int, int], ...]) -> jax.Array:
    # jit: one executable when called eagerly (inlined under an outer jit).
    if any(p for pair in pads for p in pair):
        zero = jnp.zeros((), x.dtype)
        x = lax.pad(x, zero, ((0, 0, 0), (*pads[0], 0), (*pads[1], 0), (0, 0, 0)))
    # Under shard_map, give the kernel every axis along which x varies (adding a zero of x's
    # type; outside shard_map, a no-op that XLA removes). The custom VJP's kernel cotangent,
    # which varies like x, then has the kernel's type, and for a replicated kernel (P()
    # specs) autodiff sums the per-device gradients, as it would for lax's convolution.
    kernel = kernel + jnp.zeros_like(x, shape=())
    return _conv_valid_cpu(x, kernel)


def conv2d(
    x: jax.Array,
    kernel: jax.Array,
    bias: jax.Array | None = None,
    *,
    padding: PaddingLike = "VALID",
) -> jax.Array:
    """Stride-1 2-D convolution, NHWC input and HWIO kernel, with a fast CPU gradient.

    Numerically the same as ``lax.conv_general_dilated(x, kernel, (1, 1), padding,
    dimension_numbers=('NHWC', 'HWIO', 'NHWC'))`` (plus ``bias``), up to float
    summation order.  On the CPU backend the forward and backward passes use the
    chunked matmul formulation described in the module docstring, via a
    ``jax.custom_vjp`` (so reverse mode, ``jit`` and ``vmap`` work; forward-mode
    ``jax.jvp`` does not on CPU).  On other backends it is exactly the ``lax`` call.

    Args:
        x: input, ``(batch, height, width, in_channels)``.
        kernel: ``(kernel_h, kernel_w, in_channels, out_channels)``.
        bias: optional ``(out_channels,)``, added to every output pixel.
        padding: ``'VALID'`` (default), ``'SAME'``, an int (applied to every side),
            or two ints / two ``(low, high)`` pairs for height and width, as in
            ``flax.linen.Conv``.

    Returns:
        ``(batch, out_height, out_width, out_channels)``.

    Raises:
        ValueError: on mismatched shapes or an unsupported padding.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> x = jnp.ones((2, 28, 28, 1))
      >>> k = jnp.ones((5, 5, 1, 20)) / 25
      >>> conv2d(x, k, jnp.zeros(20)).shape
      (2, 24, 24, 20)
      >>> conv2d(x, k, padding='SAME').shape
      (2, 28, 28, 20)
      >>> g = jax.grad(lambda k: conv2d(x, k).sum())(k)
      >>> g.shape, float(g[0, 0, 0, 0])
      ((5, 5, 1, 20), 1152.0)
    """
    if x.ndim != 4 or kernel.ndim != 4:
        raise ValueError(f"expected 4-D NHWC x and HWIO kernel, got {x.shape}, {kernel.shape}")
    if x.shape[3] != kernel.shape[2]:
        raise ValueError(f"input channels {x.shape[3]} != kernel input channels {kernel.shape[2]}")
    pads = _pairs(padding, kernel.shape[:2])
    dtype = jnp.result_type(x, kernel) if bias is None else jnp.result_type(x, kernel, bias)
    x, kernel = x.astype(dtype), kernel.astype(dtype)
    if bias is not None:
        if bias.shape != (kernel.shape[3],):
            raise ValueError(f"bias shape {bias.shape} != ({kernel.shape[3]},)")
        bias = bias.astype(dtype)
    if jax.default_backend() == "cpu":
        padded_hw = (x.shape[1] + sum(pads[0]), x.shape[2] + sum(pads[1]))
        if padded_hw[0] < kernel.shape[0] or padded_hw[1] < kernel.shape[1]:
            raise ValueError(f"kernel {kernel.shape[:2]} larger than padded input {padded_hw}")
        y = _conv_cpu(x, kernel, pads)
    else:
        y = lax.conv_general_dilated(
            x, kernel, (1, 1), pads, dimension_numbers=_DIMENSION_NUMBERS
        )
    # Added outside the custom_vjp: XLA fuses it (and its gradient, a sum of g)
    # with the neighbouring elementwise work, which measured faster than adding
    # it per chunk inside the loop.
    if bias is not None:
        y = y + bias
    return y


class Conv(nn.Module):
    """Drop-in for ``flax.linen.Conv`` (2-D, stride 1) backed by :func:`conv2d`.

    Same parameter names, shapes and default initialisers as ``flax.linen.Conv``
    (``kernel``: ``lecun_normal``, ``(kh, kw, in_features, features)``; ``bias``:
    zeros, ``(features,)``), so a ``flax.linen.Conv`` parameter tree loads as is.
    Inputs may carry several leading batch dimensions or none, as in flax.

    Attributes:
        features: number of output channels.
        kernel_size: ``(kh, kw)``.
        padding: ``'SAME'`` (flax's default), ``'VALID'``, an int, or two ints /
            ``(low, high)`` pairs.
        use_bias: whether to add a learned bias.
        dtype: computation dtype (default: inferred from inputs and params).
        param_dtype: dtype of the parameters.
        kernel_init: kernel initialiser.
        bias_init: bias initialiser.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> layer = Conv(features=20, kernel_size=(5, 5), padding='VALID')
      >>> x = jnp.ones((4, 28, 28, 1))
      >>> params = layer.init(jax.random.key(0), x)
      >>> jax.tree.map(jnp.shape, params)
      {'params': {'bias': (20,), 'kernel': (5, 5, 1, 20)}}
      >>> layer.apply(params, x).shape
      (4, 24, 24, 20)
    """

    features: int
    kernel_size: Sequence[int]
    padding: PaddingLike = "SAME"
    use_bias: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    kernel_init: Callable[..., jax.Array] = nn.initializers.lecun_normal()
    bias_init: Callable[..., jax.Array] = nn.initializers.zeros_init()

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        """Applies the convolution.

        Args:
            inputs: ``(*batch_dims, height, width, in_features)``.

        Returns:
            ``(*batch_dims, out_height, out_width, features)``.
        """
        if isinstance(self.kernel_size, int) or len(self.kernel_size) != 2:
            # flax.linen.Conv reads an int as a 1-D kernel; this module is 2-D only.
            raise ValueError(f"kernel_size must be (kh, kw), got {self.kernel_size!r}")
        kernel_size = tuple(self.kernel_size)
        batch_shape = inputs.shape[:-3]
        x = inputs.reshape((-1, *inputs.shape[-3:]))
        kernel = self.param(
            "kernel", self.kernel_init, (*kernel_size, x.shape[-1], self.features), self.param_dtype
        )
        bias = (
            self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias
            else None
        )
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        y = conv2d(x, kernel, bias, padding=self.padding)
        return y.reshape(*batch_shape, *y.shape[1:])
