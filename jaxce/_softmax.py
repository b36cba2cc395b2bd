"""Numerically stable softmax, log-softmax and logsumexp with masks."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxce import _common
from jaxce import _core


def _prepare(x: ArrayLike, axis: int, where: ArrayLike | None, fn: str):
  """Validates inputs; returns (x as a float array, mask or None, axis)."""
  x = _common.as_array(x, "x", fn)
  _common.check_real(x, "x", fn)
  axis = _common.canonical_axis(axis, x.ndim, "x", fn)
  mask = _common.mask_array(where, x.shape, "x", fn)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    x = x.astype(jnp.float32)
  return x, mask, axis


@functools.partial(jax.jit, static_argnames=("axis", "output"))
def _normalise(x: jax.Array, mask: jax.Array | None, *, axis: int, output: str) -> jax.Array:
  """``logsumexp``, ``log_softmax`` or ``softmax`` of ``x`` along ``axis``, via the shared core.

  Rows with no mass (fully masked, or only ``-inf``) have no distribution: their
  ``log_softmax``/``softmax`` entries are NaN, except masked entries, which are
  set explicitly (``-inf``/0, so a fully masked row gets zero gradients).
  """
  mask = None if mask is None else jnp.moveaxis(mask, axis, -1)
  xm = _core.masked(jnp.moveaxis(x, axis, -1), mask)
  stats, e = _core.row_stats(xm)
  if output == "logsumexp":
    return stats.lse.astype(x.dtype)
  if output == "log_softmax":
    out = (xm.astype(e.dtype) - stats.shift[..., None]) - stats.log_total[..., None]
    fill = -jnp.inf
  else:
    out = e / jnp.where(stats.has_mass, stats.total, 1.0)[..., None]
    fill = 0.0
  out = jnp.where(stats.has_mass[..., None], out, jnp.nan)
  if mask is not None:
    out = jnp.where(mask, out, fill)
  return jnp.moveaxis(out, -1, axis).astype(x.dtype)


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
  x, mask, axis = _prepare(x, axis, where, "jaxce.logsumexp")
  return _normalise(x, mask, axis=axis, output="logsumexp")


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
  x, mask, axis = _prepare(x, axis, where, "jaxce.log_softmax")
  return _normalise(x, mask, axis=axis, output="log_softmax")


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
  x, mask, axis = _prepare(x, axis, where, "jaxce.softmax")
  return _normalise(x, mask, axis=axis, output="softmax")
