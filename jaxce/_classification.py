"""Softmax cross-entropy with integer (sparse) or probability (dense) labels, and NLL."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jaxce import _aux
from jaxce import _common
from jaxce import _core
from jaxce import _kernels
from jaxce import _labels
from jaxce import _platform
from jaxce import _sharding


def _logits(logits, axis, where, fn, name="logits"):
  """Validates logits, the class axis and the mask; returns ``(x, mask, axis)`` as laid out."""
  x = _common.as_array(logits, name, fn)
  _common.check_floating(x, name, fn)
  axis = _common.canonical_axis(axis, x.ndim, name, fn)
  mask = _common.mask_array(where, x.shape, name, fn)
  if x.shape[axis] == 0:
    raise ValueError(f"{fn}: {name} has no classes (axis {axis} of shape {x.shape} is 0).")
  return x, mask, axis


def _int_labels(labels, x, axis, ignore_index, mask, fn, name="logits"):
  """Validates integer labels against ``x``; checks their values when they are concrete."""
  labels, concrete = _labels.int_labels(labels, fn)
  batch = x.shape[:axis] + x.shape[axis + 1:]
  _common.check_shape(labels, batch, "labels", f"{name} without the class axis", fn)
  if concrete is not None and (mask is None or _common.is_concrete(mask)):
    classes_last = None if mask is None else np.moveaxis(np.asarray(mask), axis, -1)
    _labels.check_labels(concrete, x.shape[axis], ignore_index, classes_last, fn)
  return labels


def _classes_last(x, axis):
  return None if x is None else jnp.moveaxis(x, axis, -1)


def _predicted(x, mask):
  """int32 argmax of the masked logits ``[..., C]`` (the lowest index on ties)."""
  return _core.row_argmax(_core.masked(x, mask))


def sparse_cross_entropy(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    axis: int = -1,
    class_weights: ArrayLike | None = None,
    ignore_index: int | None = None,
    label_smoothing: float = 0.0,
    where: ArrayLike | None = None,
    reduction: str = "none",
    z_loss: float = 0.0,
    softcap: float | None = None,
    return_aux: bool = False,
) -> jax.Array | tuple[jax.Array, _aux.CrossEntropyAux]:
  r"""Softmax cross-entropy with integer class labels.

  .. math::
    \ell_n = (1-\varepsilon)\,w_{y_n}\,(-\log p_{n,y_n})
      + \tfrac{\varepsilon}{C}\textstyle\sum_c w_c\,(-\log p_{n,c}),
    \quad p_n = \mathrm{softmax}(x_n)

  ``reduction="mean"`` divides the sum by :math:`\sum_n w_{y_n}` over the kept
  examples, exactly as PyTorch does. Semantics chosen where the references differ:

  * ``ignore_index`` examples (and examples whose every class is masked out by
    ``where``) give 0 and are left out of the mean; if none is left the mean is
    0 with zero gradients (PyTorch gives NaN).
  * Labels outside ``[0, C)`` (other than ``ignore_index``), or naming a class
    that ``where`` masks out, raise ``ValueError`` when the labels are concrete;
    under ``jit``/``vmap`` they give NaN for that example (never another class).
    Wrap with :func:`jaxce.checked` to turn that into an error under ``jit``.
  * ``where=False`` classes and ``-inf`` logits are impossible classes: they get
    probability 0, zero gradient, and no label-smoothing mass (``C`` counts the
    possible classes only), so the loss stays finite.
  * ``+inf`` or NaN logits in a kept example give NaN.
  * bf16/fp16 logits are accumulated in float32 inside the fused loops; the
    loss is float32 (float64 for float64
    logits) and gradients come back in the logits' dtype.

  The gradient is hand-written (``jax.custom_vjp``). Each row is shifted by its
  label's logit rather than its max (no max pass; an overflowing row sends the
  call through the max-shifted path), ``exp`` runs once and is kept for the
  backward (for 16-bit logits it is recomputed instead, so no float32 copy is
  held), and the backward scales it and scatters ``-1`` at the labels. Under
  ``jit`` the kept ``exp`` is written into the gradient's buffer: with logits
  passed in, loss and gradient need no other ``[..., C]`` buffer; with logits
  computed in the same step, one beside them (as optax). For vocabularies where
  that matters, :func:`jaxce.linear_cross_entropy` never forms the logits.
  ``grad``-of-``grad`` and ``jax.hessian`` work; ``jax.jvp`` of the loss
  raises JAX's ``TypeError`` for ``custom_vjp`` functions.

  Args:
    logits: unnormalised scores ``[..., C, ...]`` with classes on ``axis``.
    labels: integer class indices of ``logits.shape`` without ``axis``.
    axis: the class axis (PyTorch's ``(N, C, d1..dk)`` layout is ``axis=1``).
    class_weights: optional per-class weights ``(C,)`` (PyTorch ``weight``).
    ignore_index: optional label value whose examples are skipped (PyTorch's
      default is ``-100``).
    label_smoothing: :math:`\varepsilon \in [0, 1]`; the target becomes
      ``(1-ε)·onehot + ε/C``.
    where: optional boolean mask broadcastable to ``logits.shape``.
    reduction: ``"none"``, ``"mean"`` or ``"sum"``.
    z_loss: coefficient :math:`z \ge 0` of the auxiliary ``z·lse²`` term added
      to each kept example (PaLM/T5X), which keeps logits from drifting.
    softcap: None, or :math:`s > 0`: the logits become ``s·tanh(logits / s)``
      before the softmax (Gemma 2's logit soft-capping); gradients reach the
      logits and ``s``. A ``-inf`` logit becomes ``-s`` (mask classes with
      ``where``).
    return_aux: if True, also return a :class:`jaxce.CrossEntropyAux` of
      per-example ``lse`` (differentiable), ``predicted`` and ``correct``.

  Returns:
    Per-example losses of ``logits.shape`` without ``axis`` for ``"none"``,
    otherwise a scalar. With ``return_aux=True``, ``(loss, aux)``: the same loss
    and per-example :class:`jaxce.CrossEntropyAux` fields of ``labels.shape``.

  Examples:
    >>> import jaxce
    >>> logits = jnp.array([[-0.5, -0.2, -0.3]])
    >>> jaxce.sparse_cross_entropy(logits, jnp.array([0]), reduction="mean")
    Array(1.2729..., dtype=float32)

    Token accuracy beside the loss, ignored tokens left out:

    >>> logits = jnp.array([[2.0, 0.0, 1.0], [0.0, 3.0, 1.0], [1.0, 0.0, 4.0]])
    >>> labels = jnp.array([0, 2, -100])
    >>> loss, aux = jaxce.sparse_cross_entropy(logits, labels, ignore_index=-100,
    ...                                        reduction="mean", return_aux=True)
    >>> aux.predicted, aux.correct
    (Array([0, 1, 2], dtype=int32), Array([ True, False, False], dtype=bool))
    >>> aux.correct.sum() / (labels != -100).sum()
    Array(0.5, dtype=float32)

  References:
    ``torch.nn.functional.cross_entropy`` (class indices);
    ``tf.nn.sparse_softmax_cross_entropy_with_logits``.
  """
  fn = _SPARSE
  reduction = _common.check_reduction(reduction, fn)
  ignore_index = _common.check_ignore_index(ignore_index, fn)
  smoothing = _common.scalar_option(label_smoothing, "label_smoothing", fn, upper=1.0)
  z = _common.scalar_option(z_loss, "z_loss", fn)
  x, mask, axis = _logits(logits, axis, where, fn)
  w = _common.class_weights(class_weights, x.shape[axis], fn)
  labels = _int_labels(labels, x, axis, ignore_index, mask, fn)
  cap = _common.softcap_option(softcap, fn)
  return_aux = _aux.check_return_aux(return_aux, fn)
  return _sparse(x, labels, mask, w, smoothing, z, cap, axis=axis, ignore_index=ignore_index,
                 reduction=reduction, kernel=_platform.sparse_kernel(), return_aux=return_aux)


_SPARSE = "jaxce.sparse_cross_entropy"


@functools.partial(jax.jit, static_argnames=("axis", "ignore_index", "reduction", "kernel",
                                             "return_aux"))
def _sparse(x, labels, mask, w, smoothing, z, cap, *, axis, ignore_index, reduction, kernel,
            return_aux=False):
  """The numeric core of :func:`sparse_cross_entropy`, compiled once per static configuration."""
  x, mask = _classes_last(x, axis), _classes_last(mask, axis)
  if cap is not None:
    x = _core.softcap(x, _common.cap_or_nan(cap))
  labels = _sharding.rows_like(labels, x)
  lab = _labels.resolve_labels(labels, x.shape[-1], ignore_index, mask)
  _labels.debug_check_labels(lab.bad, x.shape[-1], ignore_index, mask is not None, _SPARSE)
  smoothing, z = _common.option_or_nan(smoothing, 1.0), _common.option_or_nan(z)
  dtype = _common.compute_dtype(x.dtype)
  keep = lab.keep.astype(dtype)
  w_y = keep if w is None else _core.per_class(w.astype(dtype), lab.index) * keep
  on_label = w_y if smoothing is None else (1.0 - smoothing) * w_y
  target = _core.Target(
      on_label,
      None if smoothing is None else smoothing * keep,
      None if z is None else z * keep,
  )
  if not return_aux:
    loss = _kernels.sparse_rows(x, mask, lab.index, lab.live, target, w, kernel=kernel)
    loss = _labels.nan_where(lab.bad, loss)  # a bad label's loss and gradient are NaN
    return _common.reduce_loss(loss, reduction, w_y)
  loss, lse = _kernels.sparse_rows(x, mask, lab.index, lab.live, target, w, kernel=kernel,
                                   with_lse=True)
  loss = _labels.nan_where(lab.bad, loss)
  predicted = _predicted(x, mask)
  aux = _aux.CrossEntropyAux(lse, predicted, (predicted == lab.index) & lab.live)
  return _common.reduce_loss(loss, reduction, w_y), aux


def dense_cross_entropy(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    axis: int = -1,
    class_weights: ArrayLike | None = None,
    label_smoothing: float = 0.0,
    where: ArrayLike | None = None,
    reduction: str = "none",
    z_loss: float = 0.0,
    softcap: float | None = None,
    return_aux: bool = False,
) -> jax.Array | tuple[jax.Array, _aux.CrossEntropyAux]:
  r"""Softmax cross-entropy with probability (soft) labels.

  .. math::
    \ell_n = -\textstyle\sum_c w_c\, t_{n,c} \log \mathrm{softmax}(x_n)_c,
    \quad t = (1-\varepsilon)\,\mathrm{labels} + \varepsilon / C

  ``reduction="mean"`` divides by the number of examples (PyTorch's rule for
  probability targets, weights or not). Gradients flow to ``labels`` too (as in
  ``tf.nn.softmax_cross_entropy_with_logits``). Chosen semantics:

  * Classes masked by ``where`` are dropped with their label mass (masking
    equals slicing); an example with every class masked gives 0 and is left out
    of the mean (0, not NaN, if none is left).
  * A class with zero target mass contributes 0 even when its logit is ``-inf``
    (no ``0·inf`` NaN); label smoothing spreads ``ε`` over the possible classes
    only (unmasked, logit ``> -inf``).
  * ``+inf`` or NaN logits give NaN. bf16/fp16 logits accumulate in float32; the
    loss is float32 (float64 for float64 logits). The gradient is fused as in
    :func:`sparse_cross_entropy`.
  * Labels are not checked to be a distribution (non-negative, summing to 1).

  Args:
    logits: unnormalised scores ``[..., C, ...]`` with classes on ``axis``.
    labels: floating target probabilities of ``logits.shape``.
    axis: the class axis.
    class_weights: optional per-class weights ``(C,)``.
    label_smoothing: :math:`\varepsilon \in [0, 1]`.
    where: optional boolean mask broadcastable to ``logits.shape``.
    reduction: ``"none"``, ``"mean"`` or ``"sum"``.
    z_loss: coefficient :math:`z \ge 0` of the auxiliary ``z·lse²`` term added
      to each example.
    softcap: None, or :math:`s > 0`: the logits become ``s·tanh(logits / s)``
      before the softmax, as in :func:`sparse_cross_entropy`.
    return_aux: if True, also return a :class:`jaxce.CrossEntropyAux` of
      per-example ``lse`` (differentiable), ``predicted`` and ``correct``
      (``predicted`` equals the labels' own argmax).

  Returns:
    Per-example losses of ``logits.shape`` without ``axis`` for ``"none"``,
    otherwise a scalar. With ``return_aux=True``, ``(loss, aux)``: the same loss
    and per-example :class:`jaxce.CrossEntropyAux` fields of ``logits.shape``
    without ``axis``.

  Examples:
    >>> import jaxce
    >>> logits = jnp.array([[4.0, 2.0, 1.0], [0.0, 5.0, 1.0]])
    >>> labels = jnp.array([[1.0, 0.0, 0.0], [0.0, 0.8, 0.2]])
    >>> jaxce.dense_cross_entropy(logits, labels)
    Array([0.1698..., 0.8247...], dtype=float32)

  References:
    ``tf.nn.softmax_cross_entropy_with_logits``;
    ``torch.nn.functional.cross_entropy`` (class probabilities).
  """
  fn = "jaxce.dense_cross_entropy"
  reduction = _common.check_reduction(reduction, fn)
  smoothing = _common.scalar_option(label_smoothing, "label_smoothing", fn, upper=1.0)
  z = _common.scalar_option(z_loss, "z_loss", fn)
  x, mask, axis = _logits(logits, axis, where, fn)
  labels = _common.as_array(labels, "labels", fn)
  if not jnp.issubdtype(labels.dtype, jnp.floating):
    raise TypeError(
        f"{fn}: labels must be real floating-point probabilities, got dtype {labels.dtype}. "
        "For integer class indices use jaxce.sparse_cross_entropy."
    )
  _common.check_shape(labels, x.shape, "labels", "logits", fn)
  w = _common.class_weights(class_weights, x.shape[axis], fn)
  cap = _common.softcap_option(softcap, fn)
  return_aux = _aux.check_return_aux(return_aux, fn)
  return _dense(x, labels, mask, w, smoothing, z, cap, axis=axis, reduction=reduction,
                return_aux=return_aux)


@functools.partial(jax.jit, static_argnames=("axis", "reduction", "return_aux"))
def _dense(x, labels, mask, w, smoothing, z, cap, *, axis, reduction, return_aux=False):
  """The numeric core of :func:`dense_cross_entropy`, compiled once per static configuration."""
  x, mask = _classes_last(x, axis), _classes_last(mask, axis)
  if cap is not None:
    x = _core.softcap(x, _common.cap_or_nan(cap))
  smoothing, z = _common.option_or_nan(smoothing, 1.0), _common.option_or_nan(z)
  dtype = _common.compute_dtype(x.dtype)
  target = _classes_last(labels, axis).astype(dtype)
  if smoothing is not None:
    possible = _core.masked(x, mask) > -jnp.inf
    count = jnp.sum(possible, axis=-1, keepdims=True).astype(dtype)
    spread = _common.safe_divide(possible.astype(dtype), count)
    target = (1.0 - smoothing) * target + smoothing * spread
  if w is not None:
    target = target * w.astype(dtype).reshape((1,) * (x.ndim - 1) + w.shape)
  active = jnp.ones(x.shape[:-1], bool) if mask is None else jnp.any(mask, axis=-1)
  if mask is not None:
    target = jnp.where(mask, target, 0.0)
  z_row = None if z is None else z * active.astype(dtype)
  if not return_aux:
    loss = _kernels.dense_rows(x, mask, target, z_row)
    loss = jnp.where(active, loss, 0.0)
    return _common.reduce_loss(loss, reduction, None if mask is None else active)
  loss, lse = _kernels.dense_rows(x, mask, target, z_row, True)
  loss = jnp.where(active, loss, 0.0)
  predicted = _predicted(x, mask)
  wanted = _predicted(_classes_last(labels, axis), mask)
  aux = _aux.CrossEntropyAux(jnp.where(active, lse, 0.0), predicted,
                             (predicted == wanted) & active)
  return _common.reduce_loss(loss, reduction, None if mask is None else active), aux


def nll_loss(
    log_probs: ArrayLike,
    labels: ArrayLike,
    *,
    axis: int = -1,
    class_weights: ArrayLike | None = None,
    ignore_index: int | None = None,
    reduction: str = "none",
) -> jax.Array:
  r"""Negative log-likelihood of integer labels given log-probabilities.

  .. math::
    \ell_n = -w_{y_n}\, \mathrm{log\_probs}_{n, y_n}

  Same label rules as :func:`sparse_cross_entropy`: ``reduction="mean"``
  divides by :math:`\sum_n w_{y_n}` over non-ignored examples (0 if none),
  ignored examples give 0, and out-of-range labels raise ``ValueError`` when
  concrete and give NaN under ``jit``. The input is not normalised: pass
  :func:`log_softmax` output. bf16/fp16 inputs give a float32 loss.

  Args:
    log_probs: log-probabilities ``[..., C, ...]`` with classes on ``axis``.
    labels: integer class indices of ``log_probs.shape`` without ``axis``.
    axis: the class axis.
    class_weights: optional per-class weights ``(C,)``.
    ignore_index: optional label value whose examples are skipped.
    reduction: ``"none"``, ``"mean"`` or ``"sum"``.

  Returns:
    Per-example losses of ``log_probs.shape`` without ``axis`` for ``"none"``,
    otherwise a scalar.

  Examples:
    >>> import jaxce
    >>> probs = jnp.array([[0.3, 0.3, 0.4], [0.3, 0.4, 0.3], [0.1, 0.2, 0.7]])
    >>> jaxce.nll_loss(jnp.log(probs), jnp.array([2, 1, 0]), reduction="mean")
    Array(1.3783..., dtype=float32)

  References:
    ``torch.nn.functional.nll_loss``.
  """
  fn = _NLL
  reduction = _common.check_reduction(reduction, fn)
  ignore_index = _common.check_ignore_index(ignore_index, fn)
  x, _, axis = _logits(log_probs, axis, None, fn, "log_probs")
  w = _common.class_weights(class_weights, x.shape[axis], fn)
  labels = _int_labels(labels, x, axis, ignore_index, None, fn, "log_probs")
  return _nll(x, labels, w, axis=axis, ignore_index=ignore_index, reduction=reduction)


_NLL = "jaxce.nll_loss"


@functools.partial(jax.jit, static_argnames=("axis", "ignore_index", "reduction"))
def _nll(x, labels, w, *, axis, ignore_index, reduction):
  """The numeric core of :func:`nll_loss`, compiled once per static configuration."""
  x = _classes_last(x, axis)
  labels = _sharding.rows_like(labels, x)
  lab = _labels.resolve_labels(labels, x.shape[-1], ignore_index)
  _labels.debug_check_labels(lab.bad, x.shape[-1], ignore_index, False, _NLL)
  dtype = _common.compute_dtype(x.dtype)
  picked = _core.at_label(x, lab.index).astype(dtype)
  keep = lab.keep.astype(dtype)
  w_y = keep if w is None else _core.per_class(w.astype(dtype), lab.index) * keep
  loss = jnp.where(lab.keep, -w_y * picked, 0.0)
  loss = _labels.nan_where(lab.bad, loss)  # a bad label's loss and gradient are NaN
  return _common.reduce_loss(loss, reduction, w_y)
