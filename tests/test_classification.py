"""Tests for jaxce._classification: sparse/dense cross-entropy and NLL."""

import functools

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

SETTINGS = hypothesis.settings(max_examples=25, deadline=None, derandomize=True)


# ---------------------------------------------------------------------------
# Independent float64 NumPy references (classes on the last axis).
# ---------------------------------------------------------------------------


def _np_log_softmax(x, mask):
  x = np.where(mask, x, -np.inf)
  m = np.max(x, axis=-1, keepdims=True)
  m = np.where(np.isfinite(m), m, 0.0)
  with np.errstate(divide="ignore"):
    return x - m - np.log(np.sum(np.exp(x - m), axis=-1, keepdims=True))


def _classes_last(x, axis, where, weights):
  """float64 logits, boolean mask and class weights with classes on the last axis."""
  mask = np.ones(np.shape(x), bool) if where is None else np.broadcast_to(where, np.shape(x))
  x = np.moveaxis(np.asarray(x, np.float64), axis, -1)
  w = np.ones(x.shape[-1]) if weights is None else np.asarray(weights, np.float64)
  return x, np.moveaxis(mask, axis, -1), w


def _reduce(loss, reduction, den):
  if reduction == "none":
    return loss
  if reduction == "sum":
    return loss.sum()
  return loss.sum() / den if den else 0.0


def ref_sparse(x, y, *, axis=-1, weights=None, ignore_index=None, ls=0.0, where=None,
               reduction="none"):
  x, mask, w = _classes_last(x, axis, where, weights)
  logp = _np_log_softmax(x, mask)
  y = np.asarray(y)
  loss = np.zeros(y.shape)
  den = 0.0
  for idx in np.ndindex(y.shape):
    label = y[idx]
    if (ignore_index is not None and label == ignore_index) or not mask[idx].any():
      continue
    possible = np.isfinite(logp[idx])
    nll = -logp[idx][label]
    smooth = -np.sum(w[possible] * logp[idx][possible]) / possible.sum()
    loss[idx] = (1 - ls) * w[label] * nll + ls * smooth
    den += w[label]
  return _reduce(loss, reduction, den)


def ref_dense(x, t, *, axis=-1, weights=None, ls=0.0, where=None, reduction="none"):
  x, mask, w = _classes_last(x, axis, where, weights)
  t = np.moveaxis(np.asarray(t, np.float64), axis, -1)
  logp = _np_log_softmax(x, mask)
  possible = np.isfinite(logp)
  t = (1 - ls) * t + ls * possible / possible.sum(-1, keepdims=True)
  q = np.where(mask, w * t, 0.0)
  with np.errstate(invalid="ignore"):
    loss = -np.sum(np.where(q == 0, 0.0, q * logp), axis=-1)
  active = mask.any(-1)
  loss = np.where(active, loss, 0.0)
  return _reduce(loss, reduction, active.sum())


def ref_nll(lp, y, *, axis=-1, weights=None, ignore_index=None, reduction="none"):
  lp = np.moveaxis(np.asarray(lp, np.float64), axis, -1)
  w = np.ones(lp.shape[-1]) if weights is None else np.asarray(weights, np.float64)
  y = np.asarray(y)
  keep = np.ones(y.shape, bool) if ignore_index is None else y != ignore_index
  safe = np.where(keep, y, 0)
  picked = np.take_along_axis(lp, safe[..., None], -1)[..., 0]
  loss = np.where(keep, -w[safe] * picked, 0.0)
  return _reduce(loss, reduction, np.where(keep, w[safe], 0).sum())


def _problem_2d(seed, n=4, c=5):
  rng = np.random.default_rng(seed)
  return rng.normal(size=(n, c)).astype(np.float32), rng.integers(0, c, size=n)


def _close(actual, expected, rtol=2e-5, atol=2e-5):
  np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=rtol, atol=atol)


INT_DTYPES = (np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32)


def _huge_problem(scale, dtype=np.float32):
  """Rows whose logits are ±``scale`` apart (PyTorch gives the exact finite loss)."""
  x = np.array([[scale, -scale, 0.0, 1.0], [-scale, scale, 3.0, -2.0],
                [0.5, -0.5, scale, -scale]], dtype)
  return x, np.array([1, 0, 2])


def _close_rel(actual, expected, rtol):
  np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=rtol, atol=0)


@st.composite
def sparse_problems(draw):
  """Random logits/labels/options with the class axis anywhere."""
  ndim = draw(st.integers(1, 3))
  shape = tuple(draw(st.lists(st.integers(1, 4), min_size=ndim, max_size=ndim)))
  axis = draw(st.integers(-ndim, ndim - 1))
  c = draw(st.integers(2, 6))
  shape = shape[:axis % ndim] + (c,) + shape[axis % ndim + 1:]
  seed = draw(st.integers(0, 2**16))
  rng = np.random.default_rng(seed)
  x = (rng.normal(size=shape) * draw(st.sampled_from([1.0, 10.0]))).astype(np.float32)
  y = rng.integers(0, c, size=np.delete(np.array(shape), axis % ndim))
  ignore = draw(st.sampled_from([None, -100, 0]))
  if ignore == -100:
    y = np.where(rng.random(y.shape) < 0.3, -100, y)
  weights = draw(st.sampled_from([None, "w"]))
  if weights:
    weights = rng.uniform(0.2, 2.0, size=c).astype(np.float32)
  opts = dict(axis=axis, class_weights=weights, ignore_index=ignore,
              label_smoothing=draw(st.sampled_from([0.0, 0.1, 1.0])),
              reduction=draw(st.sampled_from(["none", "mean", "sum"])))
  return x, y, opts


# ---------------------------------------------------------------------------
# sparse_cross_entropy
# ---------------------------------------------------------------------------


class TestSparseCrossEntropy(parameterized.TestCase):

  def test_pytorch_reference_value(self):
    loss = jaxce.sparse_cross_entropy(jnp.array([[-0.5, -0.2, -0.3]]), jnp.array([0]),
                                      axis=1, reduction="mean")
    self.assertAlmostEqual(float(loss), 1.2729, places=4)

  def test_tensorflow_example_matches_float64_reference(self):
    logits = np.array([[2, -5, .5, -.1], [0, 0, 1.9, 1.4], [-100, 100, -100, -100]], np.float32)
    labels = np.array([0, 3, 1])
    loss = jaxce.sparse_cross_entropy(logits, labels)
    _close(loss, ref_sparse(logits, labels))
    _close(loss, [0.29750752, 1.1448325, 0.0], atol=1e-6)

  @hypothesis.given(sparse_problems())
  @SETTINGS
  def test_matches_float64_reference(self, problem):
    x, y, opts = problem
    ref_opts = dict(opts, ls=opts["label_smoothing"], weights=opts["class_weights"])
    del ref_opts["label_smoothing"], ref_opts["class_weights"]
    loss = jax.jit(functools.partial(jaxce.sparse_cross_entropy, **opts))  # one compile per case
    _close(loss(x, y), ref_sparse(x, y, **ref_opts), 1e-4, 1e-4)

  @parameterized.product(reduction=["none", "mean", "sum"], smoothing=[0.0, 0.3],
                         weighted=[False, True])
  @needs_torch
  def test_matches_pytorch_with_ignore_index(self, reduction, smoothing, weighted):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(6, 5, 3)).astype(np.float32)
    y = rng.integers(0, 5, size=(6, 3))
    y[0, 0] = y[3, 2] = -100
    w = rng.uniform(0.5, 2.0, size=5).astype(np.float32) if weighted else None
    xt = torch.tensor(x, requires_grad=True)
    expected = F.cross_entropy(xt, torch.tensor(y), weight=None if w is None else torch.tensor(w),
                               ignore_index=-100, label_smoothing=smoothing, reduction=reduction)
    expected.sum().backward()

    def loss(x):
      return jaxce.sparse_cross_entropy(x, y, axis=1, class_weights=w, ignore_index=-100,
                                        label_smoothing=smoothing, reduction=reduction)

    _close(loss(x), expected.detach().numpy(), 1e-5, 1e-6)
    _close(jax.grad(lambda x: loss(x).sum())(x), xt.grad.numpy(), 1e-5, 1e-6)

  def test_axis_equals_moveaxis(self):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(3, 5, 4, 2)).astype(np.float32)
    y = rng.integers(0, 5, size=(3, 4, 2))
    chex.assert_trees_all_close(
        jaxce.sparse_cross_entropy(x, y, axis=1, label_smoothing=0.2),
        jaxce.sparse_cross_entropy(np.moveaxis(x, 1, -1), y, label_smoothing=0.2), rtol=1e-6)

  def test_masking_classes_equals_slicing(self):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(4, 6)).astype(np.float32)
    keep = np.array([True, False, True, True, False, True])
    w = rng.uniform(0.5, 2.0, size=6).astype(np.float32)
    opts = dict(label_smoothing=0.2, reduction="mean")
    masked = jaxce.sparse_cross_entropy(x, np.array([0, 2, 3, 5]), where=keep, class_weights=w,
                                        **opts)
    sliced = jaxce.sparse_cross_entropy(x[:, keep], np.array([0, 1, 2, 3]),
                                        class_weights=w[keep], **opts)
    chex.assert_trees_all_close(masked, sliced, rtol=1e-6)

  def test_masking_rows_equals_slicing_rows(self):
    rng = np.random.default_rng(4)
    x = rng.normal(size=(5, 4)).astype(np.float32)
    y = rng.integers(0, 4, size=5)
    rows = np.array([True, False, True, True, False])
    w = rng.uniform(0.5, 2.0, size=4).astype(np.float32)
    for reduction in ["mean", "sum"]:
      masked = jaxce.sparse_cross_entropy(x, y, where=rows[:, None], class_weights=w,
                                          reduction=reduction)
      sliced = jaxce.sparse_cross_entropy(x[rows], y[rows], class_weights=w, reduction=reduction)
      chex.assert_trees_all_close(masked, sliced, rtol=1e-6)
    per_example = jaxce.sparse_cross_entropy(x, y, where=rows[:, None])
    np.testing.assert_array_equal(np.asarray(per_example)[~rows], 0.0)

  def test_fully_masked_rows_give_zero_loss_and_zero_gradient(self):
    x = jnp.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    rows = jnp.array([[True], [False]])
    grad = jax.grad(lambda x: jaxce.sparse_cross_entropy(
        x, jnp.array([0, 1]), where=rows, reduction="mean", label_smoothing=0.1))(x)
    assert np.all(np.isfinite(grad))
    np.testing.assert_array_equal(grad[1], 0.0)
    everything_masked = jaxce.sparse_cross_entropy(x, jnp.array([0, 1]), where=jnp.zeros((2, 1),
                                                   bool), reduction="mean")
    self.assertEqual(float(everything_masked), 0.0)

  def test_all_ignored_mean_is_zero_with_zero_gradients(self):
    x = jnp.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    y = jnp.array([-100, -100])

    def loss(x):
      return jaxce.sparse_cross_entropy(x, y, ignore_index=-100, reduction="mean",
                                        class_weights=jnp.array([1.0, 2.0, 3.0]),
                                        label_smoothing=0.1)

    value, grad = jax.jit(jax.value_and_grad(loss))(x)
    self.assertEqual(float(value), 0.0)
    np.testing.assert_array_equal(grad, 0.0)

  def test_ignore_index_may_be_a_valid_class(self):
    x = jnp.array([[1.0, 2.0], [3.0, 1.0]])
    loss = jaxce.sparse_cross_entropy(x, jnp.array([0, 1]), ignore_index=0)
    _close(loss, [0.0, ref_sparse(x[1:], [1])[0]])

  def test_neg_inf_logits_on_other_classes_are_finite_with_zero_gradient(self):
    x = jnp.array([[0.5, -jnp.inf, 1.0, -jnp.inf]])
    for smoothing in [0.0, 0.2]:
      loss_fn = lambda x, s=smoothing: jaxce.sparse_cross_entropy(
          x, jnp.array([2]), label_smoothing=s, reduction="sum")
      value, grad = jax.value_and_grad(loss_fn)(x)
      _close(value, ref_sparse(np.array([[0.5, 1.0]]), [1], ls=smoothing))
      assert np.all(np.isfinite(grad))
      np.testing.assert_array_equal(grad[0, [1, 3]], 0.0)

  def test_neg_inf_logit_on_label_gives_inf(self):
    loss = jaxce.sparse_cross_entropy(jnp.array([[0.0, -jnp.inf]]), jnp.array([1]))
    self.assertEqual(float(loss[0]), np.inf)

  @parameterized.parameters(jnp.inf, jnp.nan)
  def test_inf_and_nan_logits_propagate_nan(self, bad):
    x = jnp.array([[0.0, bad, 1.0], [0.0, 1.0, 2.0]])
    loss = jaxce.sparse_cross_entropy(x, jnp.array([0, 1]))
    assert np.isnan(loss[0]) and np.isfinite(loss[1])

  def test_where_hiding_the_label_raises_eagerly(self):
    with pytest.raises(ValueError, match=r"be a class that `where` keeps; got 1 at index \(0,\)"):
      jaxce.sparse_cross_entropy(jnp.zeros((1, 3)), jnp.array([1]),
                                 where=jnp.array([True, False, True]))

  def test_where_hiding_the_label_is_nan_under_jit_never_negative(self):
    loss = jax.jit(lambda x, y, m: jaxce.sparse_cross_entropy(x, y, where=m))(
        jnp.array([[0.0, 5.0, 1.0], [0.0, 5.0, 1.0]]), jnp.array([1, 0]),
        jnp.array([True, False, True]))
    assert np.isnan(loss[0])
    _close(loss[1], ref_sparse(np.array([[0.0, 1.0]]), [0])[0])

  def test_zero_classes_raise_a_clear_error(self):
    for fn, labels in ((jaxce.sparse_cross_entropy, jnp.zeros(2, int)),
                       (jaxce.dense_cross_entropy, jnp.zeros((2, 0))),
                       (jaxce.nll_loss, jnp.zeros(2, int))):
      with pytest.raises(ValueError, match=r"has no classes \(axis 1 of shape \(2, 0\) is 0\)"):
        fn(jnp.zeros((2, 0)), labels)

  def test_out_of_range_label_raises_eagerly(self):
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\) or equal ignore_index "
                       r"\(-100\); got -1 at index \(1,\)"):
      jaxce.sparse_cross_entropy(jnp.zeros((2, 3)), jnp.array([0, -1]), ignore_index=-100)
    with pytest.raises(ValueError, match=r"got 3 at index \(0,\)"):
      jaxce.sparse_cross_entropy(jnp.zeros((2, 3)), jnp.array([3, 0]))

  @parameterized.parameters(-1, 3, 7)
  def test_out_of_range_label_is_nan_under_jit_and_vmap(self, bad):
    x = jnp.zeros((2, 3))
    y = jnp.array([0, bad])
    for fn in [jax.jit(jaxce.sparse_cross_entropy), jax.vmap(jaxce.sparse_cross_entropy)]:
      loss = fn(x, y)
      assert np.isnan(loss[1]) and np.isfinite(loss[0])

  def test_out_of_range_label_raises_under_checked_jit(self):
    loss = jax.jit(lambda x, y: jaxce.sparse_cross_entropy(x, y, reduction="mean"))
    with pytest.raises(Exception, match=r"labels must be in \[0, 3\).*got 1 bad label"):
      jaxce.checked(loss)(jnp.zeros((2, 3)), jnp.array([0, 5]))

  @parameterized.parameters(jnp.bfloat16, jnp.float16)
  def test_low_precision_logits_accumulate_in_float32(self, dtype):
    rng = np.random.default_rng(5)
    x = (rng.normal(size=(8, 1000)) * 3).astype(np.float32)
    y = rng.integers(0, 1000, size=8)
    x_low = jnp.asarray(x, dtype)
    loss = jaxce.sparse_cross_entropy(x_low, y, reduction="none")
    self.assertEqual(loss.dtype, jnp.float32)
    _close(loss, ref_sparse(np.asarray(x_low, np.float64), y), 1e-5, 1e-5)
    grad = jax.grad(lambda x: jaxce.sparse_cross_entropy(x, y, reduction="mean"))(x_low)
    self.assertEqual(grad.dtype, dtype)

  def test_jit_vmap_equal_python_loop(self):
    rng = np.random.default_rng(6)
    x = rng.normal(size=(3, 4, 5)).astype(np.float32)
    y = rng.integers(0, 5, size=(3, 4))
    fn = lambda x, y: jaxce.sparse_cross_entropy(x, y, label_smoothing=0.1, reduction="mean")
    loop = np.stack([fn(x[i], y[i]) for i in range(3)])
    chex.assert_trees_all_close(jax.vmap(fn)(x, y), loop, rtol=1e-6)
    chex.assert_trees_all_close(jax.jit(jax.vmap(fn))(x, y), loop, rtol=1e-6)

  @parameterized.product(smoothing=[0.0, 0.3], reduction=["none", "mean"])
  def test_gradients_pass_check_grads(self, smoothing, reduction):
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.normal(size=(4, 5)), jnp.float32)
    y = jnp.array([0, -100, 4, 2])
    w = jnp.asarray(rng.uniform(0.5, 2.0, size=5), jnp.float32)
    mask = jnp.array([[True] * 5, [True] * 5, [True] * 5, [False] * 5])
    fn = lambda x: jaxce.sparse_cross_entropy(x, y, class_weights=w, ignore_index=-100, where=mask,
                                              label_smoothing=smoothing, reduction=reduction)
    check_grads(fn, (x,), order=1, modes=["rev"], atol=1e-2, rtol=1e-2)

  def test_bad_inputs_raise_clear_errors(self):
    x, y = jnp.zeros((4, 3)), jnp.zeros((4,), jnp.int32)
    f = jaxce.sparse_cross_entropy
    with pytest.raises(TypeError, match="labels must be integer class indices, got dtype float32"):
      f(x, jnp.zeros((4,)))
    with pytest.raises(ValueError, match=r"labels shape \(3,\) does not match logits without the "
                       r"class axis \(4,\)"):
      f(x, jnp.zeros((3,), jnp.int32))
    with pytest.raises(ValueError, match=r"labels shape \(4,\) does not match .* \(3,\)"):
      f(x, y, axis=0)
    with pytest.raises(ValueError, match=r"weights shape \(4,\) does not match the number of "
                       r"classes \(3,\)"):
      f(x, y, class_weights=jnp.ones(4))
    with pytest.raises(ValueError, match=r"where shape \(2,\) does not broadcast to logits shape "
                       r"\(4, 3\)"):
      f(x, y, where=jnp.ones(2, bool))
    with pytest.raises(TypeError, match="where must be a boolean array"):
      f(x, y, where=jnp.ones((4, 3)))
    with pytest.raises(ValueError, match="reduction must be one of 'none', 'mean', 'sum'; "
                       "got 'avg'"):
      f(x, y, reduction="avg")
    with pytest.raises(ValueError, match=r"label_smoothing must be a scalar in \[0, 1\]"):
      f(x, y, label_smoothing=1.5)
    with pytest.raises(ValueError, match="axis=2 is out of range for logits of rank 2"):
      f(x, y, axis=2)
    with pytest.raises(TypeError, match="logits must be a real floating-point array"):
      f(jnp.zeros((4, 3), jnp.int32), y)

  def test_shape_errors_raise_at_trace_time_under_jit(self):
    with pytest.raises(ValueError, match="does not match"):
      jax.jit(jaxce.sparse_cross_entropy)(jnp.zeros((4, 3)), jnp.zeros((5,), jnp.int32))


  @parameterized.product(smoothing=[0.0, 0.1], weighted=[False, True])
  def test_huge_finite_logits_give_the_exact_loss_and_gradient(self, smoothing, weighted):
    x, y = _huge_problem(1e20)
    w = np.array([1.0, 2.0, 0.5, 1.5], np.float32) if weighted else None
    opts = dict(class_weights=w, label_smoothing=smoothing)
    expected = ref_sparse(x, y, weights=w, ls=smoothing)
    self.assertTrue(np.all(np.isfinite(expected)))
    _close_rel(jaxce.sparse_cross_entropy(x, y, **opts), expected, 1e-6)
    _close_rel(jax.jit(lambda x: jaxce.sparse_cross_entropy(x, y, **opts))(x), expected, 1e-6)
    grad = jax.grad(lambda x: jaxce.sparse_cross_entropy(x, y, **opts).sum())(jnp.asarray(x))
    # The softmax is one-hot at each row's max; the gradient is exact.
    wy = np.ones(3) if w is None else w[y]
    onehot_max = np.eye(4)[np.argmax(x, axis=1)]
    wc = np.ones(4) if w is None else w
    q = (1 - smoothing) * wy[:, None] * np.eye(4)[y] + smoothing * wc[None, :] / 4
    expected_grad = q.sum(1, keepdims=True) * onehot_max - q
    _close(grad, expected_grad, 1e-6, 1e-6)

  def test_huge_finite_float64_logits_give_the_exact_loss(self):
    with jax.enable_x64(True):
      x, y = _huge_problem(1e200, np.float64)
      got = jaxce.sparse_cross_entropy(x, y, label_smoothing=0.1)
      self.assertEqual(got.dtype, jnp.float64)
      _close_rel(got, ref_sparse(x, y, ls=0.1), 1e-12)

  @parameterized.parameters(*INT_DTYPES)
  def test_every_integer_label_dtype_means_the_same_classes(self, dtype):
    x, y = _problem_2d(3)
    y = np.array([1, 0, 2, 4], dtype)
    expected = ref_sparse(x, y.astype(np.int64))
    _close(jaxce.sparse_cross_entropy(x, y, ignore_index=-100), expected)
    jitted = jax.jit(functools.partial(jaxce.sparse_cross_entropy, ignore_index=-100))
    _close(jitted(x, jnp.asarray(y)), expected)

  @parameterized.parameters(np.uint8, np.uint16, np.int8)
  def test_negative_ignore_index_never_wraps_onto_a_class(self, dtype):
    # -100 is 156 as uint8 and 65436 as uint16: neither may be taken as ignored,
    # and with C = 200 (beyond int8) nothing may overflow.
    c = 200
    x = np.zeros((2, c), np.float32)
    y = np.array([156 % 128 if dtype == np.int8 else 156, 1]).astype(dtype)
    loss = jax.jit(functools.partial(jaxce.sparse_cross_entropy, ignore_index=-100))(x, y)
    _close(loss, [np.log(c), np.log(c)])
    y_big = np.array([65436, 1]).astype(np.uint16)
    with pytest.raises(ValueError, match=r"got 65436 at index \(0,\)"):
      jaxce.sparse_cross_entropy(x, y_big, ignore_index=-100)
    self.assertTrue(np.isnan(jax.jit(functools.partial(
        jaxce.sparse_cross_entropy, ignore_index=-100))(x, jnp.asarray(y_big))[0]))

  def test_64_bit_labels_are_never_truncated_into_another_class(self):
    x = np.zeros((2, 3), np.float32)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\); got 4294967297 at index"):
      jaxce.sparse_cross_entropy(x, np.array([2**32 + 1, 0], np.int64))
    with pytest.raises(ValueError, match=r"got 4294967296 at index"):
      jaxce.nll_loss(x, np.array([0, 2**32], np.int64))

  @parameterized.parameters("sparse", "nll")
  def test_bad_label_under_jit_gives_nan_loss_and_nan_gradient(self, which):
    x = jnp.asarray(_problem_2d(4)[0])
    y = jnp.array([0, 9, 1, 2])
    fn = jaxce.sparse_cross_entropy if which == "sparse" else jaxce.nll_loss
    loss = jax.jit(lambda x, y: fn(x, y))
    grad = jax.jit(jax.grad(lambda x, y: fn(x, y).sum()))(x, y)
    self.assertTrue(np.isnan(loss(x, y)[1]))
    self.assertTrue(np.any(np.isnan(grad[1])))
    self.assertTrue(np.all(np.isfinite(np.delete(np.asarray(grad), 1, axis=0))))
    # Rows the caller leaves out of its objective keep a clean zero gradient.
    clean = jax.jit(jax.grad(lambda x, y: fn(x, y)[0]))(x, y)
    _close(clean[1:], np.zeros((3, 5)))

  def test_gradients_reach_smoothing_z_loss_and_class_weights(self):
    x, y = _problem_2d(5)
    w = jnp.array([1.0, 2.0, 0.5, 1.5, 1.0])

    def ours(ls, z, w):
      return jaxce.sparse_cross_entropy(x, y, class_weights=w, label_smoothing=ls, z_loss=z,
                                        reduction="mean")

    def naive(ls, z, w):
      logp = jax.nn.log_softmax(x)
      lse = jax.nn.logsumexp(x, axis=-1)
      wy = w[y]
      per = ((1 - ls) * wy * -logp[jnp.arange(4), y] + ls * jnp.mean(w[None, :] * -logp, axis=-1)
             + z * lse**2)
      return per.sum() / wy.sum()

    got = jax.grad(ours, argnums=(0, 1, 2))(0.2, 0.01, w)
    want = jax.grad(naive, argnums=(0, 1, 2))(0.2, 0.01, w)
    for a, b in zip(got, want, strict=True):
      _close(a, b, 1e-5, 1e-6)
      self.assertTrue(np.all(np.asarray(a) != 0))

  def test_traced_options_out_of_their_domain_give_nan(self):
    x, y = _problem_2d(6)
    ls = jax.jit(lambda s: jaxce.sparse_cross_entropy(x, y, label_smoothing=s))
    z = jax.jit(lambda s: jaxce.sparse_cross_entropy(x, y, z_loss=s))
    for bad in (1.5, -0.1, float("nan")):
      self.assertTrue(np.all(np.isnan(ls(bad))))
    for bad in (-1.0, float("inf"), float("nan")):
      self.assertTrue(np.all(np.isnan(z(bad))))
    self.assertTrue(np.all(np.isfinite(ls(0.3))) and np.all(np.isfinite(z(0.3))))

  def test_option_types_are_validated_with_one_message_each(self):
    x, y = _problem_2d(7)
    f = jaxce.sparse_cross_entropy
    for bad in ("a", 1.5, True, None.__class__):
      with pytest.raises(TypeError, match="ignore_index must be an int or None; got"):
        f(x, y, ignore_index=bad)
    with pytest.raises(TypeError, match="ignore_index must be a Python int or None, not a traced"):
      jax.jit(lambda i: f(x, y, ignore_index=i))(0)
    with pytest.raises(ValueError, match=r"z_loss must be a finite scalar >= 0; got an array of "
                       r"shape \(1,\)"):
      f(x, y, z_loss=[0.1])
    for bad in ("0.1", None, 1j):
      with pytest.raises(TypeError, match=r"label_smoothing must be a scalar in \[0, 1\]; got"):
        f(x, y, label_smoothing=bad)
    for bad in (float("inf"), -1e-3, float("nan")):
      with pytest.raises(ValueError, match="z_loss must be a finite scalar >= 0; got"):
        f(x, y, z_loss=bad)
    with pytest.raises(ValueError, match="reduction must be one of 'none', 'mean', 'sum'"):
      f(x, y, reduction="Mean")
    for bad in (None, 3):
      with pytest.raises(TypeError, match="reduction must be a string, one of 'none', 'mean'"):
        f(x, y, reduction=bad)

  def test_complex_logits_raise_type_error(self):
    x, y = _problem_2d(8)
    with pytest.raises(TypeError, match="logits must be a real floating-point array, got dtype "
                       "complex64"):
      jaxce.sparse_cross_entropy(x.astype(np.complex64), y)

  def test_empty_batch_and_zero_total_weight_means_are_zero(self):
    empty = jaxce.sparse_cross_entropy(np.zeros((0, 3), np.float32), np.zeros(0, np.int32),
                                       reduction="mean")
    self.assertEqual(float(empty), 0.0)
    self.assertEqual(jaxce.sparse_cross_entropy(np.zeros((0, 3), np.float32),
                                                np.zeros(0, np.int32)).shape, (0,))
    x, y = _problem_2d(9)
    w = np.zeros(5, np.float32)
    fn = lambda x: jaxce.sparse_cross_entropy(x, y, class_weights=w, reduction="mean")
    self.assertEqual(float(fn(x)), 0.0)
    _close(jax.grad(fn)(jnp.asarray(x)), np.zeros_like(x))

  def test_float32_sum_of_a_few_hundred_terms_is_as_accurate_as_pytorch(self):
    # Only the reduction differs: each sum is compared with the float64 sum of
    # the same float32 per-example losses, over 30 random batches of 300.
    errors, torch_errors = [], []
    for seed in range(30):
      rng = np.random.default_rng(seed)
      x = (rng.normal(size=(300, 7)) * 0.1).astype(np.float32)
      y = rng.integers(0, 7, size=300)
      terms = np.asarray(jaxce.sparse_cross_entropy(x, y))
      exact = terms.astype(np.float64).sum()
      errors.append(abs(float(jaxce.sparse_cross_entropy(x, y, reduction="sum")) - exact) / exact)
      if torch is not None:
        torch_errors.append(abs(float(torch.tensor(terms).sum()) - exact) / exact)
    eps = np.finfo(np.float32).eps
    # Pairwise summation: ~0.3 eps on average here; XLA's plain float32 sum is ~0.43 eps.
    self.assertLess(np.mean(errors), 0.36 * eps)
    if torch_errors:
      self.assertLessEqual(np.mean(errors), np.mean(torch_errors))


class TestSparseCrossEntropyVariants(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_jit_equals_no_jit(self):
    rng = np.random.default_rng(8)
    x = rng.normal(size=(2, 5, 3)).astype(np.float32)
    y = rng.integers(0, 5, size=(2, 3))
    w = rng.uniform(0.5, 2.0, size=5).astype(np.float32)
    fn = self.variant(lambda x, y: jaxce.sparse_cross_entropy(
        x, y, axis=1, class_weights=w, label_smoothing=0.1, reduction="mean"))
    _close(fn(x, y), ref_sparse(x, y, axis=1, weights=w, ls=0.1, reduction="mean"))


# ---------------------------------------------------------------------------
# dense_cross_entropy
# ---------------------------------------------------------------------------


class TestDenseCrossEntropy(parameterized.TestCase):

  def test_tensorflow_example(self):
    logits = np.array([[4.0, 2.0, 1.0], [0.0, 5.0, 1.0]], np.float32)
    labels = np.array([[1.0, 0.0, 0.0], [0.0, 0.8, 0.2]], np.float32)
    loss = jaxce.dense_cross_entropy(logits, labels)
    _close(loss, ref_dense(logits, labels))
    _close(loss, [0.16984604, 0.82474494], atol=1e-6)

  def test_one_hot_labels_equal_sparse_loss(self):
    rng = np.random.default_rng(9)
    x = rng.normal(size=(6, 4)).astype(np.float32)
    y = rng.integers(0, 4, size=6)
    chex.assert_trees_all_close(
        jaxce.dense_cross_entropy(x, jax.nn.one_hot(y, 4), label_smoothing=0.2),
        jaxce.sparse_cross_entropy(x, y, label_smoothing=0.2), rtol=1e-6)

  @hypothesis.given(sparse_problems(), st.booleans())
  @SETTINGS
  def test_matches_float64_reference(self, problem, use_where):
    x, _, opts = problem
    rng = np.random.default_rng(x.size)
    axis = opts["axis"]
    t = np.moveaxis(rng.dirichlet(np.ones(x.shape[axis]), size=np.delete(x.shape, axis % x.ndim)),
                    -1, axis).astype(np.float32)
    where = rng.random(x.shape) < 0.7 if use_where else None
    loss = jax.jit(functools.partial(
        jaxce.dense_cross_entropy, axis=axis, class_weights=opts["class_weights"],
        label_smoothing=opts["label_smoothing"], reduction=opts["reduction"]))
    got = loss(x, t, where=where)
    expected = ref_dense(x, t, axis=axis, weights=opts["class_weights"], where=where,
                         ls=opts["label_smoothing"], reduction=opts["reduction"])
    _close(got, expected, 1e-4, 1e-4)

  @parameterized.product(reduction=["none", "mean", "sum"], smoothing=[0.0, 0.3],
                         weighted=[False, True])
  @needs_torch
  def test_matches_pytorch_probability_targets(self, reduction, smoothing, weighted):
    rng = np.random.default_rng(10)
    x = rng.normal(size=(6, 5, 3)).astype(np.float32)
    t = np.moveaxis(rng.dirichlet(np.ones(5), size=(6, 3)), -1, 1).astype(np.float32)
    w = rng.uniform(0.5, 2.0, size=5).astype(np.float32) if weighted else None
    xt = torch.tensor(x, requires_grad=True)
    expected = F.cross_entropy(xt, torch.tensor(t), weight=None if w is None else torch.tensor(w),
                               label_smoothing=smoothing, reduction=reduction)
    expected.sum().backward()
    loss = lambda x: jaxce.dense_cross_entropy(x, t, axis=1, class_weights=w,
                                               label_smoothing=smoothing, reduction=reduction)
    _close(loss(x), expected.detach().numpy(), 1e-5, 1e-6)
    _close(jax.grad(lambda x: loss(x).sum())(x), xt.grad.numpy(), 1e-5, 1e-6)

  def test_gradient_flows_to_labels(self):
    x = jnp.array([[1.0, 2.0, 3.0]])
    t = jnp.array([[0.2, 0.3, 0.5]])
    grad = jax.grad(lambda t: jaxce.dense_cross_entropy(x, t).sum())(t)
    _close(grad, -np.asarray(jax.nn.log_softmax(x)))

  def test_masking_equals_slicing(self):
    rng = np.random.default_rng(11)
    x = rng.normal(size=(3, 5)).astype(np.float32)
    t = rng.dirichlet(np.ones(5), size=3).astype(np.float32)
    keep = np.array([True, True, False, True, False])
    chex.assert_trees_all_close(
        jaxce.dense_cross_entropy(x, t, where=keep, label_smoothing=0.1),
        jaxce.dense_cross_entropy(x[:, keep], t[:, keep], label_smoothing=0.1), rtol=1e-6)
    rows = np.array([True, False, True])
    chex.assert_trees_all_close(
        jaxce.dense_cross_entropy(x, t, where=rows[:, None], reduction="mean"),
        jaxce.dense_cross_entropy(x[rows], t[rows], reduction="mean"), rtol=1e-6)

  def test_zero_mass_on_neg_inf_logit_is_finite_with_zero_gradient(self):
    x = jnp.array([[1.0, -jnp.inf, 2.0]])
    t = jnp.array([[0.5, 0.0, 0.5]])
    value, grad = jax.value_and_grad(lambda x: jaxce.dense_cross_entropy(x, t, label_smoothing=0.1)
                                     .sum())(x)
    _close(value, ref_dense(np.array([[1.0, 2.0]]), np.array([[0.5, 0.5]]), ls=0.1)[0])
    assert np.all(np.isfinite(grad)) and grad[0, 1] == 0.0

  def test_fully_masked_everything_gives_zero_mean_and_zero_grad(self):
    x = jnp.ones((2, 3))
    t = jnp.full((2, 3), 1 / 3)
    value, grad = jax.value_and_grad(lambda x: jaxce.dense_cross_entropy(
        x, t, where=jnp.zeros((2, 1), bool), reduction="mean"))(x)
    self.assertEqual(float(value), 0.0)
    np.testing.assert_array_equal(grad, 0.0)

  @parameterized.parameters(jnp.inf, jnp.nan)
  def test_inf_and_nan_logits_propagate_nan(self, bad):
    loss = jaxce.dense_cross_entropy(jnp.array([[0.0, bad]]), jnp.array([[0.5, 0.5]]))
    assert np.isnan(loss[0])

  def test_axis_equals_moveaxis_and_vmap_equals_loop(self):
    rng = np.random.default_rng(12)
    x = rng.normal(size=(3, 4, 2)).astype(np.float32)
    t = np.moveaxis(rng.dirichlet(np.ones(4), size=(3, 2)), -1, 1).astype(np.float32)
    chex.assert_trees_all_close(
        jaxce.dense_cross_entropy(x, t, axis=1),
        jaxce.dense_cross_entropy(np.moveaxis(x, 1, -1), np.moveaxis(t, 1, -1)), rtol=1e-6)
    fn = lambda x, t: jaxce.dense_cross_entropy(x, t, axis=0, reduction="mean")
    loop = np.stack([fn(x[i], t[i]) for i in range(3)])
    chex.assert_trees_all_close(jax.jit(jax.vmap(fn))(x, t), loop, rtol=1e-6)

  def test_gradients_pass_check_grads(self):
    rng = np.random.default_rng(13)
    x = jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)
    t = jnp.asarray(rng.dirichlet(np.ones(4), size=3), jnp.float32)
    w = jnp.asarray(rng.uniform(0.5, 2.0, size=4), jnp.float32)
    fn = lambda x, t: jaxce.dense_cross_entropy(x, t, class_weights=w, label_smoothing=0.2,
                                                reduction="mean")
    check_grads(fn, (x, t), order=1, modes=["rev"], atol=1e-2, rtol=1e-2)

  @parameterized.parameters(jnp.bfloat16, jnp.float16)
  def test_low_precision_logits_return_float32(self, dtype):
    rng = np.random.default_rng(14)
    x = jnp.asarray(rng.normal(size=(4, 300)) * 3, dtype)
    t = rng.dirichlet(np.ones(300), size=4).astype(np.float32)
    loss = jaxce.dense_cross_entropy(x, t)
    self.assertEqual(loss.dtype, jnp.float32)
    _close(loss, ref_dense(np.asarray(x, np.float64), t), 1e-5, 1e-5)

  def test_bad_inputs_raise_clear_errors(self):
    x = jnp.zeros((4, 3))
    f = jaxce.dense_cross_entropy
    with pytest.raises(TypeError, match="labels must be real floating-point probabilities, got "
                       "dtype int32"):
      f(x, jnp.zeros((4, 3), jnp.int32))
    with pytest.raises(ValueError, match=r"labels shape \(4,\) does not match logits \(4, 3\)"):
      f(x, jnp.zeros((4,)))
    with pytest.raises(ValueError, match=r"weights shape \(2,\) does not match"):
      f(x, x, class_weights=jnp.ones(2))
    with pytest.raises(ValueError, match=r"where shape \(4, 2\) does not broadcast"):
      f(x, x, where=jnp.ones((4, 2), bool))
    with pytest.raises(ValueError, match="reduction must be one of"):
      f(x, x, reduction="batchmean")


# ---------------------------------------------------------------------------
# nll_loss
# ---------------------------------------------------------------------------


  @parameterized.parameters(0.0, 0.1)
  def test_huge_finite_logits_give_the_exact_loss_and_gradient(self, smoothing):
    x, y = _huge_problem(1e20)
    t = np.eye(4, dtype=np.float32)[y]
    expected = ref_dense(x, t, ls=smoothing)
    self.assertTrue(np.all(np.isfinite(expected)))
    _close_rel(jaxce.dense_cross_entropy(x, t, label_smoothing=smoothing), expected, 1e-6)
    grad = jax.grad(lambda x: jaxce.dense_cross_entropy(x, t, label_smoothing=smoothing).sum())(
        jnp.asarray(x))
    q = (1 - smoothing) * t + smoothing / 4
    _close(grad, np.eye(4)[np.argmax(x, axis=1)] - q, 1e-6, 1e-6)

  def test_gradients_reach_smoothing_z_loss_weights_and_labels(self):
    rng = np.random.default_rng(11)
    x = jnp.asarray(rng.normal(size=(4, 5)), jnp.float32)
    t = jnp.asarray(rng.dirichlet(np.ones(5), size=4) * 0.9, jnp.float32)  # sums to 0.9

    def ours(ls, z, w, t):
      return jaxce.dense_cross_entropy(x, t, class_weights=w, label_smoothing=ls, z_loss=z,
                                       reduction="mean")

    def naive(ls, z, w, t):
      logp = jax.nn.log_softmax(x)
      q = ((1 - ls) * t + ls / 5) * w[None, :]
      return jnp.mean(-jnp.sum(q * logp, axis=-1) + z * jax.nn.logsumexp(x, axis=-1)**2)

    args = (0.2, 0.01, jnp.array([1.0, 2.0, 0.5, 1.5, 1.0]), t)
    got = jax.grad(ours, argnums=(0, 1, 2, 3))(*args)
    want = jax.grad(naive, argnums=(0, 1, 2, 3))(*args)
    for a, b in zip(got, want, strict=True):
      _close(a, b, 1e-5, 1e-6)
    # Labels that do not sum to 1: the exact derivative, not TensorFlow's softmax − labels.
    gx = jax.grad(lambda x: jaxce.dense_cross_entropy(x, t).sum())(x)
    _close(gx, 0.9 * jax.nn.softmax(x) - t, 1e-5, 1e-6)

  def test_traced_options_out_of_their_domain_give_nan(self):
    rng = np.random.default_rng(12)
    x = rng.normal(size=(3, 4)).astype(np.float32)
    t = rng.dirichlet(np.ones(4), size=3).astype(np.float32)
    ls = jax.jit(lambda s: jaxce.dense_cross_entropy(x, t, label_smoothing=s))
    z = jax.jit(lambda s: jaxce.dense_cross_entropy(x, t, z_loss=s))
    self.assertTrue(np.all(np.isnan(ls(1.5))) and np.all(np.isnan(z(-1.0))))
    self.assertTrue(np.all(np.isfinite(ls(0.5))) and np.all(np.isfinite(z(0.5))))

  def test_complex_inputs_raise_type_error(self):
    x = np.zeros((2, 3), np.float32)
    with pytest.raises(TypeError, match="logits must be a real floating-point array"):
      jaxce.dense_cross_entropy(x.astype(np.complex64), x)
    with pytest.raises(TypeError, match="labels must be real floating-point probabilities, got "
                       "dtype complex64"):
      jaxce.dense_cross_entropy(x, x.astype(np.complex64))


class TestNllLoss(parameterized.TestCase):

  @parameterized.parameters(
      ([[.3, .3, .4], [.3, .4, .3], [.1, .2, .7]], 1.3784),
      ([[.1, .2, .7], [.1, .7, .2], [.4, .3, .3]], 0.5432),
  )
  def test_reference_values(self, probs, expected):
    loss = jaxce.nll_loss(jnp.log(jnp.array(probs)), jnp.array([2, 1, 0]), axis=1,
                          reduction="mean")
    self.assertAlmostEqual(float(loss), expected, places=4)

  @parameterized.product(reduction=["none", "mean", "sum"], weighted=[False, True])
  @needs_torch
  def test_matches_pytorch(self, reduction, weighted):
    rng = np.random.default_rng(15)
    lp = np.log(np.moveaxis(rng.dirichlet(np.ones(4), size=(5, 2)), -1, 1)).astype(np.float32)
    y = rng.integers(0, 4, size=(5, 2))
    y[1, 1] = -100
    w = rng.uniform(0.5, 2.0, size=4).astype(np.float32) if weighted else None
    expected = F.nll_loss(torch.tensor(lp), torch.tensor(y), ignore_index=-100,
                          weight=None if w is None else torch.tensor(w), reduction=reduction)
    got = jaxce.nll_loss(lp, y, axis=1, class_weights=w, ignore_index=-100, reduction=reduction)
    _close(got, expected.numpy(), 1e-6, 1e-6)
    _close(got, ref_nll(lp, y, axis=1, weights=w, ignore_index=-100, reduction=reduction))

  def test_nll_of_log_softmax_equals_cross_entropy(self):
    rng = np.random.default_rng(16)
    x = rng.normal(size=(5, 7)).astype(np.float32)
    y = rng.integers(0, 7, size=5)
    chex.assert_trees_all_close(jaxce.nll_loss(jaxce.log_softmax(x), y, reduction="mean"),
                                jaxce.sparse_cross_entropy(x, y, reduction="mean"), rtol=1e-6)

  def test_all_ignored_is_zero_with_zero_gradient(self):
    value, grad = jax.value_and_grad(lambda lp: jaxce.nll_loss(
        lp, jnp.array([-1, -1]), ignore_index=-1, reduction="mean"))(jnp.zeros((2, 3)))
    self.assertEqual(float(value), 0.0)
    np.testing.assert_array_equal(grad, 0.0)

  def test_out_of_range_labels(self):
    with pytest.raises(ValueError, match=r"jaxce.nll_loss: labels must be in \[0, 3\).*got 3"):
      jaxce.nll_loss(jnp.zeros((2, 3)), jnp.array([0, 3]))
    assert np.isnan(jax.jit(jaxce.nll_loss)(jnp.zeros((2, 3)), jnp.array([0, 3]))[1])

  def test_gradients_and_vmap(self):
    rng = np.random.default_rng(17)
    lp = jnp.asarray(rng.normal(size=(3, 4, 5)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 5, size=(3, 4)))
    fn = lambda lp, y: jaxce.nll_loss(lp, y, reduction="mean")
    check_grads(lambda lp: fn(lp, y[0]), (lp[0],), order=1, modes=["rev"])
    loop = np.stack([fn(lp[i], y[i]) for i in range(3)])
    chex.assert_trees_all_close(jax.jit(jax.vmap(fn))(lp, y), loop, rtol=1e-6)

  def test_bad_inputs_raise_clear_errors(self):
    with pytest.raises(TypeError, match="jaxce.nll_loss: labels must be integer"):
      jaxce.nll_loss(jnp.zeros((2, 3)), jnp.zeros((2,)))
    with pytest.raises(ValueError, match=r"labels shape \(3,\) does not match log_probs without "
                       r"the class axis \(2,\)"):
      jaxce.nll_loss(jnp.zeros((2, 3)), jnp.zeros((3,), jnp.int32))
    with pytest.raises(ValueError, match="reduction must be one of"):
      jaxce.nll_loss(jnp.zeros((2, 3)), jnp.zeros((2,), jnp.int32), reduction="elementwise")

  def test_huge_finite_log_probs_and_every_label_dtype(self):
    x, y = _huge_problem(1e20)
    for dtype in INT_DTYPES:
      _close_rel(jaxce.nll_loss(x, y.astype(dtype), ignore_index=-100),
                 -x[np.arange(3), y].astype(np.float64), 1e-7)

  def test_complex_log_probs_raise_type_error(self):
    with pytest.raises(TypeError, match="log_probs must be a real floating-point array"):
      jaxce.nll_loss(np.zeros((2, 3), np.complex64), np.array([0, 1]))
