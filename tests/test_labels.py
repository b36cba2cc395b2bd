"""Tests for jaxce._labels: label resolution, exact for every integer dtype, and NaN rows."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from jaxce import _labels

INT_DTYPES = (np.int8, np.int16, np.int32, np.uint8, np.uint16, np.uint32)


class TestResolveLabels(parameterized.TestCase):

  @parameterized.product(dtype=INT_DTYPES, ignore_index=[None, -100, 0, 300])
  def test_every_integer_dtype_agrees_with_an_exact_reference(self, dtype, ignore_index):
    info = np.iinfo(dtype)
    values = np.array([0, 1, 2, 5, info.max, info.min, 156, 255, 299], np.int64)
    labels = values.clip(info.min, info.max).astype(dtype)
    for c in (3, 200, 70000):
      lab = jax.jit(lambda y, c=c: _labels.resolve_labels(y, c, ignore_index))(labels)
      wide = labels.astype(np.int64)
      ignored = np.zeros(len(wide), bool) if ignore_index is None else wide == ignore_index
      in_range = (wide >= 0) & (wide < c)
      np.testing.assert_array_equal(lab.keep, ~ignored)
      np.testing.assert_array_equal(lab.bad, ~ignored & ~in_range)
      np.testing.assert_array_equal(lab.index, np.where(in_range, wide, 0))

  def test_mask_hiding_the_label_or_the_whole_row(self):
    mask = jnp.array([[True, False, True], [False, False, False], [True, True, True]])
    lab = _labels.resolve_labels(jnp.array([1, 0, 2]), 3, None, mask)
    np.testing.assert_array_equal(lab.keep, [True, False, True])
    np.testing.assert_array_equal(lab.bad, [True, False, False])
    np.testing.assert_array_equal(lab.live, [False, False, True])

  def test_check_labels_names_the_first_bad_label_and_counts_them(self):
    with pytest.raises(ValueError, match=r"f: labels must be in \[0, 3\) or equal ignore_index "
                       r"\(-1\); got 9 at index \(1, 0\) \(2 bad label\(s\)\)"):
      _labels.check_labels(np.array([[0, 1], [9, 7]]), 3, -1, None, "f")
    with pytest.raises(ValueError, match=r"and be a class that `where` keeps; got 1"):
      _labels.check_labels(np.array([1]), 3, None, np.array([[True, False, True]]), "f")
    _labels.check_labels(np.array([0, -1, 2], np.int64), 3, -1, None, "f")  # no error


class TestNanWhere(parameterized.TestCase):

  def test_value_and_gradient_are_nan_only_where_bad_and_used(self):
    bad = jnp.array([False, True, True])
    value = jnp.array([1.0, 2.0, 3.0])
    np.testing.assert_array_equal(np.isnan(_labels.nan_where(bad, value)), [False, True, True])
    g = jax.grad(lambda v: jnp.sum(_labels.nan_where(bad, v) * jnp.array([1.0, 1.0, 0.0])))(value)
    np.testing.assert_array_equal(np.isnan(g), [False, True, False])
    self.assertEqual(float(g[0]), 1.0)
    self.assertEqual(float(g[2]), 0.0)
