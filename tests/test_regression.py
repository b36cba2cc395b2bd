"""Tests for jaxce._regression: mean squared error."""

import chex
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from absl.testing import parameterized
from jax.test_util import check_grads

import jaxce

from torch_ref import F
from torch_ref import needs_torch
from torch_ref import torch

SETTINGS = hypothesis.settings(max_examples=8, deadline=None, derandomize=True, database=None)
EDGE_SETTINGS = hypothesis.settings(max_examples=16, deadline=None, derandomize=True,
                                    database=None)
REDUCTIONS = (("none", "none"), ("mean", "mean"), ("sum", "sum"))
SHAPES = ((5,), (3, 4), (2, 3, 4))
INPUT_DTYPES = ("float32", "bfloat16", "float16")
TARGET_DTYPES = ("bool", "int8", "uint8", "int32", "float16", "bfloat16", "float32")
# Magnitudes up to overflow of the square (1e20² and 3e38² are inf in float32) and inf.
SCALES = (1.0, 1e3, 1e10, 1e20, 3e38, np.inf)

mse = jax.jit(jaxce.mse_loss, static_argnames="reduction")


def ref_mse(predictions, targets, *, weights=None, reduction="none"):
  """Independent float64 reference."""
  loss = (np.asarray(predictions, np.float64) - np.asarray(targets, np.float64)) ** 2
  if weights is not None:
    loss = np.asarray(weights, np.float64) * loss
  return {"none": loss, "mean": loss.mean(), "sum": loss.sum()}[reduction]


def _rounded(v):
  """``v`` rounded to float32 (overflowing to inf), in float64: what the compute dtype holds."""
  with np.errstate(over="ignore"):
    return np.asarray(v, np.float64).astype(np.float32).astype(np.float64)


def _sum_to(g, shape):
  """Sums a broadcast gradient back to ``shape``."""
  g = g.sum(axis=tuple(range(g.ndim - len(shape))))
  axes = tuple(i for i, d in enumerate(shape) if d == 1 and g.shape[i] != 1)
  return g.sum(axis=axes, keepdims=True).reshape(shape)


def ref_mse_edges(predictions, targets, *, weights=None, reduction="none"):
  """Value and gradients (predictions, targets, weights) with float32 intermediates:
  ``p - t`` and the elementwise loss are rounded (so they overflow to inf) before
  ``weights / n`` scales them. The gradient of ``p`` is exact from there on; the
  second returned for it also rounds ``2 (p - t)``, which may overflow too."""
  p, t = np.asarray(predictions, np.float64), np.asarray(targets, np.float64)
  with np.errstate(over="ignore", invalid="ignore"):
    diff = _rounded(p - t)
    loss = _rounded(diff**2)
    w = np.ones(p.shape) if weights is None else np.broadcast_to(
        np.asarray(weights, np.float64), p.shape)
    scale = 1.0 / max(p.size, 1) if reduction == "mean" else 1.0
    value = {"none": w * loss, "mean": np.mean(w * loss), "sum": np.sum(w * loss)}[reduction]
    grad_p = 2.0 * diff * w * scale
    stepwise = _rounded(2.0 * diff) * w * scale
  grad_w = None if weights is None else _sum_to(loss * scale, np.shape(weights))
  return value, (grad_p, stepwise), (-grad_p, -stepwise), grad_w


def assert_close(actual, expected, rtol=1e-5, atol=1e-6):
  np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=rtol, atol=atol)


def assert_rounded_close(actual, expected, rtol):
  """Compares in ``actual``'s dtype: the reference is rounded to it first."""
  actual = np.asarray(actual)
  with np.errstate(over="ignore", invalid="ignore"):
    expected = np.asarray(np.asarray(expected, np.float64), actual.dtype)
  atol = float(ml_dtypes.finfo(actual.dtype).smallest_subnormal)
  np.testing.assert_allclose(actual.astype(np.float64), expected.astype(np.float64), rtol=rtol,
                             atol=atol)


def assert_gradient_close(actual, expected, rtol):
  """``expected`` is (exact, stepwise): an inf where the stepwise one overflows passes
  (XLA may form ``2 (p - t)`` before scaling by ``weights / n``, or not)."""
  exact, stepwise = expected
  with np.errstate(over="ignore", invalid="ignore"):
    overflowed = np.isinf(np.asarray(actual, np.float64)) & np.isinf(
        np.asarray(stepwise, np.float64).astype(np.asarray(actual).dtype).astype(np.float64))
  assert_rounded_close(actual, np.where(overflowed, stepwise, exact), rtol)


def _tolerance(dtype):
  return {np.dtype(np.float16): 2e-3, np.dtype(ml_dtypes.bfloat16): 1e-2}.get(np.dtype(dtype),
                                                                                2e-6)


def _dtype(name):
  return {"bool": np.bool_, "bfloat16": ml_dtypes.bfloat16}.get(name, np.dtype(name))


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


@st.composite
def edge_problems(draw):
  """Huge, infinite and NaN values × every input and target dtype × options."""
  shape = draw(st.sampled_from(SHAPES))
  dtype = _dtype(draw(st.sampled_from(INPUT_DTYPES)))
  target_dtype = draw(st.sampled_from(TARGET_DTYPES))
  rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
  with np.errstate(over="ignore", invalid="ignore"):
    scales = rng.choice(SCALES, shape)
    p = np.where(np.isinf(scales), scales, scales * rng.standard_normal(shape))
    p = np.where(rng.random(shape) < 0.5, -p, p)
    p[rng.random(shape) < 0.05] = np.nan
    p = p.astype(np.float32).astype(dtype)
    if target_dtype == "bool":
      t = rng.random(shape) < 0.5
    elif target_dtype.startswith(("int", "uint")):
      t = rng.integers(0, 100, shape).astype(target_dtype)
    else:
      t = (rng.choice(SCALES, shape) * rng.standard_normal(shape)).astype(np.float32)
      t = t.astype(_dtype(target_dtype))
  options = {"reduction": draw(st.sampled_from(["none", "mean", "sum"]))}
  if draw(st.booleans()):
    wshape = tuple(1 if rng.random() < 0.5 else d for d in shape)[rng.integers(0, len(shape)):]
    options["weights"] = rng.uniform(0.5, 2.0, wshape).astype(np.float32)
  return p, t, options


def _grads(p, t, options):
  """Value and gradients w.r.t. predictions, float targets and weights, under jit."""
  float_targets = jnp.issubdtype(np.asarray(t).dtype, jnp.floating)
  weights = options.get("weights")

  def total(p, t, w):
    out = jaxce.mse_loss(p, t, weights=w, reduction=options["reduction"])
    return jnp.sum(out), out

  argnums = (0, 1) if float_targets else (0,)
  if weights is not None:
    argnums += (2,)
  grads, value = jax.jit(jax.grad(total, argnums, has_aux=True))(p, t, weights)
  grads = list(grads)
  return (value, grads.pop(0), grads.pop(0) if float_targets else None,
          grads.pop(0) if weights is not None else None)


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

  def test_int64_targets_are_not_wrapped_to_int32(self):
    # Without x64, jnp.asarray would wrap 2**32 + 5 to 5 (eager calls: jit converts its
    # arguments itself, before jaxce sees them).
    targets = np.array([2**32 + 5, -(2**40)], np.int64)
    loss = jaxce.mse_loss(jnp.array([5.0, 0.0]), targets, weights=np.array([1, 2**33], np.int64))
    assert_close(loss, [float(2**32) ** 2, 2.0**33 * 2.0**80], rtol=1e-6, atol=0)
    assert_close(jaxce.mse_loss(jnp.array([0.0]), np.array([2**63 - 1], np.uint64)), [2.0**126],
                 rtol=1e-6)

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
    check_grads(jax.jit(fn), (p, t, w), order=2, modes=["fwd", "rev"], atol=1e-2, rtol=1e-2)

  # Edges: huge, infinite and NaN values; value and every gradient.

  def test_huge_and_infinite_values(self):
    inf = np.inf
    p = jnp.array([inf, inf, 1e20, -3e38, 1.0, np.nan, 1e19])
    t = jnp.array([0.0, inf, 0.0, 3e38, 1.0, 0.0, 0.0])
    w = jnp.full(7, 0.5)
    value, grad_p, grad_t, grad_w = _grads(p, t, {"weights": w, "reduction": "none"})
    # 1e40 overflows float32 as the exact value does; inf - inf is NaN (PyTorch: the same).
    assert_close(value, [inf, np.nan, inf, inf, 0.0, np.nan, 5e37], rtol=1e-6, atol=0)
    assert_close(grad_p, [inf, np.nan, 1e20, -inf, 0.0, np.nan, 1e19], rtol=1e-6, atol=0)
    assert_close(grad_t, -np.asarray(grad_p), rtol=0, atol=0)
    assert_close(grad_w, [inf, np.nan, inf, inf, 0.0, np.nan, 1e38], rtol=1e-6, atol=0)

  @parameterized.named_parameters(*REDUCTIONS)
  @needs_torch
  def test_huge_and_infinite_values_match_torch(self, reduction):
    p = np.array([np.inf, np.inf, 1e20, -3e38, 1.0, np.nan, 1e19, -2.5], np.float32)
    t = np.array([0.0, np.inf, 0.0, 3e38, 1.0, 0.0, 0.0, 1e3], np.float32)
    for sl in (slice(None), slice(2, 5), slice(6, 8)):  # with and without NaN / inf
      tp = torch.tensor(p[sl], requires_grad=True)
      tt = torch.tensor(t[sl], requires_grad=True)
      expected = F.mse_loss(tp, tt, reduction=reduction)
      expected.sum().backward()
      value, grad_p, grad_t, _ = _grads(p[sl], t[sl], {"reduction": reduction})
      assert_close(value, expected.detach().numpy(), rtol=1e-6, atol=0)
      assert_close(grad_p, tp.grad.numpy(), rtol=1e-6, atol=0)
      assert_close(grad_t, tt.grad.numpy(), rtol=1e-6, atol=0)

  def test_float64_huge_values(self):
    with jax.enable_x64(True):
      p = jnp.array([1e200, 1e150, -1e150, 3.0], jnp.float64)
      t = jnp.array([0.0, 0.0, 1e150, 1.0 + 2.0**-50], jnp.float64)
      value, grad_p, grad_t, _ = _grads(p, t, {"reduction": "none"})
      assert value.dtype == jnp.float64 and grad_p.dtype == jnp.float64
      assert_close(value, [np.inf, 1e300, 4e300, (2.0 - 2.0**-50) ** 2], rtol=1e-15, atol=0)
      assert_close(grad_p, [2e200, 2e150, -4e150, 2 * (2.0 - 2.0**-50)], rtol=1e-15, atol=0)
      assert_close(grad_t, -np.asarray(grad_p), rtol=0, atol=0)

  @hypothesis.given(edge_problems())
  @EDGE_SETTINGS
  def test_edges_values_and_gradients_match_reference(self, problem):
    p, t, options = problem
    value, grad_p, grad_t, grad_w = _grads(p, t, options)
    assert value.dtype == jnp.float32 and grad_p.dtype == p.dtype
    ref_value, ref_p, ref_t, ref_w = ref_mse_edges(p, t, **options)
    if options["reduction"] == "mean" and np.isinf(value) and np.isfinite(ref_value):
      # The shared reduction sums first (as PyTorch does): a sum that overflows float32
      # makes the mean inf.
      assert np.isinf(_rounded(ref_value * p.size))
    else:
      assert_rounded_close(value, ref_value, 4e-6)
    assert_gradient_close(grad_p, ref_p, _tolerance(p.dtype))
    if grad_t is not None:
      assert grad_t.dtype == t.dtype
      assert_gradient_close(grad_t, ref_t, _tolerance(t.dtype))
    if grad_w is not None:
      assert_rounded_close(grad_w, ref_w, 4e-6)

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
    with pytest.raises(TypeError, match=r"jaxce\.mse_loss: predictions must be a (real )?"
                       r"floating-point array, got dtype int32"):
      jaxce.mse_loss(jnp.array([1, 2]), jnp.array([1.0, 2.0]))
    with pytest.raises(TypeError, match=r"predictions must be a (real )?floating-point array, "
                       r"got dtype bool"):
      jaxce.mse_loss(jnp.array([True]), jnp.array([1.0]))

  @parameterized.named_parameters(
      ("predictions", "predictions"), ("targets", "targets"), ("weights", "weights"))
  def test_complex_arguments_raise_naming_the_argument(self, name):
    args = {"predictions": jnp.array([1.0, 2.0]), "targets": jnp.array([0.0, 1.0]),
            "weights": None}
    args[name] = jnp.array([1.0 + 1.0j, 2.0 + 0.0j])
    with pytest.raises(TypeError, match=rf"jaxce\.mse_loss: {name} must be a real"):
      jaxce.mse_loss(args["predictions"], args["targets"], weights=args["weights"])
    with pytest.raises(TypeError, match=rf"{name} must be a real"):
      jax.jit(lambda p, t: jaxce.mse_loss(p, t, weights=args["weights"]))(
          args["predictions"], args["targets"])

  def test_unknown_reduction_lists_choices(self):
    with pytest.raises(ValueError, match=r"jaxce\.mse_loss: reduction must be one of 'none', "
                       r"'mean', 'sum'; got 'elementwise_mean'"):
      jaxce.mse_loss(jnp.zeros(2), jnp.zeros(2), reduction="elementwise_mean")

  @parameterized.named_parameters(
      ("none", None), ("int", 1), ("bytes", b"mean"), ("list", ["mean"]),
      ("array", np.asarray("mean")))
  def test_reduction_must_be_a_string(self, reduction):
    with pytest.raises(TypeError, match=r"jaxce\.mse_loss: reduction must be a string, one of "
                       r"'none', 'mean', 'sum'; got "):
      jaxce.mse_loss(jnp.zeros(2), jnp.zeros(2), reduction=reduction)

  def test_wrong_weights_shape(self):
    with pytest.raises(ValueError, match=r"weights shape \(3,\) does not broadcast to "
                       r"predictions shape \(2, 2\)"):
      jaxce.mse_loss(jnp.zeros((2, 2)), jnp.zeros((2, 2)), weights=jnp.ones(3))

  # Options, degenerate shapes, reductions.

  def test_weights_as_python_values_equal_traced_arrays(self):
    rng = np.random.default_rng(3)
    p, t = rng.standard_normal((2, 3, 4)).astype(np.float32)
    for weights in (0.5, 2, [1, 0, 2, 3], [[True], [False], [True]]):
      for reduction in ("none", "mean", "sum"):
        eager = jaxce.mse_loss(p, t, weights=weights, reduction=reduction)
        traced = jax.jit(lambda p, t, w, r=reduction: jaxce.mse_loss(p, t, weights=w,
                                                                     reduction=r))(
            p, t, jnp.asarray(weights))
        assert_close(traced, eager, rtol=1e-6, atol=0)
        assert_close(eager, ref_mse(p, t, weights=np.asarray(weights, np.float64),
                                    reduction=reduction), rtol=2e-6, atol=1e-7)

  @parameterized.named_parameters(("empty", (0,)), ("empty_rows", (3, 0)), ("no_rows", (0, 4)))
  def test_empty_inputs(self, shape):
    p, t = jnp.zeros(shape), jnp.zeros(shape)
    chex.assert_shape(jaxce.mse_loss(p, t), shape)
    assert float(jaxce.mse_loss(p, t, reduction="sum")) == 0.0
    # ``mean`` of nothing is 0 with zero gradients, as for every label ignored in the
    # softmax losses (PyTorch: NaN).
    assert float(jaxce.mse_loss(p, t, reduction="mean")) == 0.0
    assert float(mse(p, t, reduction="mean")) == 0.0
    grad = jax.grad(lambda p: jaxce.mse_loss(p, t, reduction="mean"))(p)
    chex.assert_shape(grad, shape)

  def test_scalar_inputs(self):
    assert_close(mse(jnp.float32(3.0), 1), 4.0, rtol=0, atol=0)
    assert_close(mse(jnp.float32(3.0), jnp.float32(1.5), reduction="mean"), 2.25, rtol=0, atol=0)

  @needs_torch
  def test_torch_mean_of_empty_is_nan(self):
    # Pins the docs/semantics.md row that documents jaxce's 0 as a choice.
    assert np.isnan(F.mse_loss(torch.zeros(0), torch.zeros(0), reduction="mean").item())

  @parameterized.product(shape=((300,), (20, 30), (4, 8, 16)), reduction=("sum", "mean"))
  def test_reductions_over_hundreds_of_terms_are_accurate(self, shape, reduction):
    # PyTorch's float32 sum/mean (cascade summation) stays within 1.7 eps of the exact sum
    # of its own elementwise losses here; jaxce must do no worse.
    rng = np.random.default_rng(4)
    eps = np.finfo(np.float32).eps
    fn = jax.jit(jaxce.mse_loss, static_argnames="reduction")
    errors = []
    for _ in range(20):
      t = rng.standard_normal(shape).astype(np.float32)
      p = (t + rng.uniform(1.0, 2.0, shape)).astype(np.float32)  # terms of similar size
      elementwise = np.asarray(fn(p, t), np.float64)
      exact = elementwise.sum() if reduction == "sum" else elementwise.mean()
      errors.append(abs(float(fn(p, t, reduction=reduction)) - exact) / exact)
    assert max(errors) <= 2 * eps, np.array(errors) / eps

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
