"""Tests for jaxce._core: the shared row statistics, label resolution and block gradient."""

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from jaxce import _core

SETTINGS = hypothesis.settings(max_examples=30, deadline=None, derandomize=True)
INT_DTYPES = (np.int8, np.int16, np.int32, np.uint8, np.uint16, np.uint32)


def _close(a, b, tol=1e-6):
  np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=tol,
                             atol=tol)


def _lse64(x):
  x = np.asarray(x, np.float64)
  m = np.max(x, axis=-1, keepdims=True)
  m = np.where(np.isfinite(m), m, 0.0)
  with np.errstate(divide="ignore"):
    return (m + np.log(np.sum(np.exp(x - m), axis=-1, keepdims=True)))[..., 0]


class TestRowStats(parameterized.TestCase):

  @hypothesis.given(st.integers(0, 2**16), st.sampled_from([1.0, 30.0, 1e20]))
  @SETTINGS
  def test_lse_matches_float64_reference(self, seed, scale):
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=(5, 7)) * scale).astype(np.float32)
    x[0, :3] = -np.inf
    stats, e = _core.row_stats(jnp.asarray(x))
    _close(stats.lse, _lse64(x), 1e-6)
    _close(np.sum(e, axis=-1), stats.total)

  def test_rows_without_mass_are_neg_inf_and_finite_inside(self):
    stats, _ = _core.row_stats(jnp.full((2, 3), -jnp.inf))
    np.testing.assert_array_equal(stats.lse, [-np.inf, -np.inf])
    np.testing.assert_array_equal(stats.safe_lse, [0.0, 0.0])
    self.assertFalse(np.any(stats.has_mass))

  @hypothesis.given(st.integers(0, 2**16), st.integers(1, 9))
  @SETTINGS
  def test_merging_blocks_equals_the_whole_row(self, seed, split):
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=(4, 10)) * 40).astype(np.float32)
    x[1, :split] = -np.inf  # a block with no mass
    left, _ = _core.row_stats(jnp.asarray(x[:, :split]))
    right, _ = _core.row_stats(jnp.asarray(x[:, split:]))
    merged = _core.merge_stats(_core.merge_stats(_core.empty_stats(4, jnp.float32), left), right)
    _close(merged.lse, _lse64(x), 1e-6)


class TestResolveLabels(parameterized.TestCase):

  @parameterized.product(dtype=INT_DTYPES, ignore_index=[None, -100, 0, 300])
  def test_every_integer_dtype_agrees_with_an_exact_reference(self, dtype, ignore_index):
    info = np.iinfo(dtype)
    values = np.array([0, 1, 2, 5, info.max, info.min, 156, 255, 299], np.int64)
    labels = values.clip(info.min, info.max).astype(dtype)
    for c in (3, 200, 70000):
      lab = jax.jit(lambda y, c=c: _core.resolve_labels(y, c, ignore_index))(labels)
      wide = labels.astype(np.int64)
      ignored = np.zeros(len(wide), bool) if ignore_index is None else wide == ignore_index
      in_range = (wide >= 0) & (wide < c)
      np.testing.assert_array_equal(lab.keep, ~ignored)
      np.testing.assert_array_equal(lab.bad, ~ignored & ~in_range)
      np.testing.assert_array_equal(lab.index, np.where(in_range, wide, 0))

  def test_mask_hiding_the_label_or_the_whole_row(self):
    mask = jnp.array([[True, False, True], [False, False, False], [True, True, True]])
    lab = _core.resolve_labels(jnp.array([1, 0, 2]), 3, None, mask)
    np.testing.assert_array_equal(lab.keep, [True, False, True])
    np.testing.assert_array_equal(lab.bad, [True, False, False])
    np.testing.assert_array_equal(lab.live, [False, False, True])

  def test_check_labels_names_the_first_bad_label_and_counts_them(self):
    with pytest.raises(ValueError, match=r"f: labels must be in \[0, 3\) or equal ignore_index "
                       r"\(-1\); got 9 at index \(1, 0\) \(2 bad label\(s\)\)"):
      _core.check_labels(np.array([[0, 1], [9, 7]]), 3, -1, None, "f")
    with pytest.raises(ValueError, match=r"and be a class that `where` keeps; got 1"):
      _core.check_labels(np.array([1]), 3, None, np.array([[True, False, True]]), "f")
    _core.check_labels(np.array([0, -1, 2], np.int64), 3, -1, None, "f")  # no error


class TestNanWhere(parameterized.TestCase):

  def test_value_and_gradient_are_nan_only_where_bad_and_used(self):
    bad = jnp.array([False, True, True])
    value = jnp.array([1.0, 2.0, 3.0])
    np.testing.assert_array_equal(np.isnan(_core.nan_where(bad, value)), [False, True, True])
    g = jax.grad(lambda v: jnp.sum(_core.nan_where(bad, v) * jnp.array([1.0, 1.0, 0.0])))(value)
    np.testing.assert_array_equal(np.isnan(g), [False, True, False])
    self.assertEqual(float(g[0]), 1.0)
    self.assertEqual(float(g[2]), 0.0)


class TestLogitsGrad(parameterized.TestCase):

  @parameterized.parameters(0.0, 0.3)
  def test_blocks_assemble_the_whole_row_gradient(self, smoothing):
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(6, 10)) * 3, jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, size=6))
    w = jnp.asarray(rng.uniform(0.5, 2.0, size=10), jnp.float32)
    g = jnp.asarray(rng.uniform(0.5, 1.5, size=6), jnp.float32)
    target = _core.Target(w[y] * (1 - smoothing), jnp.full(6, smoothing) if smoothing else None,
                          jnp.full(6, 0.01))
    stats, e = _core.row_stats(x)
    smooth = _core.smooth_stats(x, stats.shift, w) if smoothing else None
    scales = _core.grad_scales(target, stats, smooth, g)
    possible = jnp.ones(x.shape, bool)
    whole = _core.logits_grad(e, scales, y, possible=possible, weights=w)
    blocks = [_core.logits_grad(e[:, s:s + 4], scales, y, possible=possible[:, s:s + 4],
                                weights=w[s:s + 4], start=s) for s in range(0, 10, 4)]
    _close(jnp.concatenate(blocks, axis=1), whole)

    def loss(x):
      stats, _ = _core.row_stats(x)
      nll = stats.lse - x[jnp.arange(6), y]
      sm = _core.smooth_stats(x, stats.shift, w) if smoothing else None
      return jnp.sum(g * _core.target_loss(target, stats, nll, sm))

    _close(whole, jax.grad(loss)(x), 2e-6)
