"""Tests for jaxce._binary: binary cross-entropy on probabilities and on logits."""

import chex
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from absl.testing import parameterized
from jax.experimental import checkify
from jax.test_util import check_grads

import jaxce

from torch_ref import F
from torch_ref import needs_torch
from torch_ref import torch

SETTINGS = hypothesis.settings(max_examples=10, deadline=None, derandomize=True, database=None)
EDGE_SETTINGS = hypothesis.settings(max_examples=16, deadline=None, derandomize=True,
                                    database=None)
SHAPES = ((5,), (3, 4), (2, 3, 4))
REDUCTIONS = (("none", "none"), ("mean", "mean"), ("sum", "sum"))
LOW_PRECISION = (("bfloat16", jnp.bfloat16), ("float16", jnp.float16))
INPUT_DTYPES = ("float32", "bfloat16", "float16")
LABEL_DTYPES = ("bool", "int8", "uint8", "int32", "float16", "bfloat16", "float32")
# Probabilities at and near PyTorch's edges: exact 0 and 1, below e^-100 (clamped log),
# around its 1e-12 gradient floor, and 1 - 2^-24 (the float32 just below 1).
SPECIAL_PROBS = (0.0, 1.0, 1e-44, 1e-30, 1e-13, 1e-12, 1e-6, 0.5, 1.0 - 2.0**-24)
# Logits of every magnitude, infinities included (float16 overflows the large ones to inf).
LOGIT_SCALES = (1.0, 30.0, 1e4, 1e20, 3e38, np.inf)
TORCH_EPS = float(np.float32(1e-12))

bce = jax.jit(jaxce.binary_cross_entropy, static_argnames="reduction")
bce_logits = jax.jit(jaxce.binary_cross_entropy_with_logits, static_argnames="reduction")


def _dtype(name):
  return {"bool": np.bool_, "bfloat16": ml_dtypes.bfloat16}.get(name, np.dtype(name))


def _tolerance(dtype):
  """Relative tolerance for a result rounded to ``dtype``."""
  return {np.dtype(np.float16): 2e-3, np.dtype(ml_dtypes.bfloat16): 1e-2}.get(np.dtype(dtype),
                                                                                2e-5)


# ---------------------------------------------------------------------------
# Independent references (float64; long double where logits are huge).
# ---------------------------------------------------------------------------


def _reduce(loss, reduction):
  return {"none": loss, "mean": loss.mean(), "sum": loss.sum()}[reduction]


def _weighted(loss, weights):
  return loss if weights is None else np.asarray(weights, np.float64) * loss


def _sum_to(g, shape):
  """Sums a broadcast gradient back to ``shape``."""
  g = np.asarray(g)
  g = g.sum(axis=tuple(range(g.ndim - len(shape))))
  axes = tuple(i for i, d in enumerate(shape) if d == 1 and g.shape[i] != 1)
  return g.sum(axis=axes, keepdims=True).reshape(shape)


def _scale(shape, reduction):
  """d(reduced)/d(element); for "none" the tests differentiate the sum."""
  return 1.0 / max(int(np.prod(shape)), 1) if reduction == "mean" else 1.0


def _clamped_logs(p):
  with np.errstate(divide="ignore"):
    return np.maximum(np.log(p), -100.0), np.maximum(np.log1p(-p), -100.0)


def ref_bce(p, y, *, weights=None, reduction="none"):
  """PyTorch's definition: each log term clamped at -100."""
  p, y = np.asarray(p, np.float64), np.asarray(y, np.float64)
  log_p, log_1mp = _clamped_logs(p)
  return _reduce(_weighted(-(y * log_p + (1.0 - y) * log_1mp), weights), reduction)


def ref_bce_grads(p, y, *, weights=None, reduction="none"):
  """Gradients: PyTorch's ``(p - y) / max(p (1-p), 1e-12)`` for ``p``; the
  clamped loss's derivative for ``y``; the elementwise loss for ``weights``."""
  p, y = np.asarray(p, np.float64), np.asarray(y, np.float64)
  s = _scale(p.shape, reduction)
  w = np.ones(p.shape) if weights is None else np.broadcast_to(np.asarray(weights, np.float64),
                                                                 p.shape)
  log_p, log_1mp = _clamped_logs(p)
  grad_p = (p - y) / np.maximum(p * (1.0 - p), TORCH_EPS) * w * s
  grad_y = (log_1mp - log_p) * w * s
  grad_w = None if weights is None else _sum_to(ref_bce(p, y) * s, np.shape(weights))
  return grad_p, grad_y, grad_w


def _times(c, s):
  """``c · s`` with an absent term (``c == 0``) contributing 0 even if ``s`` is inf."""
  with np.errstate(invalid="ignore"):
    return np.where((c == 0) & np.isinf(s), 0.0, c * s)


def _ld(x):
  return np.asarray(np.asarray(x, np.float64), np.longdouble)


def _softplus(x):
  return np.logaddexp(np.longdouble(0), x)


def _sigmoid(x):
  with np.errstate(over="ignore"):
    return 1.0 / (1.0 + np.exp(-x))


def _compute_dtype(x):
  return np.float64 if np.asarray(x).dtype == np.float64 else np.float32


def _rounded(v, dtype):
  """``v`` rounded to ``dtype`` (overflowing to inf), back in long double."""
  with np.errstate(over="ignore"):
    return _ld(np.asarray(np.asarray(v, np.float64), dtype))


def ref_bce_logits(x, y, *, weights=None, pos_weight=None, reduction="none"):
  """``-[pw·y·log σ(x) + (1-y)·log(1-σ(x))]`` in long double, with its limits at ±inf."""
  dtype = _compute_dtype(x)
  x, y = _ld(x), _ld(y)
  pw = _ld(1.0 if pos_weight is None else pos_weight)
  loss = _times(1.0 - y, _softplus(x)) + _times(pw * y, _softplus(-x))
  if weights is not None:  # weights scale the elementwise loss as computed (it may overflow)
    loss = _ld(weights) * _rounded(loss, dtype)
  return _reduce(loss, reduction)


def ref_bce_logits_grads(x, y, *, weights=None, pos_weight=None, reduction="none"):
  """Each element's derivative is rounded to the compute dtype before it is scaled by
  ``weights / n`` (so ``pw·softplus(-x)`` of 4 · 3e38 is inf, as in any chain rule)."""
  dtype = _compute_dtype(x)
  x, y = _ld(x), _ld(y)
  pw = np.broadcast_to(_ld(1.0 if pos_weight is None else pos_weight), x.shape)
  w = np.ones(x.shape) if weights is None else np.broadcast_to(_ld(weights), x.shape)
  ws = w * _scale(x.shape, reduction)
  grad_x = _rounded((1.0 - y) * _sigmoid(x) - pw * y * _sigmoid(-x), dtype) * ws
  grad_y = _rounded(_times(pw, _softplus(-x)) - _softplus(x), dtype) * ws
  grad_pw = None if pos_weight is None else _sum_to(
      _rounded(_times(y, _softplus(-x)), dtype) * ws, np.shape(pos_weight))
  # d/dw is the elementwise loss (times 1/n for "mean"): the float32 loss, which may overflow.
  loss = _rounded(ref_bce_logits(x, y, pos_weight=pos_weight), dtype)
  grad_w = None if weights is None else _sum_to(loss * _scale(x.shape, reduction),
                                                np.shape(weights))
  return grad_x, grad_y, grad_pw, grad_w


def assert_close(actual, expected, rtol=1e-5, atol=1e-6):
  np.testing.assert_allclose(np.asarray(actual, np.float64), np.asarray(expected, np.float64),
                             rtol=rtol, atol=atol)


def assert_rounded_close(actual, expected, rtol):
  """Compares in ``actual``'s dtype: the exact reference is rounded to it first (so a
  value that overflows it is inf), with one subnormal step of absolute slack."""
  actual = np.asarray(actual)
  with np.errstate(over="ignore", invalid="ignore"):
    expected = np.asarray(np.asarray(expected, np.float64), actual.dtype)
  atol = max(float(ml_dtypes.finfo(actual.dtype).smallest_subnormal), 1e-30)
  np.testing.assert_allclose(actual.astype(np.float64), expected.astype(np.float64), rtol=rtol,
                             atol=atol)


def assert_reduced_close(actual, expected, reduction, shape, rtol):
  """As :func:`assert_rounded_close`; a ``mean`` whose float32 sum overflows may be inf
  (the shared reduction sums first, as PyTorch does) or the exact mean."""
  if reduction == "mean" and np.isinf(actual) and np.isfinite(expected):
    with np.errstate(over="ignore"):
      assert np.isinf(np.float32(np.float64(expected) * np.prod(shape))), (actual, expected)
    return
  assert_rounded_close(actual, expected, rtol)


def _broadcastable(rng, shape):
  """A random shape that broadcasts to ``shape``: size-1 dims, fewer leading dims."""
  mshape = tuple(1 if rng.random() < 0.5 else d for d in shape)
  return mshape[rng.integers(0, len(shape)):]


def _labels(rng, shape, dtype_name):
  if dtype_name == "bool":
    return rng.random(shape) < 0.5
  if dtype_name.startswith(("int", "uint")):
    return rng.integers(0, 2, shape).astype(dtype_name)
  y = rng.uniform(size=shape)
  y = np.where(rng.random(shape) < 0.3, rng.choice([0.0, 1.0, 1e-3, 0.5], shape), y)
  return y.astype(np.float32).astype(_dtype(dtype_name))


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


@st.composite
def edge_problems(draw, logits):
  """Extreme inputs × every label dtype × options, for values and gradients."""
  shape = draw(st.sampled_from(SHAPES))
  dtype = _dtype(draw(st.sampled_from(INPUT_DTYPES)))
  label_dtype = draw(st.sampled_from(LABEL_DTYPES))
  rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
  if logits:
    scales = rng.choice(LOGIT_SCALES, shape)
    with np.errstate(invalid="ignore", over="ignore"):
      x = np.where(np.isinf(scales), scales, scales * rng.standard_normal(shape))
    x = np.where(rng.random(shape) < 0.5, -np.abs(x), np.abs(x))
  else:
    x = np.where(rng.random(shape) < 0.6, rng.choice(SPECIAL_PROBS, shape), rng.uniform(size=shape))
  with np.errstate(over="ignore"):  # float16 overflows the large logits to inf
    x = x.astype(np.float32).astype(dtype)
  y = _labels(rng, shape, label_dtype)
  options = {"reduction": draw(st.sampled_from(["none", "mean", "sum"]))}
  if draw(st.booleans()):
    options["weights"] = rng.uniform(0.5, 2.0, _broadcastable(rng, shape)).astype(np.float32)
  if logits and draw(st.booleans()):
    options["pos_weight"] = rng.uniform(0.0, 4.0, _broadcastable(rng, shape)).astype(np.float32)
  return x, y, options


def _grads(loss_fn, x, y, options):
  """Value and gradients w.r.t. the input, float labels, and the array options."""
  names = [k for k in ("pos_weight", "weights") if k in options]
  float_labels = jnp.issubdtype(np.asarray(y).dtype, jnp.floating)
  reduction = options["reduction"]

  def total(x, y, *arrays):
    out = loss_fn(x, y, reduction=reduction, **dict(zip(names, arrays, strict=True)))
    return jnp.sum(out), out

  argnums = (0, 1, *range(2, 2 + len(names))) if float_labels else (0, *range(2, 2 + len(names)))
  grads, out = jax.jit(jax.grad(total, argnums, has_aux=True))(x, y, *(options[k] for k in names))
  grads = list(grads)
  result = {"value": out, "x": grads.pop(0), "y": grads.pop(0) if float_labels else None}
  result.update(zip(names, grads, strict=True))
  return result


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

  # Edges: p in {0, 1}, tiny p, every label dtype; value and gradient.

  def test_probabilities_zero_and_one_give_pytorch_values_and_gradients(self):
    p = jnp.array([0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 1e-44, 1e-13, 0.5])
    y = jnp.array([1.0, 0.0, 0.0, 1.0, 0.5, 0.25, 1.0, 1.0, 1.0])
    loss = bce(p, y)
    # Each clamped log term contributes at most 100, as in PyTorch.
    assert_close(loss[:7], [100.0, 100.0, 0.0, 0.0, 50.0, 75.0, 100.0], rtol=1e-6, atol=1e-6)
    assert_close(loss, ref_bce(p, y))
    grad_p, grad_y = jax.jit(jax.grad(lambda p, y: jnp.sum(jaxce.binary_cross_entropy(p, y)),
                                      argnums=(0, 1)))(p, y)
    # PyTorch's gradient: (p - y) / max(p (1 - p), 1e-12), not zero at the clamp.
    big = 9.9999999590e11  # PyTorch's float32 1 / 1e-12
    assert_close(grad_p, [-big, big, 0.0, 0.0, -0.5 * big, 0.75 * big, -big, -big, -2.0],
                 rtol=1e-7, atol=0)
    # Labels: the clamped loss's derivative, finite (PyTorch: ±inf at p in {0, 1}).
    assert_close(grad_y[:7], [100.0, -100.0, 100.0, -100.0, 100.0, -100.0, 100.0], rtol=1e-6)
    assert_close(grad_y[7:], [-np.log(1e-13), 0.0], rtol=1e-5)

  def test_small_probabilities_use_log1p(self):
    # log(1 - p) rounds to 0 for p < 2^-25 in float32; PyTorch uses log1p.
    p = jnp.array([1e-8, 1e-6, 3e-30])
    assert_close(bce(p, jnp.zeros(3)), [1e-8, 1e-6, 3e-30], rtol=1e-6, atol=0)

  @hypothesis.given(edge_problems(logits=False))
  @EDGE_SETTINGS
  def test_edges_values_and_gradients_match_reference(self, problem):
    p, y, options = problem
    got = _grads(jaxce.binary_cross_entropy, p, y, options)
    assert got["value"].dtype == jnp.float32
    assert_rounded_close(got["value"], ref_bce(p, y, **options), rtol=2e-5)
    grad_p, grad_y, grad_w = ref_bce_grads(p, y, **options)
    assert got["x"].dtype == p.dtype
    assert_rounded_close(got["x"], grad_p, _tolerance(p.dtype))
    if got["y"] is not None:
      assert got["y"].dtype == y.dtype
      assert_rounded_close(got["y"], grad_y, _tolerance(y.dtype))
    if grad_w is not None:
      assert_rounded_close(got["weights"], grad_w, 2e-5)

  @parameterized.named_parameters(*REDUCTIONS)
  @needs_torch
  def test_edges_match_torch_values_and_gradients(self, reduction):
    rng = np.random.default_rng(11)
    shape = (6, 9)
    p = np.where(rng.random(shape) < 0.6, rng.choice(SPECIAL_PROBS, shape),
                 rng.uniform(size=shape)).astype(np.float32)
    y = _labels(rng, shape, "float32")
    w = rng.uniform(0.5, 2.0, (9,)).astype(np.float32)
    tp, ty = torch.tensor(p, requires_grad=True), torch.tensor(y, requires_grad=True)
    expected = F.binary_cross_entropy(tp, ty, weight=torch.from_numpy(w), reduction=reduction)
    expected.sum().backward()
    got = _grads(jaxce.binary_cross_entropy, p, y, {"weights": w, "reduction": reduction})
    # atol: XLA:CPU flushes float32 subnormals (p = 1e-44 acts as 0), PyTorch does not.
    assert_close(got["value"], expected.detach().numpy(), rtol=2e-6, atol=1e-30)
    assert_close(got["x"], tp.grad.numpy(), rtol=2e-6, atol=1e-30)
    # Labels: equal where PyTorch's -logit(p) is the clamped loss's derivative; at
    # the clamp (p in {0, 1} or below e^-100) PyTorch gives ±inf, jaxce ±100 per term.
    torch_y = ty.grad.numpy()
    clamped = (p < np.exp(-100.0)) | (p == 1.0)
    assert_close(got["y"][~clamped], torch_y[~clamped], rtol=2e-5, atol=1e-6)
    np.testing.assert_array_equal(np.sign(got["y"][clamped]), np.sign(torch_y[clamped]))
    assert np.all(np.isfinite(got["y"]))

  def test_hessian_is_the_analytic_second_derivative(self):
    p, y = jnp.array([0.2, 0.5, 0.9]), jnp.array([1.0, 0.3, 0.0])
    hess = jax.jit(jax.hessian(lambda p: jnp.sum(jaxce.binary_cross_entropy(p, y))))(p)
    assert_close(np.diag(hess), y / p**2 + (1 - y) / (1 - p) ** 2, rtol=1e-5)
    assert np.all(np.isfinite(jax.hessian(
        lambda p: jnp.sum(jaxce.binary_cross_entropy(p, jnp.ones(3))))(jnp.array([0.0, 1.0, 0.5]))))

  # Domain: outside [0, 1] or NaN is an error (PyTorch raises too).

  @parameterized.named_parameters(
      ("negative", [-0.1, 0.5], r"-0\.1 at index \(0,\) \(1 value\(s\)"),
      ("above_one", [0.5, 1.5], r"1\.5 at index \(1,\) \(1 value\(s\)"),
      ("nan", [np.nan, 0.5], r"nan at index \(0,\)"),
      ("inf", [0.5, np.inf], r"inf at index \(1,\)"))
  def test_probs_outside_unit_interval_raise_eagerly(self, probs, detail):
    with pytest.raises(ValueError, match=r"jaxce\.binary_cross_entropy: probs must lie in "
                       r"\[0, 1\]; got " + detail):
      jaxce.binary_cross_entropy(jnp.array(probs), jnp.array([1, 0]))

  @parameterized.named_parameters(
      ("int", np.array([0, 2], np.int32), r"2 at index \(1,\)"),
      ("negative_int", np.array([-1, 1], np.int8), r"-1 at index \(0,\)"),
      ("uint8", np.array([1, 255], np.uint8), r"255 at index \(1,\)"),
      ("above_one", np.array([0.5, 1.5], np.float32), r"1\.5 at index \(1,\)"),
      ("negative", np.array([-0.5, 1.0], np.float32), r"-0\.5 at index \(0,\)"),
      ("nan", np.array([np.nan, 1.0], np.float32), r"nan at index \(0,\)"),
      ("inf", np.array([np.inf, 1.0], np.float32), r"inf at index \(0,\)"))
  def test_labels_outside_unit_interval_raise_eagerly(self, labels, detail):
    with pytest.raises(ValueError, match=r"jaxce\.binary_cross_entropy: labels must lie in "
                       r"\[0, 1\]; got " + detail):
      jaxce.binary_cross_entropy(jnp.array([0.3, 0.6]), labels)

  def test_int64_labels_are_not_wrapped_to_int32(self):
    # Without x64, jnp.asarray would wrap 2**32 to a valid 0. (Arguments of a jitted
    # function are converted by jit itself, before jaxce sees them.)
    for labels in (np.array([0, 2**32], np.int64), np.array([2**32 + 1, 1], np.uint64)):
      with pytest.raises(ValueError, match=r"labels must lie in \[0, 1\]; got 4\.29497e\+09"):
        jaxce.binary_cross_entropy(jnp.array([0.3, 0.6]), labels)
      with pytest.raises(ValueError, match=r"with_logits: labels must lie in \[0, 1\]"):
        jaxce.binary_cross_entropy_with_logits(jnp.array([0.3, 0.6]), labels)
    assert_close(jaxce.binary_cross_entropy(jnp.array([0.3, 0.6]), np.array([1, 0], np.int64),
                                            weights=np.array([2, 3], np.int64)),
                 [-2 * np.log(0.3), -3 * np.log(0.4)], rtol=1e-6, atol=0)
    assert_close(jaxce.binary_cross_entropy_with_logits(
        jnp.zeros(2), np.array([1, 0], np.uint64), pos_weight=np.array([2**33, 1], np.int64)),
                 [2.0**33 * np.log(2), np.log(2)], rtol=1e-6, atol=0)

  @needs_torch
  def test_pytorch_raises_for_the_same_domain(self):
    for p, y in (([np.nan], [1.0]), ([-0.1], [1.0]), ([0.5], [1.5]), ([0.5], [np.nan])):
      with pytest.raises(RuntimeError, match="should be between 0 and 1"):
        F.binary_cross_entropy(torch.tensor(p), torch.tensor(y))

  def test_outside_unit_interval_gives_nan_value_and_gradient_under_jit(self):
    p, y = jnp.array([-0.1, 0.5, 1.5, 0.5, np.nan]), jnp.array([1.0, 0.0, 1.0, 2.0, 1.0])
    loss = np.asarray(bce(p, y))
    assert np.all(np.isnan(loss[[0, 2, 3, 4]]))
    assert_close(loss[1], np.log(2))
    assert np.isnan(bce(p, y, reduction="mean"))
    grad_p, grad_y = jax.jit(jax.grad(lambda p, y: jnp.sum(jaxce.binary_cross_entropy(p, y)),
                                      argnums=(0, 1)))(p, y)
    for g in map(np.asarray, (grad_p, grad_y)):
      assert np.all(np.isnan(g[[0, 2, 3, 4]])) and np.isfinite(g[1])

  def test_checked_raises_under_jit(self):
    loss = jax.jit(lambda p, y: jaxce.binary_cross_entropy(p, y, reduction="mean"))
    jaxce.checked(loss)(jnp.array([0.2, 0.5]), jnp.array([1, 0]))  # valid: no error
    with pytest.raises(checkify.JaxRuntimeError, match=r"jaxce\.binary_cross_entropy: probs "
                       r"must lie in \[0, 1\]; got 2 value\(s\) outside \[0, 1\] or NaN"):
      jaxce.checked(loss)(jnp.array([-0.2, np.nan]), jnp.array([1, 0]))
    with pytest.raises(checkify.JaxRuntimeError, match=r"labels must lie in \[0, 1\]; got 1 "
                       r"value\(s\)"):
      jaxce.checked(loss)(jnp.array([0.2, 0.5]), jnp.array([1, 3]))

  # Options and broadcasting.

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
    check_grads(jax.jit(fn), (p, y, w), order=1, modes=["fwd", "rev"], atol=1e-2, rtol=1e-2)

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
    with pytest.raises(TypeError, match=r"probs must be a (real )?floating-point array, got "
                       r"dtype int32"):
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

  # Edges: huge and infinite logits, every label dtype; value and every gradient.

  def test_stable_at_large_logits(self):
    x = jnp.array([1e4, -1e4, 1e4, -1e4, 3e38, -3e38])
    y = jnp.array([0.0, 1.0, 1.0, 0.0, 0.0, 1.0])
    pos_weight = jnp.full(6, 3.0)
    loss = bce_logits(x, y)
    assert_close(loss, [1e4, 1e4, 0.0, 0.0, 3e38, 3e38], rtol=1e-7, atol=0)
    loss_pw = bce_logits(x, y, pos_weight=pos_weight)
    assert_close(loss_pw[:4], [1e4, 3e4, 0.0, 0.0], rtol=1e-7, atol=0)
    assert loss_pw[5] == np.inf  # 9e38 overflows float32, as the exact value does
    grad = jax.jit(jax.grad(lambda x: jnp.sum(jaxce.binary_cross_entropy_with_logits(
        x, y, pos_weight=pos_weight))))(x)
    assert_close(grad, [1.0, -3.0, 0.0, 0.0, 1.0, -3.0], rtol=0, atol=0)
    # bf16 logits of that size too (the loss is float32).
    x_bf16 = x.astype(jnp.bfloat16)  # 3e38 is in bf16's range
    loss_bf16 = bce_logits(x_bf16, y)
    assert np.all(np.isfinite(loss_bf16))
    assert_close(loss_bf16, ref_bce_logits(x_bf16, y), rtol=1e-7, atol=0)

  def test_huge_logits_with_soft_labels_are_exact(self):
    # PyTorch's (1-y)·x - log σ(x) cancels: 1.0000278e17 here instead of 1e17.
    x = jnp.array([-1e20, 1e20, -1e20, 1e20])
    y = jnp.array([1e-3, 1.0 - 1e-3, 0.5, 0.25])
    pw = jnp.array([1.0, 2.0, 3.0, 0.5])
    got = _grads(jaxce.binary_cross_entropy_with_logits, x, y,
                 {"pos_weight": pw, "reduction": "none"})
    assert_close(got["value"], ref_bce_logits(x, y, pos_weight=pw), rtol=3e-7, atol=0)
    for name, expected in zip(("x", "y", "pos_weight"), ref_bce_logits_grads(x, y, pos_weight=pw),
                              strict=False):
      assert_close(got[name], expected, rtol=3e-7, atol=0)

  def test_float64_logits_of_1e200(self):
    with jax.enable_x64(True):
      x = jnp.array([1e200, -1e200, 1e200, -1e200, -1e200], jnp.float64)
      y = jnp.array([1.0, 0.0, 0.3, 1e-3, 1.0], jnp.float64)
      pw = jnp.array([2.0, 2.0, 2.0, 2.0, 0.0], jnp.float64)
      got = _grads(jaxce.binary_cross_entropy_with_logits, x, y,
                   {"pos_weight": pw, "reduction": "sum"})
      assert got["value"].dtype == jnp.float64 and got["x"].dtype == jnp.float64
      expected = ref_bce_logits_grads(x, y, pos_weight=pw, reduction="sum")
      assert_close(got["value"], ref_bce_logits(x, y, pos_weight=pw, reduction="sum"),
                   rtol=1e-15, atol=0)
      for name, value in zip(("x", "y", "pos_weight"), expected, strict=False):
        assert_close(got[name], value, rtol=1e-15, atol=0)

  def test_infinite_logits_give_the_limits(self):
    inf = np.inf
    x = jnp.array([inf, -inf, inf, -inf, inf, -inf, -inf, np.nan])
    y = jnp.array([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 1.0, 1.0])
    pw = jnp.array([2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 0.0, 2.0])
    got = _grads(jaxce.binary_cross_entropy_with_logits, x, y,
                 {"pos_weight": pw, "reduction": "none"})
    # Agreeing label: 0 (PyTorch: NaN); disagreeing: inf; pos_weight 0 drops the term.
    assert_close(got["value"], [0.0, 0.0, inf, inf, inf, inf, 0.0, np.nan], rtol=0, atol=0)
    assert_close(got["x"], [0.0, 0.0, 1.0, -2.0, 0.5, -1.0, 0.0, np.nan], rtol=0, atol=0)
    assert_close(got["y"], [-inf, inf, -inf, inf, -inf, inf, 0.0, np.nan], rtol=0, atol=0)
    assert_close(got["pos_weight"], [0.0, 0.0, 0.0, inf, 0.0, inf, inf, np.nan], rtol=0, atol=0)

  @needs_torch
  def test_torch_at_infinite_logits(self):
    # Pins the docs/semantics.md row: PyTorch's NaNs where jaxce gives the limit 0 (or inf).
    x = torch.tensor([np.inf, -np.inf, -np.inf, np.inf], requires_grad=True)
    y = torch.tensor([1.0, 0.0, 1.0, 0.0])
    loss = F.binary_cross_entropy_with_logits(x, y, reduction="none")
    assert_close(loss.detach().numpy(), [np.nan, np.nan, np.nan, np.inf], rtol=0, atol=0)
    loss.sum().backward()
    got = _grads(jaxce.binary_cross_entropy_with_logits, x.detach().numpy(), y.numpy(),
                 {"reduction": "none"})
    assert_close(got["value"], [0.0, 0.0, np.inf, np.inf], rtol=0, atol=0)
    assert_close(got["x"], x.grad.numpy(), rtol=0, atol=0)  # same gradients: 0, 0, -1, 1

  @hypothesis.given(edge_problems(logits=True))
  @EDGE_SETTINGS
  def test_edges_values_and_gradients_match_reference(self, problem):
    x, y, options = problem
    got = _grads(jaxce.binary_cross_entropy_with_logits, x, y, options)
    assert got["value"].dtype == jnp.float32
    assert_reduced_close(got["value"], ref_bce_logits(x, y, **options), options["reduction"],
                         x.shape, rtol=2e-6)
    grad_x, grad_y, grad_pw, grad_w = ref_bce_logits_grads(x, y, **options)
    assert got["x"].dtype == x.dtype
    assert_rounded_close(got["x"], grad_x, _tolerance(x.dtype))
    if got["y"] is not None:
      assert got["y"].dtype == y.dtype
      assert_rounded_close(got["y"], grad_y, _tolerance(y.dtype))
    if grad_pw is not None:
      assert_rounded_close(got["pos_weight"], grad_pw, 2e-6)
    if grad_w is not None:
      assert_rounded_close(got["weights"], grad_w, 2e-6)

  @parameterized.named_parameters(*REDUCTIONS)
  @needs_torch
  def test_gradients_match_torch(self, reduction):
    rng = np.random.default_rng(12)
    x = (rng.choice([1.0, 10.0, 30.0], (5, 6)) * rng.standard_normal((5, 6))).astype(np.float32)
    y = _labels(rng, (5, 6), "float32")
    w = rng.uniform(0.5, 2.0, (6,)).astype(np.float32)
    pw = rng.uniform(0.5, 3.0, (6,)).astype(np.float32)
    tx, ty = torch.tensor(x, requires_grad=True), torch.tensor(y, requires_grad=True)
    expected = F.binary_cross_entropy_with_logits(
        tx, ty, weight=torch.from_numpy(w), pos_weight=torch.from_numpy(pw), reduction=reduction)
    expected.sum().backward()
    got = _grads(jaxce.binary_cross_entropy_with_logits, x, y,
                 {"weights": w, "pos_weight": pw, "reduction": reduction})
    assert_close(got["value"], expected.detach().numpy(), rtol=1e-5, atol=1e-7)
    # PyTorch's (1-y) - (1 + (pw-1) y) σ(-x) cancels at large negative x: absolute slack.
    assert_close(got["x"], tx.grad.numpy(), rtol=1e-5, atol=1e-6)
    assert_close(got["y"], ty.grad.numpy(), rtol=1e-5, atol=1e-6)

  @needs_torch
  def test_more_accurate_than_torch_at_large_logits(self):
    rng = np.random.default_rng(13)
    x = (rng.choice([-1.0, 1.0], 200) * 10.0 ** rng.uniform(1, 30, 200)).astype(np.float32)
    y = rng.uniform(size=200).astype(np.float32)
    exact = np.asarray(ref_bce_logits(x, y), np.float64)
    ours = np.asarray(bce_logits(x, y), np.float64)
    theirs = F.binary_cross_entropy_with_logits(torch.from_numpy(x), torch.from_numpy(y),
                                                reduction="none").numpy().astype(np.float64)
    eps = np.finfo(np.float32).eps
    assert np.max(np.abs(ours - exact) / exact) <= 4 * eps
    assert np.all(np.abs(ours - exact) <= np.abs(theirs - exact) + 3 * eps * exact)
    assert np.max(np.abs(theirs - exact) / exact) > 100 * eps  # where PyTorch cancels

  # Domain: labels outside [0, 1] or NaN are an error (PyTorch extrapolates).

  @parameterized.named_parameters(
      ("int", np.array([0, 2], np.int32), r"2 at index \(1,\)"),
      ("minus_one", np.array([-1, 1], np.int32), r"-1 at index \(0,\)"),
      ("above_one", np.array([0.5, 1.5], np.float32), r"1\.5 at index \(1,\)"),
      ("nan", np.array([np.nan, 1.0], np.float32), r"nan at index \(0,\)"))
  def test_labels_outside_unit_interval_raise_eagerly(self, labels, detail):
    with pytest.raises(ValueError, match=r"jaxce\.binary_cross_entropy_with_logits: labels must "
                       r"lie in \[0, 1\]; got " + detail):
      jaxce.binary_cross_entropy_with_logits(jnp.array([0.3, -0.6]), labels)

  def test_labels_outside_unit_interval_under_jit(self):
    x, y = jnp.array([0.3, -0.6, 2.0]), jnp.array([1.0, -1.0, 1.5])
    loss = bce_logits(x, y)
    assert np.isfinite(loss[0]) and np.all(np.isnan(loss[1:]))
    grad = jax.jit(jax.grad(lambda x, y: jnp.sum(jaxce.binary_cross_entropy_with_logits(x, y))))(
        x, y)
    assert np.isfinite(grad[0]) and np.all(np.isnan(grad[1:]))
    # Labels closed over as constants are concrete at trace time: an error even under jit.
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 1\]; got -1 at index \(1,\)"):
      jax.jit(lambda x: jaxce.binary_cross_entropy_with_logits(x, y))(x)
    fn = jax.jit(lambda x, y: jaxce.binary_cross_entropy_with_logits(x, y, reduction="sum"))
    with pytest.raises(checkify.JaxRuntimeError, match=r"binary_cross_entropy_with_logits: "
                       r"labels must lie in \[0, 1\]; got 2 value\(s\) outside"):
      jaxce.checked(fn)(x, y)

  # Options and broadcasting.

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
    check_grads(jax.jit(fn), (x, y, w, pw), order=2, modes=["fwd", "rev"], atol=1e-2, rtol=1e-2)

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
    with pytest.raises(TypeError, match=r"logits must be a (real )?floating-point array, got "
                       r"dtype int32"):
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


BINARY_LOSSES = (
    ("probs", jaxce.binary_cross_entropy, "probs"),
    ("logits", jaxce.binary_cross_entropy_with_logits, "logits"),
)


class TestBinaryOptionsAndDegenerateInputs(parameterized.TestCase):
  """Both binary losses: non-real inputs, option types, empty shapes, reductions."""

  @parameterized.named_parameters(
      ("probs", jaxce.binary_cross_entropy, "probs"),
      ("labels", jaxce.binary_cross_entropy, "labels"),
      ("weights", jaxce.binary_cross_entropy, "weights"),
      ("logits", jaxce.binary_cross_entropy_with_logits, "logits"),
      ("logits_labels", jaxce.binary_cross_entropy_with_logits, "labels"),
      ("logits_weights", jaxce.binary_cross_entropy_with_logits, "weights"),
      ("pos_weight", jaxce.binary_cross_entropy_with_logits, "pos_weight"))
  def test_complex_arguments_raise_naming_the_argument(self, loss_fn, name):
    args = {"x": jnp.array([0.25, 0.5]), "labels": jnp.array([1.0, 0.0])}
    complex_value = jnp.array([0.25 + 0.5j, 0.5 + 0.0j])
    kwargs = {}
    if name in ("probs", "logits"):
      args["x"] = complex_value
    elif name == "labels":
      args["labels"] = complex_value
    else:
      kwargs[name] = complex_value
    pattern = rf"{loss_fn.__name__}: {name} must be a real"
    with pytest.raises(TypeError, match=pattern):
      loss_fn(args["x"], args["labels"], **kwargs)
    with pytest.raises(TypeError, match=pattern):  # at trace time under jit too
      jax.jit(lambda x, y: loss_fn(x, y, **kwargs))(args["x"], args["labels"])

  @parameterized.product(
      loss=BINARY_LOSSES,
      reduction=(None, 1, b"mean", ["mean"], jnp.asarray(0)))
  def test_reduction_must_be_a_string(self, loss, reduction):
    _, loss_fn, _ = loss
    with pytest.raises(TypeError, match=rf"{loss_fn.__name__}: reduction must be a string, one "
                       r"of 'none', 'mean', 'sum'; got "):
      loss_fn(jnp.array([0.5]), jnp.array([1.0]), reduction=reduction)
    out = loss_fn(jnp.array([0.5]), jnp.array([1.0]), reduction=np.str_("sum"))  # a str subclass
    assert out.shape == ()

  @parameterized.named_parameters(*BINARY_LOSSES)
  def test_options_as_python_values_equal_traced_arrays(self, loss_fn, kind):
    rng = np.random.default_rng(14)
    x = rng.uniform(0.05, 0.95, (3, 4)).astype(np.float32)
    y = rng.integers(0, 2, (3, 4)).astype(np.int32)
    options = [{"weights": 0.5}, {"weights": [1, 2, 0, 3]},
               {"weights": np.array([True, False, True, True])}]
    if kind == "logits":
      options += [{"pos_weight": 2}, {"pos_weight": [1.0, 2.0, 3.0, 0.5]},
                  {"pos_weight": 2.5, "weights": [[1.0], [0.0], [2.0]]}]
    for opts in options:
      for reduction in ("none", "mean", "sum"):
        eager = loss_fn(x, y, reduction=reduction, **opts)
        names = list(opts)
        traced = jax.jit(lambda x, y, *v, names=names, reduction=reduction: loss_fn(
            x, y, reduction=reduction, **dict(zip(names, v, strict=True))))(
                x, y, *(jnp.asarray(opts[k]) for k in names))
        assert_close(traced, eager, rtol=1e-6, atol=0)
        ref = ref_bce if kind == "probs" else ref_bce_logits
        assert_close(eager, ref(x, y, reduction=reduction,
                                **{k: np.asarray(v, np.float64) for k, v in opts.items()}),
                     rtol=2e-6, atol=1e-7)

  @parameterized.product(loss=BINARY_LOSSES, shape=((0,), (3, 0), (0, 4)))
  def test_empty_inputs(self, loss, shape):
    _, loss_fn, _ = loss
    x, y = jnp.zeros(shape), jnp.zeros(shape)
    chex.assert_shape(loss_fn(x, y), shape)
    assert float(loss_fn(x, y, reduction="sum")) == 0.0
    # ``mean`` of nothing is 0 with zero gradients, as for every label ignored in the
    # softmax losses (PyTorch: NaN).
    for fn in (loss_fn, jax.jit(loss_fn, static_argnames="reduction")):
      assert float(fn(x, y, reduction="mean")) == 0.0
    grad = jax.grad(lambda x: loss_fn(x, y, weights=jnp.ones(shape[-1:]), reduction="mean"))(x)
    chex.assert_shape(grad, shape)

  def test_scalar_inputs(self):
    assert_close(bce(jnp.float32(0.25), 1), -np.log(0.25))
    assert_close(bce_logits(jnp.float32(-2.0), True, reduction="mean"), np.log1p(np.exp(2.0)))

  @parameterized.named_parameters(*BINARY_LOSSES)
  @needs_torch
  def test_torch_mean_of_empty_is_nan(self, loss_fn, kind):
    # Pins the docs/semantics.md row that documents jaxce's 0 as a choice.
    torch_fn = {"probs": F.binary_cross_entropy,
                "logits": F.binary_cross_entropy_with_logits}[kind]
    assert np.isnan(torch_fn(torch.zeros(0), torch.zeros(0), reduction="mean").item())
    assert float(loss_fn(jnp.zeros(0), jnp.zeros(0), reduction="mean")) == 0.0

  @parameterized.product(loss=BINARY_LOSSES, shape=((300,), (20, 30), (4, 8, 16)),
                         reduction=("sum", "mean"))
  def test_reductions_over_hundreds_of_terms_are_accurate(self, loss, shape, reduction):
    # PyTorch's float32 sum/mean (cascade summation) stays within 1.7 eps of the exact sum
    # of its own elementwise losses here; jaxce must do no worse.
    _, loss_fn, kind = loss
    rng = np.random.default_rng(15)
    eps = np.finfo(np.float32).eps
    fn = jax.jit(loss_fn, static_argnames="reduction")
    errors = []
    for _ in range(20):
      if kind == "probs":
        x = rng.uniform(0.001, 0.999, shape).astype(np.float32)
      else:
        x = rng.uniform(1.0, 2.0, shape).astype(np.float32)  # terms of similar size
      y = rng.uniform(size=shape).astype(np.float32)
      elementwise = np.asarray(fn(x, y), np.float64)
      exact = elementwise.sum() if reduction == "sum" else elementwise.mean()
      errors.append(abs(float(fn(x, y, reduction=reduction)) - exact) / exact)
    assert max(errors) <= 2 * eps, np.array(errors) / eps
