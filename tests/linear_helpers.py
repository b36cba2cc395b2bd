"""Shared inputs and helpers of the ``tests/test_linear_*.py`` files."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

import jaxce
from jaxce._linear import reference

N, D, V = 11, 6, 19  # V is prime: no chunk size below V divides it.
IGNORE = 3
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_inputs(n=N, d=D, v=V, seed=0, dtype=jnp.float32):
  """``(hidden [n, d], weight [d, v], bias [v], labels [n])``."""
  rng = np.random.default_rng(seed)
  hidden = rng.normal(size=(n, d)).astype(np.float32)
  weight = rng.normal(size=(d, v)).astype(np.float32)
  bias = rng.normal(size=(v,)).astype(np.float32)
  labels = rng.integers(0, v, size=(n,)).astype(np.int32)
  return (jnp.asarray(hidden, dtype), jnp.asarray(weight, dtype), jnp.asarray(bias, dtype),
          jnp.asarray(labels))


def option_set(use_weights, ignore, smoothing, use_where, z, reduction, *, n=N, v=V):
  """The keyword options of one combination of the loss's options."""
  rng = np.random.default_rng(1)
  options = dict(reduction=reduction)
  if use_weights:
    options["class_weights"] = jnp.asarray(rng.uniform(0.5, 2.0, size=(v,)), jnp.float32)
  if ignore:
    options["ignore_index"] = IGNORE
  if smoothing:
    options["label_smoothing"] = 0.2
  if use_where:
    options["where"] = jnp.asarray(np.arange(n) % 4 != 1)
  if z:
    options["z_loss"] = 0.05
  return options


def cotangent(n=N):
  return jnp.linspace(0.5, 1.5, n)


def value_and_grads(fn, hidden, weight, bias, cot):
  """Loss and its VJP with cotangent ``cot`` w.r.t. (hidden, weight, bias)."""
  loss, vjp = jax.vjp(fn, hidden, weight, bias)
  return loss, vjp(cot.astype(loss.dtype) if loss.ndim else jnp.ones_like(loss))


def ours_and_ref(hidden, weight, bias, labels, blocks=None, **options):
  """Loss and VJP of ``linear_cross_entropy`` (block sizes ``blocks``) and of the reference."""
  ours = value_and_grads(
      lambda h, w, b: jaxce.linear_cross_entropy(h, w, labels, bias=b, **(blocks or {}),
                                                 **options),
      hidden, weight, bias, cotangent())
  ref = value_and_grads(
      lambda h, w, b: reference.linear_cross_entropy(h, w, labels, bias=b, **options),
      hidden, weight, bias, cotangent())
  return ours, ref


def temp_bytes(fn, n, d, v, dtype=jnp.float32):
  """Compiled temporary memory (``memory_analysis()``: exact) of ``value_and_grad(fn)``."""
  shapes = (jax.ShapeDtypeStruct((n, d), dtype), jax.ShapeDtypeStruct((d, v), dtype),
            jax.ShapeDtypeStruct((n,), jnp.int32))
  compiled = jax.jit(jax.value_and_grad(fn, argnums=(0, 1))).lower(*shapes).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def run_on_devices(driver: str, devices: int = 8, timeout: int = 300):
  """Runs ``driver`` in a subprocess with ``devices`` fake CPU devices; its last line as JSON."""
  env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
  env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
             PYTHONPATH=REPO)
  proc = subprocess.run([sys.executable, "-c", driver], env=env, capture_output=True, text=True,
                        timeout=timeout, check=False, cwd=REPO)
  if proc.returncode:
    raise AssertionError(f"driver failed ({proc.returncode}):\n{proc.stderr[-6000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])
