"""Per-platform designs of the softmax cross-entropy kernels.

A design choice that pays on one platform can lose on another (a pass that XLA:CPU cannot fuse
may be free on a GPU), so the sparse kernel reads its choices from this table, keyed by the
platform the computation is traced for. The figures behind each entry are in docs/benchmarks.md
(``benchmarks/bench_losses.py`` on CPU, ``benchmarks/gpu_suite.py`` on GPU).
"""

from __future__ import annotations

from typing import NamedTuple

import jax


class SparseKernel(NamedTuple):
  """How :func:`jaxce.sparse_cross_entropy`'s kernel computes (every choice gives the same values).

  Attributes:
    label_pivot: shift each row by its label's logit instead of its max, which saves the max
      pass (a row that would overflow sends the call through the max-shifted path).
    keep_exp: keep ``exp(x − shift)`` of 32/64-bit logits for the backward instead of
      recomputing it from the logits.
  """

  label_pivot: bool = True
  keep_exp: bool = True


# CPU: the pivot and the kept exp each won in bench_losses (docs/benchmarks.md). GPU/TPU: the
# same until benchmarks/gpu_suite.py has compared them there.
SPARSE_KERNELS = {
    "cpu": SparseKernel(label_pivot=True, keep_exp=True),
    "gpu": SparseKernel(label_pivot=True, keep_exp=True),
    "tpu": SparseKernel(label_pivot=True, keep_exp=True),
}


def current() -> str:
  """The platform computations are traced for: JAX's default backend."""
  return jax.default_backend()


def sparse_kernel(platform: str | None = None) -> SparseKernel:
  """The sparse kernel's design on ``platform`` (default: :func:`current`)."""
  platform = current() if platform is None else platform
  return SPARSE_KERNELS.get(platform, SPARSE_KERNELS["cpu"])
