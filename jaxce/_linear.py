"""Cross-entropy of a linear layer's output without materialising the logits."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike

from jaxce import _common

_FN = "jaxce.linear_cross_entropy"

# Vocabulary columns per block. Temporary memory is about one float32
# ``[N, chunk_size]`` block plus one ``[N, D]``; for N=8192, D=1024, V=65536 on
# CPU, 4096 takes 8.6 % of the naive version's temporary memory and was as fast
# as 8192 and faster than 2048 (benchmarks/bench_losses.py --chunk-sweep).
DEFAULT_CHUNK_SIZE = 4096


def linear_cross_entropy(
    hidden: ArrayLike,
    weight: ArrayLike,
    labels: ArrayLike,
    *,
    bias: ArrayLike | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    ignore_index: int | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    reduction: str = "mean",
) -> jax.Array:
  r"""Cross-entropy of ``hidden @ weight + bias`` computed block by block.

  .. math::
    \ell_n = (1-\varepsilon)(\mathrm{lse}_n - z_{n,y_n})
      + \tfrac{\varepsilon}{V}\textstyle\sum_c (\mathrm{lse}_n - z_{n,c})
      + \zeta\,\mathrm{lse}_n^2,
    \quad z = h W + b,\ \mathrm{lse}_n = \log\textstyle\sum_c e^{z_{n,c}}

  The ``[N, V]`` logits are never stored: the forward pass runs an online
  logsumexp over blocks of ``chunk_size`` vocabulary columns and keeps one
  float32 number per row; the backward pass (a ``jax.custom_vjp``) recomputes
  each block of logits and turns it into its share of the gradients at once.
  Peak temporary memory is ``O(N * chunk_size)`` instead of ``O(N * V)``, at the
  cost of one extra ``hidden @ weight`` matmul. Loss and gradients equal those
  of ``sparse_cross_entropy(hidden @ weight + bias, labels, ...)``.

  Low-precision inputs (bf16, fp16) are multiplied with float32 accumulation
  and the logsumexp is kept in float32; the loss is float32 and each gradient
  has its input's dtype. The function is pure, so it composes with ``jit``,
  ``vmap``, ``grad`` and sharding. Reverse-mode second derivatives (e.g.
  ``jax.hessian``, which is forward-over-reverse) work; plain forward mode
  (``jax.jvp``, ``jax.jacfwd``) raises, as for every ``custom_vjp``.

  Args:
    hidden: features of shape ``[..., D]``, e.g. ``[N, D]`` or ``[B, T, D]``.
    weight: projection of shape ``[D, V]``.
    labels: integer class indices of shape ``[...]`` (``hidden.shape[:-1]``),
      in ``[0, V)`` or equal to ``ignore_index``. Concrete out-of-range labels
      raise ``ValueError``; traced ones (under ``jit``) give a NaN loss for
      their example.
    bias: optional bias of shape ``[V]``.
    chunk_size: vocabulary columns per block (a positive int). It need not
      divide ``V``; values above ``V`` are clipped to ``V``.
    ignore_index: label value whose examples get loss 0 and zero gradient and
      are left out of the ``"mean"`` denominator. If every example is ignored,
      the mean is 0 (with zero gradients), not NaN.
    label_smoothing: ``ε`` in ``[0, 1]``; the target becomes
      ``(1 - ε) * onehot + ε / V`` (as in PyTorch).
    z_loss: coefficient ``ζ >= 0`` of the auxiliary ``lse²`` term (PaLM).
    reduction: ``"none"``, ``"mean"`` (over non-ignored examples) or
      ``"sum"``.

  Returns:
    float32 losses of shape ``labels.shape`` for ``reduction="none"``, else a
    float32 scalar.

  Examples:
    >>> import jax.numpy as jnp
    >>> import jaxce
    >>> hidden = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    >>> weight = jnp.array([[2.0, 0.0, -1.0], [0.0, 1.0, 0.5]])
    >>> labels = jnp.array([0, 1, 2])
    >>> loss = jaxce.linear_cross_entropy(hidden, weight, labels, chunk_size=2, reduction="none")
    >>> loss.round(4)
    Array([0.1698, 0.6803, 2.8715], dtype=float32)
    >>> jaxce.linear_cross_entropy(hidden, weight, labels, chunk_size=2)
    Array(1.2406, dtype=float32)

  References:
    Wijmans et al., `Cut Your Losses in Large-Vocabulary Language Models
    <https://arxiv.org/abs/2411.09009>`_, 2024 (Apple Cut Cross-Entropy);
    Liger Kernel ``LigerFusedLinearCrossEntropyLoss``.
  """
  hidden = _common.as_array(hidden, "hidden", _FN)
  weight = _common.as_array(weight, "weight", _FN)
  labels = _common.as_array(labels, "labels", _FN)
  _common.check_floating(hidden, "hidden", _FN)
  _common.check_floating(weight, "weight", _FN)
  _common.check_int_labels(labels, _FN)
  _common.check_reduction(reduction, _FN)
  _common.check_smoothing(label_smoothing, _FN)
  _check_z_loss(z_loss)
  _check_chunk_size(chunk_size)
  _check_ignore_index(ignore_index)
  if hidden.ndim < 1:
    raise ValueError(f"{_FN}: hidden must have shape [..., D]; got a scalar.")
  if weight.ndim != 2 or weight.shape[0] != hidden.shape[-1]:
    raise ValueError(
        f"{_FN}: weight shape {tuple(weight.shape)} must be [D, V] with D = hidden's last "
        f"dimension; hidden shape is {tuple(hidden.shape)}."
    )
  _common.check_shape(labels, hidden.shape[:-1], "labels", "hidden.shape[:-1]", _FN)
  num_classes = weight.shape[1]
  if num_classes == 0:
    raise ValueError(f"{_FN}: weight must have at least one class column; got shape (D, 0).")
  if bias is not None:
    bias = _common.as_array(bias, "bias", _FN)
    _common.check_floating(bias, "bias", _FN)
    _common.check_shape(bias, (num_classes,), "bias", "(V,) =", _FN)

  valid = jnp.ones(labels.shape, bool) if ignore_index is None else labels != ignore_index
  bad = valid & ((labels < 0) | (labels >= num_classes))
  _common.check_label_values(bad, labels, num_classes, _FN, ignore_index=ignore_index)

  batch_shape = labels.shape
  num_rows = int(np.prod(batch_shape, dtype=np.int64))
  loss = _linear_ce_rows(
      hidden.reshape(num_rows, hidden.shape[-1]),
      weight,
      bias,
      labels.reshape(num_rows),
      jnp.asarray(label_smoothing, jnp.float32),
      jnp.asarray(z_loss, jnp.float32),
      min(int(chunk_size), num_classes),
      ignore_index,
  )
  loss = loss.reshape(batch_shape)
  return _common.reduce_loss(loss, reduction, jnp.sum(valid))


def _check_chunk_size(chunk_size) -> None:
  if (
      not isinstance(chunk_size, (int, np.integer))
      or isinstance(chunk_size, bool)
      or chunk_size < 1
  ):
    raise ValueError(f"{_FN}: chunk_size must be a positive int; got {chunk_size!r}.")


def _check_ignore_index(ignore_index) -> None:
  if ignore_index is not None and (
      not isinstance(ignore_index, (int, np.integer)) or isinstance(ignore_index, bool)
  ):
    raise TypeError(f"{_FN}: ignore_index must be an int or None; got {ignore_index!r}.")


def _check_z_loss(z_loss) -> None:
  if _common.is_concrete(z_loss):
    value = np.asarray(z_loss)
    if value.shape != () or not float(value) >= 0.0:
      raise ValueError(f"{_FN}: z_loss must be a non-negative scalar; got {z_loss!r}.")


def _logits(hidden, weight, bias, start, size):
  """Float32 logits ``[N, size]`` of the vocabulary columns ``[start, start + size)``."""
  w_block = lax.dynamic_slice_in_dim(weight, start, size, axis=1)
  logits = jnp.dot(hidden, w_block, preferred_element_type=jnp.float32)
  if bias is not None:
    logits = logits + lax.dynamic_slice_in_dim(bias, start, size)[None, :].astype(jnp.float32)
  return logits, w_block


def _over_blocks(step, carry, num_classes, chunk):
  """Runs ``step(carry, start, size)`` over all vocabulary blocks.

  The ``V // chunk`` full blocks go through one ``lax.scan``; a remainder of
  ``V % chunk`` columns is one more step with its own static size, so ``weight``
  is never padded or copied and no column needs masking.
  """
  num_full = num_classes // chunk
  carry, _ = lax.scan(
      lambda c, i: (step(c, i * chunk, chunk), None),
      carry,
      jnp.arange(num_full, dtype=jnp.int32),
  )
  if num_classes % chunk:
    carry = step(carry, num_full * chunk, num_classes % chunk)
  return carry


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _linear_ce_rows(hidden, weight, bias, labels, label_smoothing, z_loss, chunk, ignore_index):
  return _linear_ce_fwd(
      hidden, weight, bias, labels, label_smoothing, z_loss, chunk, ignore_index
  )[0]


def _linear_ce_fwd(hidden, weight, bias, labels, label_smoothing, z_loss, chunk, ignore_index):
  num_rows, num_classes = hidden.shape[0], weight.shape[1]

  def step(carry, start, size):
    run_max, run_sum, z_label = carry
    logits, _ = _logits(hidden, weight, bias, start, size)
    new_max = jnp.maximum(run_max, jnp.max(logits, axis=1))
    # ``new_max`` is finite after the first block (unless the logits are not).
    scale = jnp.where(run_max == -jnp.inf, 0.0, jnp.exp(run_max - new_max))
    run_sum = run_sum * scale + jnp.sum(jnp.exp(logits - new_max[:, None]), axis=1)
    # Pick each row's label logit if it falls in this block (a gather, not a mask).
    local = labels - start
    picked = jnp.take_along_axis(logits, jnp.clip(local, 0, size - 1)[:, None], axis=1)[:, 0]
    z_label = z_label + jnp.where((local >= 0) & (local < size), picked, 0.0)
    return new_max, run_sum, z_label

  init = (
      jnp.full((num_rows,), -jnp.inf, jnp.float32),
      jnp.zeros((num_rows,), jnp.float32),
      jnp.zeros((num_rows,), jnp.float32),
  )
  run_max, run_sum, z_label = _over_blocks(step, init, num_classes, chunk)
  lse = run_max + jnp.log(run_sum)
  in_range = (labels >= 0) & (labels < num_classes)
  # lse >= z_label holds exactly (z_label is one of the summed logits).
  nll = jnp.where(in_range, lse - z_label, jnp.nan)
  # sum_c z_c = hidden @ (sum_c W[:, c]) + sum_c b_c: one matrix-vector product.
  z_mean = jnp.dot(
      hidden, jnp.sum(weight, axis=1, dtype=jnp.float32), preferred_element_type=jnp.float32
  )
  if bias is not None:
    z_mean = z_mean + jnp.sum(bias, dtype=jnp.float32)
  smooth = lse - z_mean / num_classes
  loss = (1 - label_smoothing) * nll + label_smoothing * smooth + z_loss * lse**2
  if ignore_index is not None:
    loss = jnp.where(labels == ignore_index, 0.0, loss)
  return loss, (hidden, weight, bias, labels, label_smoothing, z_loss, lse)


def _linear_ce_bwd(chunk, ignore_index, residuals, g):
  hidden, weight, bias, labels, label_smoothing, z_loss, lse = residuals
  num_classes = weight.shape[1]
  mm_dtype = jnp.result_type(hidden.dtype, weight.dtype)
  in_range = (labels >= 0) & (labels < num_classes)
  # Per-row factor of the gradient: NaN for out-of-range labels (their loss is
  # NaN too), zero for ignored rows.
  row_scale = jnp.where(in_range, g.astype(jnp.float32), jnp.nan)
  if ignore_index is not None:
    row_scale = jnp.where(labels == ignore_index, 0.0, row_scale)
  row_live = (row_scale != 0)[:, None]
  softmax_scale = (1 + 2 * z_loss * lse)[:, None]
  on_target = 1 - label_smoothing
  off_target = label_smoothing / num_classes
  labels_col = labels[:, None]

  def step(carry, start, size):
    d_hidden, d_weight, d_bias = carry
    logits, w_block = _logits(hidden, weight, bias, start, size)
    cols = start + lax.broadcasted_iota(jnp.int32, (1, size), 1)
    # d loss / d logits = (1 + 2 z lse) softmax - (1 - eps) onehot - eps / V.
    d_logits = (
        jnp.exp(logits - lse[:, None]) * softmax_scale
        - jnp.where(cols == labels_col, on_target, 0.0)
        - off_target
    )
    d_logits = jnp.where(row_live, d_logits * row_scale[:, None], 0.0)
    d_mm = d_logits.astype(mm_dtype)
    d_hidden = d_hidden + jnp.dot(d_mm, w_block.T, preferred_element_type=jnp.float32)
    d_w_block = jnp.dot(hidden.T, d_mm, preferred_element_type=jnp.float32)
    d_weight = lax.dynamic_update_slice_in_dim(
        d_weight, d_w_block.astype(d_weight.dtype), start, axis=1
    )
    if d_bias is not None:
      d_bias = lax.dynamic_update_slice_in_dim(
          d_bias, jnp.sum(d_logits, axis=0).astype(d_bias.dtype), start, axis=0
      )
    return d_hidden, d_weight, d_bias

  init = (
      jnp.zeros(hidden.shape, jnp.float32),
      jnp.zeros(weight.shape, weight.dtype),
      None if bias is None else jnp.zeros(bias.shape, bias.dtype),
  )
  d_hidden, d_weight, d_bias = _over_blocks(step, init, num_classes, chunk)
  return d_hidden.astype(hidden.dtype), d_weight, d_bias, None, None, None


_linear_ce_rows.defvjp(_linear_ce_fwd, _linear_ce_bwd)
