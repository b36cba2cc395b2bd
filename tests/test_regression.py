"""Tests for jaxce._regression: mean squared error."""

import chex
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from jax.test_util import check_grads

import jaxce
from torch_ref import F
from torch_ref import needs_torch
from torch_ref import torch

SETTINGS = hypothesis.settings(max_examples=8, deadline=None, derandomize=True, database=None)
REDUCTIONS = (("none", "none"), ("mean", "mean"), ("sum", "sum"))

mse = jax.jit(jaxce.mse_loss, static_argnames="reduction")


def ref_mse(predictions, targets, *, weights=None, reduction="none"):
  """Independent float64 reference."""
  loss = (np.asarray(predictions, np.float64) - np.asarray(targets, np.float64)) ** 2
  if weights is not None:
    loss = np.asarray(weights, np.float64) * loss
  return {"none": loss, "mean": loss.mean(), "sum": loss.sum()}[reduction]


def assert_close(actual, expected, rtol=1e-5, atol=1e-6):
  np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=rtol, atol=atol)


@st.composite
def problems(draw):
  shape = draw(st.sampled_from([(5,), (3, 4), (2, 3, 4)]))
  dtype = draw(st.sampled_from([np.float32, jnp.bfloat16, np.float16]))
  rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
  predictions = (3 * rng.standard_normal(shape)).astype(np.float32).astype(dtype)
  targets = draw(st.sampled_from(["float32", "int32"]))
  targets = (3 * rng.standard_normal(shape)).astype(targets)
  options = {"reduction": draw(st.sampled_from(["none", "mean", "sum"]))}
  if draw(st.booleans()):  # element weights that broadcast
    wshape = tuple(1 if rng.random() < 0.5 else d for d in shape)[rng.integers(0, len(shape)):]
    options["weights"] = rng.uniform(0.0, 2.0, wshape).astype(np.float32)
  return predictions, targets, options


class TestMseLoss(chex.TestCase):

  def test_known_values(self):
    p, t = jnp.array([1.0, 2.0, 4.0]), jnp.array([1.0, 0.0, 1.0])
    loss = mse(p, t)
    assert loss.dtype == jnp.float32
    assert_close(loss, [0.0, 4.0, 9.0], rtol=0, atol=0)
    assert_close(mse(p, t, reduction="mean"), 13.0 / 3.0)
    assert_close(mse(p, t, reduction="sum"), 13.0, rtol=0, atol=0)

  def test_weights(self):
    p = jnp.array([[1.0, 2.0], [3.0, 5.0]])
    t = jnp.array([[0.0, 0.0], [0.0, 0.0]])
    assert_close(mse(p, t, weights=jnp.array([2.0, 0.5])), [[2.0, 2.0], [18.0, 12.5]])
    assert_close(mse(p, t, weights=jnp.array([[0.0], [1.0]]), reduction="sum"), 34.0)
    # ``mean`` averages the weighted terms over all elements (as for the binary losses).
    assert_close(mse(p, t, weights=jnp.array([2.0, 0.5]), reduction="mean"),
                 (2.0 + 2.0 + 18.0 + 12.5) / 4)

  @hypothesis.given(problems())
  @SETTINGS
  def test_matches_float64_reference_over_shapes_dtypes_weights_reductions(self, problem):
    predictions, targets, options = problem
    out = mse(predictions, targets, **options)
    assert out.dtype == jnp.float32
    expected = ref_mse(predictions, targets, **options)
    chex.assert_shape(out, np.shape(expected))
    assert_close(out, expected, rtol=2e-5, atol=1e-5)

  def test_integer_targets_accepted(self):
    loss = mse(jnp.array([0.5, 2.0, -1.0]), jnp.array([1, 2, 3], jnp.int32))
    assert loss.dtype == jnp.float32
    assert_close(loss, [0.25, 0.0, 16.0], rtol=0, atol=0)
    assert_close(mse(jnp.array([0.5, 2.0]), jnp.array([True, False])), [0.25, 4.0])

  def test_low_precision_predictions_give_float32_and_keep_targets_exact(self):
    predictions = jnp.array([1.0, 256.0], jnp.bfloat16)
    targets = jnp.array([1.001, 257.0], jnp.float32)  # neither is a bf16 number
    loss = mse(predictions, targets)
    assert loss.dtype == jnp.float32
    assert_close(loss, ref_mse(predictions, targets), rtol=1e-5, atol=1e-9)
    half = mse(jnp.array([1.0, 3.0], jnp.float16), jnp.array([1.5, 0.0]))
    assert half.dtype == jnp.float32
    assert_close(half, [0.25, 9.0], rtol=0, atol=0)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(*REDUCTIONS)
  def test_jit_equals_no_jit(self, reduction):
    p = jnp.array([[1.0, -2.0, 0.5, 3.0], [0.0, 4.0, -1.0, 2.5], [7.0, 1.0, 1.0, -3.0]])
    t = jnp.array([[0.0, 1.0, 0.5, -3.0], [2.0, 4.0, 1.0, 0.0], [6.0, -1.0, 0.0, 0.0]])
    w = jnp.array([1.0, 2.0, 0.5, 0.0])
    fn = self.variant(lambda p, t, w: jaxce.mse_loss(p, t, weights=w, reduction=reduction))
    chex.assert_trees_all_close(fn(p, t, w), jaxce.mse_loss(p, t, weights=w,
                                                            reduction=reduction))
    chex.assert_trees_all_close(fn(p, t, w), ref_mse(p, t, weights=w, reduction=reduction))

  def test_vmap_equals_loop(self):
    rng = np.random.default_rng(0)
    p, t = rng.standard_normal((2, 3, 4)).astype(np.float32)
    row = jax.jit(lambda p, t: jaxce.mse_loss(p, t, reduction="mean"))
    batched = jax.jit(jax.vmap(row))(p, t)
    chex.assert_trees_all_close(batched, jnp.stack([row(a, b) for a, b in zip(p, t, strict=True)]))

  def test_check_grads(self):
    rng = np.random.default_rng(1)
    p, t = rng.standard_normal((2, 3, 4)).astype(np.float32)
    w = rng.uniform(0.5, 2.0, (4,)).astype(np.float32)
    fn = lambda p, t, w: jaxce.mse_loss(p, t, weights=w, reduction="mean")  # noqa: E731
    check_grads(jax.jit(fn), (p, t, w), order=1, modes=["rev"], atol=1e-2, rtol=1e-2)

  # Bad input: exception type and message.

  def test_target_shape_mismatch_is_an_error_not_a_broadcast(self):
    # PyTorch broadcasts [N, 1] against [N] with a warning; we refuse.
    with pytest.raises(ValueError, match=r"jaxce\.mse_loss: targets shape \(3, 1\) does not "
                       r"match predictions \(3,\)"):
      jaxce.mse_loss(jnp.zeros(3), jnp.zeros((3, 1)))
    with pytest.raises(ValueError, match=r"targets shape \(4,\) does not match predictions "
                       r"\(3, 4\)"):
      mse(jnp.zeros((3, 4)), jnp.zeros(4))  # at trace time under jit too

  def test_float_only_predictions(self):
    with pytest.raises(TypeError, match=r"jaxce\.mse_loss: predictions must be a floating-point "
                       r"array, got dtype int32"):
      jaxce.mse_loss(jnp.array([1, 2]), jnp.array([1.0, 2.0]))
    with pytest.raises(TypeError, match=r"predictions must be a floating-point array, got dtype "
                       r"bool"):
      jaxce.mse_loss(jnp.array([True]), jnp.array([1.0]))

  def test_unknown_reduction_lists_choices(self):
    with pytest.raises(ValueError, match=r"jaxce\.mse_loss: reduction must be one of 'none', "
                       r"'mean', 'sum'; got 'elementwise_mean'"):
      jaxce.mse_loss(jnp.zeros(2), jnp.zeros(2), reduction="elementwise_mean")

  def test_wrong_weights_shape(self):
    with pytest.raises(ValueError, match=r"weights shape \(3,\) does not broadcast to "
                       r"predictions shape \(2, 2\)"):
      jaxce.mse_loss(jnp.zeros((2, 2)), jnp.zeros((2, 2)), weights=jnp.ones(3))

  @parameterized.named_parameters(*REDUCTIONS)
  @needs_torch
  def test_matches_torch(self, reduction):
    rng = np.random.default_rng(2)
    p, t = (5 * rng.standard_normal((2, 3, 4))).astype(np.float32)
    expected = F.mse_loss(torch.from_numpy(p), torch.from_numpy(t), reduction=reduction).numpy()
    assert_close(mse(p, t, reduction=reduction), expected, rtol=1e-6, atol=1e-6)
    # PyTorch has no weights; weighting its elementwise loss is the definition.
    w = rng.uniform(0.0, 2.0, (4,)).astype(np.float32)
    weighted = w * F.mse_loss(torch.from_numpy(p), torch.from_numpy(t), reduction="none").numpy()
    expected = {"none": weighted, "mean": weighted.mean(), "sum": weighted.sum()}[reduction]
    assert_close(mse(p, t, weights=w, reduction=reduction), expected, rtol=1e-5, atol=1e-5)
