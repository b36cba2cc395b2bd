"""Mean squared error."""

from __future__ import annotations

import jax
from jax.typing import ArrayLike

from jaxce import _common
from jaxce._binary import _elementwise_inputs
from jaxce._binary import _weighted_reduce


def mse_loss(
    predictions: ArrayLike,
    targets: ArrayLike,
    *,
    weights: ArrayLike | None = None,
    reduction: str = "none",
) -> jax.Array:
  r"""Squared error between predictions and targets.

  .. math::
    \ell = w\,(\hat y - y)^2

  Unlike PyTorch, which broadcasts mismatched shapes with a warning, ``targets``
  must have exactly ``predictions.shape`` (a silent ``[N, 1]`` vs ``[N]``
  broadcast is a classic bug); ``weights`` may broadcast. ``mean`` averages over
  all elements. Gradients reach ``predictions``, float ``targets`` and
  ``weights``; infinite or NaN inputs give what the formula gives (``inf``, or
  NaN for ``inf - inf``), as in PyTorch, and a square that overflows the
  compute dtype is ``inf``. Complex inputs raise ``TypeError``.

  Args:
    predictions: floating predictions of any shape.
    targets: targets of ``predictions.shape``.
    weights: optional element weights broadcastable to ``predictions.shape``.
    reduction: ``"none"``, ``"mean"`` or ``"sum"``.

  Returns:
    Elementwise losses of ``predictions.shape`` for ``"none"``, otherwise a
    scalar; float32 for float32 and lower-precision input.

  Examples:
    >>> import jaxce
    >>> jaxce.mse_loss(jnp.array([1.0, 2.0, 4.0]), jnp.array([1.0, 0.0, 1.0]), reduction="mean")
    Array(4.3333..., dtype=float32)

  References:
    ``torch.nn.functional.mse_loss``; ``optax.squared_error``.
  """
  fn = "jaxce.mse_loss"
  _common.check_reduction(reduction, fn)
  p, t, w = _elementwise_inputs(predictions, targets, weights, fn, "predictions", "targets")
  return _weighted_reduce((p - t) ** 2, w, reduction)
