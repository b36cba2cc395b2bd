"""Fused per-row softmax cross-entropy kernels with hand-written gradients.

Both kernels take logits with classes on the last axis, in their own dtype
(bf16/fp16 are upcast inside the fused loops), and return per-row losses in the
compute dtype (float32, float64 for float64 input)

.. math::
  \\ell_n = \\sum_c q_{n,c}\\,(\\mathrm{lse}_n - x_{n,c}) + z_n\\,\\mathrm{lse}_n^2 .

The maths is :mod:`jaxce._core`'s (row statistics, target loss, block logits
gradient); this module decides what the forward pass keeps for the backward.
The backward writes ``g_n·((Q_n + 2 z_n lse_n)·softmax − q_n)`` in one
elementwise pass (``Q_n = Σ_c q_{n,c}``). Cotangents for every float input are
exact, so gradients reach class weights, smoothing, z-loss and dense labels too
(under ``jit`` the unused ones are dead code). The backward is plain JAX, so
``grad`` of ``grad`` and ``jax.hessian`` work; ``jax.jvp`` of the loss itself is
not defined for a ``custom_vjp`` and JAX raises a ``TypeError`` saying so.

Integer labels (``sparse_rows``) shift each row by its label's logit instead of
its max: ``total = Σ_c exp(x_c − x_y) ≥ 1`` needs no max pass and the loss is
``log total`` itself. A row where that overflows sends the whole call through
the max-shifted path (``lax.cond``, one predicate for all rows, ``vmap``
included). For 32/64-bit logits the forward keeps ``exp(x − x_y)`` for the
backward, so ``exp`` runs once; under ``jit`` XLA writes it straight into the
gradient's buffer. For 16-bit logits the forward keeps only the logits and the
backward recomputes ``exp``, rather than hold a float32 copy.

Both choices (the label pivot and the kept ``exp``) are read per platform from
:mod:`jaxce._platform`; every combination gives the same values and gradients.

Probability labels (``dense_rows``) save the row statistics and the backward
recomputes ``exp`` from the logits.

With the static ``with_lse`` (``return_aux=True``) both kernels also return each
row's ``lse`` from their own statistics (the pivoted ``shift + log total`` is the
lse), and their backward adds its cotangent to the softmax's row factor
(``∂lse/∂x = softmax``). Without it they trace exactly as before.

Cotangents get their primals' types (:func:`jaxce._sharding.like`): the same
explicit sharding and, inside ``shard_map``, the same varying manual axes.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxce import _common
from jaxce import _core
from jaxce import _platform
from jaxce import _sharding
from jaxce._core import RowStats
from jaxce._core import SmoothStats
from jaxce._core import Target
from jaxce._platform import SparseKernel


def _zero_where_unused(g: jax.Array, value: jax.Array) -> jax.Array:
  """``g·value`` that is 0 where ``g`` is 0 (a row the caller does not use stays clean)."""
  return jnp.where(g == 0, 0.0, g * value)


# ---------------------------------------------------------------------------
# Integer labels: q = on_label·onehot(label) + (smooth/count)·w·possible.
# ---------------------------------------------------------------------------


@functools.cache
def _pivot_exp_fn(keep_exp: bool, dtype: str, pivot: bool = True):
  """``(e, shift, total)`` pivoted on each live row's label logit, for static options.

  The pivot is the label's own logit, which costs a gather instead of a max
  pass and gives ``total ≥ 1`` (the label's term is ``exp(0)``). If that
  overflows for any live row (a logit ~88 above the label's in float32) or a
  live label's logit is not finite, the whole call takes the row max instead
  (``lax.cond``). On the fast path, rows that are not live get ``e = 0``,
  ``shift = 0`` and ``total = 1``. ``e`` is None unless ``keep_exp``.

  ``vmap`` axes are treated as row axes, which keeps ``lax.cond`` a branch under
  ``vmap`` (a batched predicate would turn it into a select that runs both).
  With ``pivot=False`` every row is shifted by its max.
  """

  @jax.custom_batching.custom_vmap
  def pivot_exp(x, labels, live):
    def by_max():
      stats, e = _core.row_stats(x)
      return (e if keep_exp else None, stats.shift, stats.total)

    if not pivot:
      return by_max()
    x_y = _core.at_label(x, labels).astype(dtype)
    shift = lax.stop_gradient(jnp.where(live, x_y, jnp.inf))
    stats, e = _core.row_stats(x, shift)
    fast = (e if keep_exp else None, jnp.where(live, shift, 0.0), jnp.where(live, stats.total, 1.0))
    return lax.cond(jnp.any(live & ~jnp.isfinite(fast[2])), by_max, lambda: fast)

  @pivot_exp.def_vmap
  def fold_rows(axis_size, in_batched, x, labels, live):
    # The batch axis becomes one more row axis (no reshape: XLA keeps writing
    # e, the gradient and the label scatter in one buffer).
    args = [a if batched else jnp.broadcast_to(a, (axis_size, *a.shape))
            for a, batched in zip((x, labels, live), in_batched, strict=True)]
    out = pivot_exp(*args)
    return out, (None if out[0] is None else True, True, True)

  # custom_vmap functions cannot be linearized, so differentiating through the
  # forward pass (grad of grad, jax.hessian) goes by this rule: with the shift
  # held constant, de = e·dx and d total = Σ_c e·dx.
  @jax.custom_jvp
  def differentiable(x, labels, live):
    return pivot_exp(x, labels, live)

  @differentiable.defjvp
  def differentiable_jvp(primals, tangents):
    x, labels, live = primals
    e, shift, total = differentiable(x, labels, live)
    full = e if e is not None else _core.row_stats(x, jnp.where(live, shift, jnp.inf))[1]
    de = full * tangents[0].astype(dtype)
    return (e, shift, total), (None if e is None else de, jnp.zeros_like(shift),
                               jnp.sum(de, axis=-1))

  return differentiable


class _SparseResiduals(NamedTuple):
  x: jax.Array | None  # the logits, kept only when the backward recomputes from them
  mask: jax.Array | None
  labels: jax.Array
  live: jax.Array
  e: jax.Array | None  # exp(x − shift), kept for 32/64-bit logits
  stats: RowStats
  target: Target
  class_weights: jax.Array | None
  nll: jax.Array
  smooth: SmoothStats | None
  smooth_value: jax.Array | None
  types: tuple  # the primals' (x, target, class_weights) types, for the cotangents


def sparse_rows(x, mask, labels, live, target: Target, class_weights, *,
                kernel: SparseKernel = _platform.SPARSE_KERNELS["cpu"], with_lse: bool = False):
  """Per-row loss ``Σ_c q_c (lse − x_c) + z·lse²`` for integer labels (and ``lse``).

  Args:
    x: logits ``[..., C]``.
    mask: boolean ``[..., C]`` or None.
    labels: int32 ``[...]`` in ``[0, C)``.
    live: bool ``[...]``, the rows whose loss is used; the others' per-row terms
      are 0 whatever their logits.
    target: per-row coefficients ``[...]`` (None fields: absent terms).
    class_weights: ``(C,)`` or None (enters the smoothing term).
    kernel: the kernel's design (:mod:`jaxce._platform`); every choice gives the same values.
    with_lse: static; also return each live row's ``lse`` (0 for the other rows),
      differentiable, from the kernel's own statistics.

  Returns:
    ``[...]`` losses in the compute dtype; with ``with_lse``, ``(losses, lse)``.
  """
  # One row axis: XLA then writes exp(x − p), the scaled gradient and the label
  # scatter in one buffer (a reshape between them would force a copy).
  order = _sharding.split_axes_first(labels)
  rows = tuple(labels.shape[d] for d in order)

  def flat(v):
    if v is None:
      return None
    v = jnp.transpose(v, order + tuple(range(len(rows), v.ndim)))
    return v.reshape((math.prod(rows), *v.shape[len(rows):]))

  def unflat(v):
    return jnp.transpose(v.reshape(rows), np.argsort(order))

  target = Target(*map(flat, target))
  out = _sparse_rows(flat(x), flat(mask), flat(labels), flat(live), target, class_weights,
                     kernel, with_lse)
  return tuple(map(unflat, out)) if with_lse else unflat(out)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _sparse_rows(x, mask, labels, live, target, class_weights, kernel, with_lse):
  return _sparse_fwd(x, mask, labels, live, target, class_weights, kernel, with_lse)[0]


def _sparse_fwd(x, mask, labels, live, target, class_weights, kernel, with_lse):
  dtype = _common.compute_dtype(x.dtype)
  xin = _core.masked(x, mask)
  # 32/64-bit logits: keep exp(x − p) for the backward (under jit it is written
  # straight into the gradient's buffer, so exp runs once). 16-bit logits: keep
  # only the logits and recompute, rather than hold a float32 copy.
  keep_exp = kernel.keep_exp and jnp.dtype(x.dtype).itemsize >= 4
  e, shift, total = _pivot_exp_fn(keep_exp, jnp.dtype(dtype).name, kernel.label_pivot)(
      xin, labels, live)
  stats = RowStats(shift, total)
  x_y = _core.at_label(xin, labels).astype(dtype)
  nll = jnp.where(live, (shift - x_y) + stats.log_total, 0.0)  # shift − x_y is 0 on the fast path
  smooth = smooth_value = None
  if target.smooth is not None:
    w = None if class_weights is None else class_weights.astype(dtype)
    smooth = _core.smooth_stats(xin.astype(dtype), shift, w)
    smooth_value = jnp.where(live, _core.smooth_term(stats, smooth), 0.0)
  live_stats = RowStats(jnp.where(live, shift, 0.0), jnp.where(live, total, 0.0))
  loss = target.on_label * nll
  if smooth is not None:
    loss = loss + target.smooth * smooth_value
  if target.z is not None:
    loss = loss + target.z * live_stats.safe_lse**2
  keep_logits = e is None or smooth is not None
  residuals = _SparseResiduals(
      x if keep_logits else None, mask if keep_logits else None, labels, live, e, live_stats,
      target, class_weights, nll, smooth, smooth_value,
      (_sharding.type_of(x), Target(*map(_sharding.type_of, target)),
       _sharding.type_of(class_weights)))
  if with_lse:  # the pivoted shift + log total is the lse of a live row (−inf: no mass)
    return (loss, jnp.where(live, stats.lse, 0.0)), residuals
  return loss, residuals


def _sparse_bwd(kernel, with_lse, res: _SparseResiduals, g):
  g, g_lse = g if with_lse else (g, None)
  dtype = res.stats.total.dtype
  xm = None if res.x is None else _core.masked(res.x, res.mask).astype(dtype)
  e = res.e
  if e is None:
    e = _core.row_stats(xm, jnp.where(res.live, res.stats.shift, jnp.inf))[1]
  # The backward divides by the forward's own total (1 on the fast path's dead rows).
  stats = RowStats(res.stats.shift, jnp.where(res.live, res.stats.total, 1.0))
  scales = _core.grad_scales(res.target, stats, res.smooth, g)
  if g_lse is not None:  # d lse / dx = softmax = e / total
    scales = scales._replace(probs=scales.probs + _core.lse_grad_scale(g_lse, stats, res.live))
  w = None if res.class_weights is None else res.class_weights.astype(dtype)
  possible = None if xm is None else xm > -jnp.inf
  gx = _core.logits_grad(e, scales, res.labels, possible=possible, weights=w)
  d_weights = None
  if res.smooth is not None and w is not None:
    neg_logp = jnp.where(possible, res.stats.safe_lse[:, None] - xm, 0.0)
    d_weights = jnp.sum(_zero_where_unused(scales.per_class[:, None], neg_logp), axis=0)
    d_weights = d_weights.astype(res.class_weights.dtype)
  d_target = Target(
      _zero_where_unused(g, res.nll),
      None if res.smooth is None else _zero_where_unused(g, res.smooth_value),
      None if res.target.z is None else _zero_where_unused(g, res.stats.safe_lse**2),
  )
  gx = gx.astype(res.x.dtype if res.x is not None else res.e.dtype)
  x_type, target_types, weights_type = res.types
  gx = _sharding.like(gx, x_type)
  d_target = Target(*map(_sharding.like, d_target, target_types))
  d_weights = _sharding.like(d_weights, weights_type)
  return gx, None, None, None, d_target, d_weights


_sparse_rows.defvjp(_sparse_fwd, _sparse_bwd)


# ---------------------------------------------------------------------------
# Probability labels: q given in full.
# ---------------------------------------------------------------------------


class _DenseResiduals(NamedTuple):
  x: jax.Array
  mask: jax.Array | None
  q: jax.Array
  z: jax.Array | None
  stats: RowStats
  q_sum: jax.Array
  types: tuple  # the primals' (x, q, z) types, for the cotangents


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def dense_rows(x, mask, q, z, with_lse=False):
  """Per-row loss ``Σ_c q_c·(lse − x_c) + z·lse²``; ``q_c = 0`` terms are 0 even at ``x_c = -inf``.

  Args:
    x: logits ``[..., C]``.
    mask: boolean ``[..., C]`` or None (``q`` must already be 0 where masked).
    q: float target weights ``[..., C]`` (smoothing and class weights applied).
    z: ``[...]`` z-loss coefficient, or None.
    with_lse: static; also return each row's differentiable ``lse`` from the
      kernel's row statistics (``-inf`` for a row with no mass).

  Returns:
    ``[...]`` losses in the compute dtype; with ``with_lse``, ``(losses, lse)``.
  """
  return _dense_fwd(x, mask, q, z, with_lse)[0]


def _dense_fwd(x, mask, q, z, with_lse):
  xm = _core.masked(x, mask)
  stats, _ = _core.row_stats(xm)
  q = q.astype(stats.total.dtype)
  q_sum = jnp.sum(q, axis=-1)
  shifted = xm.astype(q.dtype) - stats.shift[..., None]
  loss = q_sum * stats.log_total - jnp.sum(jnp.where(q == 0, 0.0, q * shifted), axis=-1)
  if z is not None:
    loss = loss + z * stats.lse**2
  types = tuple(map(_sharding.type_of, (x, q, z)))
  residuals = _DenseResiduals(x, mask, q, z, stats, q_sum, types)
  return ((loss, stats.lse) if with_lse else loss), residuals


def _dense_bwd(with_lse, res: _DenseResiduals, g):
  g, g_lse = g if with_lse else (g, None)
  xm = _core.masked(res.x, res.mask).astype(res.q.dtype)
  rows = g.shape
  target = Target(res.q_sum, None, res.z)
  scales = _core.grad_scales(target, res.stats, None, g)
  if g_lse is not None:  # d lse / dx = softmax = e / total
    scales = scales._replace(probs=scales.probs + _core.lse_grad_scale(g_lse, res.stats))
  e = _core.row_stats(xm, res.stats.shift)[1]
  order = _sharding.split_axes_first(g)
  perm = order + (len(rows),)

  def flat(v):
    return jnp.transpose(v, perm).reshape(math.prod(rows), -1)

  gx = _core.logits_grad(flat(e), _core.GradScales(flat(scales.probs[..., None])[:, 0], None, None),
                         dense=flat(g[..., None] * res.q))
  gx = jnp.transpose(gx.reshape(tuple(rows[d] for d in order) + e.shape[-1:]), np.argsort(perm))
  neg_logp = jnp.where(xm == -jnp.inf, 0.0, res.stats.safe_lse[..., None] - xm)
  gq = _zero_where_unused(g[..., None], neg_logp)
  gz = None if res.z is None else _zero_where_unused(g, res.stats.lse**2)
  x_type, q_type, z_type = res.types
  gx = _sharding.like(gx.astype(res.x.dtype), x_type)
  return gx, None, _sharding.like(gq, q_type), _sharding.like(gz, z_type)


dense_rows.defvjp(_dense_fwd, _dense_bwd)
