"""The numerics every softmax-family function shares: row statistics, the target loss, its gradient.

Classes are on the last axis of every array here; callers move them there.
Each function is named after the maths it computes, not after its caller:

* :func:`row_stats` -- the masked max shift and the sum of exponentials
  (``lse = shift + log total``), used by softmax/log_softmax/logsumexp, the
  dense and sparse cross-entropies and, one block of columns at a time with
  :func:`merge_stats`, the linear cross-entropy;
* :class:`Target` / :func:`target_loss` -- the integer-label target
  ``q = a·onehot(y) + (ε/count)·w·possible`` and its loss
  ``Σ_c q_c (lse − x_c) + z·lse²``;
* :class:`GradScales` / :func:`grad_scales` / :func:`logits_grad` -- the
  gradient of that loss with respect to any block of logits columns,
  ``g·((Q + 2 z lse)·softmax − q)``, plus :func:`lse_grad_scale` for a
  cotangent on ``lse`` itself (``return_aux``).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxce import _common
from jaxce import _sharding

# ---------------------------------------------------------------------------
# Row statistics: lse = shift + log(total).
# ---------------------------------------------------------------------------


class RowStats(NamedTuple):
  """Per-row parts of ``lse = shift + log(total)``, each ``[...]`` in the compute dtype.

  ``shift`` is stopped from gradients (the result does not depend on it). A row
  with nothing unmasked (or only ``-inf``) has ``shift = 0`` and ``total = 0``.
  """

  shift: jax.Array
  total: jax.Array

  @property
  def has_mass(self) -> jax.Array:
    return self.total != 0

  @property
  def log_total(self) -> jax.Array:
    """``log(total)``, 0 for rows with no mass (so everything derived stays finite)."""
    return jnp.log(jnp.where(self.has_mass, self.total, 1.0))

  @property
  def lse(self) -> jax.Array:
    """``log Σ_c exp(x_c)``; ``-inf`` for rows with no mass."""
    return jnp.where(self.has_mass, self.shift + self.log_total, -jnp.inf)

  @property
  def safe_lse(self) -> jax.Array:
    """``lse`` with 0 for rows with no mass (safe to multiply by a zero coefficient)."""
    return self.shift + self.log_total


def at_label(x: jax.Array, index: jax.Array) -> jax.Array:
  """``x[..., index]`` per row: ``x [..., C]``, ``index`` int ``[...]`` in ``[0, C)``.

  With the classes split over Explicit mesh axes it is a masked row sum (or
  ``any`` for a boolean ``x``), which each device computes on its own classes.
  """
  if not _sharding.explicit_axes(x)[-1]:
    return jnp.take_along_axis(x, index[..., None], axis=-1)[..., 0]
  hit = lax.broadcasted_iota(index.dtype, x.shape, x.ndim - 1) == index[..., None]
  if x.dtype == jnp.bool_:
    return jnp.any(hit & x, axis=-1)
  return jnp.sum(jnp.where(hit, x, 0), axis=-1)


def row_argmax(x: jax.Array) -> jax.Array:
  """int32 index of each row's largest ``x [..., C]``, the lowest on ties (``jnp.argmax``'s rule).

  With the classes split over Explicit mesh axes it is the row max, then the
  lowest index that reaches it (two reductions XLA all-reduces; the variadic
  reduce of ``jnp.argmax`` would gather every device's partial results).
  """
  if not _sharding.explicit_axes(x)[-1]:
    return jnp.argmax(x, axis=-1).astype(jnp.int32)
  top = jnp.max(x, axis=-1, keepdims=True)
  classes = lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
  hit = (x == top) | jnp.isnan(x)  # a NaN is the max, as for jnp.argmax
  return jnp.min(jnp.where(hit, classes, x.shape[-1]), axis=-1)


def per_class(values: jax.Array, index: jax.Array) -> jax.Array:
  """``values[index]``: a per-class ``(C,)`` array read at each row's label, laid out as ``index``.

  Under a mesh of Explicit axes it is a masked sum over the classes, computed
  where ``index`` lives (a gather there needs an output sharding that ``vmap``
  cannot state).
  """
  if not (_sharding.in_explicit_mesh() or _sharding.is_explicitly_sharded(values)):
    return values[index]
  values = _sharding.replicated(values)
  classes = lax.broadcasted_iota(index.dtype, index.shape + values.shape, index.ndim)
  hit = classes == index[..., None]
  return jnp.sum(jnp.where(hit, values, 0), axis=-1)


@jax.custom_vjp
def softcap(x: jax.Array, cap: jax.Array) -> jax.Array:
  """``cap · tanh(x / cap)`` (Gemma's logit soft-capping), in ``x``'s dtype.

  Computed in the compute dtype; the backward recomputes ``tanh`` from ``x``
  (which the caller keeps anyway) instead of keeping a capped copy. The
  gradient w.r.t. ``cap`` is ``Σ g·(tanh u − u·(1 − tanh² u))``, ``u = x / cap``,
  whose second term is 0 at ``x = ±inf`` (its limit).
  """
  return _softcap_fwd(x, cap)[0]


def _softcap_fwd(x, cap):
  dtype = _common.compute_dtype(x.dtype)
  capped = (cap * jnp.tanh(x.astype(dtype) / cap)).astype(x.dtype)
  return capped, (x, cap, _sharding.type_of(x), _sharding.type_of(cap))


def _softcap_bwd(res, g):
  x, cap, x_type, cap_type = res
  dtype = _common.compute_dtype(x.dtype)
  u = x.astype(dtype) / cap
  t = jnp.tanh(u)
  slope = 1.0 - t * t
  g = g.astype(dtype)
  gx = (g * slope).astype(x.dtype)
  gcap = jnp.sum(g * (t - jnp.where(jnp.isfinite(u), u * slope, 0.0))).astype(cap.dtype)
  return _sharding.like(gx, x_type), _sharding.like(gcap, cap_type)


softcap.defvjp(_softcap_fwd, _softcap_bwd)


def masked(x: jax.Array, mask: jax.Array | None) -> jax.Array:
  """``x`` with masked-out entries set to ``-inf`` (impossible classes)."""
  return x if mask is None else jnp.where(mask, x, -jnp.inf)


def row_max(x: jax.Array, dtype) -> jax.Array:
  """Stopped row max ``[...]`` of masked logits, in ``dtype``; 0 for rows with no finite max.

  The max is exact in the input dtype; taking it there keeps XLA from
  materialising a float32 copy of bf16/fp16 logits.
  """
  m = lax.stop_gradient(jnp.max(x, axis=-1, initial=-jnp.inf)).astype(dtype)
  return jnp.where(m == -jnp.inf, 0.0, m)


def row_stats(x: jax.Array, shift: jax.Array | None = None) -> tuple[RowStats, jax.Array]:
  """Returns ``(stats, e)`` with ``e = exp(x − shift)`` in the compute dtype.

  Args:
    x: masked logits ``[..., C]`` (``-inf`` where impossible), any float dtype.
    shift: optional per-row shift ``[...]`` (stopped by the caller); the row max
      by default.

  Returns:
    The row statistics and the shifted exponentials ``[..., C]`` (under ``jit``
    an unused ``e`` costs nothing).
  """
  dtype = _common.compute_dtype(x.dtype)
  if shift is None:
    shift = row_max(x, dtype)
  e = jnp.exp(x.astype(dtype) - shift[..., None])
  return RowStats(shift, jnp.sum(e, axis=-1)), e


def merge_stats(a: RowStats, b: RowStats) -> RowStats:
  """Statistics of the union of two column blocks (the online logsumexp step)."""
  shift = jnp.where(~a.has_mass, b.shift,
                    jnp.where(~b.has_mass, a.shift, jnp.maximum(a.shift, b.shift)))
  scale_a = jnp.where(a.has_mass, jnp.exp(a.shift - shift), 0.0)
  scale_b = jnp.where(b.has_mass, jnp.exp(b.shift - shift), 0.0)
  return RowStats(shift, a.total * scale_a + b.total * scale_b)


def empty_stats(rows, dtype) -> RowStats:
  """Statistics of no columns at all (the identity of :func:`merge_stats`)."""
  return RowStats(jnp.zeros(rows, dtype), jnp.zeros(rows, dtype))


# ---------------------------------------------------------------------------
# The integer-label target, its loss and its logits gradient.
# ---------------------------------------------------------------------------


class Target(NamedTuple):
  """Per-row target ``q_c = on_label·[c = y] + smooth·w_c·[c possible] / count``, plus z-loss.

  Every field is ``[...]`` (0 for rows that do not count) or None when its
  term is statically absent, so a default option never computes
  ``0 · (something that overflows)``.
  """

  on_label: jax.Array
  smooth: jax.Array | None
  z: jax.Array | None


class SmoothStats(NamedTuple):
  """Per-row sums the smoothing term needs, ``[...]`` each.

  ``count`` possible classes (unmasked, logit ``> -inf``), ``wsum = Σ w_c`` over
  them, and ``wdot = Σ w_c (x_c − shift)`` over them.
  """

  count: jax.Array
  wsum: jax.Array
  wdot: jax.Array


def smooth_stats(xm: jax.Array, shift: jax.Array, weights: jax.Array | None) -> SmoothStats:
  """:class:`SmoothStats` of masked float logits ``xm [..., C]`` (classes last)."""
  possible = xm > -jnp.inf
  if weights is None:
    w = possible.astype(xm.dtype)
  else:
    w = jnp.where(possible, weights.reshape((1,) * (xm.ndim - 1) + weights.shape), 0.0)
  return SmoothStats(
      jnp.sum(possible, axis=-1).astype(xm.dtype),
      jnp.sum(w, axis=-1),
      jnp.sum(jnp.where(possible, w * (xm - shift[..., None]), 0.0), axis=-1),
  )


def merge_smooth(a: SmoothStats, b: SmoothStats, shift_a, shift_b, shift) -> SmoothStats:
  """:class:`SmoothStats` of two column blocks, re-based onto a common ``shift``."""
  return SmoothStats(a.count + b.count, a.wsum + b.wsum,
                     a.wdot + a.wsum * (shift_a - shift) + b.wdot + b.wsum * (shift_b - shift))


def target_loss(target: Target, stats: RowStats, nll: jax.Array,
                smooth: SmoothStats | None) -> jax.Array:
  """``Σ_c q_c (lse − x_c) + z·lse²`` per row.

  Args:
    target: the row coefficients.
    stats: row statistics (``lse = shift + log total``).
    nll: ``lse − x_y`` per row (0 where ``on_label`` is 0).
    smooth: the smoothing sums (needed when ``target.smooth`` is set).

  Returns:
    ``[...]`` losses.
  """
  loss = target.on_label * nll
  if target.smooth is not None:
    loss = loss + target.smooth * smooth_term(stats, smooth)
  if target.z is not None:
    loss = loss + target.z * stats.safe_lse**2
  return loss


def smooth_term(stats: RowStats, smooth: SmoothStats) -> jax.Array:
  """``mean_c w_c (lse − x_c)`` over the possible classes (``-log p`` averaged)."""
  return _common.safe_divide(smooth.wsum * stats.log_total - smooth.wdot, smooth.count)


class GradScales(NamedTuple):
  """Per-row factors of ``g·∂ℓ/∂x_c = softmax_c·probs − per_class·w_c·[possible] − at_label·[c=y]``.

  ``probs`` multiplies ``exp(x − shift)`` (it already holds ``1/total``);
  ``per_class`` is None without smoothing.
  """

  probs: jax.Array
  per_class: jax.Array | None
  at_label: jax.Array


def grad_scales(target: Target, stats: RowStats, smooth: SmoothStats | None,
                g: jax.Array) -> GradScales:
  """:class:`GradScales` for cotangent ``g [...]``: ``(Q + 2 z lse)·g/total`` and the rest.

  Rows of zero cotangent get exactly 0 in every factor (no ``0·inf`` or
  ``0·NaN`` from a row that does not count).
  """
  coef = target.on_label
  per_class = None
  if target.smooth is not None:
    per_class = _common.safe_divide(g * target.smooth, smooth.count)
    coef = coef + _common.safe_divide(target.smooth * smooth.wsum, smooth.count)
  if target.z is not None:
    coef = coef + 2.0 * target.z * stats.safe_lse
  scales = GradScales(_common.safe_divide(g * coef, stats.total), per_class, g * target.on_label)
  unused = g == 0
  return GradScales(*(None if f is None else jnp.where(unused, 0.0, f) for f in scales))


def lse_grad_scale(g_lse: jax.Array, stats: RowStats, live: jax.Array | None = None) -> jax.Array:
  """The factor of ``exp(x − shift)`` in ``g_lse·∂lse/∂x = g_lse·softmax``: ``g_lse / total``.

  It adds to :attr:`GradScales.probs`. Exactly 0 where ``g_lse`` is 0, where a row
  has no mass, and outside ``live`` (rows whose reported ``lse`` is a constant).
  """
  scale = jnp.where(g_lse == 0, 0.0, _common.safe_divide(g_lse, stats.total))
  return scale if live is None else jnp.where(live, scale, 0.0)


def logits_grad(
    e: jax.Array,
    scales: GradScales,
    labels: jax.Array | None = None,
    *,
    dense: jax.Array | None = None,
    possible: jax.Array | None = None,
    weights: jax.Array | None = None,
) -> jax.Array:
  """Gradient of the target loss w.r.t. a block of logits columns ``[R, size]``.

  ``e·probs − per_class·w·possible − at_label·onehot(labels) − dense``, each
  term only when given.

  Args:
    e: ``exp(x − shift)`` of the block, ``[R, size]``, in the compute dtype.
    scales: the row factors from :func:`grad_scales` (``at_label`` may be None
      for dense targets).
    labels: int ``[R]`` label of each row, or None.
    dense: an explicit ``[R, size]`` term to subtract (``g·q`` for probability
      labels), or None.
    possible: boolean ``[R, size]``, the possible classes of the block (needed
      with smoothing).
    weights: the block's class weights ``(size,)`` or None.

  Returns:
    ``[R, size]`` in ``e``'s dtype; the label term is a scatter, not a one-hot pass.
  """
  gx = e * scales.probs[:, None]
  if scales.per_class is not None:
    w = 1.0 if weights is None else weights[None, :]
    gx = gx - jnp.where(possible, scales.per_class[:, None] * w, 0.0)
  if dense is not None:
    gx = gx - dense
  if labels is None:
    return gx
  values = -scales.at_label.astype(gx.dtype)
  if _sharding.is_explicitly_sharded(gx):  # an elementwise select partitions cleanly
    onehot = lax.broadcasted_iota(labels.dtype, gx.shape, 1) == labels[:, None]
    return gx + jnp.where(onehot, values[:, None], 0.0)
  rows = jnp.arange(e.shape[0])
  return gx.at[rows, labels].add(values, mode="promise_in_bounds", unique_indices=True,
                                 indices_are_sorted=True)
