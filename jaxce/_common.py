"""Private helpers shared by the loss modules: validation, dtypes, reductions.

Every check runs at trace time on static shapes and dtypes, raises with the
public function's name and the offending argument, and costs nothing at run
time. Value checks (labels out of range) run only when the values are concrete.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

REDUCTIONS = ("none", "mean", "sum")


def as_array(x: Any, name: str, fn: str) -> jax.Array:
  """``jnp.asarray`` with an error that names the argument."""
  try:
    return jnp.asarray(x)
  except (TypeError, ValueError) as e:
    raise TypeError(f"{fn}: {name} must be array-like, got {type(x).__name__}: {e}") from None


def compute_dtype(dtype: Any) -> np.dtype:
  """The dtype losses accumulate in: at least float32 (float64 stays float64)."""
  return jnp.promote_types(dtype, jnp.float32)


def check_floating(x: jax.Array, name: str, fn: str) -> None:
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"{fn}: {name} must be a floating-point array, got dtype {x.dtype}.")


def check_reduction(reduction: str, fn: str) -> None:
  if reduction not in REDUCTIONS:
    raise ValueError(
        f"{fn}: reduction must be one of {', '.join(map(repr, REDUCTIONS))}; got {reduction!r}."
    )


def canonical_axis(axis: int, ndim: int, name: str, fn: str) -> int:
  """Resolves a possibly negative class axis; errors name the array's rank."""
  if not isinstance(axis, (int, np.integer)) or isinstance(axis, bool):
    raise TypeError(f"{fn}: axis must be an int, got {axis!r}.")
  if ndim == 0:
    raise ValueError(
        f"{fn}: {name} must have at least one dimension (the class axis); got a scalar.")
  if not -ndim <= axis < ndim:
    raise ValueError(f"{fn}: axis={axis} is out of range for {name} of rank {ndim}.")
  return int(axis) % ndim


def check_smoothing(label_smoothing: float, fn: str) -> None:
  if is_concrete(label_smoothing):
    value = np.asarray(label_smoothing)
    if value.shape != () or not 0.0 <= float(value) <= 1.0:
      raise ValueError(
          f"{fn}: label_smoothing must be a scalar in [0, 1]; got {label_smoothing!r}.")


def check_shape(x: jax.Array, shape: Sequence[int], name: str, other: str, fn: str) -> None:
  if tuple(x.shape) != tuple(shape):
    raise ValueError(f"{fn}: {name} shape {tuple(x.shape)} does not match {other} {tuple(shape)}.")


def broadcast_to(x: jax.Array, shape: Sequence[int], name: str, target: str, fn: str) -> jax.Array:
  """Broadcasts ``x`` to ``shape`` or raises naming both shapes."""
  try:
    if np.broadcast_shapes(x.shape, tuple(shape)) != tuple(shape):
      raise ValueError
  except ValueError:
    raise ValueError(
        f"{fn}: {name} shape {tuple(x.shape)} does not broadcast to {target} shape {tuple(shape)}."
    ) from None
  return jnp.broadcast_to(x, shape)


def mask_array(where: Any, shape: Sequence[int], target: str, fn: str) -> jax.Array | None:
  """Validates ``where`` and broadcasts it to ``shape`` as booleans."""
  if where is None:
    return None
  where = as_array(where, "where", fn)
  if where.dtype != jnp.bool_:
    raise TypeError(f"{fn}: where must be a boolean array, got dtype {where.dtype}.")
  return broadcast_to(where, shape, "where", target, fn)


def class_weights(weights: Any, num_classes: int, fn: str) -> jax.Array | None:
  """Validates per-class weights of shape ``(C,)``."""
  if weights is None:
    return None
  weights = as_array(weights, "weights", fn)
  if weights.shape != (num_classes,):
    raise ValueError(
        f"{fn}: weights shape {tuple(weights.shape)} does not match the number of classes "
        f"({num_classes},)."
    )
  check_floating(weights, "weights", fn)
  return weights


def is_concrete(*xs: Any) -> bool:
  """True when no argument is a tracer, so its values can be read eagerly."""
  return not any(isinstance(x, jax.core.Tracer) for x in xs)


def check_int_labels(labels: jax.Array, fn: str) -> None:
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise TypeError(
        f"{fn}: labels must be integer class indices, got dtype {labels.dtype}. "
        "For probability targets use jaxce.dense_cross_entropy."
    )


def check_label_values(
    bad: jax.Array,
    labels: jax.Array,
    num_classes: int,
    fn: str,
    detail: str = "",
    ignore_index: int | None = None,
) -> None:
  """Raises eagerly on concrete bad labels; adds a checkify check under tracing.

  ``bad`` marks labels that are neither in ``[0, C)`` nor ignored. Under ``jit``
  the loss is NaN for those examples and :func:`jaxce.checked` turns the check
  into an error.
  """
  allowed = "" if ignore_index is None else f" or equal ignore_index ({ignore_index})"
  message = f"{fn}: labels must be in [0, {num_classes}){allowed}{detail}"
  if is_concrete(bad, labels):
    bad_np = np.asarray(bad)
    if bad_np.any():
      index = tuple(int(i) for i in np.argwhere(bad_np)[0])
      value = np.asarray(labels)[index]
      raise ValueError(
          f"{message}; got {value} at index {index} ({int(bad_np.sum())} bad label(s))."
      )
  else:
    checkify.debug_check(~jnp.any(bad), message + "; got {} bad label(s).", jnp.sum(bad))


def safe_divide(num: jax.Array, den: jax.Array) -> jax.Array:
  """``num / den`` that is 0, with zero gradients, where ``den == 0``."""
  nonzero = den != 0
  return jnp.where(nonzero, num / jnp.where(nonzero, den, 1), 0)


def reduce_loss(
    loss: jax.Array, reduction: str, denominator: jax.Array | float | None = None
) -> jax.Array:
  """Applies ``reduction``; ``mean`` divides by ``denominator`` (default: size).

  An empty denominator (every example ignored or masked) gives 0, not NaN.
  """
  if reduction == "none":
    return loss
  total = jnp.sum(loss)
  if reduction == "sum":
    return total
  if denominator is None:
    denominator = loss.size
  return safe_divide(total, jnp.asarray(denominator, loss.dtype))
