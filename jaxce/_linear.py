"""Cross-entropy of a linear layer's output without materialising the logits.

The loss is :func:`jaxce.sparse_cross_entropy` of ``hidden @ weight + bias``
(same options, same semantics), computed block by block. The maths is
:mod:`jaxce._core`'s: per-block row statistics merged online
(:func:`_core.merge_stats`), the target loss (:func:`_core.target_loss`) and
the gradient of a block of logits columns (:func:`_core.grad_scales`,
:func:`_core.logits_grad`). This module decides the blocking and what each
pass keeps:

* **scalar reductions** (``"mean"``, ``"sum"``) -- the fused path. Under
  differentiation the forward pass takes ``rows`` tokens at a time, forms
  their full rows of logits (``[rows, V]``, the only large temporary), finishes
  their statistics and turns the block straight into its share of the
  gradients while it is live (as Liger's fused linear cross-entropy does). The
  backward pass only scales the stored gradients by the cotangent, so loss and
  gradients cost the naive version's three matmuls, not four.
* **``reduction="none"``** -- the recompute path. Each example's cotangent is
  unknown in the forward pass, so the forward keeps per-row statistics only
  and the backward recomputes each ``[rows, cols]`` tile of logits.

Both paths run unchanged inside ``shard_map`` (``mesh=``): every device holds
its tokens' rows and its slice of the vocabulary, per-row statistics are
combined over the vocabulary axis (an all-gather of a few numbers per row; the
label logit comes from the device that owns it), the hidden gradient is summed
over the vocabulary axis and the weight gradient over the token axes. No
weight-sized array is gathered (Megatron's vocab-parallel cross-entropy).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P
from jax.typing import ArrayLike
from jax.typing import DTypeLike

from jaxce import _common
from jaxce import _core
from jaxce import _labels

_FN = "jaxce.linear_cross_entropy"

# Block sizes per platform. ``row_bytes``: temporary memory the fused path may
# spend on one block of full logits rows (``rows = row_bytes // (4 · V)``, at
# least 8, V per device, split into even blocks); ``fused_cols``: vocabulary
# columns per weight-gradient product of the fused path (None: all at once);
# ``cols`` and ``tile_rows``: the [rows, cols] tiles of the recompute path.
#
# CPU: with the [D, 1024] weight-gradient tile, loss + gradients compile to
# 25 MiB of temporaries at (4096, 1024, 32768) and (8192, 1024, 65536) in
# float32, below tokamax chunked_xla's 28 MiB; more rows per block means fewer
# passes over the weight gradient (the fused path's main overhead): 160 rows
# ran 0.84x tokamax's time at V = 32768 on the 2-core CPU, 128 rows 0.91x.
# GPU/TPU: blocks large enough to keep the matrix units busy. On an H200 at
# (4096, 4096, 128256) bf16, 5 blocks of 824 rows with the whole-vocabulary
# weight-gradient product ran 1.14x the naive time in 0.20x its temporary
# memory with bf16 accumulation, the default there for bf16 weights (0.43x
# tokamax chunked_xla's time; with a float32 accumulator 1.24x in 0.74x);
# 512-row blocks ran 1.16x, 16384-column weight-gradient tiles 1.26x.
class _Blocks(NamedTuple):
  row_bytes: int
  cols: int
  tile_rows: int
  fused_cols: int | None  # weight-gradient tile of the fused path (None: all columns)


_BLOCKS = {
    "cpu": _Blocks(row_bytes=20 * 2**20, cols=1024, tile_rows=1024, fused_cols=1024),
    "accelerator": _Blocks(row_bytes=480 * 2**20, cols=8192, tile_rows=1024, fused_cols=None),
}


def _blocks(platform: str) -> _Blocks:
  return _BLOCKS["cpu" if platform == "cpu" else "accelerator"]


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
    chunk_size: int | None = None,
    token_chunk_size: int | None = None,
    grad_accumulation_dtype: DTypeLike | None = None,
    mesh: jax.sharding.Mesh | None = None,
    token_axes: str | tuple[str, ...] | None = None,
    vocab_axis: str | tuple[str, ...] | None = None,
) -> jax.Array:
  r"""Sparse softmax cross-entropy of ``hidden @ weight + bias``, never storing the logits.

  .. math::
    \ell_n = (1-\varepsilon)\,w_{y_n}\,(\mathrm{lse}_n - z_{n,y_n})
      + \varepsilon\,\tfrac{1}{C_n}\textstyle\sum_{c} w_c\,(\mathrm{lse}_n - z_{n,c})
      + \zeta\,\mathrm{lse}_n^2,
    \quad z = h W + b

  Values and gradients (w.r.t. ``hidden``, ``weight``, ``bias``, and the
  options) are those of ``jaxce.sparse_cross_entropy(hidden @ weight + bias,
  labels, **options)`` with ``where`` applied per example; the ``[..., V]``
  logits are never stored. With ``reduction="mean"`` or ``"sum"`` the gradients
  are formed in the forward pass while each block of logits is live, so loss
  plus gradients cost three matmuls (the naive version's count); temporary
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
  merge, ``psum``), and no weight-sized array is all-gathered.

  Args:
    hidden: features ``[..., D]``.
    weight: projection ``[D, V]``.
    labels: integer class indices ``[...]`` (``hidden.shape[:-1]``).
    bias: optional ``[V]``.
    class_weights: optional per-class weights ``[V]`` (PyTorch ``weight``).
    ignore_index: optional label value whose examples are skipped.
    label_smoothing: :math:`\varepsilon \in [0, 1]`; the target becomes
      ``(1-ε)·onehot + ε·w_c/C`` over the possible classes (PyTorch's rule).
    where: optional boolean per-example mask, broadcastable to ``labels.shape``;
      ``False`` examples count as ignored.
    reduction: ``"none"`` (default, as optax), ``"mean"`` or ``"sum"``.
    z_loss: coefficient :math:`\zeta \ge 0` of the ``lse²`` term (PaLM).
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
    float32 losses of ``labels.shape`` for ``reduction="none"``, else a scalar.

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
  w = _common.class_weights(class_weights, num_classes, fn)
  labels, concrete = _labels.int_labels(labels, fn)
  _common.check_shape(labels, hidden.shape[:-1], "labels", "hidden.shape[:-1]", fn)
  mask = _common.mask_array(where, labels.shape, "labels", fn)
  if concrete is not None and (mask is None or _common.is_concrete(mask)):
    kept = concrete if mask is None else np.where(np.asarray(mask), concrete, 0)
    _labels.check_labels(kept, num_classes, ignore_index, None, fn)
  layout = _layout(mesh, token_axes, vocab_axis, math.prod(labels.shape), num_classes, fn)
  config = _Config(
      reduction=reduction,
      ignore_index=ignore_index,
      rows=_block_option(token_chunk_size, "token_chunk_size", fn),
      cols=_block_option(chunk_size, "chunk_size", fn),
      layout=layout,
      accumulate=_accumulation_option(grad_accumulation_dtype, fn),
      platform=_platform(mesh),
  )
  return _linear(config, hidden, weight, bias, w, labels, mask, smoothing, z)


def _platform(mesh) -> str:
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
# Static configuration.
# ---------------------------------------------------------------------------


class _Layout(NamedTuple):
  """Where the work runs: one device (``mesh`` None) or vocabulary-parallel on a mesh."""

  mesh: jax.sharding.Mesh | None = None
  tokens: tuple[str, ...] = ()
  vocab: tuple[str, ...] = ()

  @property
  def vocab_axis(self) -> tuple[str, ...] | None:
    """The axis name(s) per-row statistics are combined over, or None."""
    return self.vocab or None


def _axis_names(value: Any, name: str, fn: str) -> tuple[str, ...]:
  if value is None:
    return ()
  names = (value,) if isinstance(value, str) else value
  if not isinstance(names, (tuple, list)) or not all(isinstance(n, str) for n in names):
    raise TypeError(f"{fn}: {name} must be a mesh axis name, a tuple of names or None; "
                    f"got {value!r}.")
  return tuple(names)


def _layout(mesh, token_axes, vocab_axis, num_rows: int, num_classes: int, fn: str) -> _Layout:
  tokens = _axis_names(token_axes, "token_axes", fn)
  vocab = _axis_names(vocab_axis, "vocab_axis", fn)
  if mesh is None:
    if tokens or vocab:
      raise ValueError(f"{fn}: token_axes and vocab_axis need a mesh.")
    return _Layout()
  if not isinstance(mesh, jax.sharding.Mesh):
    raise TypeError(f"{fn}: mesh must be a jax.sharding.Mesh or None; got {type(mesh).__name__}.")
  for axis in tokens + vocab:
    if axis not in mesh.shape:
      raise ValueError(f"{fn}: {axis!r} is not an axis of the mesh {dict(mesh.shape)}.")
  if set(tokens) & set(vocab):
    raise ValueError(f"{fn}: token_axes {tokens} and vocab_axis {vocab} must not share an axis.")
  for axes, size, what in ((tokens, num_rows, "tokens"), (vocab, num_classes, "classes (V)")):
    parts = math.prod(mesh.shape[a] for a in axes)
    if size % parts:
      raise ValueError(f"{fn}: {size} {what} do not split evenly over mesh axes {axes} "
                       f"({parts} devices).")
  return _Layout(mesh, tokens, vocab)


class _Config(NamedTuple):
  """Static options of the numeric core (hashable: one compilation per value)."""

  reduction: str
  ignore_index: int | None
  rows: int | None
  cols: int | None
  layout: _Layout
  accumulate: str | None = None  # dtype name of the weight/bias gradient accumulators
  platform: str = "cpu"  # picks the default block sizes

  @property
  def tile_cols(self) -> int:
    """Vocabulary columns per tile."""
    return self.cols or _blocks(self.platform).cols

  @property
  def tile_rows(self) -> int:
    """Tokens per tile of the recompute path (``reduction="none"``)."""
    return self.rows or _blocks(self.platform).tile_rows

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
    return self.cols or _blocks(self.platform).fused_cols or num_classes

  def fused_rows(self, num_rows: int, num_classes: int, dtype) -> int:
    """Tokens per block of full logits rows in the fused path.

    By default the fewest blocks whose float32 logits fit the platform's
    budget, split evenly (rounded up to a multiple of 8), so that no block
    mostly repeats its predecessor's rows.
    """
    if self.rows:
      return self.rows
    most = max(8, _blocks(self.platform).row_bytes // (num_classes * jnp.dtype(dtype).itemsize))
    count = -(-num_rows // most)
    rows = -(-num_rows // max(count, 1))
    return min(most, rows + (-rows) % 8) if rows > 8 else 8


# ---------------------------------------------------------------------------
# The numeric core: labels and options to per-row coefficients, then a kernel.
# ---------------------------------------------------------------------------


class _Params(NamedTuple):
  """The differentiable arrays the logits depend on (``w``: class weights, via smoothing)."""

  hidden: jax.Array  # [N, D]
  weight: jax.Array  # [D, V]
  bias: jax.Array | None  # [V]
  w: jax.Array | None  # [V]


class _Rows(NamedTuple):
  """Per-row inputs of the kernel, ``[N]`` each.

  ``target`` holds the loss coefficients of every row (they are not masked);
  ``keep``/``bad`` mask the rows once, at the loss and at the row cotangent.
  """

  index: jax.Array
  keep: jax.Array
  bad: jax.Array
  target: _core.Target


@functools.partial(jax.jit, static_argnums=0)
def _linear(config: _Config, hidden, weight, bias, w, labels, mask, smoothing, z):
  """The numeric core of :func:`linear_cross_entropy`, compiled once per static configuration."""
  num_classes, batch_shape = weight.shape[1], labels.shape
  labels = labels.reshape(-1)
  lab = _labels.resolve_labels(labels, num_classes, config.ignore_index)
  keep, bad = lab.keep, lab.bad
  if mask is not None:
    keep, bad = keep & mask.reshape(-1), bad & mask.reshape(-1)
  _labels.debug_check_labels(bad, num_classes, config.ignore_index, False, _FN)
  smoothing, z = _common.option_or_nan(smoothing, 1.0), _common.option_or_nan(z)
  dtype = _common.compute_dtype(jnp.result_type(hidden.dtype, weight.dtype))
  w_y = jnp.ones(labels.shape, dtype) if w is None else w.astype(dtype)[lab.index]
  ones = jnp.ones(labels.shape, dtype)
  target = _core.Target(
      w_y if smoothing is None else (1.0 - smoothing) * w_y,
      None if smoothing is None else smoothing * ones,
      None if z is None else z * ones,
  )
  params = _Params(hidden.reshape(-1, hidden.shape[-1]), weight, bias, w)
  rows = _Rows(lab.index, keep, bad, target)
  denominator = jnp.where(keep, w_y, 0.0)
  if config.reduction == "none":
    return _row_losses(config, params, rows).reshape(batch_shape)
  total = _summed_loss(config, params, rows)
  return _common.reduce_loss(total[None], config.reduction, denominator)


# ---------------------------------------------------------------------------
# Per-row statistics of a block of logits columns, and their online merge.
# ---------------------------------------------------------------------------


class _Stats(NamedTuple):
  """Per-row results of a pass over (part of) the vocabulary, ``[R]`` each.

  ``label`` is the label's logit ``x_y`` where the label's column was in the
  pass, else 0 (so passes merge by adding it).
  """

  row: _core.RowStats
  label: jax.Array
  smooth: _core.SmoothStats | None

  @property
  def nll(self) -> jax.Array:
    """``lse − x_y``, with the shift taken out of both terms (exact for huge logits)."""
    return self.row.log_total - (self.label - self.row.shift)


def _empty(rows: int, dtype, smooth: bool) -> _Stats:
  zeros = jnp.zeros(rows, dtype)
  return _Stats(_core.empty_stats(rows, dtype), zeros,
                _core.SmoothStats(zeros, zeros, zeros) if smooth else None)


def _block_stats(x, index, start, w, smooth: bool):
  """``(stats, e)`` of logits columns ``[start, start + size)``: ``x [R, size]``."""
  row, e = _core.row_stats(x)
  local = index - start
  inside = (local >= 0) & (local < x.shape[1])
  picked = jnp.take_along_axis(x, jnp.clip(local, 0, x.shape[1] - 1)[:, None], axis=1)[:, 0]
  smooth_stats = _core.smooth_stats(x, row.shift, w) if smooth else None
  return _Stats(row, jnp.where(inside, picked, 0.0), smooth_stats), e


def _merge(a: _Stats, b: _Stats) -> _Stats:
  row = _core.merge_stats(a.row, b.row)
  smooth = None
  if a.smooth is not None:
    smooth = _core.merge_smooth(a.smooth, b.smooth, a.row.shift, b.row.shift, row.shift)
  return _Stats(row, a.label + b.label, smooth)


def _combine(stats: _Stats, axis) -> _Stats:
  """Merges each device's statistics over the vocabulary axis (identity on one device).

  An all-gather of a few numbers per row, folded with :func:`_merge`: the
  ``pmax``/``psum`` of the online logsumexp, and the label logit of the one
  device that owns the label's column.
  """
  if axis is None:
    return stats
  gathered = lax.all_gather(stats, axis)
  devices = gathered.label.shape[0]
  return functools.reduce(_merge, [jax.tree.map(lambda v, k=k: v[k], gathered)
                                   for k in range(devices)])


def _loss(target: _core.Target, stats: _Stats) -> jax.Array:
  return _core.target_loss(target, stats.row, stats.nll, stats.smooth)


def _mask_losses(rows: _Rows, loss: jax.Array) -> jax.Array:
  """The one place values are masked: 0 for dead rows, NaN for bad labels."""
  return jnp.where(rows.bad, jnp.nan, jnp.where(rows.keep, loss, 0.0))


def _row_cotangent(rows: _Rows, g: jax.Array) -> jax.Array:
  """The one place gradients are masked: 0 for dead rows, NaN for bad labels that are used."""
  g = jnp.where(rows.keep, g, 0.0)
  return jnp.where(rows.bad & (g != 0), jnp.nan, g)


def _target_cotangent(target, stats: _Stats, g) -> _core.Target:
  """Cotangents of the per-row coefficients (``g·∂ℓ/∂target``): the loss is linear in them."""
  _, vjp = jax.vjp(lambda t: _loss(t, stats), target)
  return vjp(jnp.where(g == 0, 0.0, g))[0]


# ---------------------------------------------------------------------------
# Blocking helpers.
# ---------------------------------------------------------------------------


def _over(carry, total: int, size: int, step: Callable):
  """Runs ``carry = step(carry, start, size, skip)`` over ``[0, total)`` in blocks of ``size``.

  All ``ceil(total / size)`` blocks have the same static size: when ``size``
  does not divide ``total`` the last block starts at ``total − size`` and its
  first ``skip`` positions repeat its predecessor's, which ``step`` must leave
  out (``skip`` is None when no block overlaps). One loop body, so nothing is
  padded or copied and a remainder adds no second copy of the step to compile.
  """
  if total == 0:
    return carry
  size = min(size, total)
  count = -(-total // size)
  if count == 1:
    return step(carry, 0, size, None)
  overlap = count * size != total

  def body(i, carry):
    start = jnp.minimum(i * size, total - size)
    return step(carry, start, size, i * size - start if overlap else None)

  return lax.fori_loop(0, count, body, carry)


def _fresh(size: int, skip) -> jax.Array | None:
  """Boolean ``[size]``: the positions of a block that no earlier block covered (None: all)."""
  return None if skip is None else jnp.arange(size) >= skip


def _fresh_columns(x, index, start, skip):
  """Logits with repeated columns impossible (``-inf``) and labels there dropped."""
  fresh = _fresh(x.shape[1], skip)
  if fresh is None:
    return x, index
  return jnp.where(fresh[None, :], x, -jnp.inf), jnp.where(index - start >= skip, index, -1)


def _zero_columns(block, skip):
  """A tile with its repeated columns zeroed (they add nothing to the weight gradient)."""
  fresh = _fresh(block.shape[1], skip)
  return block if fresh is None else jnp.where(fresh[None, :], block, 0)


def _fresh_rows(tree, skip):
  """Row-major arrays with repeated rows zeroed (so they add nothing to a sum over rows)."""
  if skip is None:
    return tree
  fresh = _fresh(jax.tree.leaves(tree)[0].shape[0], skip)
  return jax.tree.map(lambda v: jnp.where(fresh.reshape((-1,) + (1,) * (v.ndim - 1)), v, 0), tree)


def _slice_rows(tree, start, size):
  return jax.tree.map(lambda v: lax.dynamic_slice_in_dim(v, start, size, 0), tree)


def _put_rows(tree, part, start):
  return jax.tree.map(lambda v, p: lax.dynamic_update_slice_in_dim(v, p.astype(v.dtype), start, 0),
                      tree, part)


def _add_cols(array, part, start):
  """``array[..., start:start + size] += part``, added in ``part``'s dtype and rounded once."""
  if part.shape[-1] == array.shape[-1]:
    return (array.astype(part.dtype) + part).astype(array.dtype)
  old = lax.dynamic_slice_in_dim(array, start, part.shape[-1], array.ndim - 1)
  new = (old.astype(part.dtype) + part).astype(array.dtype)
  return lax.dynamic_update_slice_in_dim(array, new, start, array.ndim - 1)


def _logits(hidden, weight, bias, start, size, dtype):
  """Logits ``[R, size]`` of vocabulary columns ``[start, start + size)`` in ``dtype``."""
  if size != weight.shape[1]:
    weight = lax.dynamic_slice_in_dim(weight, start, size, axis=1)
  x = jnp.dot(hidden, weight, preferred_element_type=dtype)
  if bias is not None:
    bias = bias if size == bias.shape[0] else lax.dynamic_slice_in_dim(bias, start, size)
    x = x + bias.astype(dtype)[None, :]
  return x


def _cols(array, start, size):
  if array is None or size == array.shape[-1]:
    return array
  return lax.dynamic_slice_in_dim(array, start, size, array.ndim - 1)


class _Grads(NamedTuple):
  """Gradient accumulators (None: not wanted).

  ``hidden`` has the hidden's dtype: each row is written once, when its block
  is done. The others accumulate over token blocks in the compute dtype, except
  ``weight`` and ``bias``, which take :meth:`_Config.accumulator`'s dtype (each
  block's share is still summed in float32 and rounded once).
  """

  hidden: jax.Array
  weight: jax.Array
  bias: jax.Array | None
  w: jax.Array | None


def _zero_grads(config: _Config, params: _Params, dtype, want_w: bool) -> _Grads:
  return _Grads(
      jnp.zeros(params.hidden.shape, params.hidden.dtype),
      jnp.zeros(params.weight.shape, config.accumulator(params.weight.dtype, dtype)),
      None if params.bias is None else jnp.zeros(
          params.bias.shape, config.accumulator(params.bias.dtype, dtype)),
      jnp.zeros(params.w.shape, dtype) if want_w else None,
  )


def _mm_dtype(params: _Params):
  """The matmul dtype of the logits gradient (bf16 stays bf16, as in the naive version)."""
  return jnp.result_type(params.hidden.dtype, params.weight.dtype)


def _hidden_grad(dl_mm, weight_cols, dtype):
  """``dl @ W_colsᵀ``: ``[R, D]``.

  Computed as ``(W_cols · dlᵀ)ᵀ``: that product's ``[D, R]`` layout runs 1.5x
  faster on XLA:CPU for few rows and many columns; the barrier keeps XLA from
  folding the transpose back into the dot.
  """
  d_h = lax.dot_general(weight_cols, dl_mm, (((1,), (1,)), ((), ())), preferred_element_type=dtype)
  return lax.optimization_barrier(d_h).T


def _add_weight_tile(grads: _Grads, hidden_fresh, dl_mm, start, skip, platform: str) -> _Grads:
  """Adds the weight and bias gradients of a ``[R, size]`` tile of the logits gradient.

  Rows before ``skip`` repeat an earlier block's and add nothing (their
  ``hidden_fresh`` rows are zero). The tile's product is summed in float32 and
  added to a low-precision accumulator with one rounding: as a float32 add, or
  on GPU by asking for the product in the accumulator's dtype so that XLA folds
  the add into the cuBLAS matmul's epilogue (``C + A·B`` in float32, rounded
  once, with no ``[D, size]`` float32 temporary).
  """
  product_dtype = (grads.weight.dtype if platform == "gpu"
                   else _common.compute_dtype(grads.weight.dtype))
  d_w = lax.dot_general(hidden_fresh, dl_mm, (((0,), (0,)), ((), ())),
                        preferred_element_type=product_dtype)
  grads = grads._replace(weight=_add_cols(grads.weight, d_w, start))
  if grads.bias is not None:
    d_b = jnp.sum(_fresh_rows(dl_mm, skip), axis=0, dtype=_common.compute_dtype(grads.bias.dtype))
    grads = grads._replace(bias=_add_cols(grads.bias, d_b, start))
  return grads


def _class_weight_grad(x, scales: _core.GradScales, lse) -> jax.Array:
  """``Σ_rows per_class·[possible]·(lse − x)``: the smoothing term's gradient w.r.t. ``w``."""
  terms = scales.per_class[:, None] * (lse[:, None] - x)
  return jnp.sum(jnp.where(x > -jnp.inf, terms, 0.0), axis=0)


def _block_grad(x, e, scales, w, index, start, mm_dtype) -> jax.Array:
  """The logits gradient of a block of columns ``[start, start + size)``, in ``mm_dtype``.

  The label term ``−at_label·[c = y]`` is a select fused into the same
  elementwise pass (and the cast), not a scatter: XLA:CPU copies a block
  before scattering into it, which would cost a second ``[R, size]`` buffer.
  """
  possible = None if scales.per_class is None else x > -jnp.inf
  dl = _core.logits_grad(e, scales, None, possible=possible, weights=w)
  at_label = lax.broadcasted_iota(jnp.int32, dl.shape, 1) + start == index[:, None]
  return jnp.where(at_label, dl - scales.at_label[:, None], dl).astype(mm_dtype)


# ---------------------------------------------------------------------------
# The passes (local to a device; ``axes`` name the mesh axes when sharded).
# ---------------------------------------------------------------------------


def _offset(params: _Params, axis):
  """Global index of this device's first vocabulary column."""
  return 0 if axis is None else lax.axis_index(axis) * params.weight.shape[1]


def _stats_pass(config: _Config, params: _Params, index, smooth: bool, axes) -> _Stats:
  """Per-row statistics over the whole vocabulary, one ``[rows, cols]`` tile at a time."""
  axis = _vocab_axis(axes)
  num_rows, num_classes = index.shape[0], params.weight.shape[1]
  dtype = _dtype(params)
  offset = _offset(params, axis)

  def token_block(out, start, size, _):  # a repeated row is recomputed identically
    h, idx = _slice_rows((params.hidden, index - offset), start, size)

    def tile(acc, c0, cols, skip):
      x = _logits(h, params.weight, params.bias, c0, cols, dtype)
      x, idx_c = _fresh_columns(x, idx, c0, skip)
      return _merge(acc, _block_stats(x, idx_c, c0, _cols(params.w, c0, cols), smooth)[0])

    stats = _over(_empty(size, dtype, smooth), num_classes, config.tile_cols, tile)
    return _put_rows(out, _combine(stats, axis), start)

  return _over(_empty(num_rows, dtype, smooth), num_rows, config.tile_rows, token_block)


def _grad_pass(config: _Config, params: _Params, rows: _Rows, stats: _Stats, g, axes) -> _Grads:
  """Gradients for per-row cotangents ``g``, recomputing each ``[rows, cols]`` tile.

  A repeated row of the last token block gets its hidden gradient again (the
  same value) and adds nothing to the others.
  """
  axis = _vocab_axis(axes)
  num_rows, num_classes = rows.index.shape[0], params.weight.shape[1]
  dtype = _dtype(params)
  offset = _offset(params, axis)
  scales = _core.grad_scales(rows.target, stats.row, stats.smooth, _row_cotangent(rows, g))
  want_w = params.w is not None and scales.per_class is not None
  mm_dtype = _mm_dtype(params)

  def token_block(grads, start, size, row_skip):
    h, idx, st, sc = _slice_rows((params.hidden, rows.index - offset, stats, scales), start, size)
    h_fresh, sc_fresh = _fresh_rows((h, sc), row_skip)  # what repeated rows add to sums: nothing

    def tile(carry, c0, cols, col_skip):
      grads, d_h = carry
      x = _logits(h, params.weight, params.bias, c0, cols, dtype)
      x, idx_c = _fresh_columns(x, idx, c0, col_skip)
      e = _core.row_stats(x, st.row.shift)[1]
      if want_w:
        grads = grads._replace(w=_add_cols(
            grads.w, _class_weight_grad(x, sc_fresh, st.row.safe_lse), c0))
      dl_mm = _block_grad(x, e, sc, _cols(params.w, c0, cols), idx_c, c0, mm_dtype)
      d_h = d_h + _hidden_grad(dl_mm, _cols(params.weight, c0, cols), dtype)
      return _add_weight_tile(grads, h_fresh, dl_mm, c0, row_skip, config.platform), d_h

    d_h = jnp.zeros(h.shape, dtype)
    grads, d_h = _over((grads, d_h), num_classes, config.tile_cols, tile)
    return grads._replace(hidden=_put_rows(grads.hidden, d_h, start))

  grads = _over(_zero_grads(config, params, dtype, want_w), num_rows, config.tile_rows,
                token_block)
  return _reduce_grads(grads, axes)


def _fused_pass(config: _Config, params: _Params, rows: _Rows, axes):
  """Per-row statistics and the gradients of ``Σ_n ℓ_n`` in one pass over the logits.

  Takes ``rows`` tokens at a time, forms their full rows of (local) logits,
  finishes their statistics and, while the block is live, turns it into its
  share of every gradient. Returns ``(stats, grads)``.
  """
  axis = _vocab_axis(axes)
  num_rows, num_classes = rows.index.shape[0], params.weight.shape[1]
  dtype = _dtype(params)
  offset = _offset(params, axis)
  smooth = rows.target.smooth is not None
  want_w = params.w is not None and smooth
  block_rows = config.fused_rows(num_rows, num_classes, dtype)
  g = _row_cotangent(rows, jnp.ones(num_rows, dtype))
  mm_dtype = _mm_dtype(params)

  def token_block(carry, start, size, row_skip):
    out, grads = carry
    h, idx, target, g_rows = _slice_rows((params.hidden, rows.index - offset, rows.target, g),
                                         start, size)
    h_fresh = _fresh_rows(h, row_skip)
    x = _logits(h, params.weight, params.bias, 0, num_classes, dtype)
    local, e = _block_stats(x, idx, 0, params.w, smooth)
    stats = _combine(local, axis)
    scales = _core.grad_scales(target, stats.row, stats.smooth, g_rows)
    if axis is not None:  # e is relative to this device's shift, not the row's
      rescale = jnp.where(local.row.has_mass, jnp.exp(local.row.shift - stats.row.shift), 0.0)
      scales = scales._replace(probs=scales.probs * rescale)
    if want_w:
      grads = grads._replace(w=grads.w + _class_weight_grad(
          x, _fresh_rows(scales, row_skip), stats.row.safe_lse))
    dl_mm = _block_grad(x, e, scales, params.w, idx, 0, mm_dtype)
    grads = grads._replace(hidden=_put_rows(
        grads.hidden, _hidden_grad(dl_mm, params.weight, dtype), start))
    grads = _over(grads, num_classes, config.fused_cols(num_classes),
                  lambda gr, c0, cols, col_skip: _add_weight_tile(
                      gr, h_fresh, _zero_columns(_cols(dl_mm, c0, cols), col_skip), c0, row_skip,
                      config.platform))
    return _put_rows(out, stats, start), grads

  init = (_empty(num_rows, dtype, smooth), _zero_grads(config, params, dtype, want_w))
  stats, grads = _over(init, num_rows, block_rows, token_block)
  return stats, _reduce_grads(grads, axes)


def _reduce_grads(grads: _Grads, axes) -> _Grads:
  """Sums the per-device partial gradients: hidden over the vocabulary, the rest over tokens."""
  if axes is None:
    return grads
  hidden = grads.hidden if axes.vocab is None else lax.psum(grads.hidden, axes.vocab)
  rest = grads._replace(hidden=None)
  if axes.tokens:
    rest = lax.psum(rest, axes.tokens)
  return rest._replace(hidden=hidden)


class _Axes(NamedTuple):
  """Inside ``shard_map``: the mesh axes the vocabulary and the tokens are split over."""

  vocab: tuple[str, ...] | None
  tokens: tuple[str, ...]


def _vocab_axis(axes: _Axes | None):
  return None if axes is None else axes.vocab


def _dtype(params: _Params):
  return _common.compute_dtype(jnp.result_type(params.hidden.dtype, params.weight.dtype))


# ---------------------------------------------------------------------------
# Sharding: each pass runs per device under shard_map when a mesh is given.
# ---------------------------------------------------------------------------


def _sharded(layout: _Layout, fn: Callable, args, in_kinds, out_kinds):
  """Runs ``fn(*args, axes)`` on one device (``axes`` None), or per device under ``shard_map``.

  ``in_kinds``/``out_kinds`` say, per argument/output, how its leaves are laid
  out: ``"rows"`` (first axis over the tokens), ``"cols"`` (last axis over the
  vocabulary), ``"hidden"`` (tokens on axis 0, nothing else) or ``"weight"``.
  """
  if layout.mesh is None:
    return fn(*args, None)
  tokens = layout.tokens or None
  vocab = layout.vocab
  spec = {"rows": P(tokens), "cols": P(vocab), "hidden": P(tokens, None), "weight": P(None, vocab)}

  def specs(tree, kind):
    if isinstance(kind, str):
      return jax.tree.map(lambda _: spec[kind], tree)
    parts = [specs(t, k) for t, k in zip(tree, kind, strict=True)]
    return type(kind)(*parts) if hasattr(kind, "_fields") else tuple(parts)

  out_shape = jax.eval_shape(lambda *a: fn(*a, None), *args)  # structure only
  in_specs = tuple(specs(a, k) for a, k in zip(args, in_kinds, strict=True))
  out_specs = specs(out_shape, out_kinds)
  axes = _Axes(layout.vocab_axis, layout.tokens)
  return _shard_map(lambda *a: fn(*a, axes), layout.mesh, in_specs, out_specs)(*args)


def _shard_map(f, mesh, in_specs, out_specs):
  """``jax.shard_map`` without replication checks (jax ≥ 0.6), or the experimental one."""
  if hasattr(jax, "shard_map"):
    return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
  from jax.experimental.shard_map import shard_map  # noqa: PLC0415 (older jax)

  return shard_map(f, mesh, in_specs, out_specs, check_rep=False)


_PARAM_KINDS = _Params("hidden", "weight", "cols", "cols")
_ROW_KINDS = "rows"
_GRAD_KINDS = _Grads("hidden", "weight", "cols", "cols")


# ---------------------------------------------------------------------------
# The two custom VJPs.
# ---------------------------------------------------------------------------


def _stats(config, params, rows) -> _Stats:
  smooth = rows.target.smooth is not None
  return _sharded(config.layout,
                  lambda p, idx, axes: _stats_pass(config, p, idx, smooth, axes),
                  (params, rows.index), (_PARAM_KINDS, _ROW_KINDS), _ROW_KINDS)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _row_losses(config: _Config, params: _Params, rows: _Rows) -> jax.Array:
  """Masked per-row losses ``[N]``; the backward recomputes the logits tile by tile."""
  return _mask_losses(rows, _loss(rows.target, _stats(config, params, rows)))


def _row_losses_fwd(config, params, rows):
  stats = _stats(config, params, rows)
  return _mask_losses(rows, _loss(rows.target, stats)), (params, rows, stats)


def _row_losses_bwd(config, residuals, g):
  params, rows, stats = residuals
  grads = _sharded(config.layout,
                   lambda p, r, s, g, axes: _grad_pass(config, p, r, s, g, axes),
                   (params, rows, stats, g), (_PARAM_KINDS, _ROW_KINDS, _ROW_KINDS, _ROW_KINDS),
                   _GRAD_KINDS)
  d_target = _target_cotangent(rows.target, stats, _row_cotangent(rows, g))
  return _param_cotangents(params, grads, 1.0), _rows_cotangent(rows, d_target)


_row_losses.defvjp(_row_losses_fwd, _row_losses_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _summed_loss(config: _Config, params: _Params, rows: _Rows) -> jax.Array:
  """``Σ_n`` of the masked per-row losses (pairwise); gradients formed in the forward pass."""
  return _common.pairwise_sum(_row_losses(config, params, rows))


def _summed_loss_fwd(config, params, rows):
  stats, grads = _sharded(config.layout,
                          lambda p, r, axes: _fused_pass(config, p, r, axes),
                          (params, rows), (_PARAM_KINDS, _ROW_KINDS), (_ROW_KINDS, _GRAD_KINDS))
  g_rows = _row_cotangent(rows, jnp.ones(rows.index.shape, stats.label.dtype))
  loss = _common.pairwise_sum(_mask_losses(rows, _loss(rows.target, stats)))
  return loss, (params, grads, _target_cotangent(rows.target, stats, g_rows), rows)


def _summed_loss_bwd(config, residuals, g):
  params, grads, d_target, rows = residuals
  d_target = jax.tree.map(lambda t: g * t, d_target)
  return _param_cotangents(params, grads, g), _rows_cotangent(rows, d_target)


_summed_loss.defvjp(_summed_loss_fwd, _summed_loss_bwd)


def _param_cotangents(params: _Params, grads: _Grads, g) -> _Params:
  """``g·grads`` in each parameter's dtype (None: zero)."""

  def cotangent(p, d):
    return None if p is None or d is None else (g * d).astype(p.dtype)

  return _Params(*map(cotangent, params, grads))


def _rows_cotangent(rows: _Rows, d_target: _core.Target) -> _Rows:
  return _Rows(None, None, None, d_target)
