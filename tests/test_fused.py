"""Tests for jaxce._fused: hand-written gradients equal autodiff of the plain formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

import jaxce


def naive_sparse(x, y, w, smoothing, z):
  """Autodiff reference: the textbook formula, classes last, no masks."""
  logp = jax.nn.log_softmax(x, axis=-1)
  lse = jax.nn.logsumexp(x, axis=-1)
  nll = -jnp.take_along_axis(logp, y[:, None], axis=-1)[:, 0]
  smooth = -jnp.mean(w[None, :] * logp, axis=-1)
  return jnp.sum((1 - smoothing) * w[y] * nll + smoothing * smooth + z * lse**2) / jnp.sum(w[y])


def naive_dense(x, t, w, z):
  logp = jax.nn.log_softmax(x, axis=-1)
  lse = jax.nn.logsumexp(x, axis=-1)
  return jnp.mean(-jnp.sum(w[None, :] * t * logp, axis=-1) + z * lse**2)


def _problem(seed, n=6, c=7):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(n, c)) * 2, jnp.float32)
  y = jnp.asarray(rng.integers(0, c, size=n))
  w = jnp.asarray(rng.uniform(0.5, 2.0, size=c), jnp.float32)
  t = jnp.asarray(rng.dirichlet(np.ones(c), size=n), jnp.float32)
  return x, y, w, t


def _close(a, b, tol=2e-5):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol)


class TestSparseRows(parameterized.TestCase):

  @parameterized.product(smoothing=[0.0, 0.25], z=[0.0, 1e-2])
  def test_gradients_equal_autodiff_of_reference(self, smoothing, z):
    x, y, w, _ = _problem(0)

    def fused(x, w, s):
      return jaxce.sparse_cross_entropy(x, y, weights=w, label_smoothing=s, z_loss=z,
                                        reduction="mean")

    ref = jax.grad(lambda x, w: naive_sparse(x, y, w, smoothing, z), argnums=(0, 1))(x, w)
    got = jax.grad(fused, argnums=(0, 1))(x, w, smoothing)
    _close(fused(x, w, smoothing), naive_sparse(x, y, w, smoothing, z))
    _close(got[0], ref[0])
    _close(got[1], ref[1])

  def test_gradient_with_respect_to_label_smoothing(self):
    x, y, w, _ = _problem(1)
    got = jax.grad(lambda s: jaxce.sparse_cross_entropy(x, y, weights=w, label_smoothing=s,
                                                        reduction="mean"))(0.3)
    _close(got, jax.grad(lambda s: naive_sparse(x, y, w, s, 0.0))(0.3))

  def test_z_loss_adds_z_times_lse_squared(self):
    x, y, _, _ = _problem(2)
    base = jaxce.sparse_cross_entropy(x, y)
    lse = jax.nn.logsumexp(x, axis=-1)
    _close(jaxce.sparse_cross_entropy(x, y, z_loss=0.1), base + 0.1 * lse**2)
    grad = jax.grad(lambda x: jaxce.sparse_cross_entropy(x, y, z_loss=0.1).sum())(x)
    expected = (1 + 0.2 * lse[:, None]) * jax.nn.softmax(x) - jax.nn.one_hot(y, x.shape[1])
    _close(grad, expected)

  def test_z_loss_skips_ignored_examples(self):
    x, y, _, _ = _problem(3)
    y = y.at[0].set(-100)
    loss = jaxce.sparse_cross_entropy(x, y, ignore_index=-100, z_loss=0.5)
    self.assertEqual(float(loss[0]), 0.0)

  def test_second_order_reverse_over_reverse_matches_reference(self):
    x, y, w, _ = _problem(4)
    v = jnp.asarray(np.random.default_rng(5).normal(size=x.shape), jnp.float32)

    def hvp(loss):
      return jax.grad(lambda x: jnp.vdot(jax.grad(loss)(x), v))(x)

    fused = lambda x: jaxce.sparse_cross_entropy(x, y, weights=w, label_smoothing=0.1,
                                                 z_loss=1e-2, reduction="mean")
    _close(hvp(fused), hvp(lambda x: naive_sparse(x, y, w, 0.1, 1e-2)), 1e-4)

  def test_hessian_matches_reference(self):
    x, y, w, _ = _problem(6, n=3, c=4)
    fused = lambda x: jaxce.sparse_cross_entropy(x, y, weights=w, label_smoothing=0.1,
                                                 reduction="mean")
    _close(jax.hessian(fused)(x), jax.hessian(lambda x: naive_sparse(x, y, w, 0.1, 0.0))(x), 1e-4)

  def test_forward_mode_raises_clear_error(self):
    x, y, _, _ = _problem(6)
    with pytest.raises(TypeError, match="can't apply forward-mode autodiff"):
      jax.jvp(lambda x: jaxce.sparse_cross_entropy(x, y, reduction="sum"), (x,), (x,))

  def test_bf16_logits_take_at_most_one_float32_copy(self):
    n, c = 256, 4096
    x = jnp.zeros((n, c), jnp.bfloat16)
    y = jnp.zeros((n,), jnp.int32)
    f = jax.jit(jax.value_and_grad(lambda x: jaxce.sparse_cross_entropy(x, y, reduction="mean")))
    temp = f.lower(x).compile().memory_analysis().temp_size_in_bytes
    # The kernel saves per-row statistics only; on CPU, XLA's reduction
    # emitter takes one float32 copy of bf16 logits (n·c·4 bytes), no more.
    self.assertLessEqual(temp, n * c * 4 + 64 * 1024)
    loss, grad = f(x)
    self.assertEqual(grad.dtype, jnp.bfloat16)
    _close(loss, np.log(c), 1e-6)


class TestDenseRows(parameterized.TestCase):

  @parameterized.parameters(0.0, 1e-2)
  def test_gradients_equal_autodiff_of_reference(self, z):
    x, _, w, t = _problem(7)
    fused = lambda x, t, w: jaxce.dense_cross_entropy(x, t, weights=w, z_loss=z, reduction="mean")
    ref = jax.grad(lambda x, t, w: naive_dense(x, t, w, z), argnums=(0, 1, 2))(x, t, w)
    got = jax.grad(fused, argnums=(0, 1, 2))(x, t, w)
    _close(fused(x, t, w), naive_dense(x, t, w, z))
    for a, b in zip(got, ref):
      _close(a, b)

  def test_second_order_reverse_over_reverse_matches_reference(self):
    x, _, w, t = _problem(8)
    v = jnp.asarray(np.random.default_rng(9).normal(size=x.shape), jnp.float32)
    hvp = lambda loss: jax.grad(lambda x: jnp.vdot(jax.grad(loss)(x), v))(x)
    fused = lambda x: jaxce.dense_cross_entropy(x, t, weights=w, z_loss=1e-2, reduction="mean")
    _close(hvp(fused), hvp(lambda x: naive_dense(x, t, w, 1e-2)), 1e-4)

  def test_negative_z_loss_is_rejected(self):
    x, _, _, t = _problem(10)
    with pytest.raises(ValueError, match="z_loss must be a non-negative scalar; got -1.0"):
      jaxce.dense_cross_entropy(x, t, z_loss=-1.0)
