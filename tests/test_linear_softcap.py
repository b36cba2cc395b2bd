"""``softcap`` in linear_cross_entropy: inside each block, both paths, the mesh path."""

from __future__ import annotations

import itertools
import re
import textwrap

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from linear_helpers import IGNORE
from linear_helpers import make_inputs
from linear_helpers import option_set
from linear_helpers import run_on_devices

import jaxce
from jaxce._linear import reference

CAP = 4.0
COMBINATIONS = list(itertools.product((False, True), (False, True), (False, True),
                                      ("mean", "sum", "none")))


def scalar(v):
  return v if v.ndim == 0 else jnp.sum(jnp.sin(v))


@pytest.mark.parametrize(("weights_and_smoothing", "ignore_and_where", "z", "reduction"),
                         COMBINATIONS, ids=str)
def test_values_and_gradients_are_those_of_the_capped_logits(weights_and_smoothing,
                                                             ignore_and_where, z, reduction):
  hidden, weight, bias, labels = make_inputs()
  hidden = hidden * 3  # logits well past the cap
  if ignore_and_where:
    labels = labels.at[1].set(IGNORE)
  options = option_set(weights_and_smoothing, ignore_and_where, weights_and_smoothing,
                       ignore_and_where, z, reduction)

  def ours(h, w, b, cap, cw):
    opts = dict(options, class_weights=cw) if cw is not None else options
    return scalar(jaxce.linear_cross_entropy(h, w, labels, bias=b, softcap=cap,
                                             token_chunk_size=4, chunk_size=5, **opts))

  def formula(h, w, b, cap, cw):  # the naive loss of cap·tanh(z / cap)
    opts = dict(options, class_weights=cw) if cw is not None else options
    logits = cap * jnp.tanh((h @ w + b[None, :]) / cap)
    where = opts.pop("where", None)
    return scalar(jaxce.sparse_cross_entropy(
        logits, labels, where=None if where is None else where[:, None], **opts))

  cw = options.pop("class_weights", None)
  argnums = (0, 1, 2, 3) + ((4,) if cw is not None else ())
  got = jax.value_and_grad(ours, argnums=argnums)(hidden, weight, bias, CAP, cw)
  want = jax.value_and_grad(formula, argnums=argnums)(hidden, weight, bias, CAP, cw)
  chex.assert_trees_all_close(got, want, rtol=2e-5, atol=2e-5)


def test_reference_takes_the_cap_too():
  hidden, weight, bias, labels = make_inputs()
  chex.assert_trees_all_close(
      jaxce.linear_cross_entropy(hidden, weight, labels, bias=bias, softcap=CAP),
      reference.linear_cross_entropy(hidden, weight, labels, bias=bias, softcap=CAP), rtol=1e-5)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_the_cap_adds_no_matmul(reduction):
  hidden, weight, _, labels = make_inputs(n=64, d=16, v=128)

  def dots(cap):
    step = jax.jit(jax.value_and_grad(lambda h, w: scalar(jaxce.linear_cross_entropy(
        h, w, labels, reduction=reduction, softcap=cap)), argnums=(0, 1)))
    return len(re.findall(r"\bdot\(|convolution\(", step.lower(hidden, weight).compile().as_text()))

  assert dots(CAP) == dots(None) > 0


@pytest.mark.parametrize("cap", [0.0, -2.0, np.inf])
def test_bad_caps(cap):
  hidden, weight, _, labels = make_inputs()
  with pytest.raises(ValueError, match="softcap must be None or a finite scalar > 0"):
    jaxce.linear_cross_entropy(hidden, weight, labels, softcap=cap)
  loss = jax.jit(lambda c: jaxce.linear_cross_entropy(hidden, weight, labels, softcap=c,
                                                      reduction="mean"))
  assert np.isnan(loss(cap)) and np.isfinite(loss(CAP))


MESH_DRIVER = textwrap.dedent("""
    import json
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    import jaxce

    rng = np.random.default_rng(0)
    n, d, v = 64, 8, 96
    h = jnp.asarray(rng.normal(size=(n, d)) * 3, jnp.float32)
    w = jnp.asarray(rng.normal(size=(d, v)), jnp.float32)
    y = jnp.asarray(rng.integers(0, v, n), jnp.int32)
    out = {}
    for reduction in ("mean", "none"):
      def loss(h, w, cap, mesh=None):
        axes = {} if mesh is None else dict(mesh=mesh, token_axes="data", vocab_axis="model")
        v = jaxce.linear_cross_entropy(h, w, y, reduction=reduction, softcap=cap,
                                       label_smoothing=0.1, **axes)
        return v if v.ndim == 0 else jnp.sum(jnp.sin(v))
      want = jax.value_and_grad(loss, argnums=(0, 1, 2))(h, w, 4.0)
      mesh = jax.make_mesh((2, 4), ("data", "model"))
      with jax.sharding.set_mesh(mesh):
        got = jax.jit(jax.value_and_grad(lambda h, w, c: loss(h, w, c, mesh),
                                         argnums=(0, 1, 2)))(h, w, 4.0)
      out[reduction] = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                           for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)))
    print(json.dumps(out))
""")


def test_mesh_path_matches_one_device():
  errors = run_on_devices(MESH_DRIVER)
  assert max(errors.values()) < 2e-5, errors
