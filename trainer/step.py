"""Steps: the compiled training and evaluation calls, data-parallel over all devices with pmap.

A call runs many steps as one loop over index arrays into the data already on the device, so no
Python runs per step. A step's gradient is the sum of the gradients of :func:`num_groups` equal
groups of the global batch's rows, each group's computed alone with the same shapes, added in one
fixed pairwise order and divided by the real examples in the global batch. Why groups: a matmul's
rounding depends on how many rows it has, so a gradient of each device's rows would differ in the
last bits between device counts, and training amplifies that; with fixed groups a step gives the
same bits on 1, 2, 4 or 8 devices (other counts sum one group per device). Masked padding rows
change nothing and the padded last batch gives the exact mean over the examples it holds.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax.training import train_state
from jax import lax

import jaxce
from trainer.data import AXIS
from trainer.data import normalize

# By default a global batch's gradient is the sum of the gradients of this many equal groups of
# its rows (or of the largest power of two dividing the batch size, if smaller).
GROUPS = 8


def num_groups(batch_size: int, devices: int = 1, grad_groups: int = GROUPS) -> int:
  """How many equal groups of rows a global batch of ``batch_size`` is split into.

  ``gcd(batch_size, grad_groups)`` whenever ``devices`` divides it, so that every such device
  count sums the same groups; otherwise (and with ``grad_groups=0``) one group per device.
  """
  groups = math.gcd(batch_size, grad_groups) if grad_groups else devices
  return groups if groups % devices == 0 else devices


def _psum(tree):
  """``lax.psum`` over all devices; on one device nothing at all.

  XLA:CPU keeps a one-device all-reduce as a copy of every gradient, every step.
  """
  return tree if lax.axis_size(AXIS) == 1 else lax.psum(tree, AXIS)


def _pairwise_sum(x):
  """``x``'s sum over its leading axis as a tree of explicit adds (neighbours, level by level).

  Not ``jnp.sum``: XLA chooses a reduction's order itself, and it may differ between programs.
  For a power-of-two count, a device's pairwise sum of its contiguous groups is a subtree of the
  sum over all groups.
  """
  parts = [x[i] for i in range(x.shape[0])]
  while len(parts) > 1:
    pairs = [a + b for a, b in zip(parts[::2], parts[1::2], strict=False)]
    parts = pairs + parts[len(pairs) * 2:]
  return parts[0]


def _sum_groups(tree):
  """Each leaf's sum over all groups of all devices, on every device, in one order for any device
  count: this device's (contiguous) groups pairwise, then the devices' sums gathered and added
  pairwise, which is the same balanced tree over all the groups. On one device no collective."""
  tree = jax.tree.map(_pairwise_sum, tree)
  if lax.axis_size(AXIS) == 1:
    return tree
  return jax.tree.map(_pairwise_sum, lax.all_gather(tree, AXIS))


def _group_grad(state, images, labels, count, rows):
  """The gradient and loss sum of the rows ``rows = (idx, valid)`` (the mean's share of them)."""
  i, v = rows

  def loss_fn(params):
    logits = state.apply_fn({"params": params}, normalize(images[i]))
    loss_sum = jaxce.sparse_cross_entropy(logits, labels[i], where=v[:, None], reduction="sum")
    return loss_sum / jnp.maximum(count, 1.0), loss_sum

  return jax.grad(loss_fn, has_aux=True)(state.params)


def train_step(state: train_state.TrainState, images: jax.Array, labels: jax.Array,
               idx: jax.Array, valid: jax.Array, count: jax.Array, grad_groups: int = GROUPS):
  """One SGD step on this device's rows ``idx`` of a global batch holding ``count`` real rows.

  Rows with ``valid=False`` are padding. Returns the new state and the global batch's loss sum.
  With ``grad_groups=0`` each device differentiates its rows at once and the gradients are
  ``psum``med: fastest, but the last bits then depend on the device count.
  """
  devices = lax.axis_size(AXIS)
  if grad_groups == 0:
    grads, loss_sum = _group_grad(state, images, labels, count, (idx, valid))
    return state.apply_gradients(grads=_psum(grads)), _psum(loss_sum)
  groups = num_groups(idx.shape[0] * devices, devices, grad_groups) // devices  # This device's.

  # A loop over the groups, not vmap: vmap would make one matmul of all this device's rows, and
  # a row's result depends on how many rows its matmul has.
  grads, loss_sums = lax.map(functools.partial(_group_grad, state, images, labels, count),
                             (idx.reshape(groups, -1), valid.reshape(groups, -1)))
  grads, loss_sum = _sum_groups((grads, loss_sums))
  return state.apply_gradients(grads=grads), loss_sum


@functools.partial(jax.pmap, axis_name=AXIS, donate_argnums=(0,), static_broadcasted_argnums=(7,))
def train_chunk(state, images, labels, idx, valid, count, num_steps, grad_groups=GROUPS):
  """The first ``num_steps`` steps of ``idx`` in one loop; returns the state, [loss sum, examples].

  Every call has the same shapes (one compilation); the last call of an epoch runs fewer steps
  (a loop with a traced trip count) rather than filler steps that would have to be masked out.
  """

  def body(i, carry):
    state, loss_total, examples = carry
    state, loss_sum = train_step(state, images, labels, idx[i], valid[i], count[i], grad_groups)
    return state, loss_total + loss_sum, examples + count[i]

  zero = jnp.zeros((), jnp.float32)
  state, loss_total, examples = lax.fori_loop(0, num_steps, body, (state, zero, zero))
  return state, jnp.stack([loss_total, examples])


@functools.partial(jax.pmap, axis_name=AXIS)
def eval_chunk(state, images, labels, idx, valid, num_chunks):
  """[loss sum, correct, count] over the first ``num_chunks`` chunks of ``idx`` (rows marked
  valid), summed over all devices."""

  def body(c, totals):
    i, v = idx[c], valid[c]
    logits = state.apply_fn({"params": state.params}, normalize(images[i]))
    loss = jaxce.sparse_cross_entropy(logits, labels[i], where=v[:, None], reduction="sum")
    correct = jnp.sum((jnp.argmax(logits, axis=-1) == labels[i]) & v, dtype=jnp.float32)
    return totals + jnp.stack([loss, correct, jnp.sum(v, dtype=jnp.float32)])

  return _psum(lax.fori_loop(0, num_chunks, body, jnp.zeros(3, jnp.float32)))
