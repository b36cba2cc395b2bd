"""``linear_cross_entropy``: validation, the static configuration and platform defaults.

The public function checks its arguments, fixes the static configuration
(:class:`Config`) and hands the arrays to :func:`_linear`, which turns labels
and options into per-row coefficients and runs one of the two paths:
:func:`fused.summed_loss` for the scalar reductions, :func:`recompute.row_losses`
for ``reduction="none"``.
"""

from __future__ import annotations

import functools
import math
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike
from jax.typing import DTypeLike

from jaxce import _aux
from jaxce import _common
from jaxce import _core
from jaxce import _labels
from jaxce._linear import blocks
from jaxce._linear import fused
from jaxce._linear import recompute
from jaxce._linear import sharded

_FN = "jaxce.linear_cross_entropy"


def linear_cross_entropy(
    hidden: ArrayLike,
    weight: ArrayLike,
    labels: ArrayLike,
    *,
    bias: ArrayLike | None = None,
    class_weights: ArrayLike | None = None,
    ignore_index: int | None = None,
    label_smoothing: float = 0.0,
    where: ArrayLike | None = None,
    reduction: str = "none",
    z_loss: float = 0.0,
    softcap: float | None = None,
    return_aux: bool = False,
    chunk_size: int | None = None,
    token_chunk_size: int | None = None,
    grad_accumulation_dtype: DTypeLike | None = None,
    mesh: jax.sharding.Mesh | None = None,
    token_axes: str | tuple[str, ...] | None = None,
    vocab_axis: str | tuple[str, ...] | None = None,
) -> jax.Array | tuple[jax.Array, _aux.CrossEntropyAux]:
  r"""Softmax cross-entropy of ``hidden @ weight + bias``, never storing the logits.

  .. math::
    \ell_n = (1-\varepsilon)\,w_{y_n}\,(\mathrm{lse}_n - z_{n,y_n})
      + \varepsilon\,\tfrac{1}{C_n}\textstyle\sum_{c} w_c\,(\mathrm{lse}_n - z_{n,c})
      + \zeta\,\mathrm{lse}_n^2,
    \quad z = h W + b

  Values and gradients (w.r.t. ``hidden``, ``weight``, ``bias``, and the
  options) are those of ``jaxce.sparse_cross_entropy(hidden @ weight + bias,
  labels, **options)`` with ``where`` applied per example; the ``[..., V]``
  logits are never stored. Probability targets ``labels [..., V]`` follow
  :func:`jaxce.dense_cross_entropy` instead (the first term becomes
  :math:`(1-\varepsilon)\sum_c w_c\,t_{n,c}\,(\mathrm{lse}_n - z_{n,c})`,
  ``"mean"`` divides by the number of kept examples, as PyTorch does); the
  targets are read one block at a time (counted in the default block's
  memory budget), so memory beyond their own ``[..., V]`` array does not
  grow, and gradients reach them too (one more pass over the logits when
  they are differentiated).

  With ``reduction="mean"`` or ``"sum"`` the gradients are formed in the
  forward pass while each block of logits is live, so loss plus gradients
  cost three matmuls (the naive version's count); temporary
  memory is one block of ``[token_chunk_size, V]`` logits plus a
  ``[D, chunk_size]`` weight-gradient tile. With ``reduction="none"`` the
  backward recomputes ``[token_chunk_size, chunk_size]`` tiles (four matmuls).

  Semantics (as :func:`jaxce.sparse_cross_entropy`): ``"mean"`` is PyTorch's
  weighted mean ``Σ w[y]·ℓ / Σ w[y]`` over kept examples (0, with zero
  gradients, when none is kept); ``ignore_index`` and ``where=False`` examples
  give 0 and leave the mean; a column with a ``-inf`` bias is an impossible
  class (no smoothing mass, zero gradient); out-of-range labels raise
  ``ValueError`` when concrete and give a NaN loss and NaN gradients for their
  example under ``jit`` (:func:`jaxce.checked` turns that into an error).
  Logits are accumulated in float32 (float64 for float64 inputs); the loss is
  float32 and each gradient has its input's dtype. Forward-over-reverse
  (``jax.hessian``) and reverse-over-reverse work; plain ``jax.jvp`` raises, as
  for every ``custom_vjp``.

  With ``mesh``, the computation runs vocabulary-parallel under ``shard_map``:
  ``hidden``/``labels``/``where`` split over ``token_axes`` on their first
  axis, ``weight``'s columns, ``bias`` and ``class_weights`` over
  ``vocab_axis``. Each device works on its ``[tokens, V / devices]`` share,
  per-row statistics are combined across the vocabulary axis (``pmax``-style
  merge, ``psum``), and no weight-sized array is all-gathered. Meshes of
  Explicit axes (``jax.make_mesh``'s default) and of Auto axes work, inside
  and outside ``jax.set_mesh``; with Explicit types the ``"none"`` losses are
  split over ``token_axes`` and each gradient has its input's sharding.
  Without ``mesh``, inputs whose Explicit shardings split ``hidden``'s first
  axis and/or ``weight``'s columns run the same way on their mesh.

  Args:
    hidden: features ``[..., D]``.
    weight: projection ``[D, V]``.
    labels: integer class indices ``[...]`` (``hidden.shape[:-1]``), or
      floating probability targets ``[..., V]`` (``hidden.shape[:-1] + (V,)``;
      not checked to be distributions; ``ignore_index`` does not apply).
    bias: optional ``[V]``.
    class_weights: optional per-class weights ``[V]`` (PyTorch ``weight``).
    ignore_index: optional label value whose examples are skipped.
    label_smoothing: :math:`\varepsilon \in [0, 1]`; the target becomes
      ``(1-ε)·onehot + ε·w_c/C`` over the possible classes (PyTorch's rule).
    where: optional boolean per-example mask, broadcastable to ``labels.shape``;
      ``False`` examples count as ignored.
    reduction: ``"none"`` (default, as optax), ``"mean"`` or ``"sum"``.
    z_loss: coefficient :math:`\zeta \ge 0` of the ``lse²`` term (PaLM).
    softcap: None, or :math:`s > 0`: the logits become ``s·tanh(z / s)`` before
      the softmax (Gemma 2's soft-capping), inside each block (no extra pass
      over the vocabulary, no extra matmul); gradients reach ``hidden``,
      ``weight``, ``bias`` and ``s``. A ``-inf`` bias becomes ``-s``.
    return_aux: also return a :class:`jaxce.CrossEntropyAux` of per-example
      ``lse`` (differentiable), ``predicted`` and ``correct``, from the same
      passes (no extra matmul unless the lse is differentiated under a scalar
      reduction, which adds the recompute path's backward).
    chunk_size: vocabulary columns per tile (need not divide V). Default on
      CPU 1024; on GPU/TPU 8192, and the whole vocabulary for the fused
      path's weight-gradient product.
    token_chunk_size: tokens per block. Default for the scalar reductions:
      the fewest even blocks whose float32 logits rows fit in 20 MiB on CPU,
      480 MiB on GPU/TPU; 1024 for ``"none"``.
    grad_accumulation_dtype: dtype of the weight- and bias-gradient
      accumulators summed over token blocks. Default on CPU: float32 (float64
      for float64 inputs). Default on GPU/TPU: a bf16/fp16 parameter's own
      dtype, as Liger's kernel does: it halves the ``[D, V]`` buffer at one
      rounding per token block (each block's product is summed in float32);
      pass ``jnp.float32`` for float32 accumulation.
    mesh: a :class:`jax.sharding.Mesh` to run vocabulary-parallel on, or None.
    token_axes: mesh axis name(s) that split the tokens (with ``mesh``).
    vocab_axis: mesh axis name(s) that split the vocabulary (with ``mesh``).

  Returns:
    float32 losses of ``hidden.shape[:-1]`` for ``reduction="none"``, else a
    scalar; with ``return_aux``, ``(loss, aux)``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import jaxce
    >>> hidden = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    >>> weight = jnp.array([[2.0, 0.0, -1.0], [0.0, 1.0, 0.5]])
    >>> labels = jnp.array([0, 1, 2])
    >>> jaxce.linear_cross_entropy(hidden, weight, labels)
    Array([0.1698..., 0.6803..., 2.8715...], dtype=float32)
    >>> jaxce.linear_cross_entropy(hidden, weight, labels, reduction="mean")
    Array(1.2406..., dtype=float32)

    Token accuracy beside the loss, with no logits stored:

    >>> loss, aux = jaxce.linear_cross_entropy(hidden, weight, labels, reduction="mean",
    ...                                        return_aux=True)
    >>> aux.predicted, aux.correct.mean()
    (Array([0, 1, 0], dtype=int32), Array(0.6666..., dtype=float32))

    Probability targets (PyTorch's class probabilities):

    >>> targets = jnp.array([[1.0, 0.0, 0.0], [0.0, 0.5, 0.5], [0.0, 0.0, 1.0]])
    >>> jaxce.linear_cross_entropy(hidden, weight, targets)
    Array([0.1698..., 0.9302..., 2.8715...], dtype=float32)

    Vocabulary-parallel over every device:

    >>> import jax
    >>> mesh = jax.make_mesh((jax.device_count(),), ("model",))
    >>> jaxce.linear_cross_entropy(hidden, weight, labels, reduction="mean", mesh=mesh,
    ...                            vocab_axis="model")
    Array(1.2406..., dtype=float32)

  References:
    Liger Kernel ``LigerFusedLinearCrossEntropyLoss``; Wijmans et al., `Cut
    Your Losses in Large-Vocabulary Language Models
    <https://arxiv.org/abs/2411.09009>`_, 2024; Megatron-LM
    ``vocab_parallel_cross_entropy``; ``torch.nn.functional.cross_entropy``.
  """
  fn = _FN
  reduction = _common.check_reduction(reduction, fn)
  ignore_index = _common.check_ignore_index(ignore_index, fn)
  smoothing = _common.scalar_option(label_smoothing, "label_smoothing", fn, upper=1.0)
  z = _common.scalar_option(z_loss, "z_loss", fn)
  hidden = _common.as_array(hidden, "hidden", fn)
  weight = _common.as_array(weight, "weight", fn)
  _common.check_floating(hidden, "hidden", fn)
  _common.check_floating(weight, "weight", fn)
  if hidden.ndim < 1:
    raise ValueError(f"{fn}: hidden must have shape [..., D]; got a scalar.")
  if weight.ndim != 2 or weight.shape[0] != hidden.shape[-1]:
    raise ValueError(f"{fn}: weight shape {tuple(weight.shape)} must be [D, V] with D = hidden's "
                     f"last dimension; hidden shape is {tuple(hidden.shape)}.")
  num_classes = weight.shape[1]
  if num_classes == 0:
    raise ValueError(f"{fn}: weight must have at least one class column; got shape "
                     f"{tuple(weight.shape)}.")
  if bias is not None:
    bias = _common.as_array(bias, "bias", fn)
    _common.check_floating(bias, "bias", fn)
    _common.check_shape(bias, (num_classes,), "bias", "(V,) =", fn)
  class_weights = _common.class_weights(class_weights, num_classes, fn)
  aux = _aux.check_return_aux(return_aux, fn)
  dense = _is_probability_target(labels)
  batch = hidden.shape[:-1]
  if dense:
    labels = _common.as_array(labels, "labels", fn)
    if tuple(labels.shape) != (*batch, num_classes):
      raise ValueError(f"{fn}: labels of dtype {labels.dtype} are probability targets and must "
                       f"have shape hidden.shape[:-1] + (V,) = {(*batch, num_classes)}; got "
                       f"{tuple(labels.shape)}. Class indices must be integers.")
    if ignore_index is not None:
      raise ValueError(f"{fn}: ignore_index applies to class-index labels only; got "
                       f"probability targets of shape {tuple(labels.shape)} with ignore_index="
                       f"{ignore_index}. Mask examples with where= instead.")
    concrete = None
  else:
    dtype = _dtype_of(labels)
    if dtype is None or not jnp.issubdtype(dtype, jnp.integer):
      raise TypeError(f"{fn}: labels must be integer class indices [...] or floating "
                      f"probability targets [..., V]; got dtype {dtype}.")
    labels, concrete = _labels.int_labels(labels, fn)
    _common.check_shape(labels, batch, "labels", "hidden.shape[:-1]", fn)
  mask = _common.mask_array(where, batch, "labels", fn)
  if concrete is not None and (mask is None or _common.is_concrete(mask)):
    kept = concrete if mask is None else np.where(np.asarray(mask), concrete, 0)
    _labels.check_labels(kept, num_classes, ignore_index, None, fn)
  num_rows = math.prod(batch)
  layout = sharded.make_layout(mesh, token_axes, vocab_axis, num_rows, num_classes, fn,
                               (hidden, weight, bias, class_weights, labels, mask))
  if mesh is None:  # arrays of Explicit shardings run vocabulary-parallel as they are split
    layout = sharded.layout_of(hidden, weight, num_rows, num_classes, fn)
  config = Config(
      reduction=reduction,
      ignore_index=ignore_index,
      rows=_block_option(token_chunk_size, "token_chunk_size", fn),
      cols=_block_option(chunk_size, "chunk_size", fn),
      layout=layout,
      accumulate=_accumulation_option(grad_accumulation_dtype, fn),
      platform=platform(mesh),
      aux=aux,
  )
  cap = _common.softcap_option(softcap, fn)
  return _linear(config, hidden, weight, bias, class_weights, labels, mask, smoothing, z, cap)


def _dtype_of(labels: Any):
  """The labels' dtype, or None if they are not array-like."""
  dtype = getattr(labels, "dtype", None)
  if dtype is None:
    try:
      dtype = np.asarray(labels).dtype
    except (TypeError, ValueError):
      return None
  return dtype


def _is_probability_target(labels: Any) -> bool:
  """Floating labels are probability targets (integer ones are class indices)."""
  dtype = _dtype_of(labels)
  return dtype is not None and jnp.issubdtype(dtype, jnp.floating)


def platform(mesh) -> str:
  """The platform the computation runs on, which picks the default block sizes."""
  return mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()


def _accumulation_option(value: Any, fn: str) -> str | None:
  if value is None:
    return None
  try:
    dtype = jnp.dtype(value)
  except TypeError:
    dtype = None
  if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(f"{fn}: grad_accumulation_dtype must be a floating-point dtype or None; "
                    f"got {value!r}.")
  return dtype.name


def _block_option(value: Any, name: str, fn: str) -> int | None:
  if value is None:
    return None
  if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 1:
    return int(value)
  raise ValueError(f"{fn}: {name} must be a positive int or None; got {value!r}.")


# ---------------------------------------------------------------------------
# Static configuration and platform defaults.
# ---------------------------------------------------------------------------


class Blocks(NamedTuple):
  """Default block sizes of a platform.

  ``row_bytes``: temporary memory the fused path may spend on one block of
  full logits rows (``rows = row_bytes // (4 · V)``, at least 8, V per device,
  split into even blocks); ``fused_cols``: vocabulary columns per
  weight-gradient product of the fused path (None: all at once); ``cols`` and
  ``tile_rows``: the ``[rows, cols]`` tiles of the recompute path.
  """

  row_bytes: int
  cols: int
  tile_rows: int
  fused_cols: int | None


# CPU: cache-sized blocks and weight-gradient tiles keep the temporaries below
# tokamax chunked_xla's at no cost in time; GPU/TPU: blocks large enough to keep
# the matrix units busy. Measurements: docs/benchmarks.md.
BLOCKS = {
    "cpu": Blocks(row_bytes=20 * 2**20, cols=1024, tile_rows=1024, fused_cols=1024),
    "accelerator": Blocks(row_bytes=480 * 2**20, cols=8192, tile_rows=1024, fused_cols=None),
}


def default_blocks(platform: str) -> Blocks:
  return BLOCKS["cpu" if platform == "cpu" else "accelerator"]


class Config(NamedTuple):
  """Static options of the numeric core (hashable: one compilation per value)."""

  reduction: str
  ignore_index: int | None
  rows: int | None  # token_chunk_size
  cols: int | None  # chunk_size
  layout: sharded.Layout
  accumulate: str | None = None  # dtype name of the weight/bias gradient accumulators
  platform: str = "cpu"  # picks the default block sizes
  aux: bool = False  # also per-row lse and argmax (return_aux)

  @property
  def tile_cols(self) -> int:
    """Vocabulary columns per tile."""
    return self.cols or default_blocks(self.platform).cols

  @property
  def tile_rows(self) -> int:
    """Tokens per tile of the recompute path (``reduction="none"``)."""
    return self.rows or default_blocks(self.platform).tile_rows

  def accumulator(self, param_dtype, dtype) -> jnp.dtype:
    """Dtype of a weight or bias gradient summed over token blocks.

    ``grad_accumulation_dtype`` when given. Otherwise, on GPU/TPU, a 16-bit
    parameter's own dtype (Liger's choice: the fused path's few large blocks
    add one rounding each, and a float32 ``[D, V]`` buffer would cost more than
    the blocks themselves); everywhere else the compute dtype.
    """
    if self.accumulate:
      return jnp.dtype(self.accumulate)
    if self.platform != "cpu" and jnp.dtype(param_dtype).itemsize < 4:
      return jnp.dtype(param_dtype)
    return jnp.dtype(dtype)

  def fused_cols(self, num_classes: int) -> int:
    """Vocabulary columns per weight-gradient tile of the fused path."""
    return self.cols or default_blocks(self.platform).fused_cols or num_classes

  def fused_rows(self, num_rows: int, num_classes: int, dtype, targets: bool = False) -> int:
    """Tokens per block of full logits rows in the fused path.

    By default the fewest blocks whose float32 logits (and, with probability
    ``targets``, the block's targets) fit the platform's budget, split evenly
    (rounded up to a multiple of 8), so that no block mostly repeats its
    predecessor's rows.
    """
    if self.rows:
      return self.rows
    most = max(8, default_blocks(self.platform).row_bytes
               // (num_classes * jnp.dtype(dtype).itemsize * (2 if targets else 1)))
    if blocks.is_symbolic(num_rows):  # jax.export: from V alone, rows padded to a multiple
      return most
    count = -(-num_rows // most)
    rows = -(-num_rows // max(count, 1))
    return min(most, rows + (-rows) % 8) if rows > 8 else 8


# ---------------------------------------------------------------------------
# The numeric core: labels and options to per-row coefficients, then a path.
# ---------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=0)
def _linear(config: Config, hidden, weight, bias, class_weights, labels, mask, smoothing, z,
            cap):
  """The numeric core of :func:`linear_cross_entropy`, compiled once per static configuration."""
  num_classes, layout = weight.shape[1], config.layout
  batch_shape = hidden.shape[:-1]
  dense = labels.ndim == hidden.ndim
  flat_labels = labels.reshape(-1, num_classes) if dense else labels.reshape(-1)
  params, labels, mask = sharded.place_inputs(
      layout, blocks.Params(hidden.reshape(-1, hidden.shape[-1]), weight, bias, class_weights,
                            _common.cap_or_nan(cap)),
      flat_labels, None if mask is None else mask.reshape(-1))
  hidden, weight, bias, class_weights, cap = params
  smoothing, z = _common.option_or_nan(smoothing, 1.0), _common.option_or_nan(z)
  dtype = _common.compute_dtype(jnp.result_type(hidden.dtype, weight.dtype))
  num_rows = labels.shape[0]
  ones = jnp.ones(num_rows, dtype)
  if dense:
    index, probs = None, labels
    keep = jnp.ones(num_rows, bool) if mask is None else mask
    bad = jnp.zeros(num_rows, bool)
    w_y = keep.astype(dtype)  # "mean" counts the kept examples (PyTorch's rule)
    on_label = ones
  else:
    lab = _labels.resolve_labels(labels, num_classes, config.ignore_index)
    index, probs, keep, bad = lab.index, None, lab.keep, lab.bad
    if mask is not None:
      keep, bad = keep & mask, bad & mask
    _labels.debug_check_labels(bad, num_classes, config.ignore_index, False, _FN)
    on_label = ones
    if class_weights is not None:
      on_label = sharded.gather_rows(layout, class_weights.astype(dtype), lab.index)
    w_y = on_label
  target = _core.Target(
      on_label if smoothing is None else (1.0 - smoothing) * on_label,
      None if smoothing is None else smoothing * ones,
      None if z is None else z * ones,
  )
  if blocks.is_symbolic(num_rows):  # jax.export: padded rows are dead (keep and bad False)
    size = (config.tile_rows if config.reduction == "none"
            else config.fused_rows(num_rows, num_classes, dtype, dense))
    hidden, index, probs, target = blocks.pad_rows((hidden, index, probs, target), size, 0)
    keep, bad, w_y = blocks.pad_rows((keep, bad, w_y), size, False)
  params = blocks.Params(hidden, weight, bias, class_weights, cap)
  rows = blocks.Rows(index, keep, bad, target, probs)
  if config.reduction == "none":
    out = recompute.row_losses(config, params, rows)
    losses, lse, predicted = out if config.aux else (out, None, None)
    loss = lax.slice_in_dim(losses, 0, num_rows).reshape(batch_shape)
  else:
    out = fused.summed_loss(config, params, rows)
    total, lse, predicted = out if config.aux else (out, None, None)
    denominator = sharded.sum_rows(layout, jnp.where(keep, w_y, 0.0))
    loss = _common.reduce_loss(total[None], config.reduction, denominator)
  if not config.aux:
    return loss
  live = keep & ~bad
  wanted = _core.row_argmax(probs) if dense else index  # the targets' argmax, lowest on ties
  correct = (predicted == wanted) & live

  def per_example(v):
    return lax.slice_in_dim(v, 0, num_rows).reshape(batch_shape)

  return loss, _aux.CrossEntropyAux(per_example(lse), per_example(predicted),
                                    per_example(correct))

