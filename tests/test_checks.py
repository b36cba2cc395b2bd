"""Tests for jaxce._checks: run-time label checks for jitted code."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from jax.experimental import checkify

import jaxce

LOGITS = jnp.array([[2.0, -5.0, 0.5, -0.1], [0.0, 0.0, 1.9, 1.4], [-100.0, 100.0, -100.0, -100.0]])
LOG_PROBS = jax.nn.log_softmax(LOGITS)

sparse_mean = jax.jit(lambda x, y: jaxce.sparse_cross_entropy(x, y, reduction="mean"))
sparse_none = jax.jit(lambda x, y: jaxce.sparse_cross_entropy(x, y, ignore_index=-100))
nll_sum = jax.jit(lambda x, y: jaxce.nll_loss(x, y, reduction="sum"))
nll_none = jax.jit(lambda x, y: jaxce.nll_loss(x, y, ignore_index=-100))

BAD_LABELS = (
    ("equal_to_num_classes", [0, 4, 1], 1),
    ("above_num_classes", [0, 3, 7], 1),
    ("negative", [-1, 3, 1], 1),
    ("several", [-1, 4, 9], 3),
)


def _message(fn_name, count, ignore_index=None):
  allowed = "" if ignore_index is None else rf" or equal ignore_index \({ignore_index}\)"
  return (rf"jaxce\.{fn_name}: labels must be in \[0, 4\){allowed}; "
          rf"got {count} bad label\(s\)")


class TestChecked(chex.TestCase):

  @parameterized.named_parameters(*BAD_LABELS)
  def test_sparse_cross_entropy_raises_under_jit(self, labels, count):
    with pytest.raises(checkify.JaxRuntimeError, match=_message("sparse_cross_entropy", count)):
      jaxce.checked(sparse_mean)(LOGITS, jnp.array(labels))

  @parameterized.named_parameters(*BAD_LABELS)
  def test_nll_loss_raises_under_jit(self, labels, count):
    with pytest.raises(checkify.JaxRuntimeError, match=_message("nll_loss", count)):
      jaxce.checked(nll_sum)(LOG_PROBS, jnp.array(labels))

  def test_raises_with_ignore_index_set(self):
    # -100 is ignored, 4 is still out of range.
    with pytest.raises(checkify.JaxRuntimeError, match=_message("sparse_cross_entropy", 1, -100)):
      jaxce.checked(sparse_none)(LOGITS, jnp.array([-100, 4, 1]))
    with pytest.raises(checkify.JaxRuntimeError, match=_message("nll_loss", 1, -100)):
      jaxce.checked(nll_none)(LOG_PROBS, jnp.array([-100, -1, 1]))

  def test_raises_for_label_hidden_by_where(self):
    fn = jax.jit(lambda x, y, m: jaxce.sparse_cross_entropy(x, y, where=m))
    where = jnp.array([True, True, False, True])
    message = r"labels must be in \[0, 4\), and be a class that `where` keeps; got 1 bad label"
    with pytest.raises(checkify.JaxRuntimeError, match=message):
      jaxce.checked(fn)(LOGITS, jnp.array([0, 2, 1]), where)

  def test_raises_for_vmapped_functions(self):
    batched = jax.jit(jax.vmap(lambda x, y: jaxce.sparse_cross_entropy(x, y, reduction="sum")))
    with pytest.raises(checkify.JaxRuntimeError, match=r"jaxce\.sparse_cross_entropy: labels"):
      jaxce.checked(batched)(LOGITS[None], jnp.array([[0, 4, 1]]))

  def test_the_error_is_a_value_error(self):
    # Code that catches the eager ValueError also catches the jitted check.
    with pytest.raises(ValueError):
      jaxce.checked(sparse_mean)(LOGITS, jnp.array([0, 4, 1]))

  @parameterized.named_parameters(
      ("sparse_mean", sparse_mean, LOGITS, [0, 3, 1]),
      ("sparse_ignored", sparse_none, LOGITS, [-100, 3, 1]),
      ("nll_sum", nll_sum, LOG_PROBS, [0, 3, 1]),
      ("nll_ignored", nll_none, LOG_PROBS, [2, -100, -100]),
  )
  def test_valid_labels_pass_through_unchanged(self, fn, x, labels):
    labels = jnp.array(labels)
    out = jaxce.checked(fn)(x, labels)
    chex.assert_trees_all_equal(out, fn(x, labels))
    chex.assert_trees_all_equal_shapes_and_dtypes(out, fn(x, labels))
    assert np.all(np.isfinite(out))

  def test_valid_results_match_float64_reference(self):
    logits = np.asarray(LOGITS, np.float64)
    log_probs = logits - np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1,
                                       keepdims=True)) - logits.max(-1, keepdims=True)
    expected = -np.mean(log_probs[np.arange(3), [0, 3, 1]])
    chex.assert_trees_all_close(jaxce.checked(sparse_mean)(LOGITS, jnp.array([0, 3, 1])),
                                expected, rtol=1e-6)

  def test_passes_pytrees_and_keyword_arguments(self):
    @jax.jit
    def two_losses(x, y, *, scale):
      return {"ce": scale * jaxce.sparse_cross_entropy(x, y), "nll": jaxce.nll_loss(
          jax.nn.log_softmax(x), y)}

    labels = jnp.array([0, 3, 1])
    out = jaxce.checked(two_losses)(LOGITS, labels, scale=2.0)
    chex.assert_trees_all_equal(out, two_losses(LOGITS, labels, scale=2.0))
    with pytest.raises(checkify.JaxRuntimeError, match=r"bad label"):
      jaxce.checked(two_losses)(LOGITS, jnp.array([0, 4, 1]), scale=2.0)

  def test_keeps_the_wrapped_function_metadata(self):
    def my_loss(x, y):
      """Docstring."""
      return jaxce.sparse_cross_entropy(x, y)

    wrapped = jaxce.checked(my_loss)
    assert wrapped.__name__ == "my_loss" and wrapped.__doc__ == "Docstring."
    assert wrapped.__wrapped__ is my_loss

  def test_without_checked_jit_gives_nan_for_that_example_only(self):
    # What `checked` guards against: under jit a bad label cannot raise, and it
    # must give NaN for its example, never the loss of a wrapped-around class.
    loss = sparse_none(LOGITS, jnp.array([0, 4, -1]))
    assert np.isfinite(loss[0]) and np.isnan(loss[1]) and np.isnan(loss[2])
    loss = nll_none(LOG_PROBS, jnp.array([5, 3, 1]))
    assert np.isnan(loss[0]) and np.all(np.isfinite(loss[1:]))
    assert np.isnan(sparse_mean(LOGITS, jnp.array([0, 4, 1])))
