"""``return_aux=True`` in linear_cross_entropy: per-example lse, prediction and correctness."""

from __future__ import annotations

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from linear_helpers import IGNORE
from linear_helpers import N
from linear_helpers import V
from linear_helpers import make_inputs

import jaxce

BLOCKS = dict(token_chunk_size=4, chunk_size=5)
KEEP = jnp.asarray(np.arange(N) % 4 != 1)


def logits_of(h, w, b, cap=None):
  z = h @ w + b[None, :]
  return z if cap is None else cap * jnp.tanh(z / cap)


def expected(h, w, b, labels, live, cap=None):
  """The auxiliary outputs from the stored logits."""
  z = logits_of(h, w, b, cap)
  predicted = jnp.argmax(z, axis=-1).astype(jnp.int32)
  wanted = labels if labels.ndim == 1 else jnp.argmax(labels, axis=-1)
  return jaxce.CrossEntropyAux(jnp.where(live, jax.nn.logsumexp(z, axis=-1), 0.0), predicted,
                               (predicted == wanted) & live)


@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("kind", ["indices", "probabilities"])
@pytest.mark.parametrize("cap", [None, 3.0])
def test_values_and_the_loss_unchanged(reduction, kind, cap):
  hidden, weight, bias, labels = make_inputs()
  labels = labels.at[2].set(IGNORE)
  live = KEEP
  options = dict(reduction=reduction, softcap=cap, where=KEEP, label_smoothing=0.1, **BLOCKS)
  if kind == "indices":
    options["ignore_index"] = IGNORE
    live = live & (labels != IGNORE)
  else:
    labels = jax.nn.softmax(3 * logits_of(hidden, weight, bias) + 1.0)  # often agrees
  # Make some predictions right: rows 0, 4 and 8 get their prediction as label.
  if kind == "indices":
    labels = labels.at[jnp.array([0, 4, 8])].set(
        jnp.argmax(logits_of(hidden, weight, bias, cap), axis=-1)[jnp.array([0, 4, 8])])
  loss, aux = jaxce.linear_cross_entropy(hidden, weight, labels, bias=bias, return_aux=True,
                                         **options)
  chex.assert_trees_all_close(
      loss, jaxce.linear_cross_entropy(hidden, weight, labels, bias=bias, **options), rtol=1e-6)
  want = expected(hidden, weight, bias, labels, live, cap)
  chex.assert_trees_all_close(aux.lse, want.lse, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_equal(aux.predicted, want.predicted)
  chex.assert_trees_all_equal(aux.correct, want.correct)
  assert aux.lse.dtype == jnp.float32 and aux.correct.dtype == jnp.bool_
  assert 0 < int(aux.correct.sum()) < N


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_ties_give_the_lowest_index_across_blocks(reduction):
  hidden, weight, _, labels = make_inputs()
  top = jnp.argmax(hidden @ weight, axis=-1)
  # Column 17 (another block) becomes a copy of each row's best... for one row at a time is not
  # possible with one weight, so copy the best column of row 0 into columns 17 and 18.
  best = int(top[0])
  weight = weight.at[:, 17].set(weight[:, best]).at[:, 18].set(weight[:, best])
  _, aux = jaxce.linear_cross_entropy(hidden, weight, labels.at[0].set(17), return_aux=True,
                                      reduction=reduction, **BLOCKS)
  assert int(aux.predicted[0]) == best and not bool(aux.correct[0])
  _, aux = jaxce.linear_cross_entropy(hidden, weight, labels.at[0].set(best), return_aux=True,
                                      reduction=reduction, **BLOCKS)
  assert bool(aux.correct[0])


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("kind", ["indices", "probabilities"])
def test_lse_is_differentiable(reduction, kind):
  """Gradients of ``f(loss) + Σ c·lse`` w.r.t. hidden, weight, bias and the cap: autodiff's."""
  hidden, weight, bias, labels = make_inputs()
  if kind == "probabilities":
    labels = jax.nn.softmax(logits_of(hidden, weight, bias))
  c = jnp.linspace(-1.0, 1.0, N)
  options = dict(reduction=reduction, where=KEEP, z_loss=0.01)

  def scalar(loss):
    return loss if loss.ndim == 0 else jnp.sum(jnp.sin(loss))

  def ours(h, w, b, cap):
    loss, aux = jaxce.linear_cross_entropy(h, w, labels, bias=b, softcap=cap, return_aux=True,
                                           **BLOCKS, **options)
    return scalar(loss) + jnp.sum(c * aux.lse)

  def formula(h, w, b, cap):
    z = logits_of(h, w, b, cap)
    fn = jaxce.sparse_cross_entropy if kind == "indices" else jaxce.dense_cross_entropy
    loss = fn(z, labels, where=KEEP[:, None], **{k: v for k, v in options.items()
                                                  if k != "where"})
    return scalar(loss) + jnp.sum(c * jnp.where(KEEP, jax.nn.logsumexp(z, axis=-1), 0.0))

  args = (hidden, weight, bias, 3.0)
  chex.assert_trees_all_close(jax.jit(jax.value_and_grad(ours, argnums=(0, 1, 2, 3)))(*args),
                              jax.value_and_grad(formula, argnums=(0, 1, 2, 3))(*args),
                              rtol=2e-5, atol=2e-5)


def _dots(fn, *args):
  return len(re.findall(r"\bdot\(|convolution\(", jax.jit(fn).lower(*args).compile().as_text()))


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_aux_adds_no_matmul(reduction):
  """Loss and gradients with the aux outputs (logged, not differentiated): the same matmuls."""
  hidden, weight, _, labels = make_inputs(n=64, d=16, v=128)

  def step(aux):
    def loss(h, w):
      out = jaxce.linear_cross_entropy(h, w, labels, reduction=reduction, return_aux=aux)
      loss, extra = out if aux else (out, None)
      return jnp.sum(loss), extra
    return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)

  assert _dots(step(True), hidden, weight) == _dots(step(False), hidden, weight) > 0


def test_jit_and_vmap_equal_eager():
  hidden, weight, bias, labels = make_inputs(n=12)

  def f(h, y):
    return jaxce.linear_cross_entropy(h, weight, y, bias=bias, reduction="mean", return_aux=True)

  eager = f(hidden, labels)
  chex.assert_trees_all_close(jax.jit(f)(hidden, labels), eager, rtol=1e-6)
  batched = jax.vmap(f)(hidden.reshape(3, 4, -1), labels.reshape(3, 4))
  chex.assert_trees_all_close(batched[1].lse.reshape(-1), eager[1].lse, rtol=1e-6)
  chex.assert_trees_all_equal(batched[1].predicted.reshape(-1), eager[1].predicted)


def test_bad_labels_under_jit_are_not_correct():
  hidden, weight, _, labels = make_inputs()
  labels = labels.at[3].set(V + 5)
  loss, aux = jax.jit(lambda y: jaxce.linear_cross_entropy(hidden, weight, y, return_aux=True))(
      labels)
  assert np.isnan(loss[3]) and not bool(aux.correct[3]) and float(aux.lse[3]) == 0.0
