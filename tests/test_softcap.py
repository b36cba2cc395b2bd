"""``softcap`` (logit soft-capping) in the sparse and dense cross-entropies."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxce

RNG = np.random.default_rng(7)
X = jnp.asarray(RNG.normal(size=(6, 9)) * 40, jnp.float32)  # well past the cap: tanh saturates
Y = jnp.asarray(RNG.integers(0, 9, 6), jnp.int32).at[1].set(-100)
Y_VALID = jnp.where(Y < 0, 0, Y)
Q = jax.nn.softmax(jnp.asarray(RNG.normal(size=(6, 9)), jnp.float32))
W = jnp.asarray(RNG.uniform(0.5, 2.0, 9), jnp.float32)
MASK = jnp.asarray(RNG.uniform(size=(6, 9)) > 0.2).at[:, :2].set(True)
OPTIONS = [
    {},
    dict(reduction="mean", ignore_index=-100, class_weights=W),
    dict(reduction="sum", label_smoothing=0.2, z_loss=1e-3, ignore_index=-100),
    dict(reduction="mean", where=MASK, label_smoothing=0.1, ignore_index=-100),
]


def capped(x, cap):
  return cap * jnp.tanh(x / cap)


def sparse(x, cap, **options):
  labels = Y if "ignore_index" in options else Y_VALID
  return jnp.sum(jnp.sin(jaxce.sparse_cross_entropy(x, labels, softcap=cap, **options)))


def sparse_formula(x, cap, **options):
  return sparse(capped(x, cap), None, **options)


def dense(x, cap, **options):
  options = {k: v for k, v in options.items() if k != "ignore_index"}
  return jnp.sum(jnp.sin(jaxce.dense_cross_entropy(x, Q, softcap=cap, **options)))


def dense_formula(x, cap, **options):
  return dense(capped(x, cap), None, **options)


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(o) or "defaults")
@pytest.mark.parametrize(("loss", "formula"), [(sparse, sparse_formula), (dense, dense_formula)],
                         ids=["sparse", "dense"])
def test_values_and_gradients_are_those_of_the_capped_logits(loss, formula, options):
  # Gradients w.r.t. the logits, the cap and, where present, the class weights.
  got = jax.value_and_grad(lambda x, c: loss(x, c, **options), argnums=(0, 1))(X, 15.0)
  want = jax.value_and_grad(lambda x, c: formula(x, c, **options), argnums=(0, 1))(X, 15.0)
  chex.assert_trees_all_close(got, want, rtol=2e-5, atol=1e-6)
  jitted = jax.jit(jax.value_and_grad(lambda x, c: loss(x, c, **options), argnums=(0, 1)))
  chex.assert_trees_all_close(jitted(X, 15.0), got, rtol=1e-5, atol=1e-6)


def test_class_weight_and_smoothing_gradients_see_the_capped_logits():
  def loss(w, s, cap):
    return jaxce.sparse_cross_entropy(X, Y_VALID, class_weights=w, label_smoothing=s,
                                      softcap=cap, reduction="mean")

  def formula(w, s, cap):
    return loss(w, s, None) if cap is None else jaxce.sparse_cross_entropy(
        capped(X, cap), Y_VALID, class_weights=w, label_smoothing=s, reduction="mean")

  got = jax.grad(loss, argnums=(0, 1, 2))(W, 0.1, 20.0)
  want = jax.grad(formula, argnums=(0, 1, 2))(W, 0.1, 20.0)
  chex.assert_trees_all_close(got, want, rtol=2e-5, atol=1e-7)


def test_axis_one_vmap_and_bf16():
  x3 = jnp.moveaxis(X.reshape(2, 3, 9), -1, 1)  # [2, C, 3]
  y3 = Y_VALID.reshape(2, 3)
  got = jaxce.sparse_cross_entropy(x3, y3, axis=1, softcap=10.0)
  chex.assert_trees_all_close(got, jaxce.sparse_cross_entropy(capped(X, 10.0), Y_VALID)
                              .reshape(2, 3), rtol=1e-6, atol=1e-6)
  per_row = jax.vmap(lambda x, y: jaxce.sparse_cross_entropy(x, y, softcap=10.0))(X, Y_VALID)
  chex.assert_trees_all_close(per_row, jaxce.sparse_cross_entropy(X, Y_VALID, softcap=10.0))
  low = jaxce.sparse_cross_entropy(X.astype(jnp.bfloat16), Y_VALID, softcap=10.0)
  assert low.dtype == jnp.float32
  chex.assert_trees_all_close(low, jaxce.sparse_cross_entropy(X, Y_VALID, softcap=10.0),
                              rtol=2e-2, atol=2e-2)
  g = jax.grad(lambda x: jaxce.sparse_cross_entropy(x, Y_VALID, softcap=10.0,
                                                    reduction="sum"))(X.astype(jnp.bfloat16))
  assert g.dtype == jnp.bfloat16


def test_infinite_logits_are_capped_with_finite_gradients():
  x = X.at[0, 3].set(jnp.inf).at[2, 4].set(-jnp.inf)
  value, (gx, gcap) = jax.value_and_grad(
      lambda x, c: jaxce.sparse_cross_entropy(x, Y_VALID, softcap=c, reduction="mean"),
      argnums=(0, 1))(x, 5.0)
  assert np.isfinite(value) and np.all(np.isfinite(gx)) and np.isfinite(gcap)
  assert gx[0, 3] == 0 and gx[2, 4] == 0  # tanh is flat there
  chex.assert_trees_all_close(value, jaxce.sparse_cross_entropy(
      capped(x, 5.0), Y_VALID, reduction="mean"), rtol=1e-6)


def test_no_cap_is_the_plain_loss():
  chex.assert_trees_all_equal(jaxce.sparse_cross_entropy(X, Y_VALID, softcap=None),
                              jaxce.sparse_cross_entropy(X, Y_VALID))


@pytest.mark.parametrize("cap", [0.0, -1.0, np.inf, np.nan, 0])
def test_concrete_bad_caps_raise(cap):
  for fn in (lambda c: jaxce.sparse_cross_entropy(X, Y_VALID, softcap=c),
             lambda c: jaxce.dense_cross_entropy(X, Q, softcap=c)):
    with pytest.raises(ValueError, match="softcap must be None or a finite scalar > 0"):
      fn(cap)


@pytest.mark.parametrize(("cap", "error"), [("30", TypeError), ([1.0, 2.0], ValueError),
                                             (True, TypeError)])
def test_cap_types(cap, error):
  with pytest.raises(error, match="softcap"):
    jaxce.sparse_cross_entropy(X, Y_VALID, softcap=cap)


def test_traced_bad_cap_gives_nan():
  loss = jax.jit(lambda c: jaxce.sparse_cross_entropy(X, Y_VALID, softcap=c, reduction="mean"))
  assert np.isfinite(loss(10.0))
  assert np.isnan(loss(0.0)) and np.isnan(loss(-3.0)) and np.isnan(loss(jnp.inf))
