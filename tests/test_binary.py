"""Tests for jaxce._binary: binary cross-entropy on probabilities and on logits."""

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

SETTINGS = hypothesis.settings(max_examples=10, deadline=None, derandomize=True, database=None)
SHAPES = ((5,), (3, 4), (2, 3, 4))
REDUCTIONS = (("none", "none"), ("mean", "mean"), ("sum", "sum"))
LOW_PRECISION = (("bfloat16", jnp.bfloat16), ("float16", jnp.float16))

bce = jax.jit(jaxce.binary_cross_entropy, static_argnames="reduction")
bce_logits = jax.jit(jaxce.binary_cross_entropy_with_logits, static_argnames="reduction")


# ---------------------------------------------------------------------------
# Independent float64 NumPy references.
# ---------------------------------------------------------------------------


def _reduce(loss, reduction):
  return {"none": loss, "mean": loss.mean(), "sum": loss.sum()}[reduction]


def _weighted(loss, weights):
  return loss if weights is None else np.asarray(weights, np.float64) * loss


def ref_bce(p, y, *, weights=None, reduction="none"):
  """PyTorch's definition: each log term clamped at -100."""
  p, y = np.asarray(p, np.float64), np.asarray(y, np.float64)
  with np.errstate(divide="ignore"):
    log_p, log_1mp = np.maximum(np.log(p), -100.0), np.maximum(np.log(1.0 - p), -100.0)
  return _reduce(_weighted(-(y * log_p + (1.0 - y) * log_1mp), weights), reduction)


def ref_bce_logits(x, y, *, weights=None, pos_weight=None, reduction="none"):
  """``-[pw·y·log σ(x) + (1-y)·log(1-σ(x))]`` with ``log σ(x) = -log(1 + e^{-x})``."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  pw = 1.0 if pos_weight is None else np.asarray(pos_weight, np.float64)
  log_sig, log_1msig = -np.logaddexp(0.0, -x), -np.logaddexp(0.0, x)
  return _reduce(_weighted(-(pw * y * log_sig + (1.0 - y) * log_1msig), weights), reduction)


def assert_close(actual, expected, rtol=1e-5, atol=1e-6):
  np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=rtol, atol=atol)


def _broadcastable(rng, shape):
  """A random shape that broadcasts to ``shape``: size-1 dims, fewer leading dims."""
  mshape = tuple(1 if rng.random() < 0.5 else d for d in shape)
  return mshape[rng.integers(0, len(shape)):]


@st.composite
def problems(draw, logits):
  """Inputs (probabilities with exact 0s and 1s, or logits), labels and options."""
  shape = draw(st.sampled_from(SHAPES))
  dtype = draw(st.sampled_from([np.float32, jnp.bfloat16, np.float16]))
  rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
  if logits:
    x = draw(st.sampled_from([1.0, 10.0])) * rng.standard_normal(shape)
  else:
    x = rng.uniform(size=shape)
    x[rng.random(shape) < 0.1] = 0.0
    x[rng.random(shape) < 0.1] = 1.0
  x = x.astype(np.float32).astype(dtype)
  labels = draw(st.sampled_from(["int", "bool", "soft"]))
  y = {
      "int": lambda: rng.integers(0, 2, shape).astype(np.int32),
      "bool": lambda: rng.random(shape) < 0.5,
      "soft": lambda: rng.uniform(size=shape).astype(np.float32),
  }[labels]()
  options = {"reduction": draw(st.sampled_from(["none", "mean", "sum"]))}
  weights = draw(st.sampled_from([None, "full", "broadcast"]))
  if weights:
    wshape = shape if weights == "full" else _broadcastable(rng, shape)
    options["weights"] = rng.uniform(0.0, 2.0, wshape).astype(np.float32)
  if logits:
    pos_weight = draw(st.sampled_from([None, "scalar", "broadcast"]))
    if pos_weight:
      pshape = () if pos_weight == "scalar" else _broadcastable(rng, shape)
      options["pos_weight"] = rng.uniform(0.5, 4.0, pshape).astype(np.float32)
  return x, y, options


class TestBinaryCrossEntropy(chex.TestCase):

  def test_known_values(self):
    # PyTorch's BCELoss documentation values.
    loss = bce(jnp.array([0.9, 0.6]), jnp.array([1, 0]), reduction="mean")
    assert loss.dtype == jnp.float32
    assert_close(loss, 0.5108, rtol=0, atol=1e-4)
    loss = bce(jnp.array([0.6, 0.9]), jnp.array([1, 0]), reduction="mean")
    assert_close(loss, 1.4067, rtol=0, atol=1e-4)
    assert_close(loss, (-np.log(0.6) - np.log(0.1)) / 2)

  def test_hand_cases_and_reductions(self):
    p = jnp.array([[0.5, 0.5], [0.3, 0.8]])
    y = jnp.array([[1.0, 0.0], [0.3, 1.0]])
    elementwise = [[np.log(2), np.log(2)], [-(0.3 * np.log(0.3) + 0.7 * np.log(0.7)), -np.log(0.8)]]
    loss = bce(p, y)
    chex.assert_shape(loss, (2, 2))
    assert_close(loss, elementwise)
    assert_close(bce(p, y, reduction="sum"), np.sum(elementwise))
    assert_close(bce(p, y, reduction="mean"), np.mean(elementwise))

  @hypothesis.given(problems(logits=False))
  @SETTINGS
  def test_matches_float64_reference_over_shapes_dtypes_labels_weights_reductions(self, problem):
    p, y, options = problem
    out = bce(p, y, **options)
    assert out.dtype == jnp.float32  # accumulated and returned in float32
    expected = ref_bce(p, y, **options)
    chex.assert_shape(out, np.shape(expected))
    assert_close(out, expected, rtol=2e-5, atol=2e-5)

  def test_probabilities_zero_and_one_are_finite_like_torch(self):
    p = jnp.array([0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 1e-44])
    y = jnp.array([1.0, 0.0, 0.0, 1.0, 0.5, 0.25, 1.0])
    loss = bce(p, y)
    # Each clamped log term contributes at most 100, as in PyTorch.
    assert_close(loss, [100.0, 100.0, 0.0, 0.0, 50.0, 75.0, 100.0], rtol=1e-6, atol=1e-6)
    assert_close(loss, ref_bce(p, y))
    grads = jax.jit(jax.grad(lambda p, y: jnp.sum(jaxce.binary_cross_entropy(p, y)),
                             argnums=(0, 1)))(p, y)
    for g in grads:
      assert np.all(np.isfinite(g)), g
    # A clamped term is flat in p; the other term keeps its gradient.
    assert_close(grads[0][:6], [0.0, 0.0, 1.0, -1.0, 0.5, -0.25], rtol=1e-6, atol=0)

  def test_probs_outside_unit_interval_raise_eagerly(self):
    with pytest.raises(ValueError, match=r"jaxce\.binary_cross_entropy: probs must lie in "
                       r"\[0, 1\]; got values in \[-0\.1\d*, 0\.5\]"):
      jaxce.binary_cross_entropy(jnp.array([-0.1, 0.5]), jnp.array([1, 0]))
    with pytest.raises(ValueError, match=r"probs must lie in \[0, 1\]; got values in "
                       r"\[0\.5, 1\.5\]"):
      jaxce.binary_cross_entropy(jnp.array([1.5, 0.5]), jnp.array([1, 0]), reduction="mean")

  def test_probs_outside_unit_interval_give_nan_under_jit(self):
    loss = bce(jnp.array([-0.1, 0.5, 1.5]), jnp.array([1, 0, 1]))
    assert np.isnan(loss[0]) and np.isnan(loss[2])
    assert_close(loss[1], np.log(2))
    assert np.isnan(bce(jnp.array([-0.1, 0.5, 1.5]), jnp.array([1, 0, 1]), reduction="mean"))

  @parameterized.named_parameters(("per_class", (4,)), ("per_row", (3, 1)), ("scalar", ()))
  def test_weights_broadcast(self, wshape):
    rng = np.random.default_rng(0)
    p = rng.uniform(0.05, 0.95, (3, 4)).astype(np.float32)
    y = rng.integers(0, 2, (3, 4))
    w = rng.uniform(0.0, 2.0, wshape).astype(np.float32)
    unweighted = np.asarray(bce(p, y), np.float64)
    assert_close(bce(p, y, weights=w), w * unweighted)
    assert_close(bce(p, y, weights=w, reduction="mean"), np.mean(w * unweighted))
    assert_close(bce(p, y, weights=w, reduction="sum"), np.sum(w * unweighted))

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(*REDUCTIONS)
  def test_jit_equals_no_jit(self, reduction):
    p = jnp.array([[0.0, 0.2, 0.7, 1.0], [0.5, 0.9, 0.01, 0.3], [1.0, 0.0, 0.6, 0.4]])
    y = jnp.array([[1, 0, 1, 1], [0, 1, 0, 1], [0, 0, 1, 1]])
    w = jnp.array([1.0, 2.0, 0.5, 0.0])
    fn = self.variant(lambda p, y, w: jaxce.binary_cross_entropy(p, y, weights=w,
                                                                  reduction=reduction))
    chex.assert_trees_all_close(fn(p, y, w), jaxce.binary_cross_entropy(
        p, y, weights=w, reduction=reduction))
    chex.assert_trees_all_close(fn(p, y, w), ref_bce(p, y, weights=w, reduction=reduction),
                                rtol=1e-5)

  def test_vmap_equals_loop(self):
    rng = np.random.default_rng(1)
    p = rng.uniform(size=(3, 4)).astype(np.float32)
    y = rng.uniform(size=(3, 4)).astype(np.float32)
    w = rng.uniform(size=(3, 4)).astype(np.float32)
    row = jax.jit(lambda p, y, w: jaxce.binary_cross_entropy(p, y, weights=w, reduction="mean"))
    batched = jax.jit(jax.vmap(row))(p, y, w)
    looped = jnp.stack([row(*args) for args in zip(p, y, w, strict=True)])
    chex.assert_trees_all_close(batched, looped)

  def test_check_grads(self):
    rng = np.random.default_rng(2)
    p = rng.uniform(0.1, 0.9, (3, 4)).astype(np.float32)
    y = rng.uniform(size=(3, 4)).astype(np.float32)
    w = rng.uniform(0.5, 2.0, (4,)).astype(np.float32)
    fn = lambda p, y, w: jaxce.binary_cross_entropy(p, y, weights=w, reduction="mean")  # noqa: E731
    check_grads(jax.jit(fn), (p, y, w), order=1, modes=["rev"], atol=1e-2, rtol=1e-2)

  @parameterized.named_parameters(*LOW_PRECISION)
  def test_low_precision_gives_float32_accurately(self, dtype):
    rng = np.random.default_rng(3)
    p = rng.uniform(size=(3, 4)).astype(dtype)
    y = rng.uniform(size=(3, 4)).astype(np.float32)  # not rounded to the probs' dtype
    out = bce(p, y)
    assert out.dtype == jnp.float32
    assert_close(out, ref_bce(p, y), rtol=1e-5, atol=1e-6)

  # Bad input: exception type and message.

  def test_unknown_reduction_lists_choices(self):
    with pytest.raises(ValueError, match=r"jaxce\.binary_cross_entropy: reduction must be one "
                       r"of 'none', 'mean', 'sum'; got 'avg'"):
      jaxce.binary_cross_entropy(jnp.array([0.5]), jnp.array([1]), reduction="avg")

  def test_label_shape_mismatch_names_both_shapes(self):
    with pytest.raises(ValueError, match=r"labels shape \(2, 1\) does not match probs \(2,\)"):
      jaxce.binary_cross_entropy(jnp.array([0.5, 0.5]), jnp.array([[1], [0]]))
    with pytest.raises(ValueError, match=r"labels shape \(3,\) does not match probs \(2,\)"):
      bce(jnp.array([0.5, 0.5]), jnp.array([1, 0, 1]))  # at trace time under jit too

  def test_wrong_weights_shape(self):
    with pytest.raises(ValueError, match=r"weights shape \(3,\) does not broadcast to probs "
                       r"shape \(2, 2\)"):
      jaxce.binary_cross_entropy(jnp.full((2, 2), 0.5), jnp.ones((2, 2)), weights=jnp.ones(3))
    with pytest.raises(ValueError, match=r"weights shape \(2, 2, 2\) does not broadcast"):
      jaxce.binary_cross_entropy(jnp.full((2, 2), 0.5), jnp.ones((2, 2)),
                                 weights=jnp.ones((2, 2, 2)))

  def test_integer_probs_rejected(self):
    with pytest.raises(TypeError, match=r"probs must be a floating-point array, got dtype int32"):
      jaxce.binary_cross_entropy(jnp.array([0, 1]), jnp.array([0, 1]))

  @parameterized.named_parameters(
      ("mean", "mean", None), ("none_weighted", "none", (3, 4)),
      ("mean_weighted", "mean", (4,)), ("sum_weighted", "sum", (3, 1)))
  @needs_torch
  def test_matches_torch(self, reduction, wshape):
    rng = np.random.default_rng(4)
    p = rng.uniform(size=(3, 4)).astype(np.float32)
    p[0, :2] = [0.0, 1.0]
    y = rng.uniform(size=(3, 4)).astype(np.float32)
    w = None if wshape is None else rng.uniform(0.0, 2.0, wshape).astype(np.float32)
    expected = F.binary_cross_entropy(
        torch.from_numpy(p), torch.from_numpy(y),
        weight=None if w is None else torch.from_numpy(w), reduction=reduction).numpy()
    assert_close(bce(p, y, weights=w, reduction=reduction), expected, rtol=1e-5, atol=1e-5)


class TestBinaryCrossEntropyWithLogits(chex.TestCase):

  def test_known_values(self):
    loss = bce_logits(jnp.array([2.0, -1.0]), jnp.array([1.0, 0.0]))
    assert loss.dtype == jnp.float32
    assert_close(loss, [np.log1p(np.exp(-2.0)), np.log1p(np.exp(-1.0))])
    assert_close(loss, [0.126928, 0.313262], rtol=1e-5)
    assert_close(bce_logits(jnp.zeros(2), jnp.array([1, 0]), reduction="sum"), 2 * np.log(2))

  @hypothesis.given(problems(logits=True))
  @SETTINGS
  def test_matches_float64_reference_over_shapes_dtypes_labels_weights_reductions(self, problem):
    x, y, options = problem
    out = bce_logits(x, y, **options)
    assert out.dtype == jnp.float32
    expected = ref_bce_logits(x, y, **options)
    chex.assert_shape(out, np.shape(expected))
    assert_close(out, expected, rtol=2e-5, atol=2e-5)

  def test_stable_at_large_logits(self):
    x = jnp.array([1e4, -1e4, 1e4, -1e4, 3e38, -3e38])
    y = jnp.array([0.0, 1.0, 1.0, 0.0, 0.0, 1.0])
    pos_weight = jnp.full(6, 3.0)
    loss = bce_logits(x, y)
    assert_close(loss, [1e4, 1e4, 0.0, 0.0, 3e38, 3e38], rtol=1e-7, atol=0)
    loss_pw = bce_logits(x, y, pos_weight=pos_weight)
    assert_close(loss_pw[:4], [1e4, 3e4, 0.0, 0.0], rtol=1e-7, atol=0)
    grad = jax.jit(jax.grad(lambda x: jnp.sum(jaxce.binary_cross_entropy_with_logits(
        x, y, pos_weight=pos_weight))))(x)
    assert_close(grad, [1.0, -3.0, 0.0, 0.0, 1.0, -3.0], rtol=0, atol=0)
    # bf16 logits of that size too (the loss is float32).
    x_bf16 = x.astype(jnp.bfloat16)  # 3e38 is in bf16's range
    loss_bf16 = bce_logits(x_bf16, y)
    assert np.all(np.isfinite(loss_bf16))
    assert_close(loss_bf16, ref_bce_logits(x_bf16, y), rtol=1e-7, atol=0)

  @parameterized.named_parameters(*REDUCTIONS)
  def test_equals_probability_form_with_sigmoid(self, reduction):
    x = np.linspace(-5.0, 5.0, 12, dtype=np.float32).reshape(3, 4)
    y = np.random.default_rng(5).uniform(size=(3, 4)).astype(np.float32)
    w = np.array([0.5, 1.0, 1.5, 2.0], np.float32)
    assert_close(bce_logits(x, y, weights=w, reduction=reduction),
                 bce(jax.nn.sigmoid(x), y, weights=w, reduction=reduction), rtol=1e-4, atol=1e-5)

  def test_pos_weight_semantics(self):
    softplus = lambda v: np.log1p(np.exp(v))  # noqa: E731
    x = jnp.array([[0.5, 0.5, 0.5], [-2.0, -2.0, -2.0]])
    y = jnp.array([[1.0, 0.0, 0.5], [1.0, 0.0, 0.5]])
    pos_weight = jnp.array([2.0, 3.0, 4.0])  # per class, broadcast over rows
    loss = bce_logits(x, y, pos_weight=pos_weight)
    # Positive term scaled by pos_weight, negative term untouched (PyTorch's definition).
    expected = [[2.0 * softplus(-0.5), softplus(0.5), 0.5 * 4.0 * softplus(-0.5)
                 + 0.5 * softplus(0.5)],
                [2.0 * softplus(2.0), softplus(-2.0), 0.5 * 4.0 * softplus(2.0)
                 + 0.5 * softplus(-2.0)]]
    assert_close(loss, expected)
    assert_close(bce_logits(x, y, pos_weight=1.0), bce_logits(x, y))
    weighted = bce_logits(x, y, pos_weight=pos_weight, weights=jnp.array([[1.0], [0.5]]),
                          reduction="sum")
    assert_close(weighted, np.sum(np.array(expected) * [[1.0], [0.5]]))

  @parameterized.named_parameters(("per_class", (4,)), ("per_row", (3, 1)), ("scalar", ()))
  def test_weights_broadcast(self, wshape):
    rng = np.random.default_rng(6)
    x = rng.standard_normal((3, 4)).astype(np.float32)
    y = rng.integers(0, 2, (3, 4))
    w = rng.uniform(0.0, 2.0, wshape).astype(np.float32)
    unweighted = np.asarray(bce_logits(x, y), np.float64)
    assert_close(bce_logits(x, y, weights=w), w * unweighted)
    assert_close(bce_logits(x, y, weights=w, reduction="mean"), np.mean(w * unweighted))

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(*REDUCTIONS)
  def test_jit_equals_no_jit(self, reduction):
    x = jnp.array([[1e4, -2.0, 0.0, 3.0], [-1e4, 0.5, -0.5, 8.0], [2.0, -3.0, 30.0, -30.0]])
    y = jnp.array([[0, 1, 1, 0], [1, 0, 1, 1], [0.5, 0.2, 1, 0]])
    w, pw = jnp.array([1.0, 2.0, 0.5, 0.0]), jnp.array([1.0, 2.0, 3.0, 0.5])
    fn = self.variant(lambda x, y, w, pw: jaxce.binary_cross_entropy_with_logits(
        x, y, weights=w, pos_weight=pw, reduction=reduction))
    chex.assert_trees_all_close(fn(x, y, w, pw), jaxce.binary_cross_entropy_with_logits(
        x, y, weights=w, pos_weight=pw, reduction=reduction))
    chex.assert_trees_all_close(
        fn(x, y, w, pw), ref_bce_logits(x, y, weights=w, pos_weight=pw, reduction=reduction),
        rtol=1e-5)

  def test_vmap_equals_loop(self):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((3, 4)).astype(np.float32)
    y = rng.uniform(size=(3, 4)).astype(np.float32)
    pw = rng.uniform(1.0, 3.0, (3, 4)).astype(np.float32)
    row = jax.jit(lambda x, y, pw: jaxce.binary_cross_entropy_with_logits(
        x, y, pos_weight=pw, reduction="sum"))
    batched = jax.jit(jax.vmap(row))(x, y, pw)
    looped = jnp.stack([row(*args) for args in zip(x, y, pw, strict=True)])
    chex.assert_trees_all_close(batched, looped)

  def test_check_grads(self):
    rng = np.random.default_rng(8)
    x = rng.standard_normal((3, 4)).astype(np.float32)
    y = rng.uniform(size=(3, 4)).astype(np.float32)
    w = rng.uniform(0.5, 2.0, (4,)).astype(np.float32)
    pw = rng.uniform(0.5, 3.0, (4,)).astype(np.float32)
    fn = lambda x, y, w, pw: jaxce.binary_cross_entropy_with_logits(  # noqa: E731
        x, y, weights=w, pos_weight=pw, reduction="mean")
    check_grads(jax.jit(fn), (x, y, w, pw), order=1, modes=["rev"], atol=1e-2, rtol=1e-2)

  @parameterized.named_parameters(*LOW_PRECISION)
  def test_low_precision_gives_float32_accurately(self, dtype):
    rng = np.random.default_rng(9)
    x = (4 * rng.standard_normal((3, 4))).astype(dtype)
    y = rng.uniform(size=(3, 4)).astype(np.float32)
    out = bce_logits(x, y)
    assert out.dtype == jnp.float32
    assert_close(out, ref_bce_logits(x, y), rtol=1e-5, atol=1e-6)

  # Bad input: exception type and message.

  def test_unknown_reduction_lists_choices(self):
    with pytest.raises(ValueError, match=r"jaxce\.binary_cross_entropy_with_logits: reduction "
                       r"must be one of 'none', 'mean', 'sum'; got 'batchmean'"):
      jaxce.binary_cross_entropy_with_logits(jnp.zeros(1), jnp.ones(1), reduction="batchmean")

  def test_label_shape_mismatch_names_both_shapes(self):
    with pytest.raises(ValueError, match=r"labels shape \(2, 1\) does not match logits \(2,\)"):
      jaxce.binary_cross_entropy_with_logits(jnp.zeros(2), jnp.zeros((2, 1)))

  def test_wrong_weights_shape(self):
    with pytest.raises(ValueError, match=r"weights shape \(3,\) does not broadcast to logits "
                       r"shape \(2, 2\)"):
      jaxce.binary_cross_entropy_with_logits(jnp.zeros((2, 2)), jnp.ones((2, 2)),
                                             weights=jnp.ones(3))

  def test_wrong_pos_weight_shape(self):
    with pytest.raises(ValueError, match=r"pos_weight shape \(3,\) does not broadcast to "
                       r"logits shape \(2, 2\)"):
      jaxce.binary_cross_entropy_with_logits(jnp.zeros((2, 2)), jnp.ones((2, 2)),
                                             pos_weight=jnp.ones(3))

  def test_integer_logits_rejected(self):
    with pytest.raises(TypeError, match=r"logits must be a floating-point array, got dtype "
                       r"int32"):
      jaxce.binary_cross_entropy_with_logits(jnp.array([0, 1]), jnp.array([0, 1]))

  @parameterized.named_parameters(
      ("mean", "mean", None, None), ("sum_weight", "sum", (4,), None),
      ("none_pos_weight", "none", None, (4,)), ("mean_both", "mean", (3, 1), (4,)),
      ("none_both", "none", (3, 4), (3, 4)))
  @needs_torch
  def test_matches_torch(self, reduction, wshape, pshape):
    rng = np.random.default_rng(10)
    x = (5 * rng.standard_normal((3, 4))).astype(np.float32)
    y = rng.uniform(size=(3, 4)).astype(np.float32)
    w = None if wshape is None else rng.uniform(0.0, 2.0, wshape).astype(np.float32)
    pw = None if pshape is None else rng.uniform(0.5, 4.0, pshape).astype(np.float32)
    expected = F.binary_cross_entropy_with_logits(
        torch.from_numpy(x), torch.from_numpy(y),
        weight=None if w is None else torch.from_numpy(w),
        pos_weight=None if pw is None else torch.from_numpy(pw), reduction=reduction).numpy()
    out = bce_logits(x, y, weights=w, pos_weight=pw, reduction=reduction)
    assert_close(out, expected, rtol=1e-5, atol=1e-5)
