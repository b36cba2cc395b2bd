"""linear_cross_entropy against PyTorch's own ``F.linear_cross_entropy`` (torch >= 2.13).

PyTorch's ``linear_weight`` is ``[V, D]`` (``nn.Linear``'s layout); jaxce's ``weight`` is
``[D, V]`` (Flax ``Dense``'s kernel), so ``weight = linear_weight.T``.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxce

from torch_ref import F
from torch_ref import needs_torch
from torch_ref import torch

N, D, V = 11, 6, 19
COMBINATIONS = list(itertools.product(
    (False, True),  # class weights
    (False, True),  # ignore_index=-100, with two rows ignored
    (0.0, 0.15),  # label smoothing
    (False, True),  # bias
    ("none", "mean", "sum"),
))


def inputs():
  rng = np.random.default_rng(3)
  hidden = rng.normal(size=(N, D))
  weight = rng.normal(size=(D, V)) * 0.7
  bias = rng.normal(size=(V,))
  class_weights = rng.uniform(0.5, 2.0, size=(V,))
  labels = rng.integers(0, V, size=(N,))
  return hidden, weight, bias, class_weights, labels


def has_linear_cross_entropy():
  return F is not None and hasattr(F, "linear_cross_entropy")


@pytest.mark.parametrize(("use_weights", "ignore", "smoothing", "use_bias", "reduction"),
                         COMBINATIONS, ids=lambda v: str(v))
@needs_torch
def test_values_and_gradients_match_pytorch(use_weights, ignore, smoothing, use_bias, reduction):
  if not has_linear_cross_entropy():
    pytest.skip("this torch has no F.linear_cross_entropy")
  hidden, weight, bias, class_weights, labels = inputs()
  if ignore:
    labels[[2, 7]] = -100
  cotangent = np.random.default_rng(4).uniform(0.5, 1.5, size=(N,))

  # PyTorch in float64: the reference.
  th = torch.tensor(hidden, requires_grad=True)
  tw = torch.tensor(weight.T.copy(), requires_grad=True)  # [V, D]
  tb = torch.tensor(bias, requires_grad=True) if use_bias else None
  torch_loss = F.linear_cross_entropy(
      th, tw, torch.tensor(labels), linear_bias=tb,
      weight=torch.tensor(class_weights) if use_weights else None, reduction=reduction,
      ignore_index=-100 if ignore else None, label_smoothing=smoothing)
  scale = torch.tensor(cotangent) if reduction == "none" else torch.tensor(1.0, dtype=torch.float64)
  (torch_loss * scale).sum().backward()

  # jaxce in float32.
  def loss(h, w, b):
    return jaxce.linear_cross_entropy(
        h, w, jnp.asarray(labels, jnp.int32), bias=b,
        class_weights=jnp.asarray(class_weights, jnp.float32) if use_weights else None,
        ignore_index=-100 if ignore else None, label_smoothing=smoothing, reduction=reduction)

  def objective(h, w, b):
    value = loss(h, w, b)
    return jnp.sum(value * (jnp.asarray(cotangent, jnp.float32) if reduction == "none" else 1.0))

  args = (jnp.asarray(hidden, jnp.float32), jnp.asarray(weight, jnp.float32),
          jnp.asarray(bias, jnp.float32) if use_bias else None)
  value = jax.jit(loss)(*args)
  grads = jax.jit(jax.grad(objective, argnums=(0, 1, 2)))(*args)

  np.testing.assert_allclose(value, torch_loss.detach().numpy(), rtol=2e-5, atol=2e-6)
  np.testing.assert_allclose(grads[0], th.grad.numpy(), rtol=2e-5, atol=2e-6)
  np.testing.assert_allclose(grads[1], tw.grad.numpy().T, rtol=2e-5, atol=2e-6)
  if use_bias:
    np.testing.assert_allclose(grads[2], tb.grad.numpy(), rtol=2e-5, atol=2e-6)


PROBABILITY_COMBINATIONS = list(itertools.product(
    (False, True),  # class weights
    (0.0, 0.15),  # label smoothing
    (False, True),  # bias
    ("none", "mean", "sum"),
))


@pytest.mark.parametrize(("use_weights", "smoothing", "use_bias", "reduction"),
                         PROBABILITY_COMBINATIONS, ids=lambda v: str(v))
@needs_torch
def test_probability_targets_match_pytorch(use_weights, smoothing, use_bias, reduction):
  """Class-probability targets ``[N, V]``: values and gradients w.r.t. input, weight, bias and
  the targets themselves."""
  if not has_linear_cross_entropy():
    pytest.skip("this torch has no F.linear_cross_entropy")
  hidden, weight, bias, class_weights, _ = inputs()
  rng = np.random.default_rng(5)
  targets = rng.dirichlet(np.ones(V) * 0.5, size=N)
  cotangent = rng.uniform(0.5, 1.5, size=(N,))

  th = torch.tensor(hidden, requires_grad=True)
  tw = torch.tensor(weight.T.copy(), requires_grad=True)  # [V, D]
  tb = torch.tensor(bias, requires_grad=True) if use_bias else None
  tq = torch.tensor(targets, requires_grad=True)
  torch_loss = F.linear_cross_entropy(
      th, tw, tq, linear_bias=tb, weight=torch.tensor(class_weights) if use_weights else None,
      reduction=reduction, label_smoothing=smoothing)
  scale = torch.tensor(cotangent) if reduction == "none" else torch.tensor(1.0, dtype=torch.float64)
  (torch_loss * scale).sum().backward()

  def loss(h, w, b, q):
    return jaxce.linear_cross_entropy(
        h, w, q, bias=b, class_weights=jnp.asarray(class_weights, jnp.float32)
        if use_weights else None, label_smoothing=smoothing, reduction=reduction)

  def objective(h, w, b, q):
    value = loss(h, w, b, q)
    return jnp.sum(value * (jnp.asarray(cotangent, jnp.float32) if reduction == "none" else 1.0))

  args = (jnp.asarray(hidden, jnp.float32), jnp.asarray(weight, jnp.float32),
          jnp.asarray(bias, jnp.float32) if use_bias else None, jnp.asarray(targets, jnp.float32))
  value = jax.jit(loss)(*args)
  grads = jax.jit(jax.grad(objective, argnums=(0, 1, 2, 3)))(*args)

  np.testing.assert_allclose(value, torch_loss.detach().numpy(), rtol=2e-5, atol=2e-6)
  np.testing.assert_allclose(grads[0], th.grad.numpy(), rtol=2e-5, atol=2e-6)
  np.testing.assert_allclose(grads[1], tw.grad.numpy().T, rtol=2e-5, atol=2e-6)
  if use_bias:
    np.testing.assert_allclose(grads[2], tb.grad.numpy(), rtol=2e-5, atol=2e-6)
  np.testing.assert_allclose(grads[3], tq.grad.numpy(), rtol=2e-5, atol=2e-6)
