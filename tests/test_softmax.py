"""Tests for jaxce._softmax: softmax, log_softmax and logsumexp.

Compilation dominates the cost of these tests on CPU, so most checks go through
one jitted ``all_three`` on a handful of shapes; eager execution is exercised by
the ``without_jit`` variants, the known values and every error test.
"""

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

# Every property test uses this fixed seed (deterministic CI). Those drawing from
# `problems()` thereby see the same examples and share one compilation of
# `all_three` per example, which is most of their cost.
SETTINGS = hypothesis.settings(max_examples=8, deadline=None, database=None)
SEED = hypothesis.seed(20260101)
SHAPES = ((5,), (1,), (3, 4), (4, 1), (2, 3, 4), (3, 1, 2))
LOW_PRECISION = (("bfloat16", jnp.bfloat16), ("float16", jnp.float16))
INF = np.inf
SOFTMAX, LOG_SOFTMAX, LOGSUMEXP = 0, 1, 2
softmax = jax.jit(jaxce.softmax, static_argnames="axis")
log_softmax = jax.jit(jaxce.log_softmax, static_argnames="axis")
logsumexp = jax.jit(jaxce.logsumexp, static_argnames="axis")


# ---------------------------------------------------------------------------
# Independent float64 NumPy reference: slice out the kept entries of each row.
# ---------------------------------------------------------------------------


def ref_all(x, *, axis=-1, where=None):
  """Returns float64 ``(softmax, log_softmax, logsumexp)`` computed row by row.

  Each row along ``axis`` is reduced to its unmasked entries by boolean indexing,
  so masks mean slicing: masked entries get probability 0 (log-probability
  ``-inf``), and a row with nothing kept has ``logsumexp = -inf``.
  """
  x = np.asarray(x, np.float64)
  mask = np.ones(x.shape, bool) if where is None else np.broadcast_to(where, x.shape)
  xs, ms = np.moveaxis(x, axis, -1), np.moveaxis(mask, axis, -1)
  probs, logp = np.zeros(xs.shape), np.full(xs.shape, -INF)
  lse = np.full(xs.shape[:-1], -INF)
  for idx in np.ndindex(xs.shape[:-1]):
    kept = xs[idx][ms[idx]]
    if kept.size:
      top = kept.max()
      with np.errstate(invalid="ignore"):  # inf - inf: such rows are NaN
        lse[idx] = top + np.log(np.sum(np.exp(kept - top)))
        logp[idx + (ms[idx],)] = kept - lse[idx]
        probs[idx + (ms[idx],)] = np.exp(kept - lse[idx])
  return np.moveaxis(probs, -1, axis), np.moveaxis(logp, -1, axis), lse


@functools.partial(jax.jit, static_argnames="axis")
def all_three(x, where=None, *, axis=-1):
  return (
      jaxce.softmax(x, axis=axis, where=where),
      jaxce.log_softmax(x, axis=axis, where=where),
      jaxce.logsumexp(x, axis=axis, where=where),
  )


def rtol_for(dtype):
  """One ulp of a low-precision output dtype (its rounding); float32 accumulation otherwise."""
  return 1e-5 if dtype == np.float32 else float(jnp.finfo(dtype).eps)


def assert_close(actual, expected, rtol=1e-5, atol=1e-6):
  np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=rtol, atol=atol)


@st.composite
def problems(draw):
  """Random inputs: shape, class axis, dtype, scale, and an optional (broadcast) mask."""
  shape = draw(st.sampled_from(SHAPES))
  axis = draw(st.integers(-len(shape), len(shape) - 1))
  dtype = draw(st.sampled_from([np.float32, jnp.bfloat16, np.float16]))
  scale = draw(st.sampled_from([0.1, 3.0, 30.0]))
  rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
  x = (scale * rng.standard_normal(shape)).astype(np.float32).astype(dtype)
  where = None
  kind = draw(st.sampled_from(["none", "full", "broadcast"]))
  if kind == "full":
    where = rng.random(shape) < 0.7
  elif kind == "broadcast":  # size-1 dims, and fewer leading dims than x
    mshape = tuple(1 if rng.random() < 0.5 else d for d in shape)
    where = rng.random(mshape[draw(st.integers(0, len(shape) - 1)):]) < 0.7
  return x, axis, where


# Rows: plain, partially masked (the masked values are NaN and +inf, which must
# not leak), fully masked, partially -inf, all -inf, +inf, NaN.
EDGE_X = np.array(
    [
        [1.0, 2.0, 3.0, 4.0],
        [0.5, np.nan, 2.0, INF],
        [3.0, 1.0, -2.0, 0.0],
        [-INF, 1.0, -INF, 2.0],
        [-INF, -INF, -INF, -INF],
        [INF, 1.0, 2.0, 3.0],
        [np.nan, 1.0, 2.0, 3.0],
    ],
    np.float32,
)
EDGE_MASK = np.array([[True] * 4, [True, False, True, False], [False] * 4] + [[True] * 4] * 4)
GRAD_X = EDGE_X[:3]  # finite
GRAD_MASK = EDGE_MASK[:3] | np.eye(3, 4, dtype=bool)  # every row and column keeps an entry

# Hand cases, one row each: uniform, huge equal, huge spread, a -inf logit, one
# finite logit, very negative equal; and the same rows with the middle class masked.
HAND_X = np.array(
    [
        [0.0, 0.0, 0.0],
        [1000.0, 1000.0, 1000.0],
        [1e4, 0.0, -1e4],
        [np.log(3.0), 0.0, -INF],
        [7.0, -INF, -INF],
        [-1e4, -1e4, -1e4],
    ],
    np.float32,
)
HAND_MASK = np.array([True, False, True])
THIRD = np.full(3, 1 / 3)
LOG3 = np.log(3.0)
HAND_EXPECTED = (
    np.array([THIRD, THIRD, [1, 0, 0], [0.75, 0.25, 0], [1, 0, 0], THIRD]),
    np.array([-LOG3 * np.ones(3), -LOG3 * np.ones(3), [0, -1e4, -2e4],
              [np.log(0.75), np.log(0.25), -INF], [0, -INF, -INF], -LOG3 * np.ones(3)]),
    np.array([LOG3, 1000 + LOG3, 1e4, np.log(4.0), 7.0, -1e4 + LOG3]),
)
HAND_MASKED_EXPECTED = (
    np.array([[0.5, 0, 0.5], [0.5, 0, 0.5], [1, 0, 0], [1, 0, 0], [1, 0, 0], [0.5, 0, 0.5]]),
    np.array([[-np.log(2), -INF, -np.log(2)], [-np.log(2), -INF, -np.log(2)], [0, -INF, -2e4],
              [0, -INF, -INF], [0, -INF, -INF], [-np.log(2), -INF, -np.log(2)]]),
    np.array([np.log(2), 1000 + np.log(2), 1e4, LOG3, 7.0, -1e4 + np.log(2)]),
)


def check_reference(index, problem):
  """Output ``index`` of ``all_three`` against the float64 reference."""
  x, axis, where = problem
  out = all_three(x, where, axis=axis)[index]
  expected = ref_all(x, axis=axis, where=where)[index]
  chex.assert_shape(out, expected.shape)
  assert out.dtype == x.dtype
  # Low precision: one ulp of the output dtype. Log outputs: float32 cancellation.
  atol = 1e-6 if index == SOFTMAX else 2e-6 * (1 + np.max(np.abs(x.astype(np.float64))))
  assert_close(out, expected, rtol=rtol_for(x.dtype), atol=atol)


def check_jit_equals_no_jit(variant, fn, index):
  """Eager (``without_jit``) and jitted calls agree on every edge row, NaN rows included."""
  jitted_or_not = variant(lambda x, m: fn(x, where=m))
  chex.assert_trees_all_close(jitted_or_not(EDGE_X, EDGE_MASK), fn(EDGE_X, where=EDGE_MASK))
  expected = all_three(EDGE_X, EDGE_MASK)[index]
  chex.assert_trees_all_close(jitted_or_not(EDGE_X, EDGE_MASK), expected)


def check_low_precision(index, dtype):
  x = (3 * np.random.default_rng(0).standard_normal((3, 4))).astype(dtype)
  out = all_three(x)[index]
  assert out.dtype == dtype
  # Accumulated in float32: within half an ulp of the output dtype (+ float32 error).
  assert_close(out, ref_all(x)[index], rtol=float(jnp.finfo(dtype).eps) / 2 + 1e-6, atol=1e-7)


class _Shared:
  """Undecorated tests common to the three functions; each class sets ``fn`` and ``index``.

  (Decorated tests cannot live here: absl's parameterization and hypothesis both
  need the method defined on the test class itself.)
  """

  fn = None
  index = None  # position of this function's output in `all_three`

  def test_hand_cases(self):
    assert_close(all_three(HAND_X)[self.index], HAND_EXPECTED[self.index], rtol=1e-6, atol=1e-6)
    assert_close(all_three(HAND_X, HAND_MASK)[self.index], HAND_MASKED_EXPECTED[self.index],
                 rtol=1e-6, atol=1e-6)

  def test_vmap_equals_loop(self):
    fn = type(self).fn
    row_fn = jax.jit(lambda r, m: fn(r, where=m))
    batched = jax.jit(jax.vmap(row_fn))(EDGE_X, EDGE_MASK)
    looped = jnp.stack([row_fn(r, m) for r, m in zip(EDGE_X, EDGE_MASK, strict=True)])
    chex.assert_trees_all_close(batched, looped, atol=1e-6)
    # Batch on axis 1, classes on axis 0 of each slice.
    x = GRAD_X.T
    batched_t = jax.jit(jax.vmap(lambda r: fn(r, axis=0), in_axes=1, out_axes=-1))(x)
    chex.assert_trees_all_close(batched_t, all_three(x, axis=0)[self.index], atol=1e-6)

  def test_empty_class_axis(self):
    # Like PyTorch: softmax of nothing is empty, logsumexp of nothing is -inf.
    out = type(self).fn(jnp.zeros((3, 0)))
    if self.index == LOGSUMEXP:
      np.testing.assert_array_equal(out, np.full(3, -INF))
    else:
      chex.assert_shape(out, (3, 0))
    chex.assert_shape(all_three(np.zeros((0, 2), np.float32), axis=0)[self.index],
                      (0, 2) if self.index != LOGSUMEXP else (2,))

  def test_integer_input_gives_float32(self):
    out = all_three(np.array([2, 1, 0], np.int32))[self.index]
    assert out.dtype == jnp.float32
    assert_close(out, ref_all(np.array([2.0, 1.0, 0.0]))[self.index])

  # Bad input: exception type and message.

  def test_axis_out_of_range(self):
    with pytest.raises(ValueError, match=r"axis=2 is out of range for x of rank 2"):
      type(self).fn(jnp.zeros((2, 3)), axis=2)
    with pytest.raises(ValueError, match=r"axis=-3 is out of range for x of rank 2"):
      type(self).fn(jnp.zeros((2, 3)), axis=-3)

  def test_axis_not_an_int(self):
    with pytest.raises(TypeError, match=r"axis must be an int, got 1.0"):
      type(self).fn(jnp.zeros((2, 3)), axis=1.0)
    with pytest.raises(TypeError, match=r"axis must be an int, got True"):
      type(self).fn(jnp.zeros((2, 3)), axis=True)

  def test_scalar_input(self):
    with pytest.raises(ValueError, match=r"x must have at least one dimension"):
      type(self).fn(jnp.float32(1.0))

  def test_where_not_broadcastable_names_both_shapes(self):
    name = type(self).fn.__name__
    with pytest.raises(ValueError, match=rf"jaxce\.{name}: where shape \(4,\) does not "
                       r"broadcast to x shape \(2, 3\)"):
      type(self).fn(jnp.zeros((2, 3)), where=jnp.ones(4, bool))
    # Broadcasting that would grow x is refused too.
    with pytest.raises(ValueError, match=r"where shape \(2, 2, 3\) does not broadcast to x "
                       r"shape \(2, 3\)"):
      type(self).fn(jnp.zeros((2, 3)), where=jnp.ones((2, 2, 3), bool))

  def test_where_not_boolean(self):
    with pytest.raises(TypeError, match=r"where must be a boolean array, got dtype float32"):
      type(self).fn(jnp.zeros((2, 3)), where=jnp.ones((2, 3)))
    with pytest.raises(TypeError, match=r"where must be a boolean array, got dtype int32"):
      type(self).fn(jnp.zeros((2, 3)), where=jnp.ones((2, 3), jnp.int32))

  def test_not_array_like(self):
    with pytest.raises(TypeError, match=r"x must be array-like, got str"):
      type(self).fn("logits")

  def test_errors_raise_at_trace_time_under_jit(self):
    with pytest.raises(ValueError, match=r"where shape \(4,\) does not broadcast"):
      jax.jit(lambda x, m: type(self).fn(x, where=m))(jnp.zeros((2, 3)), jnp.ones(4, bool))

  def test_complex_input_raises_type_error(self):
    name = type(self).fn.__name__
    with pytest.raises(TypeError, match=rf"jaxce\.{name}: x must be a real array, got dtype "
                       r"complex64"):
      type(self).fn(jnp.zeros((2, 3), jnp.complex64))

  def test_huge_finite_logits_are_exact(self):
    x = np.array([[1e20, -1e20, 0.0], [3.0, 1e20, -1e20]], np.float32)
    assert_close(all_three(x)[self.index], ref_all(x.astype(np.float64))[self.index], rtol=1e-7,
                 atol=0)


class TestSoftmax(_Shared, chex.TestCase):

  fn = staticmethod(jaxce.softmax)
  index = SOFTMAX

  @SEED
  @hypothesis.given(problems())
  @SETTINGS
  def test_matches_float64_reference_over_shapes_axes_dtypes_masks(self, problem):
    check_reference(SOFTMAX, problem)

  @chex.variants(with_jit=True, without_jit=True)
  def test_jit_equals_no_jit(self):
    check_jit_equals_no_jit(self.variant, jaxce.softmax, SOFTMAX)

  @parameterized.named_parameters(*LOW_PRECISION)
  def test_low_precision_returns_input_dtype_accurately(self, dtype):
    check_low_precision(SOFTMAX, dtype)

  def test_known_values(self):
    out = softmax(jnp.array([2.0, 1.0, 0.1]))
    assert out.dtype == jnp.float32
    assert_close(out, [0.659, 0.242, 0.099], rtol=0, atol=1e-3)
    assert_close(out, [0.65900114, 0.24243297, 0.09856589])
    masked = softmax(jnp.array([2.0, 1.0, 0.1]), where=jnp.array([True, False, True]))
    assert_close(masked, [1 / (1 + np.exp(-1.9)), 0.0, 1 / (1 + np.exp(1.9))])

  @SEED
  @hypothesis.given(problems())
  @SETTINGS
  def test_axis_equals_moveaxis(self, problem):
    x, axis, where = problem
    moved_where = None if where is None else np.moveaxis(np.broadcast_to(where, x.shape), axis, -1)
    expected = all_three(np.moveaxis(x, axis, -1), moved_where, axis=-1)
    actual = all_three(x, where, axis=axis)
    rtol = rtol_for(x.dtype)
    assert_close(actual[0], np.moveaxis(np.asarray(expected[0], np.float64), -1, axis), rtol, 0)
    assert_close(actual[1], np.moveaxis(np.asarray(expected[1], np.float64), -1, axis), rtol,
                 1e-6)
    assert_close(actual[2], np.asarray(expected[2], np.float64), rtol, 1e-6)

  @SEED
  @hypothesis.given(st.sampled_from([(3, 4), (4, 1)]), st.integers(0, 2**32 - 1))
  @SETTINGS
  def test_masking_equals_slicing(self, shape, seed):
    rng = np.random.default_rng(seed)
    x = (3 * rng.standard_normal(shape)).astype(np.float32)
    mask = rng.random(shape) < 0.6
    mask[0] = False  # always a fully masked row
    x[~mask] = rng.choice([np.nan, INF, -INF, 1e30], size=(~mask).sum())  # must not leak
    probs, logp, lse = (np.asarray(a) for a in all_three(x, mask))
    for r in range(shape[0]):
      keep = mask[r]
      np.testing.assert_array_equal(probs[r][~keep], 0.0)
      np.testing.assert_array_equal(logp[r][~keep], -INF)
      if keep.any():
        sliced = all_three(x[r][keep])
        assert_close(probs[r][keep], sliced[0], rtol=1e-6, atol=0)
        assert_close(logp[r][keep], sliced[1], rtol=1e-6, atol=1e-6)
        assert_close(lse[r], sliced[2], rtol=1e-6, atol=1e-6)
      else:
        assert np.isneginf(lse[r])

  @SEED
  @hypothesis.given(problems())
  @SETTINGS
  def test_sums_to_one_and_log_softmax_is_log_of_softmax(self, problem):
    x, axis, where = problem
    probs, logp, _ = (np.asarray(a, np.float64) for a in all_three(x, where, axis=axis))
    kept = np.broadcast_to(True if where is None else where, x.shape).any(axis=axis)
    tol = 1e-5 if x.dtype == np.float32 else x.shape[axis] * float(jnp.finfo(x.dtype).eps)
    assert_close(probs.sum(axis=axis), np.where(kept, 1.0, 0.0), rtol=0, atol=tol)
    normal = probs > 16 * float(jnp.finfo(x.dtype).tiny)  # log is accurate there
    # The log of a value rounded to a relative ulp is off by up to that ulp, absolutely.
    assert_close(logp[normal], np.log(probs[normal]), rtol=rtol_for(x.dtype),
                 atol=rtol_for(x.dtype))

  def test_check_grads(self):
    def fn(x):  # plain, and masked along axis 0
      return jaxce.softmax(x), jaxce.softmax(x, axis=0, where=GRAD_MASK)

    check_grads(jax.jit(fn), (GRAD_X,), order=1, modes=["rev"], atol=1e-2, rtol=1e-2)

  def test_gradients_finite_and_zero_where_masked(self):
    x, mask = EDGE_X[:5], EDGE_MASK[:5]  # rows 5, 6 (+inf, NaN) have NaN values
    cot = jnp.arange(1.0, 1.0 + x.size).reshape(x.shape)
    loss = lambda x: jnp.sum(cot[:4] * jaxce.softmax(x, where=mask)[:4])  # noqa: E731
    grad = np.asarray(jax.jit(jax.grad(loss))(x))
    assert np.all(np.isfinite(grad)), grad
    np.testing.assert_array_equal(grad[~mask], 0.0)
    np.testing.assert_array_equal(grad[2], 0.0)  # fully masked row
    np.testing.assert_array_equal(grad[3][np.isneginf(x[3])], 0.0)  # -inf logits
    assert np.all(grad[3][np.isfinite(x[3])] != 0.0)

  def test_edge_rows(self):
    probs = np.asarray(jaxce.softmax(EDGE_X, where=EDGE_MASK))
    np.testing.assert_array_equal(probs[2], 0.0)  # fully masked row: 0, not NaN
    np.testing.assert_array_equal(probs[1][~EDGE_MASK[1]], 0.0)
    assert_close(probs[3], [0.0, 1 / (1 + np.e), 0.0, np.e / (1 + np.e)])
    assert np.all(np.isnan(probs[4:]))  # all -inf unmasked, +inf, NaN: no distribution
    assert_close(probs[:2].sum(-1), [1.0, 1.0])

  @parameterized.parameters(0, 1, 2)
  @needs_torch
  def test_matches_torch(self, dim):
    x = np.random.default_rng(1).standard_normal((3, 4, 5)).astype(np.float32) * 5
    expected = F.softmax(torch.from_numpy(x), dim=dim).numpy()
    assert_close(all_three(x, axis=dim)[0], expected, rtol=1e-5, atol=1e-7)


class TestLogSoftmax(_Shared, chex.TestCase):

  fn = staticmethod(jaxce.log_softmax)
  index = LOG_SOFTMAX

  @SEED
  @hypothesis.given(problems())
  @SETTINGS
  def test_matches_float64_reference_over_shapes_axes_dtypes_masks(self, problem):
    check_reference(LOG_SOFTMAX, problem)

  @chex.variants(with_jit=True, without_jit=True)
  def test_jit_equals_no_jit(self):
    check_jit_equals_no_jit(self.variant, jaxce.log_softmax, LOG_SOFTMAX)

  @parameterized.named_parameters(*LOW_PRECISION)
  def test_low_precision_returns_input_dtype_accurately(self, dtype):
    check_low_precision(LOG_SOFTMAX, dtype)

  def test_known_values(self):
    out = log_softmax(jnp.array([2.0, 1.0, 0.1]))
    assert out.dtype == jnp.float32
    assert_close(out, [-0.41703002, -1.41703002, -2.31703002])
    assert_close(out, np.log([0.65900114, 0.24243297, 0.09856589]))
    masked = log_softmax(jnp.array([2.0, 1.0, 0.1]), where=jnp.array([True, False, True]))
    assert_close(masked, [-np.log1p(np.exp(-1.9)), -INF, -np.log1p(np.exp(1.9))])

  def test_check_grads(self):
    def fn(x):  # plain, and masked along axis 0 (masked outputs are the constant -inf)
      masked = jaxce.log_softmax(x, axis=0, where=GRAD_MASK)
      return jaxce.log_softmax(x), jnp.where(GRAD_MASK, masked, 0.0)

    check_grads(jax.jit(fn), (GRAD_X,), order=1, modes=["rev"], atol=1e-2, rtol=1e-2)

  def test_gradients_finite_and_zero_where_masked(self):
    x, mask = EDGE_X[:5], EDGE_MASK[:5]
    cot = jnp.arange(1.0, 1.0 + x.size).reshape(x.shape)
    kept = mask & np.isfinite(x)  # the usual pattern: use the finite log-probabilities
    loss = lambda x: jnp.sum(jnp.where(kept, cot * jaxce.log_softmax(x, where=mask), 0.0))  # noqa: E731
    grad = np.asarray(jax.jit(jax.grad(loss))(x))
    assert np.all(np.isfinite(grad)), grad
    np.testing.assert_array_equal(grad[~mask], 0.0)
    np.testing.assert_array_equal(grad[2], 0.0)  # fully masked row
    np.testing.assert_array_equal(grad[3][np.isneginf(x[3])], 0.0)
    np.testing.assert_array_equal(grad[4], 0.0)  # all -inf row: nothing kept

  def test_edge_rows(self):
    logp = np.asarray(jaxce.log_softmax(EDGE_X, where=EDGE_MASK))
    np.testing.assert_array_equal(logp[2], -INF)  # fully masked row: -inf, not NaN
    np.testing.assert_array_equal(logp[1][~EDGE_MASK[1]], -INF)
    assert_close(logp[3], [-INF, -np.log1p(np.e), -INF, -np.log1p(np.exp(-1.0))])
    assert np.all(np.isnan(logp[4:]))  # all -inf unmasked, +inf, NaN
    assert np.all(np.isfinite(logp[0]))

  @parameterized.parameters(0, 1, 2)
  @needs_torch
  def test_matches_torch(self, dim):
    x = np.random.default_rng(1).standard_normal((3, 4, 5)).astype(np.float32) * 5
    expected = F.log_softmax(torch.from_numpy(x), dim=dim).numpy()
    assert_close(all_three(x, axis=dim)[1], expected, rtol=1e-5, atol=1e-5)


class TestLogsumexp(_Shared, chex.TestCase):

  fn = staticmethod(jaxce.logsumexp)
  index = LOGSUMEXP

  @SEED
  @hypothesis.given(problems())
  @SETTINGS
  def test_matches_float64_reference_over_shapes_axes_dtypes_masks(self, problem):
    check_reference(LOGSUMEXP, problem)

  @chex.variants(with_jit=True, without_jit=True)
  def test_jit_equals_no_jit(self):
    check_jit_equals_no_jit(self.variant, jaxce.logsumexp, LOGSUMEXP)

  @parameterized.named_parameters(*LOW_PRECISION)
  def test_low_precision_returns_input_dtype_accurately(self, dtype):
    check_low_precision(LOGSUMEXP, dtype)

  def test_known_values(self):
    out = logsumexp(jnp.array([2.0, 1.0, 0.1]))
    assert out.dtype == jnp.float32
    chex.assert_shape(out, ())
    assert_close(out, np.log(np.exp(2.0) + np.exp(1.0) + np.exp(0.1)))
    masked = logsumexp(jnp.array([2.0, 1.0, 0.1]), where=jnp.array([True, False, True]))
    assert_close(masked, np.log(np.exp(2.0) + np.exp(0.1)))
    assert_close(logsumexp(jnp.array([1.0, 2.0, 3.0])), 3.4076059644443806)

  def test_check_grads(self):
    def fn(x):  # plain, and masked along axis 0
      return jaxce.logsumexp(x), jaxce.logsumexp(x, axis=0, where=GRAD_MASK)

    check_grads(jax.jit(fn), (GRAD_X,), order=1, modes=["rev"], atol=1e-2, rtol=1e-2)

  def test_gradients_finite_and_zero_where_masked(self):
    x, mask = EDGE_X[:5], EDGE_MASK[:5]
    # Rows 2 (fully masked) and 4 (all -inf) have logsumexp -inf; their gradient is 0.
    cot = jnp.array([1.0, 2.0, 3.0, 4.0, 5.0])
    loss = lambda x: jnp.sum(cot * jaxce.logsumexp(x, where=mask))  # noqa: E731
    grad = np.asarray(jax.jit(jax.grad(loss))(x))
    assert np.all(np.isfinite(grad)), grad
    np.testing.assert_array_equal(grad[~mask], 0.0)
    np.testing.assert_array_equal(grad[2], 0.0)
    np.testing.assert_array_equal(grad[4], 0.0)
    assert_close(grad[3], 4 * np.array([0.0, 1 / (1 + np.e), 0.0, np.e / (1 + np.e)]))
    assert_close(grad[0], ref_all(x[0])[SOFTMAX])

  def test_edge_rows(self):
    lse = np.asarray(jaxce.logsumexp(EDGE_X, where=EDGE_MASK))
    assert np.isneginf(lse[2])  # fully masked
    assert_close(lse[3], np.log(np.e + np.e**2))  # -inf entries contribute nothing
    assert np.isneginf(lse[4])  # all -inf: log(0) = -inf
    assert np.isnan(lse[5]) and np.isnan(lse[6])  # +inf and NaN propagate NaN
    assert_close(lse[:2], ref_all(EDGE_X[:2], where=EDGE_MASK[:2])[LOGSUMEXP])

  def test_low_precision_long_row_accumulates_in_float32(self):
    # 2**16 bf16 entries: the result is the float64 value rounded to bf16.
    x = np.random.default_rng(0).standard_normal(2**16).astype(jnp.bfloat16)
    out = logsumexp(x)
    assert out.dtype == jnp.bfloat16
    expected = ref_all(x)[LOGSUMEXP]
    assert_close(out, expected, rtol=float(jnp.finfo(jnp.bfloat16).eps) / 2, atol=0)

  @parameterized.parameters(0, 1, 2)
  @needs_torch
  def test_matches_torch(self, dim):
    x = np.random.default_rng(1).standard_normal((3, 4, 5)).astype(np.float32) * 5
    expected = torch.logsumexp(torch.from_numpy(x), dim=dim).numpy()
    assert_close(all_three(x, axis=dim)[2], expected, rtol=1e-6, atol=1e-6)
