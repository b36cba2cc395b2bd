"""Speed and memory of jaxce's cross-entropies against optax, PyTorch and a memory-traffic floor.

Two benchmarks (issue 4):

1. Sparse cross-entropy on ``[N, C]`` float32 logits, mean reduction, forward and forward+backward
   (value_and_grad w.r.t. the logits): ``jaxce.sparse_cross_entropy`` vs
   ``optax.softmax_cross_entropy_with_integer_labels(...).mean()`` vs PyTorch ``F.cross_entropy``
   (if importable) vs a floor, a jitted ``lambda x: (x.max(axis=1), x * 0.5 + 1.0)`` that reads the
   logits once and writes one array of their size, the least a fused loss+gradient must move.
2. Linear cross-entropy ``[N, D] @ [D, V]``, loss and gradients w.r.t. hidden and weight:
   ``jaxce.linear_cross_entropy`` (blocked) vs the naive ``sparse_cross_entropy(hidden @ weight)``;
   compiled temporary memory (``memory_analysis()``, exact) and time.

Candidates run interleaved, one call each per round, so machine noise hits all of them alike; the
table gives the minimum and the median over rounds, and ratios of minima (medians in brackets).

    python benchmarks/bench_losses.py            # the issue's sizes (several minutes on 2 cores)
    python benchmarks/bench_losses.py --quick    # small smoke run
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxce

try:
  import torch
  import torch.nn.functional as F
except ImportError:  # PyTorch is optional.
  torch = None


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--quick", action="store_true", help="small sizes and few rounds (smoke run)")
  p.add_argument("--rounds", type=int, default=None, help="timed rounds, sparse CE (default 15)")
  p.add_argument("--n", type=int, default=4096, help="sparse CE rows")
  p.add_argument("--c", type=int, default=32000, help="sparse CE classes")
  p.add_argument("--lin-n", type=int, default=8192, help="linear CE tokens")
  p.add_argument("--lin-d", type=int, default=1024, help="linear CE hidden size")
  p.add_argument("--lin-v", type=int, default=65536, help="linear CE vocabulary")
  p.add_argument("--chunk-size", type=int, default=None, help="linear CE chunk (default: jaxce's)")
  p.add_argument("--chunk-sweep", type=str, default="",
                 help="comma-separated chunk sizes to time too, e.g. 2048,4096,8192")
  p.add_argument("--lin-rounds", type=int, default=None, help="timed rounds for linear CE")
  p.add_argument("--skip-sparse", action="store_true")
  p.add_argument("--skip-linear", action="store_true")
  p.add_argument("--no-torch", action="store_true", help="leave PyTorch out")
  args = p.parse_args(argv)
  if args.quick:
    args.n, args.c = min(args.n, 512), min(args.c, 4096)
    args.lin_n, args.lin_d, args.lin_v = min(args.lin_n, 1024), min(args.lin_d, 128), min(
        args.lin_v, 8192)
  args.rounds = args.rounds or (5 if args.quick else 15)
  args.lin_rounds = args.lin_rounds or (2 if args.quick else 3)
  return args


def interleaved(candidates, rounds):
  """Times each ``fn()`` once per round, rotating the order; returns {name: [seconds]}."""
  names = list(candidates)
  times = {name: [] for name in names}
  for r in range(rounds):
    for name in names[r % len(names):] + names[:r % len(names)]:
      start = time.perf_counter()
      candidates[name]()
      times[name].append(time.perf_counter() - start)
  return times


def jax_call(fn, *args):
  fn = jax.jit(fn)
  jax.block_until_ready(fn(*args))  # compile and warm up
  return lambda: jax.block_until_ready(fn(*args))


def table(rows, header):
  widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
  fmt = "  ".join(f"{{:{'<' if i == 0 else '>'}{w}}}" for i, w in enumerate(widths))
  lines = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
  lines += [fmt.format(*r) for r in rows]
  return "\n".join(lines)


def ratio_line(label, times, num, den, target=None):
  lo = min(times[num]) / min(times[den])
  med = statistics.median(times[num]) / statistics.median(times[den])
  line = f"  {label:<34} {lo:6.2f}x  (median {med:5.2f}x)"
  if target is not None:
    line += f"   target <= {target:.2f}x: {'PASS' if lo <= target else 'MISS'}"
  return line


def bench_sparse(args):
  n, c = args.n, args.c
  print(f"\n== Sparse cross-entropy: N={n}, C={c}, float32, reduction=mean; "
        f"{args.rounds} interleaved rounds ==")
  rng = np.random.default_rng(0)
  logits_np = rng.normal(size=(n, c)).astype(np.float32) * 2
  labels_np = rng.integers(0, c, size=(n,)).astype(np.int32)
  logits, labels = jnp.asarray(logits_np), jnp.asarray(labels_np)

  def ours(x):
    return jaxce.sparse_cross_entropy(x, labels, reduction="mean")

  def theirs(x):
    return optax.softmax_cross_entropy_with_integer_labels(x, labels).mean()

  def floor_read(x):
    return x.max(axis=1)

  def floor_read_write(x):
    return x.max(axis=1), x * 0.5 + 1.0

  fwd = {
      "jaxce": jax_call(ours, logits),
      "optax": jax_call(theirs, logits),
      "floor: read": jax_call(floor_read, logits),
  }
  bwd = {
      "jaxce": jax_call(jax.value_and_grad(ours), logits),
      "optax": jax_call(jax.value_and_grad(theirs), logits),
      "floor: read+write": jax_call(floor_read_write, logits),
  }
  if torch is not None and not args.no_torch:
    x_t, y_t = torch.from_numpy(logits_np), torch.from_numpy(labels_np).long()
    xg_t = x_t.clone().requires_grad_(True)

    def torch_fwd():
      with torch.no_grad():
        F.cross_entropy(x_t, y_t)

    def torch_fwd_bwd():
      xg_t.grad = None
      F.cross_entropy(xg_t, y_t).backward()

    torch_fwd(), torch_fwd_bwd()  # warm up
    fwd["torch"], bwd["torch"] = torch_fwd, torch_fwd_bwd

  # Check the candidates agree before timing them.
  ref = float(theirs(logits))
  got = float(ours(logits))
  assert abs(got - ref) <= 1e-5 * abs(ref), (got, ref)

  results = {}
  for stage, cands in (("forward", fwd), ("forward+backward", bwd)):
    times = interleaved(cands, args.rounds)
    results[stage] = times
    rows = [(name, f"{min(t) * 1e3:.2f}", f"{statistics.median(t) * 1e3:.2f}")
            for name, t in times.items()]
    print(f"\n{stage}\n" + table(rows, ("candidate", "min ms", "median ms")))
    floor = "floor: read" if stage == "forward" else "floor: read+write"
    targets = (0.9, 0.45, 1.2) if stage == "forward+backward" else (None, None, None)
    print("ratios (of minima):")
    print(ratio_line("jaxce / optax", times, "jaxce", "optax", targets[0]))
    if "torch" in times:
      print(ratio_line("jaxce / torch", times, "jaxce", "torch", targets[1]))
    print(ratio_line(f"jaxce / {floor}", times, "jaxce", floor, targets[2]))
    print(ratio_line(f"optax / {floor}", times, "optax", floor))
    if "torch" in times:
      print(ratio_line(f"torch / {floor}", times, "torch", floor))
  return results


def bench_linear(args):
  n, d, v = args.lin_n, args.lin_d, args.lin_v
  chunk = args.chunk_size or jaxce._linear.DEFAULT_CHUNK_SIZE
  sweep = [int(s) for s in args.chunk_sweep.split(",") if s]
  print(f"\n== Linear cross-entropy: N={n}, D={d}, V={v}, float32, loss + grads w.r.t. hidden and "
        f"weight; {args.lin_rounds} interleaved rounds ==")
  key_h, key_w, key_y = jax.random.split(jax.random.PRNGKey(0), 3)
  hidden = jax.random.normal(key_h, (n, d), jnp.float32)
  weight = jax.random.normal(key_w, (d, v), jnp.float32) / np.sqrt(d)
  labels = jax.random.randint(key_y, (n,), 0, v)

  def naive(h, w, y):
    return jaxce.sparse_cross_entropy(h @ w, y, reduction="mean")

  def blocked(size):
    return lambda h, w, y: jaxce.linear_cross_entropy(h, w, y, chunk_size=size)

  fns = {"naive: sparse_cross_entropy(h @ w)": naive, f"jaxce.linear_cross_entropy chunk={chunk}":
         blocked(chunk)}
  for size in sweep:
    if size != chunk:
      fns[f"jaxce.linear_cross_entropy chunk={size}"] = blocked(size)
  naive_name, ours_name = list(fns)[:2]

  shapes = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (hidden, weight, labels)]
  temp = {}
  for name, fn in fns.items():
    grad_fn = jax.value_and_grad(fn, argnums=(0, 1))
    temp[name] = jax.jit(grad_fn).lower(*shapes).compile().memory_analysis().temp_size_in_bytes

  calls = {name: jax_call(jax.value_and_grad(fn, argnums=(0, 1)), hidden, weight, labels)
           for name, fn in fns.items()}
  # Same loss and gradients (checked once, outside the timing).
  ref = jax.jit(jax.value_and_grad(naive, argnums=(0, 1)))(hidden, weight, labels)
  got = jax.jit(jax.value_and_grad(fns[ours_name], argnums=(0, 1)))(hidden, weight, labels)
  errs = [float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(a)))
          for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got), strict=True)]
  del ref, got
  times = interleaved(calls, args.lin_rounds)

  rows = [(name, f"{temp[name] / 2**20:.1f}", f"{temp[name] / temp[naive_name]:.1%}",
           f"{min(t):.2f}", f"{statistics.median(t):.2f}",
           f"{min(t) / min(times[naive_name]):.2f}x")
          for name, t in times.items()]
  print(table(rows, ("candidate", "temp MiB", "temp/naive", "min s", "median s",
                     "time/naive")))
  print("max relative difference to naive (loss, d hidden, d weight): "
        + ", ".join(f"{e:.1e}" for e in errs))
  mem_ratio = temp[ours_name] / temp[naive_name]
  print("ratios:")
  print(f"  {'temp memory, blocked / naive':<34} {mem_ratio:6.1%}"
        f"              target <= 10%: {'PASS' if mem_ratio <= 0.10 else 'MISS'}")
  print(ratio_line("time, blocked / naive", times, ours_name, naive_name, 1.25))
  return temp, times


def main(argv=None):
  args = parse_args(argv)
  cmd = " ".join(shlex.quote(a) for a in [sys.executable.rsplit("/", 1)[-1]] + sys.argv)
  print(f"command: {cmd}")
  threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  info = (f"jax {jax.__version__} ({jax.default_backend()}, {jax.device_count()} device), "
          f"optax {optax.__version__}, {threads} CPU threads, {platform.processor() or 'cpu'}")
  if torch is not None and not args.no_torch:
    torch.set_num_threads(threads)
    info += f", torch {torch.__version__} ({torch.get_num_threads()} threads)"
  print(info)
  if not args.skip_sparse:
    bench_sparse(args)
  if not args.skip_linear:
    bench_linear(args)


if __name__ == "__main__":
  main()
