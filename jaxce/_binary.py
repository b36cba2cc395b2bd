"""Binary cross-entropy on probabilities and on logits."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero
from jax.typing import ArrayLike

from jaxce import _common

_LOG_CLAMP = -100.0  # PyTorch clamps log(p) and log(1 - p) at -100.
# PyTorch's BCE backward divides by max(p (1 - p), EPSILON), EPSILON a float 1e-12
# (also for float64 input).
_GRAD_EPS = float(np.float32(1e-12))


# ---------------------------------------------------------------------------
# Validation (private for now; candidates for the shared path in _common).
# ---------------------------------------------------------------------------


def _outside_unit_interval(x: jax.Array) -> jax.Array:
  """True where ``x`` is not in ``[0, 1]``, NaN included."""
  return ~((x >= 0) & (x <= 1))


def _check_unit_interval(x: jax.Array, name: str, fn: str) -> None:
  """Raises ``ValueError`` on concrete values outside ``[0, 1]`` (or NaN).

  Under tracing it adds a ``checkify`` check instead (the loss is NaN there),
  which :func:`jaxce.checked` turns into an error.
  """
  message = f"{fn}: {name} must lie in [0, 1]"
  if _common.is_concrete(x):
    values = np.asarray(x)
    bad = ~((values >= 0) & (values <= 1))
    if bad.any():
      index = tuple(int(i) for i in np.argwhere(bad)[0])
      raise ValueError(f"{message}; got {values[index]:.6g} at index {index} "
                       f"({int(bad.sum())} value(s) outside [0, 1] or NaN).")
  else:
    bad = _outside_unit_interval(x)
    _common.debug_check(~jnp.any(bad), message + "; got {} value(s) outside [0, 1] or NaN.",
                         jnp.sum(bad))


def _host_cast(value: Any, dtype: Any) -> Any:
  """NumPy 64-bit integers in the compute dtype, cast on the host.

  Without ``jax_enable_x64``, ``jnp.asarray`` wraps them modulo 2**32 (a label
  of 2**32 would become a valid 0); they are cast to floats here anyway.
  """
  if isinstance(value, (np.ndarray, np.generic)) and value.dtype.kind in "iu" and (
      value.dtype.itemsize == 8):
    return np.asarray(value, dtype)
  return value


def _elementwise_inputs(x, labels, weights, fn, x_name, label_name="labels"):
  """Validates an elementwise loss's inputs; returns them in the compute dtype."""
  x = _common.as_array(x, x_name, fn)
  _common.check_real(x, x_name, fn)
  _common.check_floating(x, x_name, fn)
  dtype = _common.compute_dtype(x.dtype)
  labels = _common.as_array(_host_cast(labels, dtype), label_name, fn)
  _common.check_real(labels, label_name, fn)
  _common.check_shape(labels, x.shape, label_name, x_name, fn)
  if weights is not None:
    weights = _common.as_array(_host_cast(weights, dtype), "weights", fn)
    _common.check_real(weights, "weights", fn)
    weights = _common.broadcast_to(weights, x.shape, "weights", x_name, fn).astype(dtype)
  return x.astype(dtype), labels.astype(dtype), weights


def _weighted_reduce(loss, weights, reduction):
  if weights is not None:
    loss = weights * loss
  return _common.reduce_loss(loss, reduction)


# ---------------------------------------------------------------------------
# Elementwise terms with explicit derivatives.
# ---------------------------------------------------------------------------


def _clamped_log(p: jax.Array) -> jax.Array:
  """``max(log p, -100)`` (``-100`` at ``p <= 0``), NaN-free under differentiation."""
  positive = p > 0
  return jnp.where(positive, jnp.maximum(jnp.log(jnp.where(positive, p, 1.0)), _LOG_CLAMP),
                   _LOG_CLAMP)


def _clamped_log1m(p: jax.Array) -> jax.Array:
  """``max(log1p(-p), -100)`` (``-100`` at ``p >= 1``), as PyTorch computes it."""
  below_one = p < 1
  return jnp.where(below_one,
                   jnp.maximum(jnp.log1p(-jnp.where(below_one, p, 0.0)), _LOG_CLAMP), _LOG_CLAMP)


def _nan_where(bad: jax.Array, x: jax.Array) -> jax.Array:
  return jnp.where(bad, jnp.nan, x)


def _add_tangent(out, coefficient, tangent):
  """``out + coefficient · tangent``, skipping symbolic zeros (no ``inf · 0``)."""
  if type(tangent) is SymbolicZero:
    return out
  term = coefficient * tangent
  return term if out is None else out + term


@jax.custom_jvp
def _bce_terms(p: jax.Array, y: jax.Array) -> jax.Array:
  """``-[y max(log p, -100) + (1-y) max(log(1-p), -100)]``; NaN outside the domain."""
  bad = _outside_unit_interval(p) | _outside_unit_interval(y)
  return _nan_where(bad, -(y * _clamped_log(p) + (1.0 - y) * _clamped_log1m(p)))


def _bce_terms_jvp(primals, tangents):
  """PyTorch's gradients: ``(p - y) / max(p (1 - p), 1e-12)`` for ``p``; for ``y``
  the derivative of the clamped loss, ``max(log(1-p), -100) - max(log p, -100)``
  (PyTorch's ``-logit(p)``, except finite at ``p`` in ``{0, 1}``)."""
  (p, y), (dp, dy) = primals, tangents
  bad = _outside_unit_interval(p) | _outside_unit_interval(y)
  log_p, log_1mp = _clamped_log(p), _clamped_log1m(p)
  loss = _nan_where(bad, -(y * log_p + (1.0 - y) * log_1mp))
  grad_p = (p - y) / jnp.maximum((1.0 - p) * p, jnp.asarray(_GRAD_EPS, p.dtype))
  out = _add_tangent(None, _nan_where(bad, grad_p), dp)
  out = _add_tangent(out, _nan_where(bad, log_1mp - log_p), dy)
  return loss, jnp.zeros_like(loss) if out is None else out


_bce_terms.defjvp(_bce_terms_jvp, symbolic_zeros=True)


def _times(c: jax.Array, s: jax.Array) -> jax.Array:
  """``c · s`` that is 0 where ``c == 0`` and ``s`` is infinite (a term that is absent)."""
  return c * jnp.where((c == 0) & jnp.isinf(s), 0.0, s)


@jax.custom_jvp
def _logits_terms(x: jax.Array, y: jax.Array, pos_weight: jax.Array) -> jax.Array:
  """``(1-y) softplus(x) + pos_weight·y softplus(-x)``; NaN for labels outside [0, 1].

  Both terms are non-negative, so nothing cancels (PyTorch's
  ``(1-y) x - (1 + (pw-1) y) log σ(x)`` loses digits at large ``|x|``), and an
  infinite logit gives the limit: 0 when the label agrees, ``inf`` otherwise.
  """
  bad = _outside_unit_interval(y)
  return _nan_where(bad, _times(1.0 - y, jax.nn.softplus(x))
                    + _times(pos_weight * y, jax.nn.softplus(-x)))


def _logits_terms_jvp(primals, tangents):
  """``d/dx = (1-y) σ(x) - pw·y σ(-x)``, ``d/dy = pw softplus(-x) - softplus(x)``,
  ``d/dpw = y softplus(-x)``, each the limit at infinite logits."""
  (x, y, pw), (dx, dy, dpw) = primals, tangents
  bad = _outside_unit_interval(y)
  sp_pos, sp_neg = jax.nn.softplus(x), jax.nn.softplus(-x)
  neg, pos = 1.0 - y, pw * y
  loss = _nan_where(bad, _times(neg, sp_pos) + _times(pos, sp_neg))
  grad_x = neg * jax.nn.sigmoid(x) - pos * jax.nn.sigmoid(-x)
  out = _add_tangent(None, _nan_where(bad, grad_x), dx)
  out = _add_tangent(out, _nan_where(bad, _times(pw, sp_neg) - sp_pos), dy)
  out = _add_tangent(out, _nan_where(bad, _times(y, sp_neg)), dpw)
  return loss, jnp.zeros_like(loss) if out is None else out


_logits_terms.defjvp(_logits_terms_jvp, symbolic_zeros=True)


# ---------------------------------------------------------------------------
# Public functions.
# ---------------------------------------------------------------------------


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

  Exactly PyTorch's definition, gradients included: each log term is clamped
  at ``-100``, so ``p`` of exactly 0 or 1 gives a finite loss (at most 100 per
  element), and the gradient with respect to ``p`` is PyTorch's
  ``(p - y) / max(p (1 - p), 1e-12)`` (about ``-1e12`` at ``p = 0, y = 1``: it
  points the right way). The gradient with respect to ``labels`` is the
  derivative of the clamped loss, ``max(log(1-p), -100) - max(log p, -100)``
  (PyTorch gives ``±inf`` at ``p`` in ``{0, 1}``); ``weights`` get their true
  gradient (PyTorch has none). ``probs`` or ``labels`` outside ``[0, 1]`` or
  NaN raise ``ValueError`` when concrete (PyTorch raises too); under ``jit``
  they give NaN, gradients included, and :func:`jaxce.checked` raises.
  ``mean`` averages over all elements. Prefer
  :func:`binary_cross_entropy_with_logits` when you have logits: it is exact
  where this one clamps.

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
  _check_unit_interval(p, "probs", fn)
  _check_unit_interval(y, "labels", fn)
  return _weighted_reduce(_bce_terms(p, y), w, reduction)


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
    \ell = w\,[\,(1 - y)\,\mathrm{softplus}(x) + p_w\,y\,\mathrm{softplus}(-x)\,]

  which equals PyTorch's :math:`-w\,[p_w\, y \log\sigma(x) + (1-y)\log(1-\sigma(x))]`
  without overflow or cancellation for any finite ``x`` (PyTorch's form loses
  digits for soft labels at large ``|x|``). Infinite logits give the limit: 0
  where the label agrees (PyTorch: NaN), ``inf`` otherwise; NaN logits give
  NaN. Gradients reach ``logits``, ``labels``, ``weights`` and ``pos_weight``
  (PyTorch has none for the last two). ``labels`` outside ``[0, 1]`` or NaN
  raise ``ValueError`` when concrete (PyTorch extrapolates the formula); under
  ``jit`` they give NaN and :func:`jaxce.checked` raises. ``mean`` averages
  over all elements.

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
  if pos_weight is None:
    pw = jnp.ones((), x.dtype)
  else:
    pw = _common.as_array(_host_cast(pos_weight, x.dtype), "pos_weight", fn)
    _common.check_real(pw, "pos_weight", fn)
    pw = _common.broadcast_to(pw, x.shape, "pos_weight", "logits", fn).astype(x.dtype)
  _check_unit_interval(y, "labels", fn)
  return _weighted_reduce(_logits_terms(x, y, pw), w, reduction)
