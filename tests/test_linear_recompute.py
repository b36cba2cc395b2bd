"""linear_cross_entropy, the recompute path (recompute.py): reduction="none": compiled memory."""

from __future__ import annotations

import jax.numpy as jnp
from absl.testing import absltest
from absl.testing import parameterized
from linear_helpers import temp_bytes

import jaxce


class RecomputePathTest(parameterized.TestCase):

  def test_temporary_memory_is_bounded_by_the_block(self):
    n, d, v, rows, cols = 1024, 32, 8192, 32, 256

    def naive(h, w, y):
      return jaxce.sparse_cross_entropy(h @ w, y, reduction="mean")

    def ours(h, w, y):
      loss = jaxce.linear_cross_entropy(h, w, y, chunk_size=cols, token_chunk_size=rows,
                                        reduction="none")
      return jnp.mean(loss) if loss.ndim else loss

    self.assertGreaterEqual(temp_bytes(naive, n, d, v), n * v * 4)  # the logits
    # [rows, cols] tiles of logits, recomputed in the backward, plus O(N) per-row numbers.
    block = 3 * rows * cols * 4
    self.assertLess(temp_bytes(ours, n, d, v), 2 * block + 3 * d * cols * 4 + 64 * n)


if __name__ == "__main__":
  absltest.main()
