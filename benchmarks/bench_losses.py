"""Speed of jaxce's sparse cross-entropy under jit against optax, PyTorch and a traffic floor.

Sparse cross-entropy on ``[N, C]`` float32 logits, mean reduction, forward and forward+backward
(value_and_grad w.r.t. the logits): ``jaxce.sparse_cross_entropy`` vs
``optax.softmax_cross_entropy_with_integer_labels(...).mean()`` vs PyTorch ``F.cross_entropy``
(if importable) vs a floor, a jitted ``lambda x: (x.max(axis=1), x * 0.5 + 1.0)`` that reads the
logits once and writes one array of their size, the least a fused loss+gradient must move. It also
times jaxce's own kernel with every row shifted by its max instead of its label's logit
("jaxce max-shift"), which decides whether the label pivot earns its keep (>= 5 % faster), and
with ``--baseline REV`` (repeatable) the jaxce of older git revisions, side by side.
The linear cross-entropy has its own benchmark, ``benchmarks/bench_linear.py``; eager (unjitted)
calls are timed by ``benchmarks/bench_eager.py``.

Candidates run interleaved, one call each per round, so machine noise hits all of them alike; the
table gives the minimum and the median over rounds, and ratios of minima (medians in brackets).

    python benchmarks/bench_losses.py            # N=4096, C=32000 (several minutes on 2 cores)
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

import baseline  # benchmarks/baseline.py  # benchmarks/variants.py, beside this script
import jax
import jax.numpy as jnp
import numpy as np
import optax
import variants

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
  p.add_argument("--no-torch", action="store_true", help="leave PyTorch out")
  p.add_argument("--baseline", action="append", default=[], metavar="REV",
                 help="also time the jaxce of git revision REV (e.g. 97dc1df), side by side, "
                      "to check for regressions; repeat for several")
  args = p.parse_args(argv)
  if args.quick:
    args.n, args.c = min(args.n, 512), min(args.c, 4096)
  args.rounds = args.rounds or (5 if args.quick else 15)
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

  def max_shift(x):
    return variants.max_shift_sparse_cross_entropy(x, labels)

  def older(module):
    return lambda x: module.sparse_cross_entropy(x, labels, reduction="mean")

  olds = {rev: older(baseline.import_jaxce(rev)) for rev in args.baseline}

  def floor_read(x):
    return x.max(axis=1)

  def floor_read_write(x):
    return x.max(axis=1), x * 0.5 + 1.0

  fwd = {
      "jaxce": jax_call(ours, logits),
      "optax": jax_call(theirs, logits),
      "jaxce max-shift": jax_call(max_shift, logits),
      "floor: read": jax_call(floor_read, logits),
  }
  bwd = {
      "jaxce": jax_call(jax.value_and_grad(ours), logits),
      "jaxce max-shift": jax_call(jax.value_and_grad(max_shift), logits),
      "optax": jax_call(jax.value_and_grad(theirs), logits),
      "floor: read+write": jax_call(floor_read_write, logits),
  }
  for rev, old in olds.items():
    fwd[f"jaxce@{rev}"] = jax_call(old, logits)
    bwd[f"jaxce@{rev}"] = jax_call(jax.value_and_grad(old), logits)
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
  for fn in (ours, max_shift, *olds.values()):
    got = float(fn(logits))
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
    for rev in olds:
      print(ratio_line(f"jaxce / jaxce@{rev}", times, "jaxce", f"jaxce@{rev}", 1.03))
    print(ratio_line("jaxce / jaxce max-shift (pivot)", times, "jaxce", "jaxce max-shift",
                     0.95 if stage == "forward+backward" else None))
    print(ratio_line(f"optax / {floor}", times, "optax", floor))
    if "torch" in times:
      print(ratio_line(f"torch / {floor}", times, "torch", floor))
  return results


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
  bench_sparse(args)


if __name__ == "__main__":
  main()
