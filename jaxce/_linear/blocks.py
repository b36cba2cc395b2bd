"""Blocking and the block maths both paths share.

The maths is :mod:`jaxce._core`'s: per-block row statistics merged online
(:func:`_core.merge_stats`), the target loss (:func:`_core.target_loss`) and the
gradient of a block of logits columns (:func:`_core.grad_scales`,
:func:`_core.logits_grad`). Here: the arrays a pass reads and writes, the
statistics of a block of logits and their merge (across devices too), and the
loop over equal-sized blocks that both paths run.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxce import _common
from jaxce import _core


class Params(NamedTuple):
  """The differentiable arrays the logits depend on."""

  hidden: jax.Array  # [N, D]
  weight: jax.Array  # [D, V], the projection
  bias: jax.Array | None  # [V]
  class_weights: jax.Array | None  # [V]; the loss depends on them through smoothing
  softcap: jax.Array | None = None  # scalar s: the logits are s·tanh(z / s)


class Rows(NamedTuple):
  """Per-row inputs of a pass, ``[N]`` each (``probs``: ``[N, V]``).

  ``target`` holds the loss coefficients of every row (they are not masked);
  ``keep``/``bad`` mask the rows once, at the loss and at the row cotangent.
  With probability targets ``probs`` holds them and ``index`` is None; the
  label term ``on_label·Σ_c w_c q_c (lse − x_c)`` replaces ``on_label·(lse − x_y)``.
  """

  index: jax.Array | None
  keep: jax.Array
  bad: jax.Array
  target: _core.Target
  probs: jax.Array | None = None


class Grads(NamedTuple):
  """Gradient accumulators (None: not wanted).

  ``hidden`` has the hidden's dtype: each row is written once, when its block
  is done. ``class_weights`` accumulates over token blocks in the compute
  dtype; ``weight`` and ``bias`` in the config's accumulator dtype (each
  block's share is still summed in float32 and rounded once).
  """

  hidden: jax.Array
  weight: jax.Array
  bias: jax.Array | None
  class_weights: jax.Array | None
  softcap: jax.Array | None = None


def compute_dtype(params: Params):
  """The dtype logits and statistics are accumulated in (at least float32)."""
  return _common.compute_dtype(jnp.result_type(params.hidden.dtype, params.weight.dtype))


def matmul_dtype(params: Params):
  """The matmul dtype of the logits gradient (bf16 stays bf16, as in the naive version)."""
  return jnp.result_type(params.hidden.dtype, params.weight.dtype)


def zero_grads(config, params: Params, dtype, want_class_weights: bool) -> Grads:
  return Grads(
      jnp.zeros(params.hidden.shape, params.hidden.dtype),
      jnp.zeros(params.weight.shape, config.accumulator(params.weight.dtype, dtype)),
      None if params.bias is None else jnp.zeros(
          params.bias.shape, config.accumulator(params.bias.dtype, dtype)),
      jnp.zeros(params.class_weights.shape, dtype) if want_class_weights else None,
      None if params.softcap is None else jnp.zeros((), dtype),
  )


def weighted_probs(probs, class_weights, dtype):
  """``a_c = w_c·q_c`` of a block of probability targets ``[R, size]`` (``w``: that block's)."""
  a = probs.astype(dtype)
  return a if class_weights is None else a * class_weights.astype(dtype)[None, :]


# ---------------------------------------------------------------------------
# Per-row statistics of a block of logits columns, and their online merge.
# ---------------------------------------------------------------------------


class DenseStats(NamedTuple):
  """Per-row sums of a probability target ``a_c = w_c q_c``.

  ``mass = Σ a_c`` and ``dot = Σ a_c (x_c − shift)`` (0 where ``a_c = 0``).
  """

  mass: jax.Array
  dot: jax.Array


class Best(NamedTuple):
  """Per-row largest logit and its global column (the lowest on ties); ``-inf``, 0 if none."""

  value: jax.Array
  index: jax.Array


class Stats(NamedTuple):
  """Per-row results of a pass over (part of) the vocabulary, ``[R]`` each.

  ``label`` is the label's logit ``x_y`` where the label's column was in the
  pass, else 0 (so passes merge by adding it). ``dense`` replaces it for
  probability targets; ``best`` is kept only for the auxiliary outputs.
  """

  row: _core.RowStats
  label: jax.Array
  smooth: _core.SmoothStats | None
  dense: DenseStats | None = None
  best: Best | None = None

  @property
  def nll(self) -> jax.Array:
    """``lse − x_y`` (or ``Σ_c a_c (lse − x_c)``), the shift taken out (exact for huge logits)."""
    if self.dense is not None:
      return self.dense.mass * self.row.log_total - self.dense.dot
    return self.row.log_total - (self.label - self.row.shift)


def empty_stats(rows: int, dtype, smooth: bool, dense: bool = False, best: bool = False) -> Stats:
  zeros = jnp.zeros(rows, dtype)
  return Stats(_core.empty_stats(rows, dtype), zeros,
               _core.SmoothStats(zeros, zeros, zeros) if smooth else None,
               DenseStats(zeros, zeros) if dense else None,
               Best(jnp.full(rows, -jnp.inf, dtype), jnp.zeros(rows, jnp.int32)) if best else None)


def block_stats(x, index, start, class_weights, smooth: bool, probs=None, best: bool = False):
  """``(stats, e)`` of logits columns ``[start, start + size)``: ``x [R, size]``.

  ``index`` holds the rows' labels (None with probability targets ``probs
  [R, size]``, this block's columns); ``best`` adds the block's argmax.
  """
  row, e = _core.row_stats(x)
  label = jnp.zeros(x.shape[0], row.total.dtype)
  if index is not None:
    local = index - start
    inside = (local >= 0) & (local < x.shape[1])
    picked = jnp.take_along_axis(x, jnp.clip(local, 0, x.shape[1] - 1)[:, None], axis=1)[:, 0]
    label = jnp.where(inside, picked, 0.0)
  smooth_stats = _core.smooth_stats(x, row.shift, class_weights) if smooth else None
  dense = None
  if probs is not None:
    a = weighted_probs(probs, class_weights, row.total.dtype)
    terms = jnp.where(a == 0, 0.0, a * (x - row.shift[:, None]))  # no 0·(-inf)
    dense = DenseStats(jnp.sum(a, axis=1), jnp.sum(terms, axis=1))
  top = None
  if best:
    top = Best(jnp.max(x, axis=1).astype(row.total.dtype),
               (jnp.argmax(x, axis=1) + start).astype(jnp.int32))
  return Stats(row, label, smooth_stats, dense, top), e


def merge(a: Stats, b: Stats) -> Stats:
  """The statistics of two column blocks; ``a`` holds the lower columns (it wins ties)."""
  row = _core.merge_stats(a.row, b.row)
  smooth = dense = best = None
  if a.smooth is not None:
    smooth = _core.merge_smooth(a.smooth, b.smooth, a.row.shift, b.row.shift, row.shift)
  if a.dense is not None:
    dense = DenseStats(a.dense.mass + b.dense.mass,
                       a.dense.dot + a.dense.mass * (a.row.shift - row.shift)
                       + b.dense.dot + b.dense.mass * (b.row.shift - row.shift))
  if a.best is not None:
    later = b.best.value > a.best.value
    best = Best(jnp.where(later, b.best.value, a.best.value),
                jnp.where(later, b.best.index, a.best.index))
  return Stats(row, a.label + b.label, smooth, dense, best)


def combine(stats: Stats, axis) -> Stats:
  """Merges each device's statistics over the vocabulary axis (identity on one device).

  An all-gather of a few numbers per row, folded with :func:`merge`: the
  ``pmax``/``psum`` of the online logsumexp, and the label logit of the one
  device that owns the label's column.
  """
  if axis is None:
    return stats
  gathered = lax.all_gather(stats, axis)
  devices = gathered.label.shape[0]
  return functools.reduce(merge, [jax.tree.map(lambda v, k=k: v[k], gathered)
                                  for k in range(devices)])


def loss(target: _core.Target, stats: Stats) -> jax.Array:
  return _core.target_loss(target, stats.row, stats.nll, stats.smooth)


def grad_scales(target: _core.Target, stats: Stats, g, g_lse=None) -> _core.GradScales:
  """:func:`_core.grad_scales`, for probability targets too, plus an lse cotangent ``g_lse``.

  With probability targets the softmax factor is ``on_label·Σ_c a_c`` and
  ``at_label`` multiplies the block's ``a_c`` instead of a one-hot;
  ``∂lse/∂x = softmax`` adds ``g_lse / total``.
  """
  if stats.dense is None:
    scales = _core.grad_scales(target, stats.row, stats.smooth, g)
  else:
    scales = _core.grad_scales(target._replace(on_label=target.on_label * stats.dense.mass),
                               stats.row, stats.smooth, g)
    scales = scales._replace(at_label=jnp.where(g == 0, 0.0, g * target.on_label))
  if g_lse is not None:
    scales = scales._replace(probs=scales.probs + _core.lse_grad_scale(g_lse, stats.row))
  return scales


def mask_losses(rows: Rows, losses: jax.Array) -> jax.Array:
  """The one place values are masked: 0 for dead rows, NaN for bad labels."""
  return jnp.where(rows.bad, jnp.nan, jnp.where(rows.keep, losses, 0.0))


def row_cotangent(rows: Rows, g: jax.Array) -> jax.Array:
  """The one place gradients are masked: 0 for dead rows, NaN for bad labels that are used."""
  g = jnp.where(rows.keep, g, 0.0)
  return jnp.where(rows.bad & (g != 0), jnp.nan, g)


def target_cotangent(target, stats: Stats, g) -> _core.Target:
  """Cotangents of the per-row coefficients (``g·∂ℓ/∂target``): the loss is linear in them."""
  _, vjp = jax.vjp(lambda t: loss(t, stats), target)
  return vjp(jnp.where(g == 0, 0.0, g))[0]


def param_cotangents(params: Params, grads: Grads, g) -> Params:
  """``g·grads`` in each parameter's dtype (None: zero)."""

  def cotangent(p, d):
    return None if p is None or d is None else (g * d).astype(p.dtype)

  return Params(*map(cotangent, params, grads))


def rows_cotangent(d_target: _core.Target, d_probs=None) -> Rows:
  """The cotangent of :class:`Rows`: the target coefficients and probability targets."""
  return Rows(None, None, None, d_target, d_probs)


# ---------------------------------------------------------------------------
# Blocking.
# ---------------------------------------------------------------------------


def over(carry, total: int, size: int, step: Callable):
  """Runs ``carry = step(carry, start, size, skip)`` over ``[0, total)`` in blocks of ``size``.

  All ``ceil(total / size)`` blocks have the same static size: when ``size``
  does not divide ``total`` the last block starts at ``total − size`` and its
  first ``skip`` positions repeat its predecessor's, which ``step`` must leave
  out (``skip`` is None when no block overlaps). One loop body, so nothing is
  padded or copied and a remainder adds no second copy of the step to compile.
  A symbolic ``total`` (``jax.export``) cannot be compared with ``size``: the
  caller pads it to a multiple of ``size`` (:func:`pad_rows`).
  """
  if is_symbolic(total):  # jax.export: the caller padded ``total`` to a multiple of ``size``
    count = jnp.asarray(total // size)
    return lax.fori_loop(0, count, lambda i, carry: step(carry, i * size, size, None), carry)
  if total == 0:
    return carry
  size = min(size, total)
  count = -(-total // size)
  if count == 1:
    return step(carry, 0, size, None)
  overlap = count * size != total

  def body(i, carry):
    start = jnp.minimum(i * size, total - size)
    return step(carry, start, size, i * size - start if overlap else None)

  return lax.fori_loop(0, count, body, carry)


def is_symbolic(dim) -> bool:
  """Whether ``dim`` is a symbolic dimension (``jax.export.symbolic_shape``)."""
  return not isinstance(dim, (int, np.integer))


def pad_rows(tree, size: int, fill):
  """Row-major arrays padded with ``fill`` to a multiple of ``size`` rows (symbolic row counts)."""
  def pad(v):
    rows = v.shape[0]
    widths = [(0, -(-rows // size) * size - rows)] + [(0, 0)] * (v.ndim - 1)
    return jnp.pad(v, widths, constant_values=jnp.asarray(fill, v.dtype))
  return jax.tree.map(pad, tree)


def _fresh(size: int, skip) -> jax.Array | None:
  """Boolean ``[size]``: the positions of a block that no earlier block covered (None: all)."""
  return None if skip is None else jnp.arange(size) >= skip


def fresh_columns(x, index, start, skip, probs=None):
  """Logits with repeated columns impossible (``-inf``), labels and target mass there dropped.

  Returns ``(x, index, probs)``; ``index`` and ``probs`` may be None.
  """
  fresh = _fresh(x.shape[1], skip)
  if fresh is None:
    return x, index, probs
  if index is not None:
    index = jnp.where(index - start >= skip, index, -1)
  if probs is not None:
    probs = jnp.where(fresh[None, :], probs, 0)
  return jnp.where(fresh[None, :], x, -jnp.inf), index, probs


def zero_columns(block, skip):
  """A tile with its repeated columns zeroed (they add nothing to the weight gradient)."""
  fresh = _fresh(block.shape[1], skip)
  return block if fresh is None else jnp.where(fresh[None, :], block, 0)


def fresh_rows(tree, skip):
  """Row-major arrays with repeated rows zeroed (so they add nothing to a sum over rows)."""
  if skip is None:
    return tree
  fresh = _fresh(jax.tree.leaves(tree)[0].shape[0], skip)
  return jax.tree.map(lambda v: jnp.where(fresh.reshape((-1,) + (1,) * (v.ndim - 1)), v, 0), tree)


def slice_rows(tree, start, size):
  return jax.tree.map(lambda v: lax.dynamic_slice_in_dim(v, start, size, 0), tree)


def put_rows(tree, part, start):
  return jax.tree.map(lambda v, p: lax.dynamic_update_slice_in_dim(v, p.astype(v.dtype), start, 0),
                      tree, part)


def tile(array, row, rows, col, cols):
  """``array[row:row + rows, col:col + cols]`` (None stays None): one slice, no row-block copy."""
  if array is None:
    return None
  return lax.dynamic_slice(array, (row, col), (rows, cols))


def cols(array, start, size):
  """Columns ``[start, start + size)`` of ``array``'s last axis (None stays None)."""
  if array is None or size == array.shape[-1]:
    return array
  return lax.dynamic_slice_in_dim(array, start, size, array.ndim - 1)


def add_cols(array, part, start):
  """``array[..., start:start + size] += part``, added in ``part``'s dtype and rounded once."""
  if part.shape[-1] == array.shape[-1]:
    return (array.astype(part.dtype) + part).astype(array.dtype)
  old = lax.dynamic_slice_in_dim(array, start, part.shape[-1], array.ndim - 1)
  new = (old.astype(part.dtype) + part).astype(array.dtype)
  return lax.dynamic_update_slice_in_dim(array, new, start, array.ndim - 1)


# ---------------------------------------------------------------------------
# Block maths: logits, their gradient, and its products.
# ---------------------------------------------------------------------------


def logits(hidden, weight, bias, start, size, dtype):
  """Logits ``[R, size]`` of vocabulary columns ``[start, start + size)`` in ``dtype``."""
  x = jnp.dot(hidden, cols(weight, start, size), preferred_element_type=dtype)
  if bias is not None:
    x = x + cols(bias, start, size).astype(dtype)[None, :]
  return x


def capped(raw, softcap):
  """``s·tanh(z / s)`` of a block of raw logits (``raw`` itself without a cap)."""
  return raw if softcap is None else softcap * jnp.tanh(raw / softcap)


def logits_grad(x, e, scales, class_weights, index, start, mm_dtype, *, softcap=None,
                probs=None):
  """The logits gradient of a block of columns ``[start, start + size)``, in ``mm_dtype``.

  The label term ``−at_label·[c = y]`` is a select fused into the same
  elementwise pass (and the cast), not a scatter: XLA:CPU copies a block
  before scattering into it, which would cost a second ``[R, size]`` buffer.

  With ``softcap`` (``x`` the capped logits, ``s·tanh u``) the gradient is
  taken through the cap, ``·(1 − t²)`` with ``t = x / s``, in the same pass,
  from ``x`` alone (no raw logits kept); it then returns ``(gradient, per-row
  cap gradient)``, the latter ``Σ_c dl·(t − u·(1 − t²))`` with ``u = atanh t``
  (0 where ``t = ±1``, its limit; masked-out columns add nothing).

  With probability targets (``probs``, the block's ``[R, size]``) the label
  term is ``−at_label·w_c q_c``, in the same pass.
  """
  possible = None if scales.per_class is None else x > -jnp.inf
  dl = _core.logits_grad(e, scales, None, possible=possible, weights=class_weights)
  if probs is not None:
    dl = dl - scales.at_label[:, None] * weighted_probs(probs, class_weights, dl.dtype)
  else:
    at_label = lax.broadcasted_iota(jnp.int32, dl.shape, 1) + start == index[:, None]
    dl = jnp.where(at_label, dl - scales.at_label[:, None], dl)
  if softcap is None:
    return dl.astype(mm_dtype)
  live = x > -jnp.inf  # a masked-out column: dl is 0 there
  t = jnp.where(live, x / softcap, 0.0)
  slope = 1.0 - t * t
  u_slope = jnp.where(slope > 0, jnp.arctanh(t) * slope, 0.0)
  d_cap = jnp.sum(jnp.where(live, dl * (t - u_slope), 0.0), axis=1)
  return (dl * slope).astype(mm_dtype), d_cap


def hidden_grad(dl_mm, weight_cols, dtype):
  """``dl @ W_colsᵀ``: ``[R, D]``.

  Computed as ``(W_cols · dlᵀ)ᵀ``: that product's ``[D, R]`` layout is faster
  on XLA:CPU for few rows and many columns (docs/benchmarks.md); the barrier
  keeps XLA from folding the transpose back into the dot.
  """
  d_h = lax.dot_general(weight_cols, dl_mm, (((1,), (1,)), ((), ())), preferred_element_type=dtype)
  return lax.optimization_barrier(d_h).T


def add_weight_tile(grads: Grads, hidden_fresh, dl_mm, start, skip, platform: str) -> Grads:
  """Adds the weight and bias gradients of a ``[R, size]`` tile of the logits gradient.

  Rows before ``skip`` repeat an earlier block's and add nothing (their
  ``hidden_fresh`` rows are zero). The tile's product is summed in float32 and
  added to a low-precision accumulator with one rounding: as a float32 add, or
  on GPU by asking for the product in the accumulator's dtype so that XLA folds
  the add into the cuBLAS matmul's epilogue (``C + A·B`` in float32, rounded
  once, with no ``[D, size]`` float32 temporary).
  """
  product_dtype = (grads.weight.dtype if platform == "gpu"
                   else _common.compute_dtype(grads.weight.dtype))
  d_w = lax.dot_general(hidden_fresh, dl_mm, (((0,), (0,)), ((), ())),
                        preferred_element_type=product_dtype)
  grads = grads._replace(weight=add_cols(grads.weight, d_w, start))
  if grads.bias is not None:
    d_b = jnp.sum(fresh_rows(dl_mm, skip), axis=0, dtype=_common.compute_dtype(grads.bias.dtype))
    grads = grads._replace(bias=add_cols(grads.bias, d_b, start))
  return grads


def neg_log_probs(x, lse):
  """``lse − x`` of a block, 0 at impossible (``-inf``) columns."""
  return jnp.where(x > -jnp.inf, lse[:, None] - x, 0.0)


def class_weights_grad(x, scales: _core.GradScales, lse, probs=None) -> jax.Array:
  """The gradient w.r.t. a block's class weights: ``Σ_rows (per_class + at_label·q_c)·(lse − x)``.

  ``per_class`` (smoothing) and ``at_label·q_c`` (probability targets, whose
  ``a_c = w_c q_c``) are each used when present.
  """
  coef = 0.0
  if scales.per_class is not None:
    coef = scales.per_class[:, None]
  if probs is not None:
    coef = coef + scales.at_label[:, None] * probs.astype(x.dtype)
  return jnp.sum(coef * neg_log_probs(x, lse), axis=0)


def probs_grad(x, scales: _core.GradScales, lse, class_weights):
  """``∂/∂q_c`` of a block: ``at_label·w_c·(lse − x_c)`` (0 at impossible columns)."""
  d = scales.at_label[:, None] * neg_log_probs(x, lse)
  return d if class_weights is None else d * class_weights.astype(d.dtype)[None, :]
