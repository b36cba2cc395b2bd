"""The recompute path (``reduction="none"``): per-row losses, logits recomputed in the backward.

Each example's cotangent is only known in the backward pass, so the forward
keeps per-row statistics and the backward recomputes each ``[rows, cols]``
tile of logits (four matmuls, as tokamax's ``chunked_xla``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxce import _core
from jaxce._linear import blocks
from jaxce._linear import sharded
from jaxce._linear.blocks import Params
from jaxce._linear.blocks import Rows
from jaxce._linear.blocks import Stats
from jaxce._linear.sharded import Layout


def _stats_pass(config, params: Params, index, smooth: bool, layout: Layout) -> Stats:
  """Per-row statistics over the whole vocabulary, one ``[rows, cols]`` tile at a time."""
  num_rows, num_classes = index.shape[0], params.weight.shape[1]
  dtype = blocks.compute_dtype(params)
  offset = sharded.vocab_offset(layout, num_classes)

  def token_block(out, start, size, _):  # a repeated row is recomputed identically
    h, idx = blocks.slice_rows((params.hidden, index - offset), start, size)

    def tile(acc, c0, cols, skip):
      x = blocks.capped(blocks.logits(h, params.weight, params.bias, c0, cols, dtype),
                        params.softcap)
      x, idx_c = blocks.fresh_columns(x, idx, c0, skip)
      stats = blocks.block_stats(x, idx_c, c0, blocks.cols(params.class_weights, c0, cols),
                                 smooth)[0]
      return blocks.merge(acc, stats)

    stats = blocks.over(blocks.empty_stats(size, dtype, smooth), num_classes, config.tile_cols,
                        tile)
    return blocks.put_rows(out, blocks.combine(stats, layout.vocab_axis), start)

  return blocks.over(blocks.empty_stats(num_rows, dtype, smooth), num_rows, config.tile_rows,
                     token_block)


def _grad_pass(config, params: Params, rows: Rows, stats: Stats, g, layout: Layout):
  """Gradients for per-row cotangents ``g``, recomputing each ``[rows, cols]`` tile.

  A repeated row of the last token block gets its hidden gradient again (the
  same value) and adds nothing to the others.
  """
  num_rows, num_classes = rows.index.shape[0], params.weight.shape[1]
  dtype = blocks.compute_dtype(params)
  offset = sharded.vocab_offset(layout, num_classes)
  scales = _core.grad_scales(rows.target, stats.row, stats.smooth, blocks.row_cotangent(rows, g))
  want_class_weights = params.class_weights is not None and scales.per_class is not None
  mm_dtype = blocks.matmul_dtype(params)

  def token_block(grads, start, size, row_skip):
    h, idx, st, sc = blocks.slice_rows((params.hidden, rows.index - offset, stats, scales),
                                       start, size)
    h_fresh, sc_fresh = blocks.fresh_rows((h, sc), row_skip)  # repeated rows add nothing

    def tile(carry, c0, cols, col_skip):
      grads, d_h = carry
      x = blocks.capped(blocks.logits(h, params.weight, params.bias, c0, cols, dtype),
                        params.softcap)
      x, idx_c = blocks.fresh_columns(x, idx, c0, col_skip)
      e = _core.row_stats(x, st.row.shift)[1]
      if want_class_weights:
        grads = grads._replace(class_weights=blocks.add_cols(
            grads.class_weights, blocks.class_weights_grad(x, sc_fresh, st.row.safe_lse), c0))
      dl_mm = blocks.logits_grad(x, e, sc, blocks.cols(params.class_weights, c0, cols), idx_c, c0,
                                 mm_dtype, softcap=params.softcap)
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


def _stats(config, params: Params, rows: Rows) -> Stats:
  smooth = rows.target.smooth is not None
  layout = config.layout
  return sharded.run(layout, lambda p, idx, lay: _stats_pass(config, p, idx, smooth, lay),
                     (params, rows.index), (layout.params, layout.rows), layout.rows)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def row_losses(config, params: Params, rows: Rows) -> jax.Array:
  """Masked per-row losses ``[N]``; the backward recomputes the logits tile by tile."""
  return blocks.mask_losses(rows, blocks.loss(rows.target, _stats(config, params, rows)))


def _row_losses_fwd(config, params, rows):
  stats = _stats(config, params, rows)
  return blocks.mask_losses(rows, blocks.loss(rows.target, stats)), (params, rows, stats)


def _row_losses_bwd(config, residuals, g):
  params, rows, stats = residuals
  layout = config.layout
  grads = sharded.run(layout, lambda p, r, s, g, lay: _grad_pass(config, p, r, s, g, lay),
                      (params, rows, stats, g),
                      (layout.params, layout.rows, layout.rows, layout.rows), layout.grads)
  d_target = blocks.target_cotangent(rows.target, stats, blocks.row_cotangent(rows, g))
  return blocks.param_cotangents(params, grads, 1.0), blocks.rows_cotangent(d_target)


row_losses.defvjp(_row_losses_fwd, _row_losses_bwd)
