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

from jaxce import _checks
from jaxce import _sharding

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
    raise TypeError(f"{fn}: {name} must be a real floating-point array, got dtype {x.dtype}.")


def check_real(x: jax.Array, name: str, fn: str) -> None:
  """Rejects complex (and other non-numeric) arrays; bools and integers pass."""
  if not (jnp.issubdtype(x.dtype, jnp.floating) or jnp.issubdtype(x.dtype, jnp.integer)
          or x.dtype == jnp.bool_):
    raise TypeError(f"{fn}: {name} must be a real array, got dtype {x.dtype}.")


def check_reduction(reduction: Any, fn: str) -> str:
  """``reduction`` as given; a non-string is a ``TypeError``, an unknown string a ``ValueError``."""
  choices = ", ".join(map(repr, REDUCTIONS))
  if not isinstance(reduction, str):
    raise TypeError(f"{fn}: reduction must be a string, one of {choices}; "
                    f"got {type(reduction).__name__} {reduction!r}.")
  if reduction not in REDUCTIONS:
    raise ValueError(f"{fn}: reduction must be one of {choices}; got {reduction!r}.")
  return reduction


def check_ignore_index(ignore_index: Any, fn: str) -> int | None:
  """``ignore_index`` as a Python int or None; anything else is a ``TypeError``.

  It must be static (it decides which rows count, and is compared in the
  labels' own dtype), as PyTorch's ``int`` argument is.
  """
  if ignore_index is None:
    return None
  if isinstance(ignore_index, jax.core.Tracer):
    raise TypeError(f"{fn}: ignore_index must be a Python int or None, not a traced array; "
                    "pass it as a static value.")
  value = np.asarray(ignore_index) if isinstance(ignore_index, (np.ndarray, jax.Array)) else None
  if value is not None and value.shape == () and np.issubdtype(value.dtype, np.integer):
    return int(value)
  if isinstance(ignore_index, (int, np.integer)) and not isinstance(ignore_index, (bool, np.bool_)):
    return int(ignore_index)
  raise TypeError(f"{fn}: ignore_index must be an int or None; got {ignore_index!r} "
                  f"({type(ignore_index).__name__}).")


def scalar_option(value: Any, name: str, fn: str, *, upper: float | None = None
                  ) -> jax.Array | None:
  """A real scalar option in ``[0, upper]`` (finite and ``>= 0`` without ``upper``).

  Returns None for a concrete 0 (the term it scales is then not computed at
  all, so it cannot turn ``0 · overflow`` into NaN), else a float array. A
  concrete value outside the domain raises ``ValueError``; a traced one gives
  NaN inside the loss (:func:`option_or_nan`). Non-numeric values raise
  ``TypeError`` and non-scalars ``ValueError``, naming the option.
  """
  domain = "a scalar in [0, 1]" if upper == 1 else (
      "a finite scalar >= 0" if upper is None else f"a scalar in [0, {upper}]")
  traced = isinstance(value, jax.core.Tracer)
  try:
    array = value if traced else np.asarray(value)
  except (TypeError, ValueError):
    array = None
  if array is None or isinstance(value, (str, bytes)) or not (
      jnp.issubdtype(array.dtype, jnp.floating) or jnp.issubdtype(array.dtype, jnp.integer)):
    raise TypeError(f"{fn}: {name} must be {domain}; got {value!r}.")
  if array.shape != ():
    raise ValueError(f"{fn}: {name} must be {domain}; got an array of shape {array.shape}.")
  if not traced:
    number = float(array)
    if not (0.0 <= number and (number <= upper if upper is not None else np.isfinite(number))):
      raise ValueError(f"{fn}: {name} must be {domain}; got {number!r}.")
    if number == 0.0:
      return None
  array = jnp.asarray(array)
  return array.astype(compute_dtype(array.dtype) if jnp.issubdtype(array.dtype, jnp.floating)
                      else jnp.float32)


def softcap_option(value: Any, fn: str) -> jax.Array | None:
  """``softcap``: None, or a finite scalar ``> 0`` (a concrete 0, negative or non-finite cap is a
  ``ValueError``; a traced one gives NaN inside the loss, :func:`cap_or_nan`)."""
  if value is None:
    return None
  domain = "None or a finite scalar > 0"
  if not isinstance(value, jax.core.Tracer):
    try:
      number = np.asarray(value)
    except (TypeError, ValueError):
      number = None
    numeric = number is not None and number.dtype.kind in "fiu"
    if not numeric or isinstance(value, (str, bytes, bool, np.bool_)):
      raise TypeError(f"{fn}: softcap must be {domain}; got {value!r}.")
    if number.shape != ():
      raise ValueError(f"{fn}: softcap must be {domain}; got an array of shape {number.shape}.")
    if not (np.isfinite(float(number)) and float(number) > 0):
      raise ValueError(f"{fn}: softcap must be {domain}; got {float(number)!r}.")
  elif value.shape != () or not jnp.issubdtype(value.dtype, jnp.floating):
    raise TypeError(f"{fn}: softcap must be {domain}; got a traced array of dtype "
                    f"{value.dtype} and shape {value.shape}.")
  cap = jnp.asarray(value)
  return cap.astype(compute_dtype(cap.dtype) if jnp.issubdtype(cap.dtype, jnp.floating)
                    else jnp.float32)


def cap_or_nan(cap: jax.Array | None) -> jax.Array | None:
  """Inside a trace: a traced cap that is not finite and ``> 0`` becomes NaN (so the loss does)."""
  if cap is None:
    return None
  return jnp.where(jnp.isfinite(cap) & (cap > 0), cap, jnp.nan)


def option_or_nan(value: jax.Array | None, upper: float | None = None) -> jax.Array | None:
  """Inside a trace: a traced option outside its domain becomes NaN (so the loss does)."""
  if value is None:
    return None
  ok = (value >= 0) & (value <= (jnp.inf if upper is None else upper))
  if upper is None:
    ok = ok & jnp.isfinite(value)
  return jnp.where(ok, value, jnp.nan)


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


def check_shape(x: jax.Array, shape: Sequence[int], name: str, other: str, fn: str) -> None:
  if tuple(x.shape) != tuple(shape):
    raise ValueError(f"{fn}: {name} shape {tuple(x.shape)} does not match {other} {tuple(shape)}.")


def broadcast_to(x: jax.Array, shape: Sequence[int], name: str, target: str, fn: str) -> jax.Array:
  """Broadcasts ``x`` to ``shape`` or raises naming both shapes."""
  try:
    if jnp.broadcast_shapes(x.shape, tuple(shape)) != tuple(shape):
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
  weights = as_array(weights, "class_weights", fn)
  if weights.shape != (num_classes,):
    raise ValueError(
        f"{fn}: class_weights shape {tuple(weights.shape)} does not match the number of classes "
        f"({num_classes},)."
    )
  check_floating(weights, "class_weights", fn)
  return weights


def is_concrete(*xs: Any) -> bool:
  """True when no argument is a tracer, so its values can be read eagerly."""
  return not any(isinstance(x, jax.core.Tracer) for x in xs)


def debug_check(ok: jax.Array, message: str, *args: Any) -> None:
  """A check that :func:`jaxce.checked` raises under ``jit``; traced only under ``checked``."""
  if _checks.enabled():
    checkify.debug_check(ok, message, *args)


def safe_divide(num: jax.Array, den: jax.Array) -> jax.Array:
  """``num / den`` that is 0, with zero gradients, where ``den == 0``."""
  nonzero = den != 0
  return jnp.where(nonzero, num / jnp.where(nonzero, den, 1), 0)


_SUM_BLOCK = 256


def pairwise_sum(x: jax.Array) -> jax.Array:
  """Sum of all elements with error ``O(log n · eps)``, as accurate as PyTorch's cascade sum.

  Each axis is summed in turn, last axis first: up to ``_SUM_BLOCK`` elements
  as a pairwise tree (``log2 n`` elementwise adds), longer axes in blocks of
  that size in one fused pass (XLA's vectorised block sums) whose sums are then
  added as a tree. Summing the last (class) axis first keeps a sum over a
  batch-sharded array local to each device until only per-row sums are left.

  Sharded over Explicit mesh axes, each device sums its own shard this way and
  the per-device sums are added by XLA's all-reduce (no shard moves). A
  symbolic dimension (``jax.export``) is summed by XLA's reduction first.
  """
  x = jnp.asarray(x)
  symbolic = tuple(d for d in range(x.ndim) if _sharding.is_symbolic(x.shape[d]))
  if symbolic:
    x = jnp.sum(x, axis=symbolic)
  if x.size == 0:
    return jnp.zeros((), x.dtype)
  counts = _sharding.shard_counts(x)
  if _sharding.is_explicitly_sharded(x) and all(k == 1 for k in counts):
    x = _sharding.replicated(x)  # mesh axes of size 1 (slicing them trips JAX's type rules)
  if _sharding.is_explicitly_sharded(x):
    if any(n % k for n, k in zip(x.shape, counts, strict=True)):
      return jnp.sum(x)  # unevenly split: XLA's reduction
    return jnp.sum(_tree_sum(_shards_first(x, counts)))
  while x.ndim:
    x = _tree_sum(x)
  return x


def _shards_first(x: jax.Array, counts: tuple[int, ...]) -> jax.Array:
  """``x`` as ``[k_1, ..., k_m, local]``: one axis per split dimension, then each shard's elements.

  Each split dimension ``n`` becomes ``[k, n / k]`` with the mesh axes on ``k``
  (a split JAX infers), so merging the local axes never crosses devices.
  """
  split = []
  for d in reversed(range(x.ndim)):
    if counts[d] > 1:
      x = x.reshape(x.shape[:d] + (counts[d], x.shape[d] // counts[d]) + x.shape[d + 1:])
      split = [s + 1 for s in split] + [d]
  lead = x.shape
  x = jnp.moveaxis(x, sorted(split), range(len(split)))
  return x.reshape(tuple(lead[d] for d in sorted(split)) + (-1,))


def _tree_sum(x: jax.Array) -> jax.Array:
  """Pairwise sum over the last (concrete) axis of ``x [..., n]``.

  The tree adds strided slices: XLA would fold a chain of reductions into one
  plain sum.
  """
  size = x.shape[-1]
  lead = x.shape[:-1]
  if size > _SUM_BLOCK:
    pad = [(0, 0)] * len(lead) + [(0, -size % _SUM_BLOCK)]
    x = jnp.pad(x, pad).reshape(lead + (-1, _SUM_BLOCK)).sum(axis=-1)
    size = x.shape[-1]
  x = jnp.pad(x, [(0, 0)] * len(lead) + [(0, (1 << (size - 1).bit_length()) - size)])
  while x.shape[-1] > 1:
    x = x[..., 0::2] + x[..., 1::2]
  return x[..., 0]


def reduce_loss(
    loss: jax.Array, reduction: str, denominator: jax.Array | float | None = None
) -> jax.Array:
  """Applies ``reduction``; ``mean`` divides by ``denominator`` (default: size).

  Sums are pairwise (:func:`pairwise_sum`). A zero denominator (every example
  ignored or masked, total weight 0, or an empty batch) gives 0 with zero
  gradients, not NaN.
  """
  if reduction == "none":
    return loss
  total = pairwise_sum(loss)
  if reduction == "sum":
    return total
  if denominator is None:
    denominator = loss.size
  elif isinstance(denominator, jax.Array) and denominator.ndim:
    denominator = pairwise_sum(denominator.astype(loss.dtype))
  return safe_divide(total, jnp.asarray(denominator, loss.dtype))
