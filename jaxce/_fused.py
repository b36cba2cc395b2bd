"""Fused per-row softmax cross-entropy kernels with hand-written gradients.

Both kernels take logits with classes on the last axis, in their own dtype
(bf16/fp16 are upcast inside the fused loops; on CPU, XLA's reduction emitter
may still take one float32 copy), and return float32 (float64 for float64 input) per-row losses

.. math::
  \\ell_n = \\sum_c q_{n,c}\\,(\\mathrm{lse}_n - x_{n,c}) + z_n\\,\\mathrm{lse}_n^2 .

The backward writes ``g_n·((Q_n + 2 z_n lse_n)·softmax − q_n)`` in one
elementwise pass (``Q_n = Σ_c q_{n,c}``); the label term of integer labels is
a scatter, not a one-hot pass. Cotangents for every float input are exact, so
gradients reach class weights, smoothing and dense labels too (under ``jit``
the unused ones are dead code). The backward is plain JAX, so ``grad`` of
``grad`` and ``jax.hessian`` work; ``jax.jvp`` of the loss itself is not defined
for a ``custom_vjp`` and JAX raises a ``TypeError`` saying so.

Integer labels (``sparse_rows``) shift each row by its label's logit instead of
its max: ``s = Σ_c exp(x_c − x_y) ≥ 1`` needs no max pass and the loss is
``log s`` itself. A row where that overflows sends the whole call through the
max-shifted path (``lax.cond``, one predicate for all rows, ``vmap`` included).
For 32/64-bit logits the forward keeps ``exp(x − x_y)`` for the backward, so
``exp`` runs once; under ``jit`` XLA writes it straight into the gradient's
buffer, so loss+gradient of logits passed in holds no other ``[N, C]`` buffer
(in a step that computes the logits, it is one beside them, as in optax). For
16-bit logits the forward keeps only the logits and the backward recomputes
``exp``, rather than hold a float32 copy.

Probability labels (``dense_rows``) save per-row statistics (``lse`` and a few
sums) and the backward recomputes ``softmax`` from the logits.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from jaxce import _common


def _row_stats(x, mask):
  """Returns ``(xm, m, log_s, has_mass)``: masked float logits and the shifted lse parts.

  ``lse = m + log_s``; rows with nothing unmasked (or only ``-inf``) have
  ``has_mass`` False, ``m = 0`` and ``log_s = 0`` so everything stays finite.
  """
  if mask is not None:
    x = jnp.where(mask, x, -jnp.inf)
  # The max is exact in the input dtype; taking it there keeps XLA from
  # materialising a float32 copy of bf16/fp16 logits.
  m = lax.stop_gradient(jnp.max(x, axis=-1)).astype(_common.compute_dtype(x.dtype))
  m = jnp.where(m == -jnp.inf, 0.0, m)
  xm = x.astype(m.dtype)
  s = jnp.sum(jnp.exp(xm - m[..., None]), axis=-1)
  has_mass = s != 0
  return xm, m, jnp.log(jnp.where(has_mass, s, 1.0)), has_mass


def _lse(m, log_s, has_mass):
  return jnp.where(has_mass, m + log_s, -jnp.inf)


def _softmax(xm, m, log_s):
  return jnp.exp(xm - (m + log_s)[..., None])


def _recompute_logits(x, mask, dtype):
  """Masked float logits for the backward pass."""
  x = x.astype(dtype)
  return x if mask is None else jnp.where(mask, x, -jnp.inf)


def _nonzero_cotangent(g, value):
  """``g·value`` that is 0 where ``g`` is 0 (rows masked out after the kernel)."""
  return jnp.where(g == 0, 0.0, g * value)


# ---------------------------------------------------------------------------
# Integer labels: q = a·onehot(label) + (eps/count)·w·possible.
# ---------------------------------------------------------------------------


def _label_pivot_exp(x, labels, live, keep_exp, dtype):
  """Returns ``(e, p, s)``: per-row pivot ``p``, ``e = exp(x − p)`` and ``s = Σ_c e``.

  Takes ``x [..., C]`` (masked, in its own dtype), ``labels [...]``, ``live [...]``.
  The pivot is the label's own logit, which costs a gather instead of a max
  pass and gives ``s ≥ 1`` (the label's term is ``exp(0)``). If that overflows
  for any live row (a logit ~88 above the label's in float32) or a live label's
  logit is not finite, the whole call takes the row max as pivot instead
  (``lax.cond``). On the fast path, rows that are not live get ``e = 0``,
  ``p = 0`` and ``s = 1``; nothing downstream reads their values (their loss
  coefficients and cotangents are 0). ``e`` is None unless ``keep_exp`` (the
  backward pass then reuses it).
  """
  return _pivot_exp_fn(keep_exp, jnp.dtype(dtype).name)(x, labels, live)


@functools.cache
def _pivot_exp_fn(keep_exp, dtype):
  """``_label_pivot_exp`` for static options; ``vmap`` axes are treated as row axes.

  That keeps ``lax.cond`` a branch under ``vmap`` (one predicate for all rows):
  a batched predicate would turn it into a select that runs both pivots.
  """

  @jax.custom_batching.custom_vmap
  def pivot_exp(x, labels, live):
    x_y = jnp.take_along_axis(x, labels[..., None], axis=-1)[..., 0].astype(dtype)
    pivot = lax.stop_gradient(jnp.where(live, x_y, jnp.inf))
    e = jnp.exp(x.astype(dtype) - pivot[..., None])
    s = jnp.where(live, jnp.sum(e, axis=-1), 1.0)
    fast = (e if keep_exp else None, jnp.where(live, pivot, 0.0), s)

    def by_max():
      # The max is exact in the input dtype; taking it there keeps XLA from
      # materialising a float32 copy of bf16/fp16 logits.
      m = lax.stop_gradient(jnp.max(x, axis=-1)).astype(dtype)
      m = jnp.where(m == -jnp.inf, 0.0, m)
      e = jnp.exp(x.astype(dtype) - m[..., None])
      return (e if keep_exp else None, m, jnp.sum(e, axis=-1))

    return lax.cond(jnp.any(live & ~jnp.isfinite(s)), by_max, lambda: fast)

  @pivot_exp.def_vmap
  def fold_rows(axis_size, in_batched, x, labels, live):
    # The batch axis becomes one more row axis (no reshape: XLA keeps writing
    # e, the gradient and the label scatter in one buffer).
    args = [a if batched else jnp.broadcast_to(a, (axis_size, *a.shape))
            for a, batched in zip((x, labels, live), in_batched, strict=True)]
    e, p, s = pivot_exp(*args)
    return (e, p, s), (None if e is None else True, True, True)

  # custom_vmap functions cannot be linearized, so differentiating through the
  # forward pass (grad of grad, jax.hessian) goes by this rule: with the pivot
  # held constant, de = e·dx and ds = Σ_c e·dx.
  @jax.custom_jvp
  def differentiable(x, labels, live):
    return pivot_exp(x, labels, live)

  @differentiable.defjvp
  def differentiable_jvp(primals, tangents):
    x, labels, live = primals
    e, p, s = differentiable(x, labels, live)
    full = e if e is not None else jnp.exp(
        x.astype(dtype) - jnp.where(live, p, jnp.inf)[..., None])
    de = full * tangents[0].astype(dtype)
    return (e, p, s), (None if e is None else de, jnp.zeros_like(p), jnp.sum(de, axis=-1))

  return differentiable


def _add_at_labels(gx, labels, values):
  """``gx [R, C]`` plus ``values [R]`` at each row's label (a scatter, not a one-hot pass)."""
  return gx.at[jnp.arange(gx.shape[0]), labels].add(
      values.astype(gx.dtype), mode="promise_in_bounds", unique_indices=True,
      indices_are_sorted=True)


def sparse_rows(x, mask, labels, live, a, eps, weights, z):
  """Per-row loss for ``q = a·onehot(labels) + eps/count·w·possible`` plus ``z·lse²``.

  Args:
    x: logits ``[..., C]``.
    mask: boolean ``[..., C]`` or None.
    labels: int ``[...]`` in ``[0, C)``.
    live: bool ``[...]``, the rows whose loss is used; the others give 0 and a
      zero gradient whatever their labels (NaN or ``+inf`` logits there still
      give NaN gradient entries, as in optax and PyTorch).
    a: ``[...]`` weight of the label term, ``(1-ε)·w_y`` (0 for dropped rows).
    eps: ``[...]`` smoothing mass ``ε`` (0 for dropped rows), or None.
    weights: class weights ``(C,)`` or None.
    z: ``[...]`` z-loss coefficient (0 for dropped rows).

  Returns:
    ``[...]`` losses, float32 (float64 for float64 logits).
  """
  # One row axis: XLA then writes exp(x − p), the scaled gradient and the label
  # scatter in one buffer (a reshape between them would force a copy).
  rows = labels.shape

  def flat(v):
    return None if v is None else v.reshape((math.prod(rows), *v.shape[len(rows):]))

  loss = _sparse_rows(flat(x), flat(mask), flat(labels), flat(live), flat(a), flat(eps), weights,
                      flat(z))
  return loss.reshape(rows)


@jax.custom_vjp
def _sparse_rows(x, mask, labels, live, a, eps, weights, z):
  return _sparse_fwd(x, mask, labels, live, a, eps, weights, z)[0]


def _class_weights_like(weights, xm):
  return weights.astype(xm.dtype).reshape((1,) * (xm.ndim - 1) + weights.shape)


def _sparse_fwd(x, mask, labels, live, a, eps, weights, z):
  dtype = _common.compute_dtype(x.dtype)
  xin = x if mask is None else jnp.where(mask, x, -jnp.inf)
  # 32/64-bit logits: keep exp(x − p) for the backward (under jit it is written
  # straight into the gradient's buffer, so exp runs once). 16-bit logits: keep
  # only the logits and recompute, rather than hold a float32 copy.
  keep_exp = jnp.dtype(x.dtype).itemsize >= 4
  e, p, s = _label_pivot_exp(xin, labels, live, keep_exp, dtype)
  has_mass = s != 0
  log_s = jnp.log(jnp.where(has_mass, s, 1.0))
  lse = jnp.where(live, _lse(p, log_s, has_mass), 0.0)
  x_y = jnp.take_along_axis(xin, labels[..., None], axis=-1)[..., 0].astype(dtype)
  nll = jnp.where(live, (p - x_y) + log_s, 0.0)  # p − x_y is exactly 0 on the fast path
  loss = a * nll + z * lse**2
  smooth = count = wsum = None
  needs_logits = e is None
  if eps is not None:
    needs_logits = True
    xm = xin.astype(dtype)
    possible = xm > -jnp.inf
    wp = possible if weights is None else jnp.where(possible, _class_weights_like(weights, xm), 0)
    count = jnp.sum(possible, axis=-1).astype(dtype)
    wsum = jnp.sum(wp, axis=-1).astype(dtype)
    shifted_dot = jnp.sum(jnp.where(possible, wp * (xm - p[..., None]), 0.0), axis=-1)
    smooth = _common.safe_divide(wsum * log_s - shifted_dot, count)  # mean_c w_c·(lse − x_c)
    smooth = jnp.where(live, smooth, 0.0)
    loss = loss + eps * smooth
  logits = (x, mask) if needs_logits else (None, None)
  residuals = (*logits, labels, live, e, p, s, a, eps, weights, z, nll, smooth, count, wsum)
  return loss, residuals


def _sparse_bwd(residuals, g):
  x, mask, labels, live, e, p, s, a, eps, weights, z, nll, smooth, count, wsum = residuals
  xm = None if x is None else _recompute_logits(x, mask, p.dtype)
  if e is None:
    e = jnp.exp(xm - jnp.where(live, p, jnp.inf)[..., None])
  has_mass = s != 0
  log_s = jnp.log(jnp.where(has_mass, s, 1.0))
  lse_safe = p + log_s
  coef = a + 2.0 * z * lse_safe
  if eps is not None:
    coef = coef + _common.safe_divide(eps * wsum, count)
  # g·coef·softmax = e·(g·coef/s): one multiply per element, then the label term.
  gx = e * _common.safe_divide(g * coef, s)[..., None]
  d_weights = None
  if eps is not None:
    per_class = _common.safe_divide(eps, count)[..., None]
    possible = xm > -jnp.inf
    w = 1.0 if weights is None else _class_weights_like(weights, xm)
    gx = gx - jnp.where(possible, (g[..., None] * per_class) * w, 0.0)
    if weights is not None:
      neg_logp = jnp.where(possible, lse_safe[..., None] - xm, 0.0)
      d_weights = jnp.sum(_nonzero_cotangent(g, per_class[..., 0])[..., None] * neg_logp,
                          axis=tuple(range(xm.ndim - 1))).astype(weights.dtype)
  gx = _add_at_labels(gx, labels, -g * a).astype(e.dtype if x is None else x.dtype)
  d_eps = None if eps is None else _nonzero_cotangent(g, smooth)
  lse = jnp.where(live, _lse(p, log_s, has_mass), 0.0)
  return (gx, None, None, None, _nonzero_cotangent(g, nll), d_eps, d_weights,
          _nonzero_cotangent(g, lse**2))


_sparse_rows.defvjp(_sparse_fwd, _sparse_bwd)


# ---------------------------------------------------------------------------
# Probability labels: q given in full.
# ---------------------------------------------------------------------------


@jax.custom_vjp
def dense_rows(x, mask, q, z):
  """Per-row loss ``Σ_c q_c·(lse − x_c) + z·lse²``; ``q_c = 0`` terms are 0 even at ``x_c = -inf``.

  Args:
    x: logits ``[..., C]``.
    mask: boolean ``[..., C]`` or None (``q`` must already be 0 where masked).
    q: float target weights ``[..., C]`` (smoothing and class weights applied).
    z: ``[...]`` z-loss coefficient.

  Returns:
    ``[...]`` losses, float32 (float64 for float64 logits).
  """
  return _dense_fwd(x, mask, q, z)[0]


def _dense_terms(xm, m, q):
  """``q·(x − m)`` with ``0·(−inf)`` read as 0."""
  return jnp.where(q == 0, 0.0, q * (xm - m[..., None]))


def _dense_fwd(x, mask, q, z):
  xm, m, log_s, has_mass = _row_stats(x, mask)
  q = q.astype(xm.dtype)
  q_sum = jnp.sum(q, axis=-1)
  loss = q_sum * log_s - jnp.sum(_dense_terms(xm, m, q), axis=-1)
  loss = loss + z * _lse(m, log_s, has_mass) ** 2
  return loss, (x, mask, q, z, m, log_s, has_mass, q_sum)


def _dense_bwd(residuals, g):
  x, mask, q, z, m, log_s, has_mass, q_sum = residuals
  xm = _recompute_logits(x, mask, m.dtype)
  lse_safe = m + log_s
  coef = q_sum + 2.0 * z * lse_safe
  gx = (g[..., None] * (coef[..., None] * _softmax(xm, m, log_s) - q)).astype(x.dtype)
  neg_logp = jnp.where(xm == -jnp.inf, 0.0, lse_safe[..., None] - xm)
  gq = _nonzero_cotangent(g[..., None], neg_logp)
  return gx, None, gq, _nonzero_cotangent(g, _lse(m, log_s, has_mass) ** 2)


dense_rows.defvjp(_dense_fwd, _dense_bwd)
