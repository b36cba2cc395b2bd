"""Binary cross-entropy on probabilities and on logits."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxce import _common

_LOG_CLAMP = -100.0  # PyTorch clamps log(p) and log(1 - p) at -100.


def _elementwise_inputs(x, labels, weights, fn, x_name, label_name="labels"):
  """Validates an elementwise loss's inputs; returns them in the compute dtype."""
  x = _common.as_array(x, x_name, fn)
  _common.check_floating(x, x_name, fn)
  labels = _common.as_array(labels, label_name, fn)
  _common.check_shape(labels, x.shape, label_name, x_name, fn)
  dtype = _common.compute_dtype(x.dtype)
  if weights is not None:
    weights = _common.as_array(weights, "weights", fn)
    weights = _common.broadcast_to(weights, x.shape, "weights", x_name, fn).astype(dtype)
  return x.astype(dtype), labels.astype(dtype), weights


def _weighted_reduce(loss, weights, reduction):
  if weights is not None:
    loss = weights * loss
  return _common.reduce_loss(loss, reduction)


def _clamped_log(p: jax.Array) -> jax.Array:
  """``max(log p, -100)``, finite with a zero gradient where the clamp is active."""
  positive = p > 0
  log_p = jnp.log(jnp.where(positive, p, 1.0))
  return jnp.where(positive, jnp.maximum(log_p, _LOG_CLAMP), _LOG_CLAMP)


def binary_cross_entropy(
    probs: ArrayLike,
    labels: ArrayLike,
    *,
    weights: ArrayLike | None = None,
    reduction: str = "none",
) -> jax.Array:
  r"""Binary cross-entropy between probabilities and (soft) binary labels.

  .. math::
    \ell = -w\,[\,y \log p + (1 - y) \log (1 - p)\,]

  As in PyTorch, each log term is clamped at ``-100``, so ``p`` of exactly 0 or 1
  gives a finite loss (at most 100 per element) and a finite gradient (zero where
  the clamp is active). Probabilities outside ``[0, 1]`` raise ``ValueError``
  when concrete and give NaN under ``jit``. ``mean`` averages over all elements.
  Prefer :func:`binary_cross_entropy_with_logits` when you have logits: it is
  exact where this one clamps.

  Args:
    probs: predicted probabilities of any shape.
    labels: targets in ``[0, 1]`` of ``probs.shape`` (ints and bools accepted).
    weights: optional element weights broadcastable to ``probs.shape``.
    reduction: ``"none"``, ``"mean"`` or ``"sum"``.

  Returns:
    Elementwise losses of ``probs.shape`` for ``"none"``, otherwise a scalar;
    float32 for float32 and lower-precision input.

  Examples:
    >>> import jaxce
    >>> jaxce.binary_cross_entropy(jnp.array([0.9, 0.6]), jnp.array([1, 0]), reduction="mean")
    Array(0.5108..., dtype=float32)

  References:
    ``torch.nn.functional.binary_cross_entropy``; ``torch.nn.BCELoss``.
  """
  fn = "jaxce.binary_cross_entropy"
  _common.check_reduction(reduction, fn)
  p, y, w = _elementwise_inputs(probs, labels, weights, fn, "probs")
  outside = (p < 0) | (p > 1)
  if _common.is_concrete(p) and bool(jnp.any(outside)):
    lo, hi = float(p.min()), float(p.max())
    raise ValueError(f"{fn}: probs must lie in [0, 1]; got values in [{lo:.6g}, {hi:.6g}].")
  loss = -(y * _clamped_log(p) + (1.0 - y) * _clamped_log(1.0 - p))
  loss = jnp.where(outside, jnp.nan, loss)
  return _weighted_reduce(loss, w, reduction)


def binary_cross_entropy_with_logits(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    weights: ArrayLike | None = None,
    pos_weight: ArrayLike | None = None,
    reduction: str = "none",
) -> jax.Array:
  r"""Binary cross-entropy on logits, computed stably.

  .. math::
    \ell = w\,[\,(1 - y)\,x + (1 + (p_w - 1)\,y)\,\mathrm{softplus}(-x)\,]

  which equals :math:`-w\,[p_w\, y \log\sigma(x) + (1-y)\log(1-\sigma(x))]`
  without overflow for any finite ``x``. ``mean`` averages over all elements.

  Args:
    logits: scores of any shape.
    labels: targets in ``[0, 1]`` of ``logits.shape`` (ints and bools accepted).
    weights: optional element weights broadcastable to ``logits.shape``.
    pos_weight: optional weight of the positive term, broadcastable to
      ``logits.shape`` (e.g. ``(C,)`` for multi-label ``[N, C]``).
    reduction: ``"none"``, ``"mean"`` or ``"sum"``.

  Returns:
    Elementwise losses of ``logits.shape`` for ``"none"``, otherwise a scalar;
    float32 for float32 and lower-precision input.

  Examples:
    >>> import jaxce
    >>> jaxce.binary_cross_entropy_with_logits(jnp.array([2.0, -1.0]), jnp.array([1.0, 0.0]))
    Array([0.1269..., 0.3132...], dtype=float32)

  References:
    ``torch.nn.functional.binary_cross_entropy_with_logits``;
    ``tf.nn.sigmoid_cross_entropy_with_logits``.
  """
  fn = "jaxce.binary_cross_entropy_with_logits"
  _common.check_reduction(reduction, fn)
  x, y, w = _elementwise_inputs(logits, labels, weights, fn, "logits")
  scale = 1.0
  if pos_weight is not None:
    pos_weight = _common.as_array(pos_weight, "pos_weight", fn)
    pos_weight = _common.broadcast_to(pos_weight, x.shape, "pos_weight", "logits", fn)
    scale = 1.0 + (pos_weight.astype(x.dtype) - 1.0) * y
  loss = (1.0 - y) * x + scale * jax.nn.softplus(-x)
  return _weighted_reduce(loss, w, reduction)
