"""linear_cross_entropy's blocking (blocks.py): every block size against the reference."""

from __future__ import annotations

import chex
import jax
from absl.testing import absltest
from absl.testing import parameterized
from linear_helpers import make_inputs
from linear_helpers import ours_and_ref


class BlocksTest(parameterized.TestCase):

  def test_block_sizes(self):
    # V = 19 and N = 11: one column/row per block, overlapping last blocks, one block, blocks
    # larger than the problem; both paths, with and without bias.
    hidden, weight, bias, labels = make_inputs()
    cases = [(1, 4, "mean", True), (4, 1, "none", False), (5, 3, "none", True),
             (64, None, "mean", False), (4, 4, "sum", True)]

    def run(hidden, weight, bias):
      return [ours_and_ref(hidden, weight, bias if use_bias else None, labels,
                           dict(chunk_size=cols, token_chunk_size=rows), label_smoothing=0.1,
                           z_loss=0.01, reduction=reduction)
              for cols, rows, reduction, use_bias in cases]

    for case, (ours, ref) in zip(cases, jax.jit(run)(hidden, weight, bias), strict=True):
      with self.subTest(case=case):
        chex.assert_trees_all_close(ours, ref, rtol=2e-5, atol=2e-6)


if __name__ == "__main__":
  absltest.main()
