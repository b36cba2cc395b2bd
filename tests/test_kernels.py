"""Tests for jaxce._kernels: hand-written gradients equal autodiff of the plain formulas."""

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
      return jaxce.sparse_cross_entropy(x, y, class_weights=w, label_smoothing=s, z_loss=z,
                                        reduction="mean")

    ref = jax.grad(lambda x, w: naive_sparse(x, y, w, smoothing, z), argnums=(0, 1))(x, w)
    got = jax.grad(fused, argnums=(0, 1))(x, w, smoothing)
    _close(fused(x, w, smoothing), naive_sparse(x, y, w, smoothing, z))
    _close(got[0], ref[0])
    _close(got[1], ref[1])

  def test_gradient_with_respect_to_label_smoothing(self):
    x, y, w, _ = _problem(1)
    got = jax.grad(lambda s: jaxce.sparse_cross_entropy(x, y, class_weights=w, label_smoothing=s,
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

    fused = lambda x: jaxce.sparse_cross_entropy(x, y, class_weights=w, label_smoothing=0.1,
                                                 z_loss=1e-2, reduction="mean")
    _close(hvp(fused), hvp(lambda x: naive_sparse(x, y, w, 0.1, 1e-2)), 1e-4)

  def test_hessian_matches_reference(self):
    x, y, w, _ = _problem(6, n=3, c=4)
    fused = lambda x: jaxce.sparse_cross_entropy(x, y, class_weights=w, label_smoothing=0.1,
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


class TestSparseRowsPivot(parameterized.TestCase):
  """The label-logit pivot, its fallback to the row max, and the buffers XLA keeps."""

  def _overflowing(self, seed=11):
    x, y, w, _ = _problem(seed)
    # Row 2 has a logit 200 above its label's: exp(x - x_y) overflows float32.
    return x.at[2, (int(y[2]) + 1) % x.shape[1]].set(200.0), y, w

  @parameterized.product(smoothing=[0.0, 0.2], z=[0.0, 1e-3])
  def test_overflowing_rows_match_reference_through_row_max_fallback(self, smoothing, z):
    x, y, w = self._overflowing()
    fused = lambda x, w: jaxce.sparse_cross_entropy(x, y, class_weights=w,
                                                    label_smoothing=smoothing, z_loss=z,
                                                    reduction="mean")
    naive = lambda x, w: naive_sparse(x, y, w, smoothing, z)
    for f in (fused, jax.jit(fused)):
      self.assertTrue(np.isfinite(float(f(x, w))))
      _close(f(x, w), naive(x, w))
      got, ref = jax.grad(f, argnums=(0, 1))(x, w), jax.grad(naive, argnums=(0, 1))(x, w)
      _close(got[0], ref[0])
      _close(got[1], ref[1])

  def test_vmap_with_one_overflowing_member_matches_unbatched_calls(self):
    x, y, _ = self._overflowing()
    xs, ys = jnp.stack([x, x.at[2].set(0.0)]), jnp.stack([y, y])
    loss_and_grad = jax.value_and_grad(lambda x, y: jaxce.sparse_cross_entropy(x, y).sum())
    got = jax.jit(jax.vmap(loss_and_grad))(xs, ys)
    for i in range(2):
      want = loss_and_grad(xs[i], ys[i])
      _close(got[0][i], want[0])
      _close(got[1][i], want[1])
    _close(got[0][0], naive_sparse(x, y, jnp.ones(x.shape[1]), 0.0, 0.0) * x.shape[0])

  def test_hessian_through_the_fallback_matches_reference(self):
    x, y, w, _ = _problem(12, n=3, c=4)
    x = x.at[0, (int(y[0]) + 1) % 4].set(150.0)
    fused = lambda x: jaxce.sparse_cross_entropy(x, y, class_weights=w, reduction="mean")
    _close(jax.hessian(fused)(x), jax.hessian(lambda x: naive_sparse(x, y, w, 0.0, 0.0))(x), 1e-4)

  def test_ignored_rows_with_overflowing_logits_give_zero_loss_and_gradient(self):
    x, y, _ = self._overflowing()
    y = y.at[2].set(-100)  # the overflowing row is ignored
    f = lambda x: jaxce.sparse_cross_entropy(x, y, ignore_index=-100, z_loss=1e-3).sum()
    loss, grad = jax.jit(jax.value_and_grad(f))(x)
    self.assertTrue(np.isfinite(float(loss)))
    np.testing.assert_array_equal(np.asarray(grad[2]), 0.0)
    keep = np.arange(x.shape[0]) != 2
    _close(jax.grad(f)(x)[keep], jax.grad(lambda x: jaxce.sparse_cross_entropy(
        x[keep], y[keep], z_loss=1e-3).sum())(x)[keep])

  def test_loss_is_shift_invariant_at_large_offsets(self):
    # The label term is log Σ exp(x − x_y) itself, not (x_y + log s) − x_y,
    # so a large common offset does not round the loss away.
    x, y, _, _ = _problem(13)
    x = jnp.round(x * 64) / 64  # multiples of 1/64: x + 3000 is exact in float32
    base = jaxce.sparse_cross_entropy(x, y)
    np.testing.assert_allclose(np.asarray(jaxce.sparse_cross_entropy(x + 3000.0, y)),
                               np.asarray(base), rtol=1e-6)

  def test_bf16_overflowing_rows_fall_back_and_return_bf16_gradients(self):
    x, y, w = self._overflowing()
    f = lambda x: jaxce.sparse_cross_entropy(x, y, class_weights=w, reduction="mean")
    loss, grad = jax.jit(jax.value_and_grad(f))(x.astype(jnp.bfloat16))
    self.assertEqual(grad.dtype, jnp.bfloat16)
    xr = x.astype(jnp.bfloat16).astype(jnp.float32)
    _close(loss, naive_sparse(xr, y, w, 0.0, 0.0), 1e-5)
    _close(grad.astype(jnp.float32), jax.grad(lambda x: naive_sparse(x, y, w, 0.0, 0.0))(xr), 1e-2)

  @parameterized.named_parameters(
      ("rows", (512, 1024), None),
      ("leading_axes", (4, 128, 1024), None),
      ("vmapped", (4, 128, 1024), "vmap"),
  )
  def test_fused_loss_and_gradient_keep_no_logits_sized_temporary(self, shape, how):
    # exp(x − x_y) is written into the gradient's own buffer, scaled and
    # scattered in place: no [N, C] temporary besides the output.
    x = jnp.zeros(shape, jnp.float32)
    y = jnp.zeros(shape[:-1], jnp.int32)
    loss = lambda x, y: jaxce.sparse_cross_entropy(x, y, reduction="mean")
    if how == "vmap":
      loss = lambda x, y, f=loss: jax.vmap(f)(x, y).mean()
    f = jax.jit(jax.value_and_grad(loss))
    temp = f.lower(x, y).compile().memory_analysis().temp_size_in_bytes
    self.assertLess(temp, x.size * 4 // 8)


  def test_in_a_training_step_holds_the_logits_and_one_buffer_of_their_size(self):
    # Logits from a matmul: the kept exp(x − x_y) is one [N, C] buffer beside
    # them and becomes the gradient in place (optax holds the same two).
    n, d, c = 256, 32, 4096
    h, w = jnp.zeros((n, d)), jnp.zeros((d, c))
    y = jnp.zeros((n,), jnp.int32)
    step = jax.jit(jax.grad(
        lambda h, w: jaxce.sparse_cross_entropy(h @ w, y, reduction="mean"), argnums=(0, 1)))
    temp = step.lower(h, w).compile().memory_analysis().temp_size_in_bytes
    self.assertLessEqual(temp, 2 * n * c * 4 + 64 * 1024)


class TestDenseRows(parameterized.TestCase):

  @parameterized.parameters(0.0, 1e-2)
  def test_gradients_equal_autodiff_of_reference(self, z):
    x, _, w, t = _problem(7)
    fused = lambda x, t, w: jaxce.dense_cross_entropy(x, t, class_weights=w, z_loss=z,
                                                      reduction="mean")
    ref = jax.grad(lambda x, t, w: naive_dense(x, t, w, z), argnums=(0, 1, 2))(x, t, w)
    got = jax.grad(fused, argnums=(0, 1, 2))(x, t, w)
    _close(fused(x, t, w), naive_dense(x, t, w, z))
    for a, b in zip(got, ref, strict=True):
      _close(a, b)

  def test_second_order_reverse_over_reverse_matches_reference(self):
    x, _, w, t = _problem(8)
    v = jnp.asarray(np.random.default_rng(9).normal(size=x.shape), jnp.float32)
    hvp = lambda loss: jax.grad(lambda x: jnp.vdot(jax.grad(loss)(x), v))(x)
    fused = lambda x: jaxce.dense_cross_entropy(x, t, class_weights=w, z_loss=1e-2,
                                                reduction="mean")
    _close(hvp(fused), hvp(lambda x: naive_dense(x, t, w, 1e-2)), 1e-4)

  def test_negative_z_loss_is_rejected(self):
    x, _, _, t = _problem(10)
    with pytest.raises(ValueError, match="z_loss must be a finite scalar >= 0; got -1.0"):
      jaxce.dense_cross_entropy(x, t, z_loss=-1.0)
