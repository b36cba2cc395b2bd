"""``return_aux=True``: each example's lse, prediction and correctness beside the loss."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

import jaxce

N, T, C = 4, 3, 7
RNG = np.random.default_rng(17)
X = jnp.asarray(RNG.normal(size=(N, T, C)) * 3, jnp.float32)
Y = jnp.asarray(RNG.integers(0, C, (N, T)), jnp.int32).at[0, 1].set(-100).at[2, 0].set(-100)
Y_VALID = jnp.where(Y < 0, 0, Y)
Q = jax.nn.softmax(jnp.asarray(RNG.normal(size=(N, T, C)) * 2, jnp.float32))
W = jnp.asarray(RNG.uniform(0.5, 2.0, C), jnp.float32)
# Random classes masked out (never a label's), and one row with every class masked.
MASK = (jnp.asarray(RNG.uniform(size=(N, T, C)) > 0.3)
        .at[jnp.arange(N)[:, None], jnp.arange(T)[None, :], Y_VALID].set(True)
        .at[1, 2].set(False))
OPTIONS = dict(class_weights=W, ignore_index=-100, label_smoothing=0.1, where=MASK, z_loss=1e-2,
               softcap=5.0)

# Every pair of options is on together, off together and each on alone in some case, and each
# reduction and class axis meets each option on and off (a pairwise covering of the full
# product, which would compile 384 programs).
CASES = [
    ((), "none", -1),
    (("ignore_index", "label_smoothing", "where", "z_loss", "softcap"), "mean", 1),
    (("class_weights", "z_loss", "softcap"), "sum", 1),
    (("class_weights", "ignore_index", "label_smoothing", "where"), "sum", -1),
    (("class_weights", "where"), "mean", 1),
    (("class_weights", "ignore_index", "label_smoothing", "z_loss", "softcap"), "none", -1),
    (("label_smoothing", "softcap"), "mean", -1),
    (("ignore_index", "where", "z_loss"), "none", 1),
    ((), "sum", -1),
]


def case_id(case):
  names, reduction, axis = case
  return "+".join(names or ["plain"]) + f"/{reduction}/axis={axis}"


def options(names, kind):
  """The named options (dense labels have no ``ignore_index``)."""
  return {k: OPTIONS[k] for k in names if not (kind == "dense" and k == "ignore_index")}


def loss_fn(kind, names, reduction, axis, **extra):
  """``f(x, labels, **overrides)`` with classes on ``axis``; ``x`` and ``labels`` classes last."""
  opts = options(names, kind)

  def f(x, labels, **overrides):
    opts_here = {**opts, **overrides}
    if axis != -1:
      x = jnp.moveaxis(x, -1, axis)
      if "where" in opts_here:
        opts_here["where"] = jnp.moveaxis(opts_here["where"], -1, axis)
      if kind == "dense":
        labels = jnp.moveaxis(labels, -1, axis)
    fn = jaxce.sparse_cross_entropy if kind == "sparse" else jaxce.dense_cross_entropy
    return fn(x, labels, axis=axis, reduction=reduction, **extra, **opts_here)

  return f


def labels_for(kind, names):
  if kind == "dense":
    return Q
  return Y if "ignore_index" in names else Y_VALID


def textbook(kind, x, labels, *, reduction, class_weights=None, ignore_index=None,
             label_smoothing=0.0, where=None, z_loss=0.0, softcap=None):
  """Autodiff reference, classes last: ``(loss, lse, the logits the softmax sees, counted)``."""
  if softcap is not None:
    x = softcap * jnp.tanh(x / softcap)
  possible = jnp.ones(x.shape, bool) if where is None else where
  active = jnp.any(possible, axis=-1)
  seen = jnp.where(possible, x, -jnp.inf)
  safe = jnp.where(active[..., None], seen, 0.0)  # a fully masked row: finite, then dropped
  lse = jax.nn.logsumexp(safe, axis=-1)
  logp = jnp.where(possible, safe - lse[..., None], 0.0)
  w = jnp.ones(x.shape) if class_weights is None else jnp.broadcast_to(class_weights, x.shape)
  count = jnp.sum(possible, axis=-1)
  if kind == "sparse":
    keep = active if ignore_index is None else active & (labels != ignore_index)
    index = jnp.where(keep, labels, 0)
    nll = -jnp.take_along_axis(logp, index[..., None], axis=-1)[..., 0]
    smooth = -jnp.sum(w * logp, axis=-1) / jnp.maximum(count, 1)
    w_y = jnp.where(keep, jnp.take_along_axis(w, index[..., None], axis=-1)[..., 0], 0.0)
    loss = (1 - label_smoothing) * w_y * nll + label_smoothing * smooth + z_loss * lse**2
    loss, den = jnp.where(keep, loss, 0.0), jnp.sum(w_y)
  else:
    keep = active
    spread = possible / jnp.maximum(count, 1)[..., None]
    t = (1 - label_smoothing) * labels + label_smoothing * spread
    q = jnp.where(possible, w * t, 0.0)
    loss = jnp.where(keep, -jnp.sum(q * logp, axis=-1) + z_loss * lse**2, 0.0)
    den = jnp.sum(keep)
  if reduction != "none":
    loss = jnp.sum(loss) / (den if reduction == "mean" else 1.0)
  return loss, jnp.where(keep, lse, 0.0), seen, keep


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("kind", ["sparse", "dense"])
def test_loss_unchanged_and_aux_fields_are_the_textbook_ones(kind, case):
  names, reduction, axis = case
  labels = labels_for(kind, names)
  plain = loss_fn(kind, names, reduction, axis)
  with_aux = loss_fn(kind, names, reduction, axis, return_aux=True)

  @jax.jit  # one program for the whole comparison (compiles dominate this suite's time)
  def both(x, labels):
    return plain(x, labels), with_aux(x, labels), textbook(
        kind, x, labels, reduction=reduction, **options(names, kind))

  want_loss, (loss, aux), (ref_loss, ref_lse, seen, keep) = both(X, labels)
  assert isinstance(aux, jaxce.CrossEntropyAux)
  chex.assert_trees_all_equal(loss, want_loss)
  chex.assert_trees_all_close(loss, ref_loss, rtol=2e-5, atol=2e-6)
  chex.assert_shape(list(aux), (N, T))
  assert (aux.lse.dtype, aux.predicted.dtype, aux.correct.dtype) == (jnp.float32, jnp.int32,
                                                                    jnp.bool_)
  chex.assert_trees_all_close(aux.lse, ref_lse, rtol=1e-6, atol=1e-6)
  predicted = jnp.argmax(seen, axis=-1)
  chex.assert_trees_all_equal(aux.predicted, predicted)
  target = labels if kind == "sparse" else jnp.argmax(jnp.where(seen > -jnp.inf, labels, -1), -1)
  chex.assert_trees_all_equal(aux.correct, (predicted == target) & keep)


GRAD_CASES = [
    ((), "none", -1),
    (("class_weights", "ignore_index", "label_smoothing", "where", "z_loss", "softcap"), "mean", 1),
    (("class_weights", "label_smoothing", "softcap"), "sum", -1),
    (("ignore_index", "where", "z_loss"), "mean", -1),
]


@pytest.mark.parametrize("case", GRAD_CASES, ids=case_id)
@pytest.mark.parametrize("kind", ["sparse", "dense"])
def test_gradients_of_loss_and_lse_are_the_textbook_ones(kind, case):
  names, reduction, axis = case
  labels = labels_for(kind, names)
  f = loss_fn(kind, names, reduction, axis, return_aux=True)
  # A random cotangent on (loss, lse).
  rng = np.random.default_rng(5)
  a = jnp.asarray(rng.normal(size=(N, T) if reduction == "none" else ()), jnp.float32)
  c = jnp.asarray(rng.normal(size=(N, T)), jnp.float32)

  def objective(loss, lse):
    return jnp.sum(a * loss) + jnp.sum(c * lse)

  # Differentiable arguments: the logits, and the cap and class weights when present.
  args = {"x": X} | {k: OPTIONS[k] for k in ("softcap", "class_weights") if k in names}

  def got(args):
    x = args.pop("x")
    loss, aux = f(x, labels, **args)
    return objective(loss, aux.lse)

  def want(args):
    x = args.pop("x")
    loss, lse, _, _ = textbook(kind, x, labels, reduction=reduction,
                               **{**options(names, kind), **args})
    return objective(loss, lse)

  chex.assert_trees_all_close(jax.jit(jax.value_and_grad(got))(args),
                              jax.jit(jax.value_and_grad(want))(args), rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("kind", ["sparse", "dense"])
def test_lse_gradient_alone_is_the_softmax_on_counted_rows(kind):
  labels = labels_for(kind, ["ignore_index"])
  f = loss_fn(kind, ["ignore_index", "where"], "mean", -1, return_aux=True)
  got = jax.jit(jax.grad(lambda x: jnp.sum(f(x, labels)[1].lse)))(X)
  _, _, seen, keep = textbook(kind, X, labels, reduction="mean", ignore_index=-100, where=MASK)
  softmax = jnp.where(keep[..., None], jax.nn.softmax(seen, axis=-1), 0.0)
  chex.assert_trees_all_close(got, jnp.nan_to_num(softmax), rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------
# Ties, masks and rows that do not count.
# ---------------------------------------------------------------------------

TIES = jnp.array([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0], [5.0, 1.0, 1.0, 0.0]])
TIES_WHERE = jnp.array([[True] * 4, [True] * 4, [False, True, True, True]])


def test_predicted_takes_the_lowest_index_on_ties_among_the_classes_where_keeps():
  _, aux = jaxce.sparse_cross_entropy(TIES, jnp.array([2, 0, 1]), where=TIES_WHERE,
                                      return_aux=True)
  chex.assert_trees_all_equal(aux.predicted, jnp.array([1, 0, 1], jnp.int32))
  chex.assert_trees_all_equal(aux.correct, jnp.array([False, True, True]))
  chex.assert_trees_all_close(aux.lse[2], jax.nn.logsumexp(TIES[2, 1:]), rtol=1e-6)


def test_dense_correct_compares_with_the_labels_argmax_among_the_classes_where_keeps():
  labels = jnp.array([[0.0, 0.5, 0.5, 0.0],  # tie: class 1, as predicted
                      [0.1, 0.2, 0.3, 0.4],  # class 3, predicted 0
                      [0.9, 0.0, 0.1, 0.0]])  # class 0 is masked: class 2, predicted 1
  _, aux = jaxce.dense_cross_entropy(TIES, labels, where=TIES_WHERE, return_aux=True)
  chex.assert_trees_all_equal(aux.predicted, jnp.array([1, 0, 1], jnp.int32))
  chex.assert_trees_all_equal(aux.correct, jnp.array([True, False, False]))


def test_rows_that_do_not_count_have_zero_lse_and_are_not_correct():
  x = jnp.array([[3.0, 0.0, 0.0], [3.0, 0.0, 0.0], [3.0, 0.0, 0.0], [3.0, 0.0, 0.0]])
  where = jnp.array([[True] * 3, [True] * 3, [False] * 3, [True] * 3])
  # Row 1 is ignored, row 2 fully masked, row 3's label is out of range (NaN under jit).
  loss, aux = jax.jit(lambda x, y: jaxce.sparse_cross_entropy(
      x, y, ignore_index=-1, where=where, return_aux=True))(x, jnp.array([0, -1, 0, 5]))
  chex.assert_trees_all_close(aux.lse, jnp.array([jax.nn.logsumexp(x[0]), 0.0, 0.0, 0.0]))
  chex.assert_trees_all_equal(aux.predicted, jnp.zeros(4, jnp.int32))
  chex.assert_trees_all_equal(aux.correct, jnp.array([True, False, False, False]))
  assert np.isnan(loss[3]) and np.all(np.isfinite(loss[:3]))
  g = jax.jit(jax.grad(lambda x: jnp.sum(jaxce.sparse_cross_entropy(
      x, jnp.array([0, -1, 0, 0]), ignore_index=-1, where=where, return_aux=True)[1].lse)))(x)
  chex.assert_trees_all_equal(g[1:3], jnp.zeros((2, 3)))

  _, aux = jaxce.dense_cross_entropy(x, jax.nn.softmax(x), where=where, return_aux=True)
  chex.assert_trees_all_equal(aux.lse[2], jnp.float32(0.0))
  chex.assert_trees_all_equal(aux.correct, jnp.array([True, True, False, True]))


# ---------------------------------------------------------------------------
# Transformations and dtypes.
# ---------------------------------------------------------------------------


class TestTransformations(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_jit_equals_no_jit(self):
    for fn, labels in ((jaxce.sparse_cross_entropy, Y), (jaxce.dense_cross_entropy, Q)):
      opts = dict(where=MASK, softcap=5.0, reduction="mean", return_aux=True)
      if fn is jaxce.sparse_cross_entropy:
        opts["ignore_index"] = -100
      got = self.variant(lambda x, labels, fn=fn, opts=opts: fn(x, labels, **opts))(X, labels)
      chex.assert_trees_all_close(got, fn(X, labels, **opts), rtol=1e-6, atol=1e-6)

  @parameterized.parameters((jaxce.sparse_cross_entropy, Y_VALID), (jaxce.dense_cross_entropy, Q))
  def test_vmap_equals_the_whole_batch(self, fn, labels):
    def whole(x, y):
      return fn(x, y, z_loss=1e-2, return_aux=True)

    def per_row(x, y):
      return jax.vmap(whole)(x, y)

    def value_and_grad(f, x, y):
      def objective(x):
        loss, aux = f(x, y)
        return jnp.sum(loss) + jnp.sum(jnp.cos(aux.lse))
      return f(x, y), jax.grad(objective)(x)

    want, got = jax.jit(lambda x, y: (value_and_grad(whole, x, y),
                                      value_and_grad(per_row, x, y)))(X, labels)
    chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_16_bit_logits_give_float32_lse_and_16_bit_gradients(dtype):
  x = X.astype(dtype)

  def lse(x):
    loss, aux = jaxce.sparse_cross_entropy(x, Y_VALID, softcap=5.0, return_aux=True)
    assert loss.dtype == aux.lse.dtype == jnp.float32
    return jnp.sum(aux.lse), aux.lse

  g, got = jax.jit(jax.grad(lse, has_aux=True))(x)
  assert g.dtype == dtype
  capped = (5.0 * jnp.tanh(x.astype(jnp.float32) / 5.0)).astype(dtype).astype(jnp.float32)
  chex.assert_trees_all_close(got, jax.nn.logsumexp(capped, axis=-1), rtol=1e-5)
  chex.assert_trees_all_close(g.astype(jnp.float32), jax.grad(
      lambda x: jnp.sum(jax.nn.logsumexp(5.0 * jnp.tanh(x / 5.0), axis=-1)))(
          x.astype(jnp.float32)), rtol=2e-2, atol=2e-3)


def test_float64_with_x64():
  with jax.enable_x64(True):
    x = np.asarray(X, np.float64)
    for fn, labels in ((jaxce.sparse_cross_entropy, np.asarray(Y_VALID)),
                       (jaxce.dense_cross_entropy, np.asarray(Q, np.float64))):
      _, aux = fn(x, labels, return_aux=True)
      assert aux.lse.dtype == jnp.float64
      np.testing.assert_allclose(aux.lse, np.log(np.sum(np.exp(x), axis=-1)), rtol=1e-13)


@pytest.mark.parametrize("value", [1, 0, None, "yes", np.bool_(True), jnp.array(True)])
def test_return_aux_must_be_a_python_bool(value):
  for fn, labels in ((jaxce.sparse_cross_entropy, Y_VALID), (jaxce.dense_cross_entropy, Q)):
    with pytest.raises(TypeError, match=f"{fn.__name__}: return_aux must be True or False"):
      fn(X, labels, return_aux=value)


class TestDefaultReturn(parameterized.TestCase):

  @parameterized.parameters(False, True)
  def test_return_type(self, return_aux):
    out = jaxce.sparse_cross_entropy(X, Y_VALID, reduction="sum", return_aux=return_aux)
    if return_aux:
      loss, aux = out
      chex.assert_shape(loss, ())
      chex.assert_shape(list(aux), (N, T))
    else:
      assert isinstance(out, jax.Array) and out.shape == ()
