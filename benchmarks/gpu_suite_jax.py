"""The JAX part of the GPU suite (run by ``gpu_suite.py``; writes its results to ``--result``).

Linear cross-entropy (``value_and_grad`` w.r.t. hidden and weight, mean, bf16): jaxce default,
jaxce with ``grad_accumulation_dtype=jnp.float32``, the naive version that stores the logits
(``jaxce.sparse_cross_entropy(h @ w)``, and optax on float32 logits), tokamax ``chunked_xla`` and
``xla``. Sparse cross-entropy (float32 and bf16, forward and forward+backward): jaxce, optax and a
memory-traffic floor (one read of the logits; for forward+backward one read and one write of a
same-size array). Dense cross-entropy at one shape, float32. train.py's steady-state step against
a minimal ``jit`` + ``lax.scan`` step (``benchmarks/bench_train.py``'s ``measure_step``).

Each case compiles every candidate, records its compiled temporary memory and its loss and
gradient errors against a float32 reference, then times the candidates in interleaved rounds,
as many as fit the case's share of ``--budget``. A candidate that fails is recorded with its error.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
import traceback

PROCESS_START = time.perf_counter()
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path[:0] = [REPO, HERE]

import gpu_suite  # noqa: E402
import jax  # noqa: E402  pylint: disable=wrong-import-position
import jax.numpy as jnp  # noqa: E402
import variants  # noqa: E402  (benchmarks/variants.py)

import jaxce  # noqa: E402

MiB = 2**20


def error_text(e: BaseException) -> str:
  return "".join(traceback.format_exception_only(type(e), e)).strip()[-1500:]


class Worker:

  def __init__(self, args):
    self.args = args
    self.start = time.perf_counter()
    self.deadline = self.start + args.budget
    device = jax.devices()[0]
    self.out = {"device": f"{device.platform}: {device.device_kind} x{jax.device_count()}",
                "jaxce_path": os.path.dirname(jaxce.__file__),
                "linear": [], "sparse": [], "dense": [], "step": None}
    try:
      self.out["environment"] = jax.print_environment_info(return_string=True)
    except Exception as e:  # noqa: BLE001  (nvidia-smi missing and the like)
      self.out["environment"] = error_text(e)
    self.lo, self.hi = (2, 2) if args.smoke else (3, 30)
    self.err = jax.jit(lambda g, r: jnp.max(jnp.abs(g.astype(jnp.float32) - r))
                       / jnp.max(jnp.abs(r)))
    self.save()

  def save(self):
    gpu_suite.write_json(self.args.result, self.out)

  def left(self) -> float:
    return self.deadline - time.perf_counter()

  # --------------------------------------------------------------------- shared machinery

  def compile_candidate(self, fn, args, ref, kind):
    """Compiles ``fn``, runs it once; its entry (memory, loss and gradient errors) and call."""
    compiled = jax.jit(fn).lower(*args).compile()
    memory = compiled.memory_analysis()
    out = jax.block_until_ready(compiled(*args))
    entry = {"framework": "jax", "status": "ok", "memory_kind": "compiled",
             "memory_mib": memory.temp_size_in_bytes / MiB if memory else None}
    if kind == "value":
      entry["loss"] = float(out)
      entry["loss_error"] = gpu_suite.relative_error(float(out), ref[0])
    elif kind == "value_and_grad":
      loss, grads = out
      grads = grads if isinstance(grads, tuple) else (grads,)
      entry["loss"] = float(loss)
      entry["loss_error"] = gpu_suite.relative_error(float(loss), ref[0])
      names = ("hidden", "weight") if len(grads) == 2 else ("logits",)
      entry["grad_error"] = {k: float(self.err(g, r))
                             for k, g, r in zip(names, grads, ref[1], strict=True)}
    del out
    return entry, (lambda: jax.block_until_ready(compiled(*args)))

  def run_case(self, case, candidates, args, ref, kind, budget_s):
    """Compiles, checks and times ``candidates`` ({name: fn or an error string}) on ``args``."""
    case_start = time.perf_counter()
    calls = {}
    for name, fn in candidates.items():
      if isinstance(fn, str):
        case["candidates"][name] = {"framework": "jax", "status": "skipped", "error": fn}
        continue
      try:
        this_kind = "floor" if name == "floor" else kind
        case["candidates"][name], calls[name] = self.compile_candidate(fn, args, ref, this_kind)
      except Exception as e:  # noqa: BLE001  (recorded, never fatal)
        case["candidates"][name] = {"framework": "jax", "status": "failed",
                                    "error": error_text(e)}
    probe = {name: self.timed(case, calls, name) for name in list(calls)}
    probe = {name: t for name, t in probe.items() if t is not None}
    spent = time.perf_counter() - case_start
    rounds = gpu_suite.rounds_for(budget_s - spent, sum(probe.values()), lo=self.lo, hi=self.hi)
    times = {name: [] for name in calls}
    for order in gpu_suite.rotations(list(calls), rounds):
      for name in order:
        if name in calls:
          t = self.timed(case, calls, name)
          if t is not None:
            times[name].append(t)
    times = {name: ts for name, ts in times.items() if name in calls}
    for name, ts in times.items():
      case["candidates"][name]["time_ms"] = gpu_suite.spread(ts)
    calls.clear()
    return case

  def timed(self, case, calls, name):
    """Seconds of one call of ``calls[name]``; a call that fails is recorded and dropped."""
    t = time.perf_counter()
    try:
      calls[name]()
    except Exception as e:  # noqa: BLE001  (an out-of-memory error, say: recorded, never fatal)
      case["candidates"][name] = {"framework": "jax", "status": "failed",
                                  "error": error_text(e)}
      del calls[name]
      return None
    return time.perf_counter() - t

  def budget(self, cases_left: int, share: float) -> float:
    return max(self.left() * share / max(cases_left, 1), 0.5)

  # --------------------------------------------------------------------- linear cross-entropy

  def linear(self, share):
    shapes = gpu_suite.SMOKE_LINEAR_SHAPES if self.args.smoke else gpu_suite.LINEAR_SHAPES
    try:
      import tokamax  # pylint: disable=g-import-not-at-top
      self.out["tokamax"] = getattr(tokamax, "__version__", "?")
      no_tokamax = None
    except Exception as e:  # noqa: BLE001  (tokamax needs Python >= 3.12)
      tokamax, no_tokamax = None, f"tokamax does not import: {error_text(e)}"
    weights = {}
    for i, (n, d, v) in enumerate(shapes):
      try:
        if (d, v) not in weights:
          weights.clear()
          weights[(d, v)] = gpu_suite.linear_weight(d, v)
        hidden, labels_np = gpu_suite.linear_hidden(n, d, v)
        self.out["linear"].append(self.linear_case(n, d, v, hidden, weights[(d, v)], labels_np,
                                                   tokamax, no_tokamax,
                                                   self.budget(len(shapes) - i, share)))
      except Exception as e:  # noqa: BLE001
        self.out["linear"].append({"shape": [n, d, v], "dtype": "bfloat16", "candidates": {
            "(case)": {"framework": "jax", "status": "failed", "error": error_text(e)}}})
      self.save()

  def linear_case(self, n, d, v, hidden_np, weight_np, labels_np, tokamax, no_tokamax, budget_s):
    dtype = jnp.bfloat16
    labels = jnp.asarray(labels_np)
    h, w = jnp.asarray(hidden_np, dtype), jnp.asarray(weight_np, dtype)

    def naive(h, w):
      return jaxce.sparse_cross_entropy(h @ w, labels, reduction="mean")

    def naive_optax(h, w):
      import optax  # pylint: disable=g-import-not-at-top
      return optax.softmax_cross_entropy_with_integer_labels(
          (h @ w).astype(jnp.float32), labels).mean()

    def reference(h, w):
      logits = jnp.matmul(h, w, precision=jax.lax.Precision.HIGHEST)
      return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1))

    ref_loss, ref_grads = jax.jit(jax.value_and_grad(reference, argnums=(0, 1)))(
        h.astype(jnp.float32), w.astype(jnp.float32))
    ref = (float(ref_loss), ref_grads)

    def ours(**options):
      return lambda h, w: jaxce.linear_cross_entropy(h, w, labels, reduction="mean", **options)

    def tok(implementation):
      if tokamax is None:
        return no_tokamax
      return lambda h, w: tokamax.linear_softmax_cross_entropy_loss(
          h, labels, w, reduction="mean", implementation=implementation)

    fns = {"jaxce": ours(), "jaxce f32 accumulation": ours(grad_accumulation_dtype=jnp.float32),
           "naive jax": naive, "naive optax f32 logits": naive_optax,
           "tokamax chunked_xla": tok("chunked_xla"), "tokamax xla": tok("xla")}
    fns = {k: f if isinstance(f, str) else jax.value_and_grad(f, argnums=(0, 1))
           for k, f in fns.items()}
    case = {"shape": [n, d, v], "dtype": "bfloat16", "candidates": {},
            "reference_loss": ref[0]}
    self.run_case(case, fns, (h, w), ref, "value_and_grad", budget_s)
    del ref_grads, ref
    return case

  # --------------------------------------------------------------------- sparse and dense

  def softmax_losses(self, share):
    smoke = self.args.smoke
    sparse_shapes = gpu_suite.SMOKE_SPARSE_SHAPES if smoke else gpu_suite.SPARSE_SHAPES
    dense_shapes = gpu_suite.SMOKE_DENSE_SHAPES if smoke else gpu_suite.DENSE_SHAPES
    cases = [("sparse", s, dt) for s in sparse_shapes for dt in ("float32", "bfloat16")]
    cases += [("dense", s, "float32") for s in dense_shapes]
    for i, (loss, (n, c), dtype) in enumerate(cases):
      budget = self.budget(len(cases) - i, share)
      try:
        key_x, key_y = jax.random.split(jax.random.key(0))
        x = (2 * jax.random.normal(key_x, (n, c), jnp.float32)).astype(dtype)
        if loss == "sparse":
          y = jax.random.randint(key_y, (n,), 0, c)
        else:
          y = jax.nn.softmax(jax.random.normal(key_y, (n, c), jnp.float32))
        ours, theirs, reference = softmax_losses(loss, y)
        ref_loss, ref_grad = jax.jit(jax.value_and_grad(reference))(x.astype(jnp.float32))
        ref = (float(ref_loss), (ref_grad,))
        for stage in gpu_suite.stages(loss, dtype, smoke):
          case = {"shape": [n, c], "dtype": dtype, "stage": stage, "candidates": {}}
          if stage == "forward":
            fns = {"jaxce": ours, "optax": theirs, "floor": lambda x: jnp.max(x, axis=1)}
            kind = "value"
          else:
            fns = {"jaxce": jax.value_and_grad(ours), "optax": jax.value_and_grad(theirs),
                   "floor": lambda x: (jnp.max(x, axis=1), x * 0.5 + 1.0)}
            kind = "value_and_grad"
          if loss == "sparse" and dtype == "float32":  # the kernel designs jaxce/_platform.py picks
            for suffix, keep in (("", True), (", recompute exp", False)):
              variant = functools.partial(variants.max_shift_sparse_cross_entropy, labels=y,
                                          keep_exp=keep)
              fns[f"jaxce max-shift{suffix}"] = (
                  variant if kind == "value" else jax.value_and_grad(variant))
          self.run_case(case, fns, (x,), ref, kind, budget / 2)
          self.out[loss].append(case)
          self.save()
        del x, y, ref_grad, ref
      except Exception as e:  # noqa: BLE001
        self.out[loss].append({"shape": [n, c], "dtype": dtype, "stage": "forward+backward",
                               "candidates": {"(case)": {"framework": "jax", "status": "failed",
                                                         "error": error_text(e)}}})
        self.save()

  # --------------------------------------------------------------------- train.py's step

  def step(self):
    if not self.args.mnist:
      self.out["step"] = {"status": "skipped", "error": "no --mnist folder given"}
      return
    try:
      import bench_train  # pylint: disable=g-import-not-at-top
      input_pipeline = gpu_suite.input_pipeline_module()

      rounds = 1 if self.args.smoke else 5
      data = input_pipeline.load_idx_dir(self.args.mnist)
      self.out["step"] = {"status": "ok", "rounds": rounds,
                          **bench_train.measure_step(data, rounds)}
    except Exception as e:  # noqa: BLE001
      self.out["step"] = {"status": "failed", "error": error_text(e)}
    self.save()


def softmax_losses(loss: str, y):
  """(jaxce, optax, float32 reference) mean losses of logits, for integer or probability y."""
  import optax  # pylint: disable=g-import-not-at-top

  if loss == "sparse":
    def ours(x):
      return jaxce.sparse_cross_entropy(x, y, reduction="mean")

    def theirs(x):
      return optax.softmax_cross_entropy_with_integer_labels(x, y).mean()

    def reference(x):
      return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(x), y[:, None], axis=1))
  else:
    def ours(x):
      return jaxce.dense_cross_entropy(x, y, reduction="mean")

    def theirs(x):
      return optax.softmax_cross_entropy(x, y).mean()

    def reference(x):
      return -jnp.mean(jnp.sum(y * jax.nn.log_softmax(x), axis=1))
  return ours, theirs, reference


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--result", required=True, help="JSON file to write (rewritten as it goes)")
  p.add_argument("--budget", type=float, default=200.0, help="seconds for this part")
  p.add_argument("--mnist", default="", help="MNIST IDX folder, for the train.py step")
  p.add_argument("--smoke", action="store_true", help="tiny shapes, 2 rounds")
  p.add_argument("--sections", default="linear,softmax,step", help="which sections to run")
  return p.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  worker = Worker(args)
  sections = args.sections.split(",")
  worker.out["section_s"] = timings = {"startup": time.perf_counter() - PROCESS_START}
  for name, run in (("linear", lambda: worker.linear(0.55)),
                    ("softmax", lambda: worker.softmax_losses(0.75)), ("step", worker.step)):
    if name in sections:
      start = time.perf_counter()
      run()
      timings[name] = time.perf_counter() - start
  worker.save()


if __name__ == "__main__":
  main()
