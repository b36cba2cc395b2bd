"""Fused per-row softmax cross-entropy kernels with hand-written gradients.

Both kernels take logits with classes on the last axis, in their own dtype
(bf16/fp16 are upcast inside the fused loops; on CPU, XLA's reduction emitter
may still take one float32 copy), and return float32 (float64 for float64 input) per-row losses

.. math::
  \\ell_n = \\sum_c q_{n,c}\\,(\\mathrm{lse}_n - x_{n,c}) + z_n\\,\\mathrm{lse}_n^2 .

The forward pass saves only per-row statistics (``lse`` and a few sums); the
backward recomputes ``softmax`` from the logits and writes
``g_n·((Q_n + 2 z_n lse_n)·softmax − q_n)`` in one elementwise pass, where
``Q_n = Σ_c q_{n,c}``. Cotangents for every float input are exact, so
gradients reach class weights, smoothing and dense labels too (under ``jit``
the unused ones are dead code). The backward is plain JAX, so ``grad`` of
``grad`` and ``jax.hessian`` work; ``jax.jvp`` of the loss itself is not defined
for a ``custom_vjp`` and JAX raises a ``TypeError`` saying so.
"""

from __future__ import annotations

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


@jax.custom_vjp
def sparse_rows(x, mask, labels, a, eps, weights, z):
  """Per-row loss for ``q = a·onehot(labels) + eps/count·w·possible`` plus ``z·lse²``.

  Args:
    x: logits ``[..., C]``.
    mask: boolean ``[..., C]`` or None.
    labels: int ``[...]`` in ``[0, C)``.
    a: ``[...]`` weight of the label term, ``(1-ε)·w_y`` (0 for dropped rows).
    eps: ``[...]`` smoothing mass ``ε`` (0 for dropped rows).
    weights: class weights ``(C,)`` or None.
    z: ``[...]`` z-loss coefficient (0 for dropped rows).

  Returns:
    ``[...]`` losses, float32 (float64 for float64 logits).
  """
  return _sparse_fwd(x, mask, labels, a, eps, weights, z)[0]


def _class_weights_like(weights, xm):
  return weights.astype(xm.dtype).reshape((1,) * (xm.ndim - 1) + weights.shape)


def _sparse_fwd(x, mask, labels, a, eps, weights, z):
  xm, m, log_s, has_mass = _row_stats(x, mask)
  lse = _lse(m, log_s, has_mass)
  x_y = jnp.take_along_axis(x if mask is None else jnp.where(mask, x, -jnp.inf),
                            labels[..., None], axis=-1)[..., 0].astype(m.dtype)
  nll = lse - x_y
  loss = a * nll + z * lse**2
  smooth = count = wsum = None
  if eps is not None:
    possible = xm > -jnp.inf
    wp = possible if weights is None else jnp.where(possible, _class_weights_like(weights, xm), 0)
    count = jnp.sum(possible, axis=-1).astype(xm.dtype)
    wsum = jnp.sum(wp, axis=-1).astype(xm.dtype)
    shifted_dot = jnp.sum(jnp.where(possible, wp * (xm - m[..., None]), 0.0), axis=-1)
    smooth = _common.safe_divide(wsum * log_s - shifted_dot, count)  # mean_c w_c·(lse − x_c)
    loss = loss + eps * smooth
  residuals = (x, mask, labels, a, eps, weights, z, m, log_s, has_mass, nll, smooth, count, wsum)
  return loss, residuals


def _sparse_bwd(residuals, g):
  x, mask, labels, a, eps, weights, z, m, log_s, has_mass, nll, smooth, count, wsum = residuals
  xm = _recompute_logits(x, mask, m.dtype)
  lse_safe = m + log_s
  coef = a + 2.0 * z * lse_safe
  if eps is not None:
    coef = coef + _common.safe_divide(eps * wsum, count)
  onehot = lax.broadcasted_iota(labels.dtype, xm.shape, xm.ndim - 1) == labels[..., None]
  gx = coef[..., None] * _softmax(xm, m, log_s) - jnp.where(onehot, a[..., None], 0.0)
  d_weights = None
  if eps is not None:
    per_class = _common.safe_divide(eps, count)[..., None]
    possible = xm > -jnp.inf
    w = 1.0 if weights is None else _class_weights_like(weights, xm)
    gx = gx - jnp.where(possible, per_class * w, 0.0)
    if weights is not None:
      neg_logp = jnp.where(possible, lse_safe[..., None] - xm, 0.0)
      d_weights = jnp.sum(_nonzero_cotangent(g, per_class[..., 0])[..., None] * neg_logp,
                          axis=tuple(range(xm.ndim - 1))).astype(weights.dtype)
  gx = (g[..., None] * gx).astype(x.dtype)
  lse = _lse(m, log_s, has_mass)
  d_eps = None if eps is None else _nonzero_cotangent(g, smooth)
  return (gx, None, None, _nonzero_cotangent(g, nll), d_eps, d_weights,
          _nonzero_cotangent(g, lse**2))


sparse_rows.defvjp(_sparse_fwd, _sparse_bwd)


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
