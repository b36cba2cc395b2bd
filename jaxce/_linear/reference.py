"""The naive linear cross-entropy: the formula the blocked implementation must match."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxce._classification import sparse_cross_entropy


def linear_cross_entropy(
    hidden: ArrayLike,
    weight: ArrayLike,
    labels: ArrayLike,
    *,
    bias: ArrayLike | None = None,
    where: ArrayLike | None = None,
    **options,
) -> jax.Array:
  """``sparse_cross_entropy(hidden @ weight + bias, labels)``, storing the ``[..., V]`` logits.

  Args:
    hidden: features ``[..., D]``.
    weight: projection ``[D, V]``.
    labels: integer class indices ``hidden.shape[:-1]``.
    bias: optional ``[V]``.
    where: optional boolean per-example mask, broadcastable to ``labels.shape``.
    **options: the other options of :func:`jaxce.linear_cross_entropy`.

  Returns:
    The loss, as :func:`jaxce.sparse_cross_entropy` gives it.

  Examples:
    >>> from jaxce._linear import reference
    >>> hidden = jnp.array([[1.0, 0.0], [0.0, 1.0]])
    >>> weight = jnp.array([[2.0, 0.0, -1.0], [0.0, 1.0, 0.5]])
    >>> reference.linear_cross_entropy(hidden, weight, jnp.array([0, 1]))
    Array([0.1698..., 0.6803...], dtype=float32)
  """
  logits = jnp.asarray(hidden) @ jnp.asarray(weight)
  if bias is not None:
    bias = jnp.asarray(bias)
    logits = logits + bias.reshape((1,) * (logits.ndim - 1) + bias.shape)
  if where is not None:  # per example: the mask covers every class of a row
    where = jnp.asarray(where)[..., None]
  return sparse_cross_entropy(logits, labels, where=where, **options)
