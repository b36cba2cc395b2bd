"""Tests for jaxce._common: one validation path per option, and the reductions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from jaxce import _common


class TestScalarOption(parameterized.TestCase):

  def test_concrete_zero_is_statically_absent(self):
    for zero in (0, 0.0, np.float32(0.0), jnp.asarray(0.0), np.array(0.0)):
      self.assertIsNone(_common.scalar_option(zero, "z_loss", "f"))

  def test_values_in_the_domain_become_float_arrays(self):
    got = _common.scalar_option(1, "label_smoothing", "f", upper=1.0)
    self.assertEqual(got.dtype, jnp.float32)
    self.assertEqual(float(got), 1.0)

  def test_traced_values_pass_through_even_at_zero(self):
    out = jax.jit(lambda v: _common.scalar_option(v, "z_loss", "f") * 2)(0.0)
    self.assertEqual(float(out), 0.0)

  @parameterized.parameters(
      (-0.1, ValueError, r"f: z_loss must be a finite scalar >= 0; got -0\.1\."),
      (float("inf"), ValueError, r"got inf"),
      (float("nan"), ValueError, r"got nan"),
      ([0.1, 0.2], ValueError, r"got an array of shape \(2,\)"),
      ("0.1", TypeError, r"f: z_loss must be a finite scalar >= 0; got '0\.1'"),
      (None, TypeError, r"got None"),
      (True, TypeError, r"got True"),
      (1j, TypeError, r"got 1j"),
  )
  def test_bad_values_raise_one_clear_message(self, value, error, message):
    with pytest.raises(error, match=message):
      _common.scalar_option(value, "z_loss", "f")

  def test_upper_bound(self):
    with pytest.raises(ValueError, match=r"label_smoothing must be a scalar in \[0, 1\]; got 1\.5"):
      _common.scalar_option(1.5, "label_smoothing", "f", upper=1.0)

  def test_option_or_nan_maps_traced_out_of_domain_values_to_nan(self):
    values = jnp.array([-1.0, 0.5, 2.0, jnp.inf, jnp.nan])
    np.testing.assert_array_equal(np.isnan(_common.option_or_nan(values, 1.0)),
                                  [True, False, True, True, True])
    np.testing.assert_array_equal(np.isnan(_common.option_or_nan(values)),
                                  [True, False, False, True, True])


class TestCheckIgnoreIndex(parameterized.TestCase):

  def test_ints_pass(self):
    for value in (-100, 0, np.int64(5), np.array(3), jnp.asarray(-1)):
      self.assertEqual(_common.check_ignore_index(value, "f"), int(value))
    self.assertIsNone(_common.check_ignore_index(None, "f"))

  @parameterized.parameters("a", 1.5, True, np.float32(2.0), ([1],))
  def test_non_ints_raise_type_error(self, value):
    with pytest.raises(TypeError, match="f: ignore_index must be an int or None; got"):
      _common.check_ignore_index(value, "f")


class TestReductions(parameterized.TestCase):

  @parameterized.parameters(0, 1, 2, 3, 7, 256, 257, 300, 1025, 70001)
  def test_pairwise_sum_equals_the_sum(self, n):
    x = np.arange(n, dtype=np.float32)
    exact = float(x.astype(np.float64).sum())
    got = float(_common.pairwise_sum(jnp.asarray(x)))
    self.assertLessEqual(abs(got - exact), 2 * np.finfo(np.float32).eps * exact)

  def test_zero_denominator_mean_is_zero_with_zero_gradient(self):
    f = lambda v: _common.reduce_loss(v, "mean", jnp.zeros(3))
    self.assertEqual(float(f(jnp.ones(3))), 0.0)
    np.testing.assert_array_equal(jax.grad(f)(jnp.ones(3)), np.zeros(3))
    self.assertEqual(float(_common.reduce_loss(jnp.zeros((0,)), "mean")), 0.0)

  @parameterized.parameters("avg", "Mean", "")
  def test_unknown_reduction_lists_the_choices(self, value):
    with pytest.raises(ValueError, match="f: reduction must be one of 'none', 'mean', 'sum'; got"):
      _common.check_reduction(value, "f")

  @parameterized.parameters(None, 3, b"mean")
  def test_non_string_reduction_is_a_type_error(self, value):
    with pytest.raises(TypeError, match="f: reduction must be a string, one of 'none', 'mean', "
                       "'sum'; got"):
      _common.check_reduction(value, "f")
