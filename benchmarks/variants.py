"""Alternative designs of jaxce's kernels, kept beside the benchmarks that compare them.

``max_shift_sparse_cross_entropy`` is jaxce's sparse cross-entropy kernel with each row shifted
by its max instead of its label's logit: the same single ``exp`` pass kept for a one-pass
backward, plus the max pass the label pivot saves; with ``keep_exp=False`` the backward
recomputes ``exp`` from the logits instead. ``bench_losses.py`` and ``gpu_suite.py`` time them
beside ``jaxce.sparse_cross_entropy``, which shows what the pivot and the kept ``exp`` are worth
on each platform (the choices in ``jaxce/_platform.py``). Public JAX only; float32 logits
``[N, C]``, integer labels in range, mean reduction.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _row_losses(x: jax.Array, labels: jax.Array, keep_exp: bool) -> jax.Array:
  return _row_losses_fwd(x, labels, keep_exp)[0]


def _row_losses_fwd(x, labels, keep_exp):
  shift = lax.stop_gradient(jnp.max(x, axis=-1))
  e = jnp.exp(x - shift[:, None])
  total = jnp.sum(e, axis=-1)
  at_label = jnp.take_along_axis(x, labels[:, None], axis=-1)[:, 0]
  kept = e if keep_exp else x
  return shift + jnp.log(total) - at_label, (kept, shift, total, labels)


def _row_losses_bwd(keep_exp, residuals, g):
  kept, shift, total, labels = residuals
  e = kept if keep_exp else jnp.exp(kept - shift[:, None])
  gx = e * (g / total)[:, None]
  rows = jnp.arange(e.shape[0])
  gx = gx.at[rows, labels].add(-g, mode="promise_in_bounds", unique_indices=True,
                               indices_are_sorted=True)
  return gx, None


_row_losses.defvjp(_row_losses_fwd, _row_losses_bwd)


def max_shift_sparse_cross_entropy(logits: jax.Array, labels: jax.Array, *,
                                   keep_exp: bool = True) -> jax.Array:
  """Mean softmax cross-entropy of ``logits [N, C]`` at ``labels [N]``, each row max-shifted."""
  return jnp.mean(_row_losses(logits, labels, keep_exp))
