"""Tests for jaxce.linear_cross_entropy (blocked, custom-VJP linear cross-entropy)."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized
from jax.test_util import check_grads

import jaxce

N, D, V = 11, 6, 19  # V is prime: no chunk size below V divides it.


def _inputs(n=N, d=D, v=V, seed=0, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  hidden = rng.normal(size=(n, d)).astype(np.float32)
  weight = rng.normal(size=(d, v)).astype(np.float32)
  bias = rng.normal(size=(v,)).astype(np.float32)
  labels = rng.integers(0, v, size=(n,)).astype(np.int32)
  return (jnp.asarray(hidden, dtype), jnp.asarray(weight, dtype), jnp.asarray(bias, dtype),
          jnp.asarray(labels))


def _reference(hidden, weight, labels, bias=None, *, ignore_index=None, label_smoothing=0.0,
               z_loss=0.0, reduction="mean"):
  """Loss and gradients w.r.t. (hidden, weight, bias) by float64 autodiff of the naive formula."""

  def loss_fn(hidden, weight, bias):
    logits = hidden @ weight + (0.0 if bias is None else bias[None, :])
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    lse = jax.nn.logsumexp(logits, axis=-1)
    valid = np.ones(labels.shape, bool) if ignore_index is None else labels != ignore_index
    safe = np.where(valid, labels, 0)
    nll = -jnp.take_along_axis(log_probs, safe[:, None], axis=-1)[:, 0]
    smooth = -jnp.mean(log_probs, axis=-1)
    loss = (1 - label_smoothing) * nll + label_smoothing * smooth + z_loss * lse**2
    loss = jnp.where(valid, loss, 0.0)
    if reduction == "none":
      return loss
    if reduction == "sum":
      return jnp.sum(loss)
    return jnp.sum(loss) / max(int(valid.sum()), 1)

  labels = np.asarray(labels)
  with jax.enable_x64(True):
    args = [None if a is None else jnp.asarray(np.asarray(a, np.float64))
            for a in (hidden, weight, bias)]
    loss, vjp = jax.vjp(loss_fn, *args)
    # Cotangent 1 for scalars, a fixed non-uniform one for per-example losses.
    cot = jnp.ones_like(loss) if loss.ndim == 0 else jnp.linspace(0.5, 1.5, loss.size)
    grads = vjp(cot)
    return np.asarray(loss), [None if g is None else np.asarray(g) for g in grads], np.asarray(cot)


def _ours(hidden, weight, labels, bias=None, cot=None, **kwargs):
  """Loss and its VJP with ``cot`` (default ones), jitted (eager mode has its own test)."""

  @jax.jit
  def run(hidden, weight, bias, labels, cot):
    loss, vjp = jax.vjp(
        lambda h, w, b: jaxce.linear_cross_entropy(h, w, labels, bias=b, **kwargs),
        hidden, weight, bias)
    cot = jnp.ones_like(loss) if cot is None else cot.astype(loss.dtype)
    return loss, vjp(cot)

  return run(hidden, weight, bias, labels, None if cot is None else jnp.asarray(cot))


class LinearCrossEntropyTest(parameterized.TestCase):

  def test_known_values(self):
    hidden = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    weight = jnp.array([[2.0, 0.0, -1.0], [0.0, 1.0, 0.5]])
    labels = jnp.array([0, 1, 2])
    # Logits rows [2, 0, -1], [0, 1, 0.5], [2, 1, -0.5]; loss = lse - z_y.
    expected = np.array([
        np.log(np.exp(2) + 1 + np.exp(-1)) - 2,
        np.log(1 + np.exp(1) + np.exp(0.5)) - 1,
        np.log(np.exp(2) + np.exp(1) + np.exp(-0.5)) + 0.5,
    ])
    loss = jaxce.linear_cross_entropy(hidden, weight, labels, chunk_size=2, reduction="none")
    chex.assert_shape(loss, (3,))
    chex.assert_trees_all_close(loss, expected, rtol=1e-6)
    mean = jaxce.linear_cross_entropy(hidden, weight, labels, chunk_size=2)
    chex.assert_trees_all_close(mean, expected.mean(), rtol=1e-6)

  @parameterized.product(chunk_size=[1, 4, 19, 64], use_bias=[False, True])
  def test_matches_reference(self, chunk_size, use_bias):
    # V = 19: one column per block, a remainder block, one block, chunk_size > V.
    hidden, weight, bias, labels = _inputs()
    bias = bias if use_bias else None
    ref_loss, ref_grads, cot = _reference(hidden, weight, labels, bias, reduction="none")
    loss, grads = _ours(hidden, weight, labels, bias, cot=cot, chunk_size=chunk_size,
                        reduction="none")
    self.assertEqual(loss.dtype, jnp.float32)
    chex.assert_trees_all_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(grads, tuple(ref_grads), rtol=1e-5, atol=1e-6)

  @parameterized.parameters("mean", "sum")
  def test_reductions(self, reduction):
    hidden, weight, bias, labels = _inputs()
    ref_loss, ref_grads, _ = _reference(hidden, weight, labels, bias, reduction=reduction)
    loss, grads = _ours(hidden, weight, labels, bias, chunk_size=4, reduction=reduction)
    chex.assert_shape(loss, ())
    chex.assert_trees_all_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(grads, tuple(ref_grads), rtol=1e-5, atol=1e-6)

  def test_traced_hyperparameters(self):
    hidden, weight, bias, labels = _inputs()

    def fn(eps, z):
      return jaxce.linear_cross_entropy(hidden, weight, labels, bias=bias, chunk_size=4,
                                        label_smoothing=eps, z_loss=z)

    ref_loss, _, _ = _reference(hidden, weight, labels, bias, label_smoothing=0.2, z_loss=0.01)
    chex.assert_trees_all_close(jax.jit(fn)(0.2, 0.01), ref_loss, rtol=1e-5)

  @parameterized.parameters(
      dict(label_smoothing=0.1),
      dict(z_loss=1e-2),
      dict(label_smoothing=0.3, z_loss=1e-3, ignore_index=-100),
      dict(label_smoothing=1.0, reduction="none"),
      dict(ignore_index=3, z_loss=0.5, reduction="sum"),
  )
  def test_options_match_reference(self, **options):
    hidden, weight, bias, labels = _inputs()
    labels = labels.at[jnp.array([1, 5])].set(options.get("ignore_index", labels[1]))
    ref_loss, ref_grads, cot = _reference(hidden, weight, labels, bias, **options)
    loss, grads = _ours(hidden, weight, labels, bias, cot=cot, chunk_size=4, **options)
    chex.assert_trees_all_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(grads, tuple(ref_grads), rtol=1e-5, atol=1e-6)

  def test_ignored_rows_have_zero_loss_and_gradient(self):
    hidden, weight, bias, labels = _inputs()
    labels = labels.at[jnp.array([0, 4])].set(-100)
    loss, (d_hidden, _, _) = _ours(hidden, weight, labels, bias, chunk_size=5,
                                   ignore_index=-100, reduction="none")
    np.testing.assert_array_equal(loss[jnp.array([0, 4])], 0.0)
    np.testing.assert_array_equal(d_hidden[jnp.array([0, 4])], 0.0)
    # The mean leaves them out of the denominator.
    mean = jaxce.linear_cross_entropy(hidden, weight, labels, bias=bias, chunk_size=5,
                                      ignore_index=-100)
    chex.assert_trees_all_close(mean, jnp.sum(loss) / (N - 2), rtol=1e-6)

  @parameterized.parameters("mean", "sum", "none")
  def test_all_ignored_is_zero_with_zero_gradients(self, reduction):
    hidden, weight, bias, labels = _inputs()
    labels = jnp.full_like(labels, -1)
    loss, grads = _ours(hidden, weight, labels, bias, chunk_size=4, ignore_index=-1,
                        reduction=reduction)
    np.testing.assert_array_equal(loss, 0.0)
    for g in grads:
      np.testing.assert_array_equal(g, 0.0)

  @chex.variants(with_jit=True, without_jit=True)
  def test_jit_equals_no_jit(self):
    hidden, weight, bias, labels = _inputs()

    @self.variant
    def value_and_grad(hidden, weight, bias, labels):
      def fn(h, w, b):
        return jaxce.linear_cross_entropy(h, w, labels, bias=b, chunk_size=4,
                                          label_smoothing=0.1, z_loss=1e-3)

      return jax.value_and_grad(fn, argnums=(0, 1, 2))(hidden, weight, bias)

    ref_loss, ref_grads, _ = _reference(hidden, weight, labels, bias, label_smoothing=0.1,
                                        z_loss=1e-3)
    loss, grads = value_and_grad(hidden, weight, bias, labels)
    chex.assert_trees_all_close(loss, ref_loss, rtol=1e-5)
    chex.assert_trees_all_close(grads, tuple(ref_grads), rtol=1e-5, atol=1e-6)

  def test_vmap_equals_loop(self):
    batch = [_inputs(seed=s) for s in range(3)]
    hidden, weight, bias, labels = (jnp.stack(xs) for xs in zip(*batch, strict=True))

    def value_and_grad(hidden, weight, bias, labels):
      def fn(h, w, b):
        return jaxce.linear_cross_entropy(h, w, labels, bias=b, chunk_size=4)

      return jax.value_and_grad(fn, argnums=(0, 1, 2))(hidden, weight, bias)

    batched = jax.jit(jax.vmap(value_and_grad))(hidden, weight, bias, labels)
    looped = [jax.jit(value_and_grad)(*xs) for xs in batch]
    chex.assert_trees_all_close(batched, jax.tree.map(lambda *xs: jnp.stack(xs), *looped),
                                rtol=1e-6, atol=1e-7)

  def test_leading_dimensions_flatten(self):
    hidden, weight, bias, labels = _inputs(n=12)
    flat = jaxce.linear_cross_entropy(hidden, weight, labels, bias=bias, reduction="none")
    nested = jaxce.linear_cross_entropy(hidden.reshape(3, 4, D), weight, labels.reshape(3, 4),
                                        bias=bias, reduction="none")
    chex.assert_shape(nested, (3, 4))
    chex.assert_trees_all_close(nested.reshape(-1), flat)

  def test_check_grads(self):
    hidden, weight, bias, labels = _inputs(n=4, d=3, v=7)
    hidden, weight, bias = (x.astype(jnp.float32) for x in (hidden, weight, bias))

    def fn(h, w, b):
      return jaxce.linear_cross_entropy(h, w, labels, bias=b, chunk_size=3,
                                        label_smoothing=0.2, z_loss=0.1, reduction="sum")

    # A custom_vjp has no forward mode, so only reverse mode is checked.
    check_grads(fn, (hidden, weight, bias), order=1, modes=["rev"], atol=2e-2, rtol=2e-2,
                eps=1e-2)

  def test_second_order(self):
    hidden, weight, bias, labels = _inputs(n=3, d=2, v=5)

    def fn(h, w):
      return jaxce.linear_cross_entropy(h, w, labels, bias=bias, chunk_size=2, z_loss=0.1,
                                        label_smoothing=0.1)

    def ref(h, w):
      logits = h @ w + bias[None, :]
      lse = jax.nn.logsumexp(logits, axis=-1)
      log_probs = logits - lse[:, None]
      nll = -jnp.take_along_axis(log_probs, labels[:, None], axis=-1)[:, 0]
      return jnp.mean(0.9 * nll - 0.1 * jnp.mean(log_probs, -1) + 0.1 * lse**2)

    # Reverse-over-reverse and forward-over-reverse (jax.hessian) work ...
    def grad_of_grad(f):
      return jax.jit(jax.grad(lambda h, w: jnp.sum(jax.grad(f)(h, w) ** 2)))

    def hessian(f):
      return jax.jit(jax.hessian(f, argnums=(0, 1)))

    for transform in (grad_of_grad, hessian):
      chex.assert_trees_all_close(transform(fn)(hidden, weight), transform(ref)(hidden, weight),
                                  rtol=1e-4, atol=1e-5)
    # ... plain forward mode does not, as for every custom_vjp.
    with self.assertRaisesRegex(TypeError, "forward-mode"):
      jax.jvp(lambda h: fn(h, weight), (hidden,), (hidden,))

  @parameterized.parameters(jnp.bfloat16, jnp.float16)
  def test_low_precision_inputs(self, dtype):
    hidden, weight, bias, labels = _inputs(v=300, dtype=dtype)
    loss, grads = _ours(hidden, weight, labels, bias, chunk_size=128, z_loss=1e-3)
    self.assertEqual(loss.dtype, jnp.float32)
    self.assertEqual([g.dtype for g in grads], [dtype] * 3)
    # Against float64 on the same (rounded) inputs: only the gradient casts round.
    ref_loss, ref_grads, _ = _reference(hidden, weight, labels, bias, z_loss=1e-3)
    chex.assert_trees_all_close(loss, ref_loss, rtol=1e-5)
    for g, r in zip(grads, ref_grads, strict=True):
      np.testing.assert_allclose(np.asarray(g, np.float32), r, rtol=2e-2, atol=2e-3)

  def test_out_of_range_labels_raise_when_concrete(self):
    hidden, weight, _, labels = _inputs()
    for bad in (V, -1):
      with self.assertRaisesRegex(ValueError, rf"labels must be in \[0, {V}\).*got {bad}"):
        jaxce.linear_cross_entropy(hidden, weight, labels.at[2].set(bad))

  def test_out_of_range_labels_are_nan_under_jit(self):
    hidden, weight, bias, labels = _inputs()
    labels = labels.at[2].set(V).at[3].set(-2)  # -2 must not wrap to class V - 2.
    fn = jax.jit(lambda h, y: jaxce.linear_cross_entropy(h, weight, y, bias=bias, chunk_size=4,
                                                         reduction="none"))
    loss = fn(hidden, labels)
    self.assertTrue(np.isnan(loss[2]) and np.isnan(loss[3]))
    self.assertTrue(np.all(np.isfinite(np.delete(np.asarray(loss), [2, 3]))))
    ref_loss, _, _ = _reference(hidden, weight, labels.at[2].set(0).at[3].set(0), bias,
                                reduction="none")
    np.testing.assert_allclose(np.delete(np.asarray(loss), [2, 3]), np.delete(ref_loss, [2, 3]),
                               rtol=1e-5)

  @parameterized.named_parameters(
      ("weight_depth", dict(weight=np.zeros((D + 1, V), np.float32)), ValueError,
       r"weight shape \(7, 19\).*hidden shape is \(11, 6\)"),
      ("weight_rank", dict(weight=np.zeros((D,), np.float32)), ValueError, r"weight shape \(6,\)"),
      ("labels_shape", dict(labels=np.zeros((N + 1,), np.int32)), ValueError,
       r"labels shape \(12,\) does not match hidden.shape\[:-1\] \(11,\)"),
      ("bias_shape", dict(bias=np.zeros((V + 1,), np.float32)), ValueError,
       r"bias shape \(20,\) does not match"),
      ("scalar_hidden", dict(hidden=np.float32(1.0)), ValueError, "hidden must have shape"),
      ("float_labels", dict(labels=np.zeros((N,), np.float32)), TypeError,
       "labels must be integer"),
      ("int_hidden", dict(hidden=np.zeros((N, D), np.int32)), TypeError,
       "hidden must be a floating-point"),
      ("int_weight", dict(weight=np.zeros((D, V), np.int32)), TypeError,
       "weight must be a floating-point"),
      ("int_bias", dict(bias=np.zeros((V,), np.int32)), TypeError,
       "bias must be a floating-point"),
      ("chunk_zero", dict(chunk_size=0), ValueError, "chunk_size must be a positive int; got 0"),
      ("chunk_float", dict(chunk_size=2.0), ValueError, "chunk_size must be a positive int"),
      ("chunk_bool", dict(chunk_size=True), ValueError, "chunk_size must be a positive int"),
      ("reduction", dict(reduction="avg"), ValueError, "'none', 'mean', 'sum'; got 'avg'"),
      ("smoothing", dict(label_smoothing=1.5), ValueError, "label_smoothing must be"),
      ("z_loss", dict(z_loss=-1.0), ValueError, "z_loss must be a non-negative scalar"),
      ("ignore_index", dict(ignore_index=1.5), TypeError, "ignore_index must be an int"),
  )
  def test_bad_inputs(self, overrides, error, message):
    hidden, weight, _, labels = _inputs()
    kwargs = dict(hidden=hidden, weight=weight, labels=labels) | overrides
    with self.assertRaisesRegex(error, message):
      jaxce.linear_cross_entropy(**kwargs)

  def test_temporary_memory_far_below_naive(self):
    n, d, v, chunk = 2048, 64, 16384, 512
    shapes = (jax.ShapeDtypeStruct((n, d), jnp.float32), jax.ShapeDtypeStruct((d, v), jnp.float32),
              jax.ShapeDtypeStruct((n,), jnp.int32))

    def naive(h, w, y):
      logits = h @ w
      return jnp.mean(jax.nn.logsumexp(logits, -1)
                      - jnp.take_along_axis(logits, y[:, None], -1)[:, 0])

    def ours(h, w, y):
      return jaxce.linear_cross_entropy(h, w, y, chunk_size=chunk)

    def temp_bytes(fn):
      compiled = jax.jit(jax.value_and_grad(fn, argnums=(0, 1))).lower(*shapes).compile()
      return compiled.memory_analysis().temp_size_in_bytes

    logits_bytes = n * v * 4
    self.assertGreaterEqual(temp_bytes(naive), logits_bytes)
    # About two float32 [n, chunk] blocks: 1/16 of the logits here.
    self.assertLess(temp_bytes(ours), logits_bytes / 8)


if __name__ == "__main__":
  absltest.main()
