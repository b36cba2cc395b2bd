"""Eager (unjitted) call time of jaxce's losses against optax / jax.nn, side by side in one process.

People call losses eagerly in notebooks, evaluation loops and tests. For each loss and shape this
times, interleaved in rounds:

* a repeated eager call of the value, and of ``jax.grad`` of its mean (min and median over rounds);
* the first call on a shape no call in the process has seen (a fresh shape per round and
  candidate), for the value, the gradient, and the gradient right after an untimed value call
  on the same shape (evaluate-then-train: op-by-op references reuse their forward compilations).

It prints ratios jaxce / reference; the targets are <= 3x for repeated calls and <= 1x for first
calls.

    python benchmarks/bench_eager.py            # about 3.5 minutes on 2 cores
    python benchmarks/bench_eager.py --quick
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxce


def _losses():
  """name -> (jaxce loss, reference loss, make inputs); each loss maps (x, t) to a scalar."""

  def sparse_inputs(rng, n, c):
    return (jnp.asarray(rng.normal(size=(n, c)), jnp.float32),
            jnp.asarray(rng.integers(0, c, size=n), jnp.int32))

  def dense_inputs(rng, n, c):
    return (jnp.asarray(rng.normal(size=(n, c)), jnp.float32),
            jnp.asarray(rng.dirichlet(np.ones(c), size=n), jnp.float32))

  def ref_nll(lp, y):
    return -jnp.mean(jnp.take_along_axis(lp, y[:, None], axis=1))

  return {
      "sparse_cross_entropy": (
          lambda x, y: jaxce.sparse_cross_entropy(x, y, reduction="mean"),
          lambda x, y: optax.softmax_cross_entropy_with_integer_labels(x, y).mean(),
          sparse_inputs),
      "dense_cross_entropy": (
          lambda x, t: jaxce.dense_cross_entropy(x, t, reduction="mean"),
          lambda x, t: optax.softmax_cross_entropy(x, t).mean(),
          dense_inputs),
      "nll_loss": (
          lambda x, y: jaxce.nll_loss(x, y, reduction="mean"),
          ref_nll,
          sparse_inputs),
      "log_softmax": (
          lambda x, _: jaxce.log_softmax(x).mean(),
          lambda x, _: jax.nn.log_softmax(x).mean(),
          sparse_inputs),
  }


def _timed(fn):
  start = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - start


_FRESH = itertools.count(1)


def _fresh_shape(n, c):
  """``(n + k, c + k)`` for a k no earlier call has used: neither dimension was seen with it.

  Both dimensions change, so no op of either library (not even one that depends on the rows
  or the classes alone) can reuse an earlier compilation.
  """
  k = next(_FRESH)
  return n + k, c + k


def _grad(loss):
  return lambda x, t: jax.grad(loss)(x, t)


def bench(name, ours, ref, make, shape, rounds, rng):
  """Returns rows of (stage, ours times, reference times)."""
  x, t = make(rng, *shape)
  stages = {"value": (ours, ref), "grad": (_grad(ours), _grad(ref))}
  rows = []
  for stage, (a, b) in stages.items():
    a(x, t), b(x, t)  # first calls out of the way
    ta, tb = [], []
    for r in range(rounds):
      pair = [(ta, a), (tb, b)] if r % 2 == 0 else [(tb, b), (ta, a)]
      for times, fn in pair:
        times.append(_timed(lambda fn=fn: fn(x, t)))
    rows.append((f"{name} {stage}, repeated", ta, tb, 3.0))
  # First calls: every round and candidate gets a shape nobody has seen, so each stage pays
  # its own compilations ("grad" has not seen the shape's value either). "grad after value"
  # times the gradient on a shape whose value that candidate has just computed (untimed): the
  # evaluate-then-train order, where op-by-op references reuse their forward compilations.
  scenarios = {"value, first call": ("value", False), "grad, first call": ("grad", False),
               "grad after value, first call": ("grad", True)}
  for label, (stage, after_value) in scenarios.items():
    ta, tb = [], []
    for r in range(max(2, rounds // 8)):
      pair = [(ta, stages[stage][0], ours), (tb, stages[stage][1], ref)]
      for times, fn, value in (pair if r % 2 == 0 else pair[::-1]):
        args = make(rng, *_fresh_shape(*shape))
        if after_value:
          jax.block_until_ready(value(*args))
        times.append(_timed(lambda fn=fn, args=args: fn(*args)))
    rows.append((f"{name} {label}", ta, tb, 1.0))
  return rows


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--quick", action="store_true", help="few rounds (smoke run)")
  p.add_argument("--rounds", type=int, default=None, help="timed rounds (default 40)")
  args = p.parse_args(argv)
  rounds = args.rounds or (6 if args.quick else 40)
  print(f"jax {jax.__version__} ({jax.default_backend()}), optax {optax.__version__}; "
        f"{rounds} interleaved rounds; times in ms, min / median")
  rng = np.random.default_rng(0)
  header = f"{'loss, stage':<46} {'jaxce':>15} {'reference':>15} {'ratio (min)':>12}  target"
  for shape in ((8, 10), (256, 1000)):
    print(f"\n== shape {shape} ==\n{header}")
    for name, (ours, ref, make) in _losses().items():
      for label, ta, tb, target in bench(name, ours, ref, make, shape, rounds, rng):
        ratio = min(ta) / min(tb)
        verdict = "PASS" if ratio <= target else "MISS"
        print(f"{label:<46} {min(ta) * 1e3:6.2f} / {statistics.median(ta) * 1e3:6.2f} "
              f"{min(tb) * 1e3:6.2f} / {statistics.median(tb) * 1e3:6.2f} {ratio:11.2f}x"
              f"  <= {target:.0f}x {verdict}")


if __name__ == "__main__":
  main()
