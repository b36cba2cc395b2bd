"""Integer labels: validation of concrete values, resolution against ``C`` classes, NaN rows.

Eagerly, bad labels are a ``ValueError`` (:func:`check_labels`, exact for every
integer dtype, int64 included). Under tracing they become ``bad`` rows whose
loss and gradient are NaN (:func:`nan_where`), and a ``checkify`` check that
:func:`jaxce.checked` raises (:func:`debug_check_labels`).
"""

from __future__ import annotations

from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxce import _common
from jaxce import _core


def int_labels(labels: Any, fn: str) -> tuple[Any, np.ndarray | None]:
  """Returns ``(labels, concrete)``: the labels to compute with and, when their
  values are known, a NumPy copy in their own dtype (int64 stays int64, so a
  value that would not survive conversion to int32 is still seen and rejected).
  """
  if isinstance(labels, jax.core.Tracer):
    if not jnp.issubdtype(labels.dtype, jnp.integer):
      raise TypeError(_int_labels_message(labels.dtype, fn))
    return labels, None
  try:
    concrete = np.asarray(labels)
  except (TypeError, ValueError) as e:
    raise TypeError(f"{fn}: labels must be array-like, got {type(labels).__name__}: {e}") from None
  if not np.issubdtype(concrete.dtype, np.integer):
    raise TypeError(_int_labels_message(concrete.dtype, fn))
  return (labels if isinstance(labels, jax.Array) else concrete), concrete


def _int_labels_message(dtype, fn):
  return (f"{fn}: labels must be integer class indices, got dtype {dtype}. "
          "For probability targets use jaxce.dense_cross_entropy.")


# ---------------------------------------------------------------------------


class Labels(NamedTuple):
  """Integer labels resolved against ``C`` classes, ``[...]`` each.

  Attributes:
    index: int32 labels clipped into ``[0, C)`` (safe to gather with).
    keep: rows that count (not ignored, not fully masked).
    bad: kept rows whose label is invalid (out of range, or a masked-out class).
  """

  index: jax.Array
  keep: jax.Array
  bad: jax.Array

  @property
  def live(self) -> jax.Array:
    """Rows whose loss is a number: kept and valid."""
    return self.keep & ~self.bad


def _in_dtype_range(value: int, dtype) -> bool:
  info = jnp.iinfo(dtype)
  return int(info.min) <= value <= int(info.max)


def label_masks(labels: jax.Array, num_classes: int, ignore_index: int | None):
  """``(in_range, ignored)`` boolean masks, exact for every integer dtype.

  Comparisons happen in the labels' own dtype against bounds that fit it, so a
  negative ``ignore_index`` never wraps onto a class of an unsigned or narrow
  dtype, and a class count beyond the dtype's range never overflows.
  """
  in_range = jnp.full_like(labels, True, dtype=bool)
  if jnp.iinfo(labels.dtype).min < 0:
    in_range = labels >= 0
  if _in_dtype_range(num_classes, labels.dtype):
    in_range = in_range & (labels < jnp.asarray(num_classes, labels.dtype))
  if ignore_index is None or not _in_dtype_range(ignore_index, labels.dtype):
    ignored = jnp.full_like(labels, False, dtype=bool)
  else:
    ignored = labels == jnp.asarray(ignore_index, labels.dtype)
  return in_range, ignored


def resolve_labels(
    labels: jax.Array,
    num_classes: int,
    ignore_index: int | None,
    mask: jax.Array | None = None,
) -> Labels:
  """Resolves integer labels ``[...]`` against logits' ``[..., C]`` mask (traceable).

  Concrete bad labels are rejected before this by :func:`check_labels`; here
  they become ``bad`` rows (NaN loss) and a ``checkify`` check.
  """
  in_range, ignored = label_masks(labels, num_classes, ignore_index)
  index = jnp.where(in_range, labels, 0).astype(jnp.int32)
  keep = ~ignored
  valid = in_range
  if mask is not None:
    keep = keep & jnp.any(mask, axis=-1)
    valid = valid & _core.at_label(mask, index)
  return Labels(index, keep, keep & ~valid)


@jax.custom_vjp
def nan_where(bad: jax.Array, value: jax.Array) -> jax.Array:
  """``value`` with NaN where ``bad``; the gradient is NaN there too, unless unused.

  A row whose loss is NaN (a bad label under ``jit``) must not hand an
  optimiser a zero gradient. ``jnp.where(bad, nan, value)`` would (its gradient
  ignores the NaN branch), and multiplying by NaN would poison rows the caller
  never uses (``0·NaN``). Here the cotangent becomes NaN exactly where ``bad``
  and nonzero.
  """
  return jnp.where(bad, jnp.nan, value)


def _nan_where_fwd(bad, value):
  # Plain JAX, not a call of ``nan_where`` itself: forward-over-reverse
  # (``jax.hessian``) differentiates this rule.
  return jnp.where(bad, jnp.nan, value), bad


def _nan_where_bwd(bad, g):
  return None, jnp.where(bad & (g != 0), jnp.nan, g)


nan_where.defvjp(_nan_where_fwd, _nan_where_bwd)


def label_error(num_classes: int, ignore_index: int | None, masked_classes: bool, fn: str) -> str:
  allowed = "" if ignore_index is None else f" or equal ignore_index ({ignore_index})"
  detail = ", and be a class that `where` keeps" if masked_classes else ""
  return f"{fn}: labels must be in [0, {num_classes}){allowed}{detail}"


def check_labels(
    labels,
    num_classes: int,
    ignore_index: int | None,
    mask,
    fn: str,
) -> None:
  """Raises ``ValueError`` on concrete bad labels (NumPy, exact for int64 too).

  Args:
    labels: concrete integer labels ``[...]`` as NumPy (any integer dtype, before
      any conversion that could truncate them).
    num_classes: ``C``.
    ignore_index: the ignored label value, or None.
    mask: concrete boolean ``[..., C]`` NumPy mask (classes last), or None.
    fn: the public function's name.
  """
  labels = np.asarray(labels)
  wide = labels.astype(np.int64) if labels.dtype != np.uint64 else labels
  in_range = (wide >= 0) & (wide < num_classes)
  keep = np.ones(labels.shape, bool) if ignore_index is None else wide != ignore_index
  valid = in_range
  if mask is not None:
    mask = np.asarray(mask)
    keep = keep & mask.any(axis=-1)
    at_label = np.take_along_axis(mask, np.where(in_range, wide, 0)[..., None].astype(np.int64),
                                  axis=-1)[..., 0]
    valid = valid & at_label
  bad = keep & ~valid
  if bad.any():
    index = tuple(int(i) for i in np.argwhere(bad)[0])
    raise ValueError(
        f"{label_error(num_classes, ignore_index, mask is not None, fn)}; got {labels[index]} at "
        f"index {index} ({int(bad.sum())} bad label(s))."
    )


def debug_check_labels(bad, num_classes, ignore_index, masked_classes, fn) -> None:
  """Under tracing: a ``checkify`` check that :func:`jaxce.checked` turns into an error."""
  message = label_error(num_classes, ignore_index, masked_classes, fn)
  _common.debug_check(~jnp.any(bad), message + "; got {} bad label(s).", jnp.sum(bad))
