"""Steps: the compiled training and evaluation calls, data-parallel over all devices with pmap.

A call runs many steps as one ``lax.scan`` over index arrays into the data already on the device,
so no Python runs per step. Each step's gradient is summed over all devices with one ``lax.psum``
and divided by the real examples in the global batch, so masked padding rows change nothing and
the padded last batch gives the exact mean over the examples it holds.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax.training import train_state
from jax import lax

import jaxce
from trainer.data import AXIS
from trainer.data import normalize


def _psum(tree):
  """``lax.psum`` over all devices; on one device nothing at all.

  XLA:CPU keeps a one-device all-reduce as a copy of every gradient, every step.
  """
  return tree if lax.axis_size(AXIS) == 1 else lax.psum(tree, AXIS)


def train_step(state: train_state.TrainState, images: jax.Array, labels: jax.Array,
               idx: jax.Array, valid: jax.Array, count: jax.Array):
  """One SGD step on this device's rows ``idx`` of a global batch holding ``count`` real rows.

  Rows with ``valid=False`` are padding. Returns the new state and this device's loss sum.
  """

  def loss_fn(params):
    logits = state.apply_fn({"params": params}, normalize(images[idx]))
    loss_sum = jaxce.sparse_cross_entropy(logits, labels[idx], where=valid[:, None],
                                          reduction="sum")
    return loss_sum / jnp.maximum(count, 1.0), loss_sum

  grads, loss_sum = jax.grad(loss_fn, has_aux=True)(state.params)
  return state.apply_gradients(grads=_psum(grads)), loss_sum


@functools.partial(jax.pmap, axis_name=AXIS, donate_argnums=(0,))
def train_chunk(state, images, labels, idx, valid, count, num_steps):
  """The first ``num_steps`` steps of ``idx`` in one loop; returns the state, [loss sum, examples].

  Every call has the same shapes (one compilation); the last call of an epoch runs fewer steps
  (a loop with a traced trip count) rather than filler steps that would have to be masked out.
  """

  def body(i, carry):
    state, loss_total, examples = carry
    state, loss_sum = train_step(state, images, labels, idx[i], valid[i], count[i])
    return state, loss_total + loss_sum, examples + count[i]

  zero = jnp.zeros((), jnp.float32)
  state, loss_total, examples = lax.fori_loop(0, num_steps, body, (state, zero, zero))
  return state, jnp.stack([_psum(loss_total), examples])


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
