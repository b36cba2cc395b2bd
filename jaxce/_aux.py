"""What a cross-entropy can report beside its loss, from the same passes: ``return_aux=True``."""

from __future__ import annotations

from typing import Any
from typing import NamedTuple

import jax


class CrossEntropyAux(NamedTuple):
  """Per-example outputs of a cross-entropy beside its loss (``return_aux=True``).

  Every field has the loss's per-example shape (``labels.shape`` for integer
  labels, ``logits.shape`` without the class axis otherwise), whatever the
  ``reduction``. "The logits" are those the softmax sees: soft-capped when
  ``softcap`` is set, with ``where=False`` classes left out.

  Attributes:
    lse: float32 (float64 for float64 inputs) ``log Σ_c exp(logits_c)`` of each
      example that counts in the loss, 0 for the others (ignored, every class
      ``where=False``, or a bad label under ``jit``). Differentiable: its gradient
      w.r.t. the logits is the softmax (z-loss monitoring, distillation).
    predicted: int32 index of each example's largest logit, the lowest index on
      ties (``jnp.argmax``'s rule), for every example (0 where every class is
      masked).
    correct: bool, ``predicted == label`` (for probability labels: the label's
      own ``argmax``, lowest index on ties) for each example that counts;
      ``False`` for the others. ``mean(correct[kept])`` is the token accuracy.
  """

  lse: jax.Array
  predicted: jax.Array
  correct: jax.Array


# A function returning the aux outputs can be serialized by jax.export.
jax.export.register_namedtuple_serialization(CrossEntropyAux,
                                             serialized_name="jaxce.CrossEntropyAux")


def check_return_aux(value: Any, fn: str) -> bool:
  """``return_aux`` must be a Python bool (it changes what the function returns)."""
  if not isinstance(value, bool):
    raise TypeError(f"{fn}: return_aux must be True or False; got {value!r}.")
  return value
