"""``jax.export`` of every loss: serialized, deserialized and called, fixed or symbolic batch.

The linear loss's own export tests (a symbolic token count) are in test_linear_api.py.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

import jaxce

pytest.importorskip("flatbuffers", reason="jax.export's serialize() needs flatbuffers")

N, C = 6, 5


def inputs(n):
  rng = np.random.default_rng(n)
  x = jnp.asarray(rng.normal(size=(n, C)), jnp.float32)
  y = jnp.asarray(rng.integers(0, C, n), jnp.int32).at[0].set(-100)
  q = jax.nn.softmax(jnp.asarray(rng.normal(size=(n, C)), jnp.float32))
  t = jnp.asarray(rng.uniform(size=(n, C)), jnp.float32)
  return x, y, q, t


def all_losses(x, y, q, t):
  """Every public function but the linear loss, each reduced to a scalar."""
  options = dict(ignore_index=-100, label_smoothing=0.1, z_loss=1e-3)
  return {
      "softmax": jnp.sum(jnp.sin(jaxce.softmax(x))),
      "log_softmax": jnp.sum(jnp.sin(jaxce.log_softmax(x))),
      "logsumexp": jnp.sum(jaxce.logsumexp(x)),
      "sparse_cross_entropy": jaxce.sparse_cross_entropy(x, y, reduction="mean", **options),
      "sparse_cross_entropy/none": jnp.sum(jnp.sin(jaxce.sparse_cross_entropy(
          x, y, ignore_index=-100))),
      "dense_cross_entropy": jaxce.dense_cross_entropy(x, q, reduction="mean"),
      "nll_loss": jaxce.nll_loss(jax.nn.log_softmax(x), y, ignore_index=-100, reduction="sum"),
      "binary_cross_entropy": jaxce.binary_cross_entropy(jax.nn.sigmoid(x), t, reduction="mean"),
      "binary_cross_entropy_with_logits": jaxce.binary_cross_entropy_with_logits(
          x, t, pos_weight=2.0, reduction="mean"),
      "mse_loss": jaxce.mse_loss(x, t, reduction="sum"),
  }


def values(*args):
  return all_losses(*args)


def values_and_grads(x, y, q, t):
  """Each loss's value and gradients w.r.t. the logits, the probabilities and the targets."""
  def loss(name, x, q, t):
    return all_losses(x, y, q, t)[name]
  return {name: jax.value_and_grad(loss, argnums=(1, 2, 3))(name, x, q, t)
          for name in all_losses(x, y, q, t)}


@pytest.mark.parametrize("fn", [values, values_and_grads], ids=["forward", "value_and_grad"])
@pytest.mark.parametrize("symbolic", [False, True], ids=["fixed", "symbolic_batch"])
def test_export_round_trip(fn, symbolic):
  batch = export.symbolic_shape("b")[0] if symbolic else N
  specs = [jax.ShapeDtypeStruct((batch,) + a.shape[1:], a.dtype) for a in inputs(N)]
  exported = export.deserialize(export.export(jax.jit(fn))(*specs).serialize())
  for n in ([N, 1, 300] if symbolic else [N]):  # 300 > the pairwise sum's block
    args = inputs(n)
    chex.assert_trees_all_close(exported.call(*args), jax.jit(fn)(*args), rtol=1e-6, atol=1e-6)


def test_exported_program_holds_no_check_and_checked_still_raises():
  loss = jax.jit(lambda x, y: jaxce.sparse_cross_entropy(x, y, reduction="mean"))
  bad = (jnp.zeros((2, 3)), jnp.array([0, 3]))
  assert "check" not in str(jax.make_jaxpr(loss)(*bad))
  assert np.isnan(loss(*bad))  # traced first without checks ...
  with pytest.raises(Exception, match=r"labels must be in \[0, 3\)"):
    jaxce.checked(loss)(*bad)  # ... still checked: the check is part of jit's cache key
  export.export(loss)(*bad).serialize()
