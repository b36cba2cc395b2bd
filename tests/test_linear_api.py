"""linear_cross_entropy (api.py): semantics against the reference, validation, platform defaults."""

from __future__ import annotations

import itertools
from unittest import mock

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest
from absl.testing import parameterized
from jax import export
from jax.test_util import check_grads
from linear_helpers import IGNORE
from linear_helpers import D
from linear_helpers import N
from linear_helpers import V
from linear_helpers import cotangent
from linear_helpers import make_inputs
from linear_helpers import option_set
from linear_helpers import ours_and_ref
from linear_helpers import temp_bytes
from linear_helpers import value_and_grads

import jaxce
from jaxce._linear import api
from jaxce._linear import reference
from jaxce._linear import sharded


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
    loss = jaxce.linear_cross_entropy(hidden, weight, labels, chunk_size=2)
    chex.assert_shape(loss, (3,))  # reduction="none" is the default, as everywhere in jaxce
    chex.assert_trees_all_close(loss, expected, rtol=1e-6)
    mean = jaxce.linear_cross_entropy(hidden, weight, labels, chunk_size=2, reduction="mean")
    chex.assert_trees_all_close(mean, expected.mean(), rtol=1e-6)

  @parameterized.parameters("none", "mean", "sum")
  def test_matches_sparse_for_every_option_combination(self, reduction):
    # linear_cross_entropy(h, W, y, bias=b, **opts) == sparse_cross_entropy(h @ W + b, y, **opts):
    # values and gradients w.r.t. h, W, b for all 2^5 sets of class_weights, ignore_index,
    # label_smoothing, where, z_loss (labels hit ignore_index and masked rows), for "none" (the
    # recompute path) and "mean" (the fused path); "sum" runs the same fused kernel as "mean"
    # and gets the sets that differ in every option. All sets of a reduction are compiled as one
    # program (one compilation each would take minutes).
    hidden, weight, bias, labels = make_inputs()
    labels = labels.at[jnp.array([2, 7])].set(IGNORE)
    flag_sets = list(itertools.product([False, True], repeat=5))
    if reduction == "sum":
      flag_sets = [(False,) * 5, (True,) * 5, (True, False, True, False, True),
                   (False, True, False, True, False)]
    sets = [option_set(*flags, reduction) for flags in flag_sets]

    results = jax.jit(lambda h, w, b: [ours_and_ref(h, w, b, labels, **o) for o in sets])(
        hidden, weight, bias)
    for options, (ours, ref) in zip(sets, results, strict=True):
      with self.subTest(**{k: v is not None for k, v in options.items() if k != "reduction"}):
        chex.assert_trees_all_close(ours, ref, rtol=2e-5, atol=2e-6)

  @parameterized.parameters("none", "mean")
  def test_option_gradients_are_true(self, reduction):
    # Gradients w.r.t. label_smoothing, z_loss and class_weights equal the sparse loss's (and are
    # not 0, issue 8), on both the fused and the recompute path.
    hidden, weight, bias, labels = make_inputs()
    class_weights = jnp.linspace(0.5, 2.0, V)

    def loss(fn):
      def f(eps, z, cw):
        out = fn(eps, z, cw)
        return jnp.sum(out * cotangent()) if out.ndim else out
      return jax.jit(jax.grad(f, argnums=(0, 1, 2)))

    ours = loss(lambda eps, z, cw: jaxce.linear_cross_entropy(
        hidden, weight, labels, bias=bias, class_weights=cw, label_smoothing=eps, z_loss=z,
        reduction=reduction, chunk_size=4, token_chunk_size=4))
    ref = loss(lambda eps, z, cw: reference.linear_cross_entropy(
        hidden, weight, labels, bias=bias, class_weights=cw, label_smoothing=eps, z_loss=z,
        reduction=reduction))
    got = ours(0.2, 0.01, class_weights)
    chex.assert_trees_all_close(got, ref(0.2, 0.01, class_weights), rtol=2e-5, atol=2e-6)
    self.assertTrue(all(np.all(np.asarray(g) != 0) for g in got[:2]))

  def test_traced_options_out_of_domain_are_nan(self):
    hidden, weight, _, labels = make_inputs()
    fn = jax.jit(lambda eps, z: jaxce.linear_cross_entropy(hidden, weight, labels,
                                                           label_smoothing=eps, z_loss=z))
    self.assertTrue(np.all(np.isnan(fn(1.5, 0.0))))
    self.assertTrue(np.all(np.isnan(fn(0.1, -1.0))))
    self.assertTrue(np.all(np.isfinite(fn(0.1, 0.1))))

  def test_where_equals_slicing(self):
    hidden, weight, bias, labels = make_inputs()
    keep = np.arange(N) % 3 != 0

    def run(hidden):
      masked = jax.value_and_grad(lambda h: jaxce.linear_cross_entropy(
          h, weight, labels, bias=bias, where=keep, reduction="mean"))(hidden)
      sliced = jax.value_and_grad(lambda h: jaxce.linear_cross_entropy(
          h[keep], weight, labels[keep], bias=bias, reduction="mean"))(hidden)
      return masked, sliced, jaxce.linear_cross_entropy(hidden, weight, labels, where=keep)

    masked, sliced, loss = jax.jit(run)(hidden)
    chex.assert_trees_all_close(masked, sliced, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(loss[~keep], 0.0)

  @parameterized.parameters("none", "mean", "sum")
  def test_all_ignored_is_zero_with_zero_gradients(self, reduction):
    hidden, weight, bias, labels = make_inputs()
    labels = jnp.full_like(labels, -1)
    loss, grads = jax.jit(lambda h, w, b: value_and_grads(
        lambda h, w, b: jaxce.linear_cross_entropy(h, w, labels, bias=b, ignore_index=-1,
                                                   reduction=reduction),
        h, w, b, cotangent()))(hidden, weight, bias)
    np.testing.assert_array_equal(loss, 0.0)
    for g in grads:
      np.testing.assert_array_equal(g, 0.0)

  @parameterized.parameters("none", "mean")
  def test_bad_labels_under_jit_are_nan_with_nan_gradients(self, reduction):
    hidden, weight, bias, labels = make_inputs()
    labels = labels.at[2].set(V).at[3].set(-2)  # -2 must not wrap to class V - 2.

    @jax.jit
    def run(h, labels):
      fn = lambda h: jaxce.linear_cross_entropy(h, weight, labels, bias=bias, chunk_size=4,
                                                reduction=reduction)
      return value_and_grads(lambda h, w, b: fn(h), h, weight, bias, cotangent())

    loss, (d_hidden, _, _) = run(hidden, labels)
    nan_rows = np.isnan(np.asarray(d_hidden)).any(axis=1)
    if reduction == "none":
      self.assertTrue(np.isnan(loss[2]) and np.isnan(loss[3]))
      np.testing.assert_allclose(np.delete(np.asarray(loss), [2, 3]),
                                 np.delete(np.asarray(run(hidden, labels.at[2].set(0).at[3].set(
                                     0))[0]), [2, 3]), rtol=1e-6)
      np.testing.assert_array_equal(nan_rows, np.isin(np.arange(N), [2, 3]))
    else:
      self.assertTrue(np.isnan(loss) and nan_rows[2] and nan_rows[3])

  def test_unused_bad_row_leaves_other_gradients_clean(self):
    hidden, weight, bias, labels = make_inputs()
    labels = labels.at[2].set(V)
    cot = cotangent().at[2].set(0.0)
    _, (d_hidden, d_weight, _) = jax.jit(lambda h, y: value_and_grads(
        lambda h, w, b: jaxce.linear_cross_entropy(h, w, y, bias=b), h, weight, bias,
        cot))(hidden, labels)
    self.assertTrue(np.all(np.isfinite(d_hidden)) and np.all(np.isfinite(d_weight)))

  def test_huge_finite_logits_give_the_exact_loss(self):
    # Logits ~1e20 in float32: the loss is exact and finite (no 0·overflow, no lse² term).
    hidden = jnp.array([[1e10], [1e10], [-1e10]], jnp.float32)
    weight = jnp.array([[1e10, -1e10, 0.0, 2e10]], jnp.float32)
    labels = jnp.array([1, 3, 2])
    for options in (dict(), dict(label_smoothing=0.1), dict(class_weights=jnp.ones(4))):
      ours = jaxce.linear_cross_entropy(hidden, weight, labels, chunk_size=2, **options)
      ref = jaxce.sparse_cross_entropy(hidden @ weight, labels, **options)
      self.assertTrue(np.all(np.isfinite(ours)))
      chex.assert_trees_all_close(ours, ref, rtol=1e-6)
    np.testing.assert_allclose(
        jaxce.linear_cross_entropy(hidden, weight, labels, chunk_size=2), [3e20, 0.0, 1e20],
        rtol=1e-6)

  def test_minus_inf_bias_is_an_impossible_class(self):
    hidden, weight, bias, labels = make_inputs()
    bias = bias.at[jnp.array([0, 9])].set(-jnp.inf)
    labels = jnp.where((labels == 0) | (labels == 9), 1, labels)
    def run(hidden, weight, bias):
      return [ours_and_ref(hidden, weight, bias, labels, dict(chunk_size=4),
                            label_smoothing=0.2, reduction=reduction)
              for reduction in ("none", "mean")]

    for ours, ref in jax.jit(run)(hidden, weight, bias):
      chex.assert_trees_all_close(ours, ref, rtol=2e-5, atol=2e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_jit_equals_no_jit(self):
    hidden, weight, bias, labels = make_inputs()

    @self.variant
    def value_and_grad(hidden, weight, bias, labels):
      def fn(h, w, b):
        return jaxce.linear_cross_entropy(h, w, labels, bias=b, chunk_size=4, label_smoothing=0.1,
                                          z_loss=1e-3, reduction="mean")

      return jax.value_and_grad(fn, argnums=(0, 1, 2))(hidden, weight, bias)

    ref = jax.value_and_grad(lambda h, w, b: reference.linear_cross_entropy(
        h, w, labels, bias=b, label_smoothing=0.1, z_loss=1e-3, reduction="mean"),
                             argnums=(0, 1, 2))(hidden, weight, bias)
    chex.assert_trees_all_close(value_and_grad(hidden, weight, bias, labels), ref, rtol=2e-5,
                                atol=2e-6)

  def test_repeated_eager_calls_do_not_retrace(self):
    hidden, weight, _, labels = make_inputs()
    jaxce.linear_cross_entropy(hidden, weight, labels, reduction="mean")
    before = api._linear._cache_size()
    for _ in range(3):
      jaxce.linear_cross_entropy(hidden, weight, labels + 0, reduction="mean")
    self.assertEqual(api._linear._cache_size(), before)

  def test_vmap_equals_loop(self):
    batch = [make_inputs(seed=s) for s in range(3)]
    hidden, weight, bias, labels = (jnp.stack(xs) for xs in zip(*batch, strict=True))

    def value_and_grad(hidden, weight, bias, labels):
      def fn(h, w, b):
        return jaxce.linear_cross_entropy(h, w, labels, bias=b, chunk_size=4, reduction="mean")

      return jax.value_and_grad(fn, argnums=(0, 1, 2))(hidden, weight, bias)

    batched = jax.jit(jax.vmap(value_and_grad))(hidden, weight, bias, labels)
    looped = [jax.jit(value_and_grad)(*xs) for xs in batch]
    chex.assert_trees_all_close(batched, jax.tree.map(lambda *xs: jnp.stack(xs), *looped),
                                rtol=1e-6, atol=1e-7)

  def test_leading_dimensions_flatten(self):
    hidden, weight, bias, labels = make_inputs(n=12)
    flat = jaxce.linear_cross_entropy(hidden, weight, labels, bias=bias)
    nested = jaxce.linear_cross_entropy(hidden.reshape(3, 4, D), weight, labels.reshape(3, 4),
                                        bias=bias)
    chex.assert_shape(nested, (3, 4))
    chex.assert_trees_all_close(nested.reshape(-1), flat)

  def test_check_grads(self):
    hidden, weight, bias, labels = make_inputs(n=4, d=3, v=7)

    def fn(h, w, b):
      loss = jaxce.linear_cross_entropy(h, w, labels, bias=b, chunk_size=3, label_smoothing=0.2,
                                        z_loss=0.1)
      return jnp.sum(loss * jnp.arange(1.0, 5.0))

    # A custom_vjp has no forward mode, so only reverse mode is checked.
    check_grads(fn, (hidden, weight, bias), order=1, modes=["rev"], atol=2e-2, rtol=2e-2,
                eps=1e-2)

  def test_second_order(self):
    hidden, weight, bias, labels = make_inputs(n=3, d=2, v=5)
    options = dict(bias=bias, z_loss=0.1, label_smoothing=0.1)

    def scalar(loss):
      return jnp.sum(loss * jnp.array([1.0, 2.0, 3.0])) if loss.ndim else loss

    def fns(reduction):
      ours = lambda h, w: scalar(jaxce.linear_cross_entropy(h, w, labels, chunk_size=2,
                                                            reduction=reduction, **options))
      ref = lambda h, w: scalar(reference.linear_cross_entropy(h, w, labels, reduction=reduction,
                                                               **options))
      return ours, ref

    # Forward-over-reverse (jax.hessian) of the fused path, reverse-over-reverse of the recompute
    # path ...
    hessian = lambda f: jax.hessian(f, argnums=(0, 1))(hidden, weight)
    grad_of_grad = lambda f: jax.grad(lambda h, w: jnp.sum(jax.grad(f)(h, w) ** 2))(hidden, weight)
    (mean, mean_ref), (none, none_ref) = fns("mean"), fns("none")
    got, want = jax.jit(lambda: ((hessian(mean), grad_of_grad(none)),
                                 (hessian(mean_ref), grad_of_grad(none_ref))))()
    chex.assert_trees_all_close(got, want, rtol=1e-4, atol=1e-5)
    # ... plain forward mode does not, as for every custom_vjp.
    with self.assertRaisesRegex(TypeError, "forward-mode"):
      jax.jvp(lambda h: mean(h, weight), (hidden,), (hidden,))

  @parameterized.parameters((jnp.bfloat16, "mean"), (jnp.float16, "none"))
  def test_low_precisionmake_inputs(self, dtype, reduction):
    hidden, weight, bias, labels = make_inputs(v=300, dtype=dtype)
    loss, grads = jax.jit(lambda h, w, b: value_and_grads(
        lambda h, w, b: jaxce.linear_cross_entropy(h, w, labels, bias=b, chunk_size=128,
                                                   z_loss=1e-3, reduction=reduction),
        h, w, b, cotangent()))(hidden, weight, bias)
    self.assertEqual(loss.dtype, jnp.float32)
    self.assertEqual([g.dtype for g in grads], [dtype] * 3)
    # Against float32 on the same (rounded) inputs: the logits are accumulated in float32, so only
    # the gradient casts round.
    up = [x.astype(jnp.float32) for x in (hidden, weight, bias)]
    ref_loss, ref_grads = value_and_grads(
        lambda h, w, b: reference.linear_cross_entropy(h, w, labels, bias=b, z_loss=1e-3,
                                                       reduction=reduction),
        *up, cotangent())
    chex.assert_trees_all_close(loss, ref_loss, rtol=1e-5)
    for g, r in zip(grads, ref_grads, strict=True):
      np.testing.assert_allclose(np.asarray(g, np.float32), r, rtol=2e-2, atol=2e-3)

  def test_label_dtypes(self):
    hidden, weight, _, labels = make_inputs()
    ref = jaxce.linear_cross_entropy(hidden, weight, labels)
    for dtype in (np.uint8, np.int16, np.int64):
      chex.assert_trees_all_close(
          jaxce.linear_cross_entropy(hidden, weight, np.asarray(labels).astype(dtype)), ref)
    # ignore_index=-100 never wraps onto a class of an unsigned dtype.
    chex.assert_trees_all_close(jaxce.linear_cross_entropy(
        hidden, weight, np.asarray(labels).astype(np.uint8), ignore_index=-100), ref)
    with self.assertRaisesRegex(ValueError, r"labels must be in \[0, 19\).*got 429496[0-9]+ "):
      jaxce.linear_cross_entropy(hidden, weight, np.asarray(labels).astype(np.int64) + 2**32)

  def test_out_of_range_labels_raise_when_concrete(self):
    hidden, weight, _, labels = make_inputs()
    for bad in (V, -1):
      with self.assertRaisesRegex(ValueError, rf"labels must be in \[0, {V}\).*got {bad}"):
        jaxce.linear_cross_entropy(hidden, weight, labels.at[2].set(bad))
    # A masked-out example's label is not checked (it is not used).
    mask = np.arange(N) != 2
    loss = jaxce.linear_cross_entropy(hidden, weight, labels.at[2].set(V), where=mask)
    self.assertEqual(float(loss[2]), 0.0)

  def test_checked_raises_under_jit(self):
    hidden, weight, _, labels = make_inputs()
    fn = jaxce.checked(jax.jit(lambda y: jaxce.linear_cross_entropy(hidden, weight, y)))
    with self.assertRaisesRegex(Exception, "linear_cross_entropy: labels must be in"):
      fn(labels.at[0].set(V))

  @parameterized.named_parameters(
      ("weight_depth", dict(weight=np.zeros((D + 1, V), np.float32)), ValueError,
       r"weight shape \(7, 19\).*hidden shape is \(11, 6\)"),
      ("weight_rank", dict(weight=np.zeros((D,), np.float32)), ValueError, r"weight shape \(6,\)"),
      ("no_classes", dict(weight=np.zeros((D, 0), np.float32)), ValueError,
       "at least one class"),
      ("labels_shape", dict(labels=np.zeros((N + 1,), np.int32)), ValueError,
       r"labels shape \(12,\) does not match hidden.shape\[:-1\] \(11,\)"),
      ("bias_shape", dict(bias=np.zeros((V + 1,), np.float32)), ValueError,
       r"bias shape \(20,\) does not match"),
      ("class_weights_shape", dict(class_weights=np.ones((V + 1,), np.float32)), ValueError,
       r"shape \(20,\) does not match the number of classes"),
      ("where_shape", dict(where=np.ones((N + 1,), bool)), ValueError, "where shape"),
      ("where_dtype", dict(where=np.ones((N,), np.int32)), TypeError, "where must be a boolean"),
      ("scalar_hidden", dict(hidden=np.float32(1.0)), ValueError, "hidden must have shape"),
      ("float_labels", dict(labels=np.zeros((N,), np.float32)), ValueError,
       r"labels of dtype float32 are probability targets and must have shape "
       r"hidden.shape\[:-1\] \+ \(V,\) = \(11, 19\); got \(11,\). Class indices must be "
       "integers"),
      ("bool_labels", dict(labels=np.zeros((N,), bool)), TypeError,
       r"labels must be integer class indices \[...\] or floating probability targets "
       r"\[..., V\]; got dtype bool"),
      ("complex_labels", dict(labels=np.zeros((N, V), np.complex64)), TypeError,
       "got dtype complex64"),
      ("probs_with_ignore_index", dict(labels=np.zeros((N, V), np.float32), ignore_index=-100),
       ValueError, "ignore_index applies to class-index labels only; got probability targets of "
       r"shape \(11, 19\) with ignore_index=-100. Mask examples with where= instead"),
      ("return_aux", dict(return_aux=1), TypeError, "return_aux must be True or False; got 1"),
      ("int_hidden", dict(hidden=np.zeros((N, D), np.int32)), TypeError,
       "hidden must be a real floating-point"),
      ("complex_hidden", dict(hidden=np.zeros((N, D), np.complex64)), TypeError,
       "hidden must be a real floating-point"),
      ("complex_weight", dict(weight=np.zeros((D, V), np.complex64)), TypeError,
       "weight must be a real floating-point"),
      ("complex_bias", dict(bias=np.zeros((V,), np.complex64)), TypeError,
       "bias must be a real floating-point"),
      ("chunk_zero", dict(chunk_size=0), ValueError, "chunk_size must be a positive int"),
      ("chunk_float", dict(chunk_size=2.0), ValueError, "chunk_size must be a positive int"),
      ("token_chunk_bool", dict(token_chunk_size=True), ValueError,
       "token_chunk_size must be a positive int"),
      ("accumulation_int", dict(grad_accumulation_dtype="int32"), TypeError,
       "grad_accumulation_dtype must be a floating-point dtype"),
      ("accumulation_name", dict(grad_accumulation_dtype="float33"), TypeError,
       "grad_accumulation_dtype must be a floating-point dtype"),
      ("reduction", dict(reduction="avg"), ValueError, "'none', 'mean', 'sum'; got 'avg'"),
      ("smoothing", dict(label_smoothing=1.5), ValueError, "label_smoothing must be"),
      ("z_loss", dict(z_loss=-1.0), ValueError, "z_loss must be"),
      ("ignore_index", dict(ignore_index=1.5), TypeError, "ignore_index must be an int"),
      ("axes_without_mesh", dict(vocab_axis="model"), ValueError, "need a mesh"),
      ("mesh_type", dict(mesh="mesh"), TypeError, "mesh must be a jax.sharding.Mesh"),
  )
  def test_badmake_inputs(self, overrides, error, message):
    hidden, weight, _, labels = make_inputs()
    kwargs = dict(hidden=hidden, weight=weight, labels=labels) | overrides
    with self.assertRaisesRegex(error, message):
      jaxce.linear_cross_entropy(**kwargs)


class PlatformDefaultsTest(parameterized.TestCase):
  """Default block sizes and accumulator dtypes per platform."""

  @parameterized.parameters(("cpu", 4096, 32768, 160), ("cpu", 8192, 65536, 80),
                            ("gpu", 4096, 128256, 824), ("gpu", 4096, 32768, 2048),
                            ("cpu", 300, 1000, 304), ("cpu", 5, 10, 8))
  def test_default_fused_blocks_are_even_and_within_budget(self, platform, n, v, rows):
    config = api.Config("mean", None, None, None, sharded.Layout(), platform=platform)
    got = config.fused_rows(n, v, jnp.float32)
    self.assertEqual(got, rows)
    budget = api.default_blocks(platform).row_bytes
    self.assertLessEqual(min(got, n) * v * 4, max(budget, 8 * v * 4))
    blocks = -(-n // got)
    self.assertLess(blocks * got - n, 8 * blocks)  # overlap: under 8 rows per block

  def test_default_block_fits_the_budget(self):
    # At a real vocabulary the default fused block stays within tokamax chunked_xla's 28 MiB.
    n, d, v = 256, 16, 65536

    def ours(h, w, y):
      return jaxce.linear_cross_entropy(h, w, y, reduction="mean")

    self.assertLess(temp_bytes(ours, n, d, v), 28 * 2**20)

  @parameterized.product(reduction=("mean", "none"), platform=("cpu", "gpu"))
  def test_low_precision_gradient_accumulation(self, reduction, platform):
    # bf16 weight/bias accumulators over 6 token blocks: the same loss and hidden gradient, a
    # weight gradient within a few bf16 roundings of the float32-accumulated one. "gpu" runs the
    # accelerator's code path (the product asked for in bf16, for the matmul epilogue) on CPU.
    hidden, weight, bias, labels = make_inputs(n=64, v=300, dtype=jnp.bfloat16)

    def run(acc):
      return jax.jit(lambda h, w, b: value_and_grads(
          lambda h, w, b: jaxce.linear_cross_entropy(
              h, w, labels, bias=b, token_chunk_size=11, label_smoothing=0.1,
              reduction=reduction, grad_accumulation_dtype=acc),
          h, w, b, cotangent(64)))(hidden, weight, bias)

    with mock.patch.object(api, "platform", return_value=platform):
      (loss, grads), (ref_loss, ref_grads) = run(jnp.bfloat16), run(jnp.float32)
    chex.assert_trees_all_equal(loss, ref_loss)
    chex.assert_trees_all_equal(grads[0], ref_grads[0])
    self.assertEqual([g.dtype for g in grads], [jnp.bfloat16] * 3)
    for g, r in zip(grads[1:], ref_grads[1:], strict=True):
      g, r = np.asarray(g, np.float32), np.asarray(r, np.float32)
      np.testing.assert_allclose(g, r, rtol=0, atol=6 * 2.0**-8 * np.max(np.abs(r)))

  @parameterized.product(reduction=("mean", "none"), platform=("cpu", "gpu", "tpu"))
  def test_default_accumulation_is_the_parameter_dtype_on_accelerators(self, reduction, platform):
    # bf16 parameters: the default accumulates in bf16 on GPU/TPU (the same program as asking for
    # it) and in float32 on CPU. float32 parameters accumulate in float32 everywhere.
    def run(dtype, acc):
      hidden, weight, bias, labels = make_inputs(n=64, v=300, dtype=dtype)
      return jax.jit(lambda h, w, b: value_and_grads(
          lambda h, w, b: jaxce.linear_cross_entropy(
              h, w, labels, bias=b, token_chunk_size=11, reduction=reduction,
              grad_accumulation_dtype=acc),
          h, w, b, cotangent(64)))(hidden, weight, bias)

    low = jnp.float32 if platform == "cpu" else jnp.bfloat16
    with mock.patch.object(api, "platform", return_value=platform):
      chex.assert_trees_all_equal(run(jnp.bfloat16, None), run(jnp.bfloat16, low))
      chex.assert_trees_all_equal(run(jnp.float32, None), run(jnp.float32, jnp.float32))
    config = api.Config("mean", None, None, None, sharded.Layout(), platform=platform)
    self.assertEqual(config.accumulator(jnp.float16, jnp.float32),
                     jnp.float32 if platform == "cpu" else jnp.float16)
    self.assertEqual(config.accumulator(jnp.float64, jnp.float64), jnp.float64)
    self.assertEqual(config._replace(accumulate="float32").accumulator(jnp.bfloat16, jnp.float32),
                     jnp.float32)

  def test_accelerator_defaults_match(self):
    # The accelerator's default blocks (whole-vocabulary weight-gradient tile) on CPU.
    hidden, weight, bias, labels = make_inputs(v=300)
    with mock.patch.object(api, "platform", return_value="gpu"):
      for reduction in ("mean", "none"):
        ours, ref = ours_and_ref(hidden, weight, bias, labels, reduction=reduction,
                                  label_smoothing=0.1)
        chex.assert_trees_all_close(ours, ref, rtol=2e-5, atol=2e-6)

  def test_low_precision_accumulation_saves_the_weight_sized_buffer(self):
    n, d, v = 256, 64, 4096

    def ours(acc):
      return lambda h, w, y: jaxce.linear_cross_entropy(h, w, y, reduction="mean",
                                                        grad_accumulation_dtype=acc)

    wide = temp_bytes(ours(jnp.float32), n, d, v, jnp.bfloat16)
    narrow = temp_bytes(ours(jnp.bfloat16), n, d, v, jnp.bfloat16)
    self.assertGreater(wide - narrow, 0.9 * d * v * 4)  # the float32 [D, V] accumulator
    self.assertEqual(temp_bytes(ours(None), n, d, v, jnp.bfloat16), wide)  # CPU default
    with mock.patch.object(api, "platform", return_value="gpu"):  # accelerator default
      self.assertEqual(temp_bytes(ours(None), n, d, v, jnp.bfloat16),
                       temp_bytes(ours(jnp.bfloat16), n, d, v, jnp.bfloat16))


class ExportTest(parameterized.TestCase):
  """``jax.export`` of the jitted loss and its ``value_and_grad``, for any number of tokens."""

  @staticmethod
  def fns():
    _, weight, bias, _ = make_inputs()
    options = dict(bias=bias, label_smoothing=0.1, token_chunk_size=4, chunk_size=8)
    rows = lambda h, y: jaxce.linear_cross_entropy(h, weight, y, **options)
    mean = lambda h, w, y: jaxce.linear_cross_entropy(h, w, y, reduction="mean", **options)
    return jax.jit(rows), jax.jit(jax.value_and_grad(mean, argnums=(0, 1)))

  def round_trip(self, symbolic):
    """``{n: (exported results, jitted results)}`` for both functions at several token counts."""
    rows, step = self.fns()
    hidden, weight, _, labels = make_inputs()
    n = export.symbolic_shape("b")[0] if symbolic else N
    h, y = jax.ShapeDtypeStruct((n, D), hidden.dtype), jax.ShapeDtypeStruct((n,), labels.dtype)
    try:
      exported = [export.deserialize(export.export(fn)(*shapes).serialize())
                  for fn, shapes in ((rows, (h, y)), (step, (h, weight, y)))]
    except ImportError as e:  # serialization needs flatbuffers
      self.skipTest(str(e))
    out = {}
    for n in (1, 5, N) if symbolic else (N,):
      args = (hidden[:n], labels[:n]), (hidden[:n], weight, labels[:n])
      out[n] = ([e.call(*a) for e, a in zip(exported, args, strict=True)],
                [rows(*args[0]), step(*args[1])])
    return out

  @parameterized.parameters(False, True)
  def test_export_round_trip(self, symbolic):
    try:
      results = self.round_trip(symbolic)
    except NotImplementedError as e:
      if "ErrorEffect" not in str(e):
        raise
      self.skipTest(f"the label check leaves a checkify effect in the program: {e}")
    for n, (got, want) in results.items():
      with self.subTest(n=n):
        chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-7)

  @parameterized.parameters(False, True)
  def test_export_round_trip_without_the_label_check(self, symbolic):
    # The blocking alone: symbolic token counts are padded to whole token blocks. The core's
    # compilation cache must not keep the patched traces.
    api._linear.clear_cache()
    self.addCleanup(api._linear.clear_cache)
    with mock.patch.object(api._labels, "debug_check_labels", lambda *args: None):
      results = self.round_trip(symbolic)
    for n, (got, want) in results.items():
      with self.subTest(n=n):
        chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-7)


if __name__ == "__main__":
  absltest.main()
