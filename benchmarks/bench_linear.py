"""Linear cross-entropy under jit: jaxce vs the naive logits version vs tokamax, time and memory.

For each shape ``(N, D, V)`` and dtype it compiles ``jax.value_and_grad`` (w.r.t. hidden and
weight, ``reduction="mean"``) of

* ``jaxce``: ``jaxce.linear_cross_entropy(hidden, weight, labels, reduction="mean")``;
* ``naive``: ``jaxce._linear.reference.linear_cross_entropy`` (``sparse_cross_entropy`` of
  ``hidden @ weight``), which stores the ``[N, V]`` logits;
* ``tokamax``: ``tokamax.linear_softmax_cross_entropy_loss(hidden, labels, weight,
  reduction="mean", implementation="chunked_xla")`` when tokamax imports (it needs Python >= 3.12);

prints each one's compiled temporary memory (``memory_analysis()``: exact, noise-free) and then
times them interleaved, one call each per round in rotating order, so machine noise hits all
alike. The table gives min and median wall time over rounds (and the process CPU time, a steadier
figure on a shared machine) and ratios of minima (medians in brackets).

    python3.12 benchmarks/bench_linear.py          # the four CPU shapes, fp32 + bf16
    python3.12 benchmarks/bench_linear.py --quick  # smoke run, seconds
    python benchmarks/bench_linear.py --shapes 4096,1024,32768 --dtypes float32 --rounds 5
    python benchmarks/bench_linear.py --impls jaxce --baseline REV   # against an older jaxce
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time

import baseline  # benchmarks/baseline.py
import jax
import jax.numpy as jnp
import numpy as np

import jaxce
from jaxce._linear import reference

try:
  import tokamax
except ImportError:  # tokamax needs Python >= 3.12; the benchmark runs without it.
  tokamax = None

ISSUE_SHAPES = "4096,1024,32768;8192,1024,65536"


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--shapes", default=ISSUE_SHAPES, help="N,D,V[;N,D,V...]")
  p.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated dtypes")
  p.add_argument("--rounds", type=int, default=5, help="timed rounds (default 5)")
  p.add_argument("--impls", default="jaxce,naive,tokamax", help="which candidates to run")
  p.add_argument("--token-chunk-size", type=int, default=None, help="jaxce token_chunk_size")
  p.add_argument("--chunk-size", type=int, default=None, help="jaxce chunk_size")
  p.add_argument("--accumulate", default=None, help="jaxce grad_accumulation_dtype")
  p.add_argument("--variants", default="",
                 help="extra jaxce settings to time beside the others, e.g. "
                      "'t=1024,c=8192;acc=bfloat16' (t: token_chunk_size, c: chunk_size, "
                      "acc: grad_accumulation_dtype, cap: softcap)")
  p.add_argument("--check", action="store_true",
                 help="print each candidate's gradient error relative to the naive version's")
  p.add_argument("--memory-only", action="store_true", help="compile, report memory, run nothing")
  p.add_argument("--baseline", action="append", default=[], metavar="REV",
                 help="also time the jaxce of git revision REV, side by side (repeatable)")
  p.add_argument("--quick", action="store_true", help="one small shape, float32, 2 rounds")
  args = p.parse_args(argv)
  if args.quick:
    args.shapes, args.dtypes, args.rounds = "1024,256,8192", "float32", 2
  args.shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes.split(";") if s]
  args.dtypes = [jnp.dtype(d) for d in args.dtypes.split(",") if d]
  args.impls = [i for i in args.impls.split(",") if i]
  args.variants = [parse_variant(v) for v in args.variants.split(";") if v]
  args.baselines = {rev: baseline.import_jaxce(rev) for rev in args.baseline}
  return args


_VARIANT_KEYS = {"t": "token_chunk_size", "c": "chunk_size", "acc": "grad_accumulation_dtype",
                 "cap": "softcap"}


def parse_variant(text):
  """``'t=1024,acc=bfloat16'`` -> ``{'token_chunk_size': 1024, 'grad_accumulation_dtype': ...}``."""
  options = {}
  for item in text.split(","):
    key, _, value = item.partition("=")
    if key not in _VARIANT_KEYS:
      raise SystemExit(f"bench_linear: unknown variant key {key!r} in {text!r}; "
                       f"use {', '.join(_VARIANT_KEYS)}")
    options[_VARIANT_KEYS[key]] = {"acc": str, "cap": float}.get(key, int)(value)
  return text, options


def candidates(args, labels):
  """``{name: loss(hidden, weight)}`` for the candidates that can run here."""
  def ours(**options):
    return lambda h, w: jaxce.linear_cross_entropy(h, w, labels, reduction="mean", **options)

  def naive(h, w):
    return reference.linear_cross_entropy(h, w, labels, reduction="mean")

  def naive_optax(h, w):
    import optax  # noqa: PLC0415 (only for this candidate)
    return optax.softmax_cross_entropy_with_integer_labels(
        (h @ w).astype(jnp.float32), labels).mean()

  def tokamax_impl(implementation):
    return lambda h, w: tokamax.linear_softmax_cross_entropy_loss(
        h, labels, w, reduction="mean", implementation=implementation)

  fns = {"jaxce": ours(token_chunk_size=args.token_chunk_size, chunk_size=args.chunk_size,
                       grad_accumulation_dtype=args.accumulate),
         "naive": naive, "naive-optax": naive_optax}
  if tokamax is not None:
    fns["tokamax"] = tokamax_impl("chunked_xla")
    fns["tokamax-xla"] = tokamax_impl("xla")
  fns = {name: fn for name, fn in fns.items() if name in args.impls}
  for text, options in args.variants:
    fns[f"jaxce[{text}]"] = ours(**options)
  for rev, module in args.baselines.items():
    fns[f"jaxce@{rev}"] = (lambda h, w, m=module: m.linear_cross_entropy(
        h, w, labels, reduction="mean", token_chunk_size=args.token_chunk_size,
        chunk_size=args.chunk_size, grad_accumulation_dtype=args.accumulate))
  return fns


def interleaved(calls, rounds):
  """Times each ``fn()`` once per round, rotating the order; returns {name: ([wall], [cpu])}."""
  names = list(calls)
  out = {name: ([], []) for name in names}
  for r in range(rounds):
    for name in names[r % len(names):] + names[:r % len(names)]:
      wall, cpu = time.perf_counter(), time.process_time()
      jax.block_until_ready(calls[name]())
      out[name][0].append(time.perf_counter() - wall)
      out[name][1].append(time.process_time() - cpu)
  return out


def seconds(t):
  """``1.234 s`` or, under a second, ``23.45 ms``."""
  return f"{t:.3f} s" if t >= 1 else f"{t * 1e3:.2f} ms"


def ratio(a, b):
  return f"{min(a) / min(b):.2f}x ({statistics.median(a) / statistics.median(b):.2f}x)"


def run_case(args, n, d, v, dtype):
  rng = np.random.default_rng(0)
  hidden = jnp.asarray(rng.normal(size=(n, d)), dtype)
  weight = jnp.asarray(rng.normal(size=(d, v)) / np.sqrt(d), dtype)
  labels = jnp.asarray(rng.integers(0, v, size=(n,)), jnp.int32)
  print(f"\n## N={n}, D={d}, V={v}, {dtype.name}: value_and_grad w.r.t. hidden and weight, "
        f"reduction='mean'")
  compiled, memory = {}, {}
  fns = candidates(args, labels)
  if args.check:
    check_gradients(fns, hidden, weight, labels)
  for name, fn in fns.items():
    step = jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))
    compiled[name] = step.lower(hidden, weight).compile()
    memory[name] = compiled[name].memory_analysis().temp_size_in_bytes / 2**20
  if args.memory_only:
    for name in compiled:
      print(f"| {name} | compiled temp memory {memory[name]:.1f} MiB |")
    return
  losses = {name: float(c(hidden, weight)[0]) for name, c in compiled.items()}
  times = interleaved({name: (lambda c=c: c(hidden, weight)) for name, c in compiled.items()},
                      args.rounds)
  print("| | loss | compiled temp memory | wall min | wall median | CPU min |")
  print("| --- | --- | --- | --- | --- | --- |")
  for name in compiled:
    wall, cpu = times[name]
    print(f"| {name} | {losses[name]:.6f} | {memory[name]:.1f} MiB | {seconds(min(wall))} "
          f"| {seconds(statistics.median(wall))} | {seconds(min(cpu))} |")
  for ours in (name for name in times if name.startswith("jaxce") and "@" not in name):
    for other in ("tokamax", "naive", *(f"jaxce@{rev}" for rev in args.baselines)):
      if other in times:
        print(f"{ours} / {other}: wall {ratio(times[ours][0], times[other][0])}, "
              f"CPU {ratio(times[ours][1], times[other][1])}, "
              f"memory {memory[ours] / memory[other]:.2f}x")


def check_gradients(fns, hidden, weight, labels):
  """Prints max |g - g_ref| / max |g_ref| for the hidden and weight gradients.

  The reference is the naive version computed in float32 from the same inputs.
  """
  wide = [jnp.asarray(a, jnp.float32) for a in (hidden, weight)]

  def naive(h, w):
    return reference.linear_cross_entropy(h, w, labels, reduction="mean")

  ref = jax.jit(jax.grad(naive, argnums=(0, 1)))(*wide)
  ref = [np.asarray(g) for g in ref]
  for name, fn in fns.items():
    grads = jax.jit(jax.grad(fn, argnums=(0, 1)))(hidden, weight)
    errors = [float(np.max(np.abs(np.asarray(g, np.float32) - r)) / np.max(np.abs(r)))
              for g, r in zip(grads, ref, strict=True)]
    print(f"gradient error vs float32 naive: {name}: hidden {errors[0]:.2e}, "
          f"weight {errors[1]:.2e}")
    del grads


def main(argv=None):
  args = parse_args(argv)
  print(f"# bench_linear: Python {platform.python_version()}, jax {jax.__version__}, "
        f"tokamax {getattr(tokamax, '__version__', 'not installed')}, "
        f"{jax.devices()[0].platform} x{jax.device_count()}, {args.rounds} rounds; "
        f"argv: {' '.join(sys.argv[1:]) or '(defaults)'}")
  for n, d, v in args.shapes:
    for dtype in args.dtypes:
      run_case(args, n, d, v, dtype)


if __name__ == "__main__":
  main()
