"""Numerically stable softmax, log-softmax and logsumexp with masks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike

from jaxce import _common


def _prepare(x: ArrayLike, axis: int, where: ArrayLike | None, fn: str):
  """Validates inputs; returns (x in compute dtype, mask or None, axis, out dtype)."""
  x = _common.as_array(x, "x", fn)
  axis = _common.canonical_axis(axis, x.ndim, "x", fn)
  mask = _common.mask_array(where, x.shape, "x", fn)
  out_dtype = x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32
  return x.astype(_common.compute_dtype(x.dtype)), mask, axis, out_dtype


def shifted_sumexp(
    x: jax.Array, axis: int, mask: jax.Array | None
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """Returns ``(shifted, sumexp, x_max, has_mass)`` with ``shifted = x - x_max``.

  The max is taken over unmasked entries and stopped from gradients (the result
  does not depend on it). Rows whose max is ``-inf`` (fully masked, or all
  ``-inf``) shift by 0, so ``sumexp`` is 0 there and ``has_mass`` is False.
  ``+inf`` and NaN propagate as NaN (``has_mass`` is True for them).
  """
  if mask is not None:
    x = jnp.where(mask, x, -jnp.inf)
  x_max = jnp.max(x, axis=axis, keepdims=True, initial=-jnp.inf)  # -inf for an empty axis
  x_max = lax.stop_gradient(jnp.where(x_max == -jnp.inf, 0.0, x_max))
  shifted = x - x_max
  sumexp = jnp.sum(jnp.exp(shifted), axis=axis, keepdims=True)
  return shifted, sumexp, x_max, sumexp != 0


def logsumexp(x: ArrayLike, *, axis: int = -1, where: ArrayLike | None = None) -> jax.Array:
  r"""Log of the sum of exponentials along ``axis``, computed stably.

  .. math::
    \mathrm{lse}(x) = \log \sum_{c:\,\mathrm{where}_c} e^{x_c}

  Low-precision inputs (bf16, fp16) are accumulated in float32 and the result is
  cast back to the input dtype. A row with no unmasked entry (or only ``-inf``)
  gives ``-inf`` with a zero gradient (``jax.nn.logsumexp`` gives a NaN
  gradient); ``+inf`` or NaN inputs give NaN.

  Args:
    x: input array of any shape ``[..., C, ...]``.
    axis: the axis to reduce.
    where: optional boolean mask broadcastable to ``x.shape``; ``False`` entries
      are left out.

  Returns:
    An array of ``x.shape`` without ``axis``, in ``x``'s dtype (float32 for
    integer input).

  Examples:
    >>> import jaxce
    >>> jaxce.logsumexp(jnp.array([1.0, 2.0, 3.0]))
    Array(3.4076..., dtype=float32)
    >>> jaxce.logsumexp(jnp.array([1.0, 2.0, 3.0]), where=jnp.array([True, True, False]))
    Array(2.3132..., dtype=float32)

  References:
    ``torch.logsumexp``; ``jax.nn.logsumexp``.
  """
  x, mask, axis, out_dtype = _prepare(x, axis, where, "jaxce.logsumexp")
  _, sumexp, x_max, has_mass = shifted_sumexp(x, axis, mask)
  lse = jnp.log(jnp.where(has_mass, sumexp, 1.0)) + x_max
  lse = jnp.where(has_mass, lse, -jnp.inf)
  return jnp.squeeze(lse, axis).astype(out_dtype)


def log_softmax(x: ArrayLike, *, axis: int = -1, where: ArrayLike | None = None) -> jax.Array:
  r"""Log-softmax along ``axis``, computed stably.

  .. math::
    \log \mathrm{softmax}(x)_c = x_c - \log \sum_{c'} e^{x_{c'}}

  Computed as ``shifted - log(sum(exp(shifted)))`` with ``shifted = x - max(x)``
  (the max stopped from gradients), accumulating bf16/fp16 in float32. Masked
  entries are ``-inf``; a row with every entry masked is all ``-inf`` with zero
  gradients. A row whose unmasked logits are all ``-inf`` has no distribution
  and gives NaN, as does any ``+inf`` or NaN in the row.

  Args:
    x: logits of any shape ``[..., C, ...]``.
    axis: the class axis.
    where: optional boolean mask broadcastable to ``x.shape``; ``False`` entries
      are excluded from the normalisation.

  Returns:
    An array of ``x.shape`` and ``x``'s dtype (float32 for integer input).

  Examples:
    >>> import jaxce
    >>> jaxce.log_softmax(jnp.array([2.0, 1.0, 0.1]))
    Array([-0.4170..., -1.4170..., -2.3170...], dtype=float32)

  References:
    ``torch.nn.functional.log_softmax``; ``tf.nn.log_softmax``.
  """
  x, mask, axis, out_dtype = _prepare(x, axis, where, "jaxce.log_softmax")
  shifted, sumexp, _, has_mass = shifted_sumexp(x, axis, mask)
  out = shifted - jnp.log(jnp.where(has_mass, sumexp, 1.0))
  out = jnp.where(has_mass, out, jnp.nan)  # no distribution; fully masked rows fixed below
  if mask is not None:
    out = jnp.where(mask, out, -jnp.inf)
  return out.astype(out_dtype)


def softmax(x: ArrayLike, *, axis: int = -1, where: ArrayLike | None = None) -> jax.Array:
  r"""Softmax along ``axis``, computed stably.

  .. math::
    \mathrm{softmax}(x)_c = \frac{e^{x_c - \max x}}{\sum_{c'} e^{x_{c'} - \max x}}

  Masked entries are 0; a row with every entry masked is all 0 with zero
  gradients. A row whose unmasked logits are all ``-inf`` gives NaN, as does any
  ``+inf`` or NaN in the row. bf16/fp16 inputs are accumulated in float32.

  Args:
    x: logits of any shape ``[..., C, ...]``.
    axis: the class axis.
    where: optional boolean mask broadcastable to ``x.shape``.

  Returns:
    Probabilities of ``x.shape`` and ``x``'s dtype (float32 for integer input);
    unmasked entries of each row sum to 1.

  Examples:
    >>> import jaxce
    >>> jaxce.softmax(jnp.array([2.0, 1.0, 0.1]))
    Array([0.6590..., 0.2424..., 0.0986...], dtype=float32)

  References:
    ``torch.nn.functional.softmax``; ``tf.nn.softmax``.
  """
  x, mask, axis, out_dtype = _prepare(x, axis, where, "jaxce.softmax")
  shifted, sumexp, _, has_mass = shifted_sumexp(x, axis, mask)
  probs = jnp.exp(shifted) / jnp.where(has_mass, sumexp, 1.0)
  probs = jnp.where(has_mass, probs, jnp.nan)  # no distribution; fully masked rows fixed below
  if mask is not None:
    probs = jnp.where(mask, probs, 0.0)
  return probs.astype(out_dtype)
