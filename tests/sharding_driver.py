"""Runs every loss on 8 fake CPU devices and prints what tests/test_sharding.py checks, as JSON.

Usage: ``python tests/sharding_driver.py MODE`` with MODE one of ``explicit`` (a
``jax.make_mesh`` mesh of Explicit axes under ``set_mesh``), ``auto`` (a
``Mesh(devices, names)`` of Auto axes, inputs placed with ``NamedSharding``),
``shard_map-explicit`` or ``shard_map-auto`` (per-device blocks inside
``jax.shard_map``, summed with ``psum``). The process must see 8 devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=8``).
"""

from __future__ import annotations

import json
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxce

B, C, T = 32, 128, 4
rng = np.random.default_rng(0)
CLASS_WEIGHTS = jnp.asarray(rng.uniform(0.5, 2.0, C), jnp.float32)
SPARSE_OPTIONS = dict(ignore_index=-100, label_smoothing=0.1, z_loss=1e-3,
                      class_weights=CLASS_WEIGHTS)


def inputs(three_d: bool):
  """``(logits, labels, probabilities, binary targets)``; classes on axis 1 when ``three_d``."""
  shape = (B, C, T) if three_d else (B, C)
  label_shape = (B, T) if three_d else (B,)
  x = jnp.asarray(rng.normal(size=shape) * 2, jnp.float32)
  y = jnp.asarray(rng.integers(0, C, label_shape), jnp.int32).at[(3,) * len(label_shape)].set(-100)
  q = jax.nn.softmax(jnp.asarray(rng.normal(size=shape), jnp.float32), axis=1)
  t = jnp.asarray(rng.uniform(0, 1, shape), jnp.float32)
  return x, y, q, t


def scalar(v):
  return v if v.ndim == 0 else jnp.sum(jnp.sin(v))  # a cotangent that is not all ones


def losses(axis: int):
  """Every public function (but the linear loss), as ``f(x, y, q, t) -> scalar``."""
  fns = {
      "softmax": lambda x, y, q, t: scalar(jaxce.softmax(x, axis=axis)),
      "log_softmax": lambda x, y, q, t: scalar(jaxce.log_softmax(x, axis=axis)),
      "logsumexp": lambda x, y, q, t: scalar(jaxce.logsumexp(x, axis=axis)),
      "nll_loss/sum": lambda x, y, q, t: jaxce.nll_loss(
          x, y, axis=axis, ignore_index=-100, class_weights=CLASS_WEIGHTS, reduction="sum"),
      "binary_cross_entropy/mean": lambda x, y, q, t: jaxce.binary_cross_entropy(
          jax.nn.sigmoid(x), t, weights=t, reduction="mean"),
      "binary_cross_entropy_with_logits/sum": lambda x, y, q, t: (
          jaxce.binary_cross_entropy_with_logits(x, t, pos_weight=2.0, reduction="sum")),
      "binary_cross_entropy/sum": lambda x, y, q, t: jaxce.binary_cross_entropy(
          jax.nn.sigmoid(x), t, reduction="sum"),
      "mse_loss/none": lambda x, y, q, t: scalar(jaxce.mse_loss(x, t)),
      "mse_loss/sum": lambda x, y, q, t: jaxce.mse_loss(x, t, weights=t, reduction="sum"),
      "mse_loss/mean": lambda x, y, q, t: jaxce.mse_loss(x, t, reduction="mean"),
  }
  fns["sparse_cross_entropy/mean, every label ignored"] = (
      lambda x, y, q, t: jaxce.sparse_cross_entropy(
          x, jnp.full_like(y, -100), axis=axis, ignore_index=-100, reduction="mean"))
  for reduction in ("mean", "sum", "none"):
    fns[f"sparse_cross_entropy/{reduction}"] = (
        lambda x, y, q, t, r=reduction: scalar(jaxce.sparse_cross_entropy(
            x, y, axis=axis, ignore_index=-100, reduction=r)))
    fns[f"sparse_cross_entropy+options/{reduction}"] = (
        lambda x, y, q, t, r=reduction: scalar(jaxce.sparse_cross_entropy(
            x, y, axis=axis, reduction=r, **SPARSE_OPTIONS)))
    fns[f"dense_cross_entropy/{reduction}"] = (
        lambda x, y, q, t, r=reduction: scalar(jaxce.dense_cross_entropy(
            x, q, axis=axis, reduction=r, label_smoothing=0.1, z_loss=1e-3)))
  # return_aux=True: the loss, the differentiable lse and the argmax-based counts.
  fns["sparse_cross_entropy+aux/sum"] = lambda x, y, q, t: with_aux(jaxce.sparse_cross_entropy(
      x, y, axis=axis, reduction="sum", return_aux=True, **SPARSE_OPTIONS))
  fns["dense_cross_entropy+aux/sum"] = lambda x, y, q, t: with_aux(jaxce.dense_cross_entropy(
      x, q, axis=axis, reduction="sum", z_loss=1e-3, return_aux=True))
  return fns


def with_aux(out):
  loss, aux = out
  return loss + scalar(aux.lse) + jnp.sum(aux.correct) + jnp.sum(aux.predicted % 7)


def vmapped_losses(axis: int):
  """The cross-entropies under ``jax.vmap`` over the leading (batch) axis."""
  del axis  # each example is [C, T]: classes on its axis 0
  def per_example(f):
    return lambda x, y, q, t: jnp.sum(jax.vmap(f)(x, y, q, t))
  return {
      "vmap sparse_cross_entropy": per_example(lambda x, y, q, t: jaxce.sparse_cross_entropy(
          x, y, axis=0, reduction="mean", **SPARSE_OPTIONS)),
      "vmap dense_cross_entropy": per_example(lambda x, y, q, t: jaxce.dense_cross_entropy(
          x, q, axis=0, reduction="sum")),
      "vmap log_softmax": per_example(lambda x, y, q, t: scalar(jaxce.log_softmax(x, axis=0))),
  }


# name: (logits spec, labels spec, classes on axis 1)
LAYOUTS = {
    "batch": (P("data", None), P("data"), False),
    "batch, labels split over another axis": (P("data", None), P("model"), False),
    "classes": (P(None, "model"), P(None), False),
    "batch+classes": (P("data", "model"), P("data"), False),
    "axis=1, batch+classes": (P("data", "model", None), P("data", None), True),
}


def gathered_sizes(hlo: str) -> list[int]:
  """Element counts of every all-gather's result in a compiled HLO text."""
  sizes = []
  for dims in re.findall(r"= \w+\[([\d,]*)\][^\n]*? all-gather\(", hlo):
    sizes.append(int(np.prod([int(d) for d in dims.split(",") if d] or [1])))
  return sizes


def max_error(got, want) -> float:
  errors = [float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
                         / (1 + np.abs(np.asarray(b, np.float64)))))
            for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True)]
  return max(errors)


def value_and_grads(fns):
  """One program: each loss's value and gradients w.r.t. the logits and the float labels."""
  def step(x, y, q, t):
    return {name: jax.value_and_grad(f, argnums=(0, 2, 3))(x, y, q, t) for name, f in fns.items()}
  return step


def run_jit(mode: str) -> dict:
  axis_type = (jax.sharding.AxisType.Explicit if mode == "explicit"
               else jax.sharding.AxisType.Auto)
  mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(axis_type,) * 2)
  results = {}
  for layout, (x_spec, y_spec, three_d) in LAYOUTS.items():
    axis = 1 if three_d else -1
    fns = losses(axis) | (vmapped_losses(axis) if three_d else {})
    args = inputs(three_d)
    step = value_and_grads(fns)
    want = jax.jit(step)(*args)
    with jax.sharding.set_mesh(mesh):
      x, y, q, t = args
      put = lambda a, spec: jax.device_put(a, NamedSharding(mesh, spec))  # noqa: E731
      sharded = (put(x, x_spec), put(y, y_spec), put(q, x_spec), put(t, x_spec))
      compiled = jax.jit(step).lower(*sharded).compile()
      got = compiled(*sharded)
    results[layout] = {
        "input_size": int(x.size),
        "rows": int(x.size // C),
        "shard_size": int(x.size // np.prod([mesh.shape[a] for a in x_spec if a])),
        "gathers": gathered_sizes(compiled.as_text()),
        "spec": str(x_spec),
        "losses": {name: {"err": max_error(got[name], want[name]),
                          "grad_specs": [str(g.sharding.spec) for g in got[name][1]]}
                   for name in fns},
    }
  results["sum_errors_ulp"] = sum_errors(mesh, P("data", "model"))
  return results


def sum_errors(mesh, spec) -> list[float]:
  """Relative errors, in float32 ulps, of sharded ``"sum"`` reductions of 4096 similar terms."""
  errors = []
  for seed in range(10):
    x = np.random.default_rng(seed).uniform(1.0, 2.0, (B, C)).astype(np.float32)
    exact = np.sum(np.asarray(jaxce.mse_loss(x, np.zeros_like(x)), np.float64))
    with jax.sharding.set_mesh(mesh):
      got = jax.jit(lambda x: jaxce.mse_loss(x, jnp.zeros_like(x), reduction="sum"))(
          jax.device_put(x, NamedSharding(mesh, spec)))
    errors.append(abs(float(got) - exact) / exact / float(np.finfo(np.float32).eps))
  return errors


def run_shard_map(mode: str) -> dict:
  axis_type = (jax.sharding.AxisType.Explicit if mode == "explicit"
               else jax.sharding.AxisType.Auto)
  mesh = jax.make_mesh((8,), ("data",), axis_types=(axis_type,))
  fns = {name: f for name, f in losses(-1).items()
         if name.endswith("/sum") or "/" not in name}  # per-device sums add up to the whole
  args = inputs(False)

  def second_order(f):
    return lambda *a: jax.grad(lambda x: jnp.sum(jax.grad(f)(x, *a[1:]) ** 2))(a[0])

  def local_step(x, y, q, t):
    out = {}
    for name, f in fns.items():
      value, grads = jax.value_and_grad(f, argnums=(0, 2, 3))(x, y, q, t)
      out[name] = (jax.lax.psum(value, "data"), jax.grad(f)(x, y, q, t), grads,
                   second_order(f)(x, y, q, t))
    return out

  def whole_step(x, y, q, t):
    out = {}
    for name, f in fns.items():
      value, grads = jax.value_and_grad(f, argnums=(0, 2, 3))(x, y, q, t)
      out[name] = (value, jax.grad(f)(x, y, q, t), grads, second_order(f)(x, y, q, t))
    return out

  want = jax.jit(whole_step)(*args)
  row = P("data")
  specs = {name: (P(), row, (row, row, row), row) for name in fns}
  with jax.sharding.set_mesh(mesh):
    put = lambda a: jax.device_put(a, NamedSharding(mesh, row))  # noqa: E731
    step = jax.shard_map(local_step, mesh=mesh, in_specs=(row,) * 4, out_specs=specs)
    got = jax.jit(step)(*map(put, args))
  return {name: {"err": max_error(got[name], want[name])} for name in fns}


def main(mode: str) -> None:
  assert jax.device_count() == 8, jax.devices()
  result = {}
  for name in ("explicit", "auto"):
    if mode == name:
      result = run_jit(name)
    elif mode == f"shard_map-{name}":
      result = run_shard_map(name)
  print(json.dumps(result))


if __name__ == "__main__":
  main(sys.argv[1])
