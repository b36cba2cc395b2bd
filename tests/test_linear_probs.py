"""linear_cross_entropy with probability targets ``[..., V]``: dense_cross_entropy's semantics."""

from __future__ import annotations

import itertools
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from linear_helpers import D
from linear_helpers import N
from linear_helpers import V
from linear_helpers import make_inputs

import jaxce

BLOCKS = dict(token_chunk_size=4, chunk_size=5)  # overlapping last blocks on both axes
# Each option on and off, with each reduction and both paths under the cap; every pair of
# options meets in some case.
COMBINATIONS = [(w, s, m, z, c, r) for (w, s), (m, z), (c, r) in itertools.product(
    ((False, 0.0), (True, 0.2)),  # class weights, label smoothing
    ((False, 0.0), (True, 0.05)),  # where (per example), z-loss
    ((None, "none"), (None, "mean"), (None, "sum"), (3.0, "none"), (3.0, "mean")),  # softcap
)] + [(w, s, m, z, None, "mean") for (w, s), (m, z) in itertools.product(
    ((True, 0.0), (False, 0.2)), ((False, 0.0), (True, 0.05)))]


def targets(n=N, v=V, seed=2):
  """Soft targets: rows of a Dirichlet, one one-hot row and one row with zeros."""
  rng = np.random.default_rng(seed)
  q = rng.dirichlet(np.ones(v) * 0.5, size=n)
  q[0] = np.eye(v)[3]
  q[1, : v // 2] = 0.0
  q[1] /= q[1].sum()
  return jnp.asarray(q, jnp.float32)


def scalar(v):
  return v if v.ndim == 0 else jnp.sum(jnp.sin(v))


def formula(h, w, b, q, *, where=None, softcap=None, **options):
  """dense_cross_entropy of the stored logits (the textbook loss jaxce must equal)."""
  logits = h @ w + b[None, :]
  if softcap is not None:
    logits = softcap * jnp.tanh(logits / softcap)
  return jaxce.dense_cross_entropy(logits, q, where=None if where is None else where[:, None],
                                   **options)


def options_of(use_weights, smoothing, use_where, z, cap, reduction):
  rng = np.random.default_rng(1)
  options = dict(reduction=reduction, label_smoothing=smoothing, z_loss=z, softcap=cap)
  if use_weights:
    options["class_weights"] = jnp.asarray(rng.uniform(0.5, 2.0, size=(V,)), jnp.float32)
  if use_where:
    options["where"] = jnp.asarray(np.arange(N) % 4 != 1)
  return options


@pytest.mark.parametrize(("use_weights", "smoothing", "use_where", "z", "cap", "reduction"),
                         COMBINATIONS, ids=str)
def test_values_and_gradients_are_dense_cross_entropys(use_weights, smoothing, use_where, z, cap,
                                                       reduction):
  """Every option combination, both paths: w.r.t. hidden, weight, bias, targets, class weights."""
  hidden, weight, bias, _ = make_inputs()
  q = targets()
  options = options_of(use_weights, smoothing, use_where, z, cap, reduction)
  cw = options.pop("class_weights", None)

  def ours(h, w, b, q, cw):
    extra = {} if cw is None else dict(class_weights=cw)
    return scalar(jaxce.linear_cross_entropy(h, w, q, bias=b, **BLOCKS, **options, **extra))

  def want(h, w, b, q, cw):
    extra = {} if cw is None else dict(class_weights=cw)
    return scalar(formula(h, w, b, q, **options, **extra))

  argnums = (0, 1, 2, 3) + ((4,) if cw is not None else ())
  got = jax.jit(jax.value_and_grad(ours, argnums=argnums))(hidden, weight, bias, q, cw)
  ref = jax.jit(jax.value_and_grad(want, argnums=argnums))(hidden, weight, bias, q, cw)
  chex.assert_trees_all_close(got, ref, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_default_blocks_jit_and_leading_axes(reduction):
  """Batch axes ``[B, T, V]`` targets, default block sizes, under ``jit``: as the formula."""
  hidden, weight, bias, _ = make_inputs(n=12)
  q = targets(n=12)
  h3, q3 = hidden.reshape(3, 4, D), q.reshape(3, 4, V)
  got = jax.jit(lambda h, q: jaxce.linear_cross_entropy(h, weight, q, bias=bias,
                                                         reduction=reduction))(h3, q3)
  want = formula(hidden, weight, bias, q, reduction=reduction)
  chex.assert_trees_all_close(got, want.reshape(got.shape), rtol=1e-5, atol=1e-6)


def test_one_hot_targets_equal_class_indices():
  """One-hot probability targets give the class-index loss (without class weights, as torch)."""
  hidden, weight, bias, labels = make_inputs()
  onehot = jax.nn.one_hot(labels, V)
  for reduction in ("none", "mean"):
    def loss(h, t, reduction=reduction):
      return scalar(jaxce.linear_cross_entropy(h, weight, t, bias=bias, label_smoothing=0.1,
                                               reduction=reduction))
    chex.assert_trees_all_close(jax.value_and_grad(loss)(hidden, onehot),
                                jax.value_and_grad(loss)(hidden, labels), rtol=1e-5, atol=1e-6)


def test_impossible_classes_take_no_smoothing_mass():
  """A ``-inf`` bias column with zero target mass: finite loss, as dense_cross_entropy."""
  hidden, weight, bias, _ = make_inputs()
  bias = bias.at[4].set(-jnp.inf)
  q = targets().at[:, 4].set(0.0)
  for reduction in ("none", "mean"):
    got = jaxce.linear_cross_entropy(hidden, weight, q, bias=bias, label_smoothing=0.3,
                                     reduction=reduction, **BLOCKS)
    want = formula(hidden, weight, bias, q, label_smoothing=0.3, reduction=reduction)
    assert np.all(np.isfinite(got))
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-6)


def test_vmap_equals_the_batch():
  hidden, weight, bias, _ = make_inputs(n=12)
  q = targets(n=12)
  one = jax.vmap(lambda h, t: jaxce.linear_cross_entropy(h, weight, t, bias=bias,
                                                          reduction="mean"))
  got = one(hidden.reshape(3, 4, D), q.reshape(3, 4, V))
  want = jnp.stack([formula(hidden[4 * i:4 * i + 4], weight, bias, q[4 * i:4 * i + 4],
                            reduction="mean") for i in range(3)])
  chex.assert_trees_all_close(got, want, rtol=1e-5)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_targets_cost_no_matmul_unless_differentiated(reduction):
  """Differentiating only hidden/weight: as many matmuls as with class indices; the targets'
  own gradient adds one pass of logits (at most one matmul; XLA may share it)."""
  hidden, weight, _, labels = make_inputs(n=64, d=16, v=128)
  q = jax.nn.softmax(jax.random.normal(jax.random.key(0), (64, 128)))

  def dots(t, argnums):
    step = jax.jit(jax.grad(lambda h, w, t: scalar(jaxce.linear_cross_entropy(
        h, w, t, reduction=reduction)), argnums=argnums))
    return len(re.findall(r"\bdot\(|convolution\(", step.lower(hidden, weight, t).compile()
                          .as_text()))

  assert dots(q, (0, 1)) == dots(labels, (0, 1)) > 0
  assert dots(q, (0, 1)) <= dots(q, (0, 1, 2)) <= dots(q, (0, 1)) + 1


@pytest.mark.parametrize("symbolic", [False, True])
def test_export_round_trip_with_aux(symbolic):
  """``jax.export`` of loss, aux and gradients (targets included) for any number of tokens."""
  hidden, weight, bias, _ = make_inputs()
  q = targets()

  @jax.jit
  def step(h, w, t):
    def f(h, w, t):
      return jaxce.linear_cross_entropy(h, w, t, bias=bias, reduction="mean", return_aux=True,
                                        label_smoothing=0.1, token_chunk_size=4, chunk_size=8)
    return jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)(h, w, t)

  n = jax.export.symbolic_shape("b")[0] if symbolic else N
  shapes = (jax.ShapeDtypeStruct((n, D), hidden.dtype), weight,
            jax.ShapeDtypeStruct((n, V), q.dtype))
  try:
    exported = jax.export.deserialize(jax.export.export(step)(*shapes).serialize())
  except ImportError as e:  # serialization needs flatbuffers
    pytest.skip(str(e))
  for rows in ((1, 5, N) if symbolic else (N,)):
    args = (hidden[:rows], weight, q[:rows])
    chex.assert_trees_all_close(exported.call(*args), step(*args), rtol=1e-6, atol=1e-7)
