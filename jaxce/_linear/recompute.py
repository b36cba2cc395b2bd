"""The recompute path (``reduction="none"``): per-row losses, logits recomputed in the backward.

Each example's cotangent is only known in the backward pass, so the forward
keeps per-row statistics and the backward recomputes each ``[rows, cols]``
tile of logits (four matmuls, as tokamax's ``chunked_xla``). The gradient of
probability targets, when they are differentiated, takes one more pass
(:func:`probs_grad`), which the fused path uses too.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from jaxce import _core
from jaxce._linear import blocks
from jaxce._linear import sharded
from jaxce._linear.blocks import Params
from jaxce._linear.blocks import Rows
from jaxce._linear.blocks import Stats
from jaxce._linear.sharded import Layout


def _stats_pass(config, params: Params, index, probs, smooth: bool, layout: Layout) -> Stats:
  """Per-row statistics over the whole vocabulary, one ``[rows, cols]`` tile at a time."""
  num_rows, num_classes = params.hidden.shape[0], params.weight.shape[1]
  dtype = blocks.compute_dtype(params)
  offset = sharded.vocab_offset(layout, num_classes)
  dense = probs is not None

  def token_block(out, start, size, _):  # a repeated row is recomputed identically
    h, idx = blocks.slice_rows((params.hidden, None if dense else index - offset), start, size)

    def tile(acc, c0, cols, skip):
      x = blocks.capped(blocks.logits(h, params.weight, params.bias, c0, cols, dtype),
                        params.softcap)
      x, idx_c, q_c = blocks.fresh_columns(x, idx, c0, skip,
                                           blocks.tile(probs, start, size, c0, cols))
      stats = blocks.block_stats(x, idx_c, c0, blocks.cols(params.class_weights, c0, cols),
                                 smooth, q_c, config.aux)[0]
      return blocks.merge(acc, stats)

    stats = blocks.over(blocks.empty_stats(size, dtype, smooth, dense, config.aux), num_classes,
                        config.tile_cols, tile)
    if stats.best is not None:
      stats = stats._replace(best=stats.best._replace(index=stats.best.index + offset))
    return blocks.put_rows(out, blocks.combine(stats, layout.vocab_axis), start)

  return blocks.over(blocks.empty_stats(num_rows, dtype, smooth, dense, config.aux), num_rows,
                     config.tile_rows, token_block)


def _grad_pass(config, params: Params, rows: Rows, stats: Stats, g, g_lse, layout: Layout):
  """Gradients for per-row cotangents ``g`` (and ``g_lse`` of the lse, or None).

  Recomputes each ``[rows, cols]`` tile. A repeated row of the last token
  block gets its hidden gradient again (the same value) and adds nothing to
  the others.
  """
  num_rows, num_classes = params.hidden.shape[0], params.weight.shape[1]
  dtype = blocks.compute_dtype(params)
  offset = sharded.vocab_offset(layout, num_classes)
  dense = rows.probs is not None
  if g_lse is not None:
    g_lse = blocks.row_cotangent(rows, g_lse)
  scales = blocks.grad_scales(rows.target, stats, blocks.row_cotangent(rows, g), g_lse)
  want_class_weights = params.class_weights is not None and (
      scales.per_class is not None or dense)
  mm_dtype = blocks.matmul_dtype(params)

  def token_block(grads, start, size, row_skip):
    index = None if dense else rows.index - offset
    h, idx, st, sc = blocks.slice_rows((params.hidden, index, stats, scales), start, size)
    h_fresh, sc_fresh = blocks.fresh_rows((h, sc), row_skip)  # repeated rows add nothing

    def tile(carry, c0, cols, col_skip):
      grads, d_h = carry
      x = blocks.capped(blocks.logits(h, params.weight, params.bias, c0, cols, dtype),
                        params.softcap)
      x, idx_c, q_c = blocks.fresh_columns(x, idx, c0, col_skip,
                                           blocks.tile(rows.probs, start, size, c0, cols))
      e = _core.row_stats(x, st.row.shift)[1]
      if want_class_weights:
        grads = grads._replace(class_weights=blocks.add_cols(
            grads.class_weights, blocks.class_weights_grad(x, sc_fresh, st.row.safe_lse, q_c), c0))
      dl_mm = blocks.logits_grad(x, e, sc, blocks.cols(params.class_weights, c0, cols), idx_c, c0,
                                 mm_dtype, softcap=params.softcap, probs=q_c)
      if params.softcap is not None:
        dl_mm, d_cap = dl_mm
        grads = grads._replace(
            softcap=grads.softcap + jnp.sum(blocks.fresh_rows(d_cap, row_skip)))
      d_h = d_h + blocks.hidden_grad(dl_mm, blocks.cols(params.weight, c0, cols), dtype)
      return blocks.add_weight_tile(grads, h_fresh, dl_mm, c0, row_skip, config.platform), d_h

    d_h = jnp.zeros(h.shape, dtype)
    grads, d_h = blocks.over((grads, d_h), num_classes, config.tile_cols, tile)
    return grads._replace(hidden=blocks.put_rows(grads.hidden, d_h, start))

  grads = blocks.over(blocks.zero_grads(config, params, dtype, want_class_weights), num_rows,
                      config.tile_rows, token_block)
  return sharded.reduce_grads(grads, layout)


def _probs_grad_pass(config, params: Params, rows: Rows, stats: Stats, g, layout: Layout):
  """``∂/∂q [N, V]`` of probability targets for per-row cotangents ``g``: one pass of logits.

  Each row block's logits are recomputed with all (local) columns, so no
  column repeats; a repeated row is written again with the same value.
  """
  num_rows, num_classes = params.hidden.shape[0], params.weight.shape[1]
  dtype = blocks.compute_dtype(params)
  scales = blocks.grad_scales(rows.target, stats, blocks.row_cotangent(rows, g))

  def token_block(out, start, size, _):
    h, lse, sc = blocks.slice_rows((params.hidden, stats.row.safe_lse, scales), start, size)
    x = blocks.capped(blocks.logits(h, params.weight, params.bias, 0, num_classes, dtype),
                      params.softcap)
    d = blocks.probs_grad(x, sc, lse, params.class_weights)
    return blocks.put_rows(out, d, start)

  rows_per_block = config.fused_rows(num_rows, num_classes, dtype, True)
  return blocks.over(jnp.zeros(rows.probs.shape, rows.probs.dtype), num_rows, rows_per_block,
                     token_block)


def probs_grad(config, params: Params, rows: Rows, stats: Stats, g) -> jax.Array:
  """The probability targets' gradient ``[N, V]`` (per device on a mesh)."""
  layout = config.layout
  return sharded.run(layout, lambda p, r, s, g, lay: _probs_grad_pass(config, p, r, s, g, lay),
                     (params, rows, stats, g),
                     (layout.params, layout.row_specs, layout.rows, layout.rows), layout.probs)


def stats(config, params: Params, rows: Rows) -> Stats:
  """Per-row statistics over the whole vocabulary (combined over the vocabulary axis)."""
  smooth = rows.target.smooth is not None
  layout = config.layout
  return sharded.run(layout,
                     lambda p, idx, q, lay: _stats_pass(config, p, idx, q, smooth, lay),
                     (params, rows.index, rows.probs),
                     (layout.params, layout.rows, layout.probs), layout.rows)


def grads(config, params: Params, rows: Rows, stats: Stats, g, g_lse=None) -> blocks.Grads:
  """Parameter gradients for per-row cotangents ``g`` (and ``g_lse``), tile by tile."""
  layout = config.layout
  return sharded.run(layout,
                     lambda p, r, s, g, gl, lay: _grad_pass(config, p, r, s, g, gl, lay),
                     (params, rows, stats, g, g_lse),
                     (layout.params, layout.row_specs, layout.rows, layout.rows, layout.rows),
                     layout.grads)


def aux_outputs(rows: Rows, stats: Stats) -> tuple[jax.Array, jax.Array]:
  """``(lse, predicted)`` per row: the lse 0 where a row does not count."""
  live = rows.keep & ~rows.bad
  return jnp.where(live, stats.row.safe_lse, 0.0), stats.best.index


def is_zero(ct) -> bool:
  """Whether a cotangent is a symbolic zero (that output is not differentiated)."""
  return ct is None or isinstance(ct, SymbolicZero)


def perturbed(primal) -> bool:
  """Whether a ``symbolic_zeros`` forward's argument leaf is differentiated."""
  return primal is not None and bool(primal.perturbed)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def row_losses(config, params: Params, rows: Rows):
  """Masked per-row losses ``[N]`` (and ``(lse, predicted)`` with ``config.aux``).

  The backward recomputes the logits tile by tile.
  """
  st = stats(config, params, rows)
  losses = blocks.mask_losses(rows, blocks.loss(rows.target, st))
  return (losses, *aux_outputs(rows, st)) if config.aux else losses


def _row_losses_fwd(config, params, rows):
  want_probs = perturbed(rows.probs)
  params, rows = jax.custom_derivatives.custom_vjp_primal_tree_values((params, rows))
  st = stats(config, params, rows)
  losses = blocks.mask_losses(rows, blocks.loss(rows.target, st))
  out = (losses, *aux_outputs(rows, st)) if config.aux else losses
  return out, (params, rows, st, Flag(want_probs))


def _row_losses_bwd(config, residuals, cts):
  params, rows, st, want_probs = residuals
  g, g_lse = (cts[0], cts[1]) if config.aux else (cts, None)
  g = jnp.zeros_like(rows.keep, st.row.total.dtype) if is_zero(g) else g
  g_lse = None if is_zero(g_lse) else g_lse
  param_grads = grads(config, params, rows, st, g, g_lse)
  d_target = blocks.target_cotangent(rows.target, st, blocks.row_cotangent(rows, g))
  d_probs = probs_grad(config, params, rows, st, g) if want_probs.value else None
  return blocks.param_cotangents(params, param_grads, 1.0), blocks.rows_cotangent(d_target,
                                                                                   d_probs)


class Flag:
  """A static bool carried in the residuals."""

  def __init__(self, value: bool):
    self.value = value

  def __eq__(self, other):
    return isinstance(other, Flag) and other.value == self.value

  def __hash__(self):
    return hash(self.value)


jax.tree_util.register_static(Flag)
row_losses.defvjp(_row_losses_fwd, _row_losses_bwd, symbolic_zeros=True)
