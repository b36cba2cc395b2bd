"""The sparse kernel's per-platform design table (jaxce/_platform.py), with the platform patched."""

from __future__ import annotations

import itertools
from unittest import mock

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxce
from jaxce import _platform

DESIGNS = [_platform.SparseKernel(*flags) for flags in itertools.product([True, False], repeat=2)]


def loss(x, y):
  return jaxce.sparse_cross_entropy(x, y, reduction="mean", label_smoothing=0.1, z_loss=1e-3,
                                    ignore_index=-100)


def on_gpu_with(design):
  """Traces as on a GPU whose table holds ``design``."""
  table = dict(_platform.SPARSE_KERNELS, gpu=design)
  return mock.patch.multiple(_platform, SPARSE_KERNELS=table, current=lambda: "gpu")


def test_every_platform_has_a_design_and_unknown_ones_get_the_cpu_one():
  assert set(_platform.SPARSE_KERNELS) >= {"cpu", "gpu", "tpu"}
  assert _platform.sparse_kernel("metal") == _platform.SPARSE_KERNELS["cpu"]
  assert _platform.sparse_kernel() == _platform.SPARSE_KERNELS[jax.default_backend()]


@pytest.mark.parametrize("design", DESIGNS, ids=str)
def test_each_design_is_taken_and_gives_the_same_values_and_gradients(design):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(6, 9)) * 3, jnp.float32)
  y = jnp.asarray(rng.integers(0, 9, 6)).at[2].set(-100)
  want = jax.value_and_grad(loss)(x, y)
  with on_gpu_with(design):
    got = jax.jit(jax.value_and_grad(loss))(x, y)
    jaxpr = str(jax.make_jaxpr(jax.grad(loss))(x, y))
    _, vjp = jax.vjp(lambda x: loss(x, y), x)
    backward = str(jax.make_jaxpr(vjp)(jnp.float32(1.0)))
  chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-7)
  assert ("cond[" in jaxpr) == design.label_pivot  # the overflow fallback exists only pivoted
  assert ("= exp " in backward) == (not design.keep_exp)  # else the forward kept exp
