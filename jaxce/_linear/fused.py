"""The fused path (``reduction="mean"``/``"sum"``): gradients formed in the forward pass.

The forward takes a block of tokens at a time, forms their full rows of
logits (``[rows, V]``, the only large temporary), finishes their statistics
and turns the block straight into its share of every gradient while it is
live (as Liger's fused linear cross-entropy does). The backward only scales
the stored gradients by the cotangent, so loss and gradients cost the naive
version's three matmuls, not four. Differentiating the auxiliary lse adds
the recompute path's backward; differentiating probability targets adds one
pass of logits (:func:`recompute.probs_grad`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxce._linear import blocks
from jaxce._linear import recompute
from jaxce._linear import sharded
from jaxce._linear.blocks import Params
from jaxce._linear.blocks import Rows
from jaxce._linear.sharded import Layout


def _fused_pass(config, params: Params, rows: Rows, layout: Layout):
  """Per-row statistics and the gradients of ``Σ_n ℓ_n`` in one pass over the logits.

  Takes ``rows`` tokens at a time, forms their full rows of (local) logits,
  finishes their statistics and, while the block is live, turns it into its
  share of every gradient. Returns ``(stats, grads)``.
  """
  axis = layout.vocab_axis
  num_rows, num_classes = params.hidden.shape[0], params.weight.shape[1]
  dtype = blocks.compute_dtype(params)
  offset = sharded.vocab_offset(layout, num_classes)
  smooth = rows.target.smooth is not None
  dense = rows.probs is not None
  want_class_weights = params.class_weights is not None and (smooth or dense)
  block_rows = config.fused_rows(num_rows, num_classes, dtype, dense)
  g = blocks.row_cotangent(rows, jnp.ones(num_rows, dtype))
  mm_dtype = blocks.matmul_dtype(params)

  def token_block(carry, start, size, row_skip):
    out, grads = carry
    index = None if dense else rows.index - offset
    h, idx, target, g_rows = blocks.slice_rows((params.hidden, index, rows.target, g), start, size)
    q = blocks.slice_rows(rows.probs, start, size) if dense else None
    h_fresh = blocks.fresh_rows(h, row_skip)
    x = blocks.capped(blocks.logits(h, params.weight, params.bias, 0, num_classes, dtype),
                      params.softcap)
    local, e = blocks.block_stats(x, idx, 0, params.class_weights, smooth, q, config.aux)
    if local.best is not None:
      local = local._replace(best=local.best._replace(index=local.best.index + offset))
    stats = blocks.combine(local, axis)
    scales = blocks.grad_scales(target, stats, g_rows)
    if axis is not None:  # e is relative to this device's shift, not the row's
      rescale = jnp.where(local.row.has_mass, jnp.exp(local.row.shift - stats.row.shift), 0.0)
      scales = scales._replace(probs=scales.probs * rescale)
    if want_class_weights:
      grads = grads._replace(class_weights=grads.class_weights + blocks.class_weights_grad(
          x, blocks.fresh_rows(scales, row_skip), stats.row.safe_lse, q))
    dl_mm = blocks.logits_grad(x, e, scales, params.class_weights, idx, 0, mm_dtype,
                               softcap=params.softcap, probs=q)
    if params.softcap is not None:
      dl_mm, d_cap = dl_mm
      grads = grads._replace(softcap=grads.softcap + jnp.sum(blocks.fresh_rows(d_cap, row_skip)))
    grads = grads._replace(hidden=blocks.put_rows(
        grads.hidden, blocks.hidden_grad(dl_mm, params.weight, dtype), start))

    def weight_tile(grads, c0, cols, col_skip):
      dl_cols = blocks.zero_columns(blocks.cols(dl_mm, c0, cols), col_skip)
      return blocks.add_weight_tile(grads, h_fresh, dl_cols, c0, row_skip, config.platform)

    grads = blocks.over(grads, num_classes, config.fused_cols(num_classes), weight_tile)
    return blocks.put_rows(out, stats, start), grads

  init = (blocks.empty_stats(num_rows, dtype, smooth, dense, config.aux),
          blocks.zero_grads(config, params, dtype, want_class_weights))
  stats, grads = blocks.over(init, num_rows, block_rows, token_block)
  return stats, sharded.reduce_grads(grads, layout)


def _outputs(config, rows: Rows, stats):
  """The loss sum (and, with ``config.aux``, the per-row lse and prediction)."""
  total = sharded.sum_rows(config.layout, blocks.mask_losses(rows, blocks.loss(rows.target, stats)))
  return (total, *recompute.aux_outputs(rows, stats)) if config.aux else total


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def summed_loss(config, params: Params, rows: Rows):
  """``Σ_n`` of the masked per-row losses (pairwise); gradients formed in the forward pass.

  With ``config.aux`` it returns ``(total, lse, predicted)``. Undifferentiated,
  it is the recompute path's forward: statistics only, tile by tile.
  """
  return _outputs(config, rows, recompute.stats(config, params, rows))


def _run_fused(config, params, rows):
  layout = config.layout
  return sharded.run(layout, lambda p, r, lay: _fused_pass(config, p, r, lay), (params, rows),
                     (layout.params, layout.row_specs), (layout.rows, layout.grads))


def _summed_loss_fwd(config, params, rows):
  want_probs = recompute.perturbed(rows.probs)
  params, rows = jax.custom_derivatives.custom_vjp_primal_tree_values((params, rows))
  stats, grads = _run_fused(config, params, rows)
  g_rows = blocks.row_cotangent(rows, jnp.ones_like(stats.label))
  keep = config.aux or want_probs  # an lse cotangent or the targets' gradient recomputes
  residuals = (params, grads, blocks.target_cotangent(rows.target, stats, g_rows),
               rows if keep else None, stats if keep else None, recompute.Flag(want_probs))
  return _outputs(config, rows, stats), residuals


def _summed_loss_bwd(config, residuals, cts):
  params, grads, d_target, rows, stats, want_probs = residuals
  g, g_lse = (cts[0], cts[1]) if config.aux else (cts, None)
  if recompute.is_zero(g):
    g = jnp.zeros((), grads.weight.dtype)
  d_target = jax.tree.map(lambda t: g * t, d_target)
  cotangents = blocks.param_cotangents(params, grads, g)
  if not recompute.is_zero(g_lse):
    no_loss = jnp.zeros_like(stats.label)
    extra = blocks.param_cotangents(
        params, recompute.grads(config, params, rows, stats, no_loss, g_lse), 1.0)
    cotangents = jax.tree.map(lambda a, b: a + b, cotangents, extra)
  d_probs = None
  if want_probs.value:
    g_rows = jnp.broadcast_to(g, stats.label.shape).astype(stats.label.dtype)
    d_probs = recompute.probs_grad(config, params, rows, stats, g_rows)
  return cotangents, blocks.rows_cotangent(d_target, d_probs)


summed_loss.defvjp(_summed_loss_fwd, _summed_loss_bwd, symbolic_zeros=True)
