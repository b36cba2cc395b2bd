"""Tests for jaxce._core: the shared row statistics, label resolution and block gradient."""

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized

from jaxce import _core

SETTINGS = hypothesis.settings(max_examples=30, deadline=None, derandomize=True)

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
    blocks = [_core.logits_grad(e[:, s:s + 4], scales, None, possible=possible[:, s:s + 4],
                                weights=w[s:s + 4]) for s in range(0, 10, 4)]
    label_term = jax.nn.one_hot(y, 10) * scales.at_label[:, None]
    _close(jnp.concatenate(blocks, axis=1) - label_term, whole)

    def loss(x):
      stats, _ = _core.row_stats(x)
      nll = stats.lse - x[jnp.arange(6), y]
      sm = _core.smooth_stats(x, stats.shift, w) if smoothing else None
      return jnp.sum(g * _core.target_loss(target, stats, nll, sm))

    _close(whole, jax.grad(loss)(x), 2e-6)
