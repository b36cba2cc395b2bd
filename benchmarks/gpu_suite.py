r"""GPU suite: jaxce's losses and train.py beside their PyTorch and JAX competitors, in one command.

    python3 benchmarks/gpu_suite.py --mnist .gpu/mnist --out results/   # about 8 minutes on one GPU
    python3 benchmarks/gpu_suite.py --smoke --out /tmp/smoke            # CPU, tiny shapes, < 1 min

It runs, each in its own process (so JAX and PyTorch never share device memory, and a crash or a
timeout costs one part, not the run):

* ``gpu_suite_jax.py``: linear cross-entropy (jaxce default, jaxce with a float32 gradient
  accumulator, the naive logits versions, tokamax ``chunked_xla`` and ``xla``), sparse
  cross-entropy (jaxce, optax, a memory-traffic floor), dense cross-entropy, and train.py's
  steady-state step against a minimal ``jit`` + ``lax.scan`` step;
* ``gpu_suite_torch.py --mode losses``: the same losses in PyTorch (naive, Liger Kernel, Cut
  Cross-Entropy, ``F.linear_cross_entropy``, ``F.cross_entropy``, Liger's cross-entropy);
* ``python train.py`` (default config, whole process), the PyTorch tutorial's pipeline
  (``--mode seed``) and a PyTorch loop with the data already on the device (``--mode tuned``).

Every figure is the min and median over interleaved rounds, with compiled (JAX) or peak (PyTorch)
temporary memory and the loss and gradient errors against a float32 reference. Rounds are sized to
fit ``--budget`` seconds. Results go to ``--out``: ``gpu_suite.json`` (everything, rewritten after
each part) and ``gpu_suite.md`` (the tables and the target checks). A candidate that cannot import
or fails is recorded with its error; it never stops the run. This file needs only the standard
library; the workers import JAX or PyTorch.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import importlib.metadata
import json
import math
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

# Shapes (N, D, V) of the linear cross-entropy and (N, C) of the sparse and dense ones.
LINEAR_SHAPES = ((4096, 4096, 128256), (8192, 4096, 128256))
SPARSE_SHAPES = ((8192, 32000), (8192, 128256))
DENSE_SHAPES = ((8192, 32000),)
SMOKE_LINEAR_SHAPES = ((256, 64, 1000),)
SMOKE_SPARSE_SHAPES = ((256, 1000),)
SMOKE_DENSE_SHAPES = ((256, 512),)

# Share of --budget each part may spend (the seed PyTorch pipeline gets what is left).
SHARES = {"jax": 0.36, "torch": 0.26, "train.py": 0.10, "torch-tuned": 0.05}
DISTRIBUTIONS = ("jaxce", "jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda13-pjrt",
                 "jax-cuda12-plugin", "tokamax", "optax", "flax", "torch", "torchvision", "triton",
                 "liger-kernel", "cut-cross-entropy", "numpy")


# ----------------------------------------------------------------------- pure helpers


def spread(seconds: list[float]) -> dict:
  """``{"min", "median", "rounds"}`` of a list of timings, in milliseconds."""
  if not seconds:
    return {"min": None, "median": None, "rounds": 0}
  return {"min": 1e3 * min(seconds), "median": 1e3 * statistics.median(seconds),
          "rounds": len(seconds)}


def rounds_for(budget_s: float, per_round_s: float, *, lo: int, hi: int) -> int:
  """Interleaved rounds of ``per_round_s`` that fit in ``budget_s``, at least lo, at most hi."""
  if per_round_s <= 0:
    return hi
  return max(lo, min(hi, int(budget_s / per_round_s)))


def rotations(names: list[str], rounds: int):
  """The order of each interleaved round: ``names`` rotated by one more each round."""
  for r in range(rounds):
    k = r % len(names) if names else 0
    yield names[k:] + names[:k]


def relative_error(got: float, ref: float) -> float:
  """``|got - ref| / |ref|`` (``|got - ref|`` when ref is 0; inf when got is not finite)."""
  if not math.isfinite(got):
    return math.inf
  return abs(got - ref) / abs(ref) if ref else abs(got - ref)


def max_relative_error(got, ref) -> float:
  """``max |got - ref| / max |ref|`` over two numpy arrays (the gradient error of the tables)."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
  scale = float(np.max(np.abs(ref))) if ref.size else 0.0
  diff = float(np.max(np.abs(got - ref))) if ref.size else 0.0
  if not np.all(np.isfinite(got)):
    return math.inf
  return diff / scale if scale else diff


def linear_weight(d: int, v: int):
  """The ``[D, V]`` float32 weight both workers use: standard normal / sqrt(D), seed 1."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  return np.random.default_rng(1).standard_normal((d, v), dtype=np.float32) / np.float32(d**0.5)


def linear_hidden(n: int, d: int, v: int):
  """The ``[N, D]`` float32 hidden states (standard normal, seed 2) and int32 labels (seed 3)."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  return (np.random.default_rng(2).standard_normal((n, d), dtype=np.float32),
          np.random.default_rng(3).integers(0, v, size=(n,), dtype=np.int32))


def check(target: str, value: float | None, limit: float, *, at_least: bool = False,
          detail: str = "") -> dict:
  """One target: ``value <= limit`` (``>=`` with at_least); "n/a" when a figure is missing."""
  if value is None or not math.isfinite(value):
    status = "n/a"
  elif at_least:
    status = "PASS" if value >= limit else "FAIL"
  else:
    status = "PASS" if value <= limit else "FAIL"
  return {"target": target, "value": value, "limit": limit,
          "op": ">=" if at_least else "<=", "status": status, "detail": detail}


def _min_ms(entry: dict | None) -> float | None:
  if not entry or entry.get("status") != "ok":
    return None
  return (entry.get("time_ms") or {}).get("min")


def _memory(entry: dict | None) -> float | None:
  if not entry or entry.get("status") != "ok":
    return None
  return entry.get("memory_mib")


def _ratio(a: float | None, b: float | None) -> float | None:
  return a / b if a is not None and b else None


def linear_targets(case: dict) -> list[dict]:
  """The linear cross-entropy targets of one shape: time against the fused competitors and the
  naive version, temporary memory against the leanest candidate and the naive version."""
  cands = case["candidates"]
  ours = cands.get("jaxce")
  where = f"linear {'x'.join(map(str, case['shape']))} {case['dtype']}"
  out = []
  for other in ("liger", "cce", "cce exact", "tokamax chunked_xla", "tokamax xla"):
    out.append(check(f"{where}: jaxce time / {other} time", _ratio(_min_ms(ours),
                     _min_ms(cands.get(other))), 1.0))
  memories = [m for m in (_memory(c) for c in cands.values()) if m]
  leanest = min(memories) if memories else None
  out.append(check(f"{where}: jaxce memory / leanest ({leanest and round(leanest, 1)} MiB)",
                   _ratio(_memory(ours), leanest), 1.5))
  naive = cands.get("naive jax")
  out.append(check(f"{where}: jaxce time / naive JAX time", _ratio(_min_ms(ours), _min_ms(naive)),
                   1.10))
  out.append(check(f"{where}: jaxce memory / naive JAX memory",
                   _ratio(_memory(ours), _memory(naive)), 0.20))
  return out


def sparse_targets(case: dict) -> list[dict]:
  """The sparse cross-entropy targets of one forward+backward case."""
  cands = case["candidates"]
  ours = cands.get("jaxce")
  where = f"sparse {'x'.join(map(str, case['shape']))} {case['dtype']} fwd+bwd"
  return [
      check(f"{where}: jaxce time / optax time", _ratio(_min_ms(ours), _min_ms(cands.get("optax"))),
            1.0),
      check(f"{where}: jaxce time / Liger time",
            _ratio(_min_ms(ours), _min_ms(cands.get("liger"))), 1.0),
      check(f"{where}: jaxce memory / optax memory",
            _ratio(_memory(ours), _memory(cands.get("optax"))), 1.0),
      check(f"{where}: jaxce time / traffic floor",
            _ratio(_min_ms(ours), _min_ms(cands.get("floor"))), 1.3),
  ]


def train_targets(train: dict) -> list[dict]:
  """train.py against the seed's PyTorch pipeline (whole process) and the minimal step."""
  ours = (train.get("train.py") or {}).get("wall_s")
  seed = train.get("torch seed") or {}
  seed_wall = seed.get("wall_s") if not seed.get("timed_out") else seed.get("projected_wall_s")
  step = train.get("step") or {}
  return [
      check("train.py: PyTorch seed pipeline time / train.py time (whole process)",
            _ratio(seed_wall, ours), 10.0, at_least=True,
            detail="projected from the epochs done" if seed.get("timed_out") else ""),
      check("train.py: steady step / minimal jit + lax.scan step", step.get("ratio_of_mins"), 1.1),
      check("train.py grad_groups=0: steady step / minimal jit + lax.scan step",
            step.get("grad_groups_0_ratio_of_mins"), 1.1),
  ]


def evaluate_targets(results: dict) -> list[dict]:
  """Every target check of the run, in the order of the tables."""
  out = []
  for case in results.get("linear", []):
    out += linear_targets(case)
  for case in results.get("sparse", []):
    if case.get("stage") == "forward+backward":
      out += sparse_targets(case)
  out += train_targets(results.get("train", {}))
  return out


def merge_cases(cases: list[dict], more: list[dict]) -> list[dict]:
  """Cases from two workers joined by (shape, dtype, stage): JAX and PyTorch side by side."""
  index = {}
  merged = []
  for case in [*cases, *more]:
    key = (tuple(case["shape"]), case["dtype"], case.get("stage"))
    if key in index:
      index[key]["candidates"].update(case["candidates"])
    else:
      index[key] = {**case, "candidates": dict(case["candidates"])}
      merged.append(index[key])
  return merged


# ----------------------------------------------------------------------- the Markdown report


def _fmt(value, digits=2, unit=""):
  if value is None:
    return "—"
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)
  return f"{value:.{digits}f}{unit}"


def _err(value):
  return "—" if value is None else f"{value:.2e}"


def error_line(text: str | None) -> str:
  """The line of an error text or a traceback that says what went wrong."""
  lines = [line.strip() for line in (text or "").splitlines()]
  lines = [line for line in lines if line and not line.startswith(("For simplicity", "-----"))]
  said = [line for line in lines if re.match(r"^([\w.]+(Error|Exception)\b|\S+: error:)", line)]
  return (said or lines or [""])[-1].replace("|", "/")


def candidate_rows(case: dict, baseline: str | None) -> list[str]:
  rows = []
  base = _min_ms(case["candidates"].get(baseline)) if baseline else None
  # JAX candidates first, then PyTorch, whichever worker finished first.
  items = sorted(case["candidates"].items(), key=lambda kv: kv[1].get("framework") != "jax")
  for name, c in items:
    if c.get("status") != "ok":
      rows.append(f"| {name} | {c.get('framework', '')} | {c.get('status')}: "
                  f"{error_line(c.get('error'))[:200]} | | | | | |")
      continue
    t = c["time_ms"]
    grads = c.get("grad_error") or {}
    grad = ", ".join(f"{k} {_err(v)}" for k, v in grads.items()) or "—"
    rel = _ratio(t["min"], base)
    rows.append(f"| {name} | {c.get('framework', '')} | {_fmt(t['min'])} ({_fmt(t['median'])}) "
                f"| {_fmt(rel, 2, 'x')} | {_fmt(c.get('memory_mib'), 1)} "
                f"{c.get('memory_kind', '')} | {_fmt(c.get('loss'), 5)} "
                f"| {_err(c.get('loss_error'))} | {grad} |")
  return rows


TABLE_HEAD = ("| candidate | framework | time ms, min (median) | / {base} | temp memory MiB "
              "| loss | loss error | gradient error |\n| --- | --- | --- | --- | --- | --- | --- "
              "| --- |")


def render_markdown(results: dict) -> str:
  meta = results.get("meta", {})
  lines = ["# jaxce GPU suite", ""]
  smoke = "SMOKE RUN (CPU, tiny shapes: no figure is meaningful); " if meta.get("smoke") else ""
  lines.append(f"{meta.get('date', '')}; device: {meta.get('device', '?')}; {smoke}"
               f"budget {meta.get('budget_s')} s, ran {_fmt(meta.get('wall_s'), 0)} s.")
  versions = meta.get("versions", {})
  lines.append("Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items() if v) + ".")
  if meta.get("cuda"):
    lines.append(f"CUDA: {meta['cuda']}.")
  lines.append(f"Command: `{meta.get('command', '')}`")
  lines += ["", "Times: min (median) over interleaved rounds, ms. Memory: JAX, compiled "
            "temporary memory (`memory_analysis()`, gradients and inputs excluded); PyTorch, peak "
            "allocated during the call above what is allocated after it (inputs and gradients "
            "excluded). Errors: loss `|l - l_ref| / |l_ref|`, gradients `max|g - g_ref| / "
            "max|g_ref|`, against float32 computed from the same inputs.", ""]
  targets = results.get("targets", [])
  lines += ["## Targets", "", "| target | value | limit | result |", "| --- | --- | --- | --- |"]
  for t in targets:
    note = f" ({t['detail']})" if t.get("detail") else ""
    lines.append(f"| {t['target']}{note} | {_fmt(t['value'], 3, 'x')} | {t['op']} "
                 f"{t['limit']:g}x | {t['status']} |")
  sections = (("Linear cross-entropy (`value_and_grad` w.r.t. hidden and weight, mean)", "linear",
               "naive jax"),
              ("Sparse cross-entropy (mean)", "sparse", "optax"),
              ("Dense cross-entropy (mean)", "dense", "optax"))
  for title, key, base in sections:
    lines += ["", f"## {title}"]
    for case in results.get(key, []):
      stage = f", {case['stage']}" if case.get("stage") else ""
      lines += ["", f"### {' x '.join(map(str, case['shape']))}, {case['dtype']}{stage}", "",
                TABLE_HEAD.format(base=base), *candidate_rows(case, base)]
    if not results.get(key):
      lines.append("\n(not run)")
  lines += ["", "## train.py (MNIST, batch 64, SGD 0.01 / 0.5)", ""]
  train = results.get("train", {})
  lines += ["| run | status | whole process s | compile s | steady examples/s | test accuracy % "
            "| note |", "| --- | --- | --- | --- | --- | --- | --- |"]
  for name in ("train.py", "torch seed", "torch tuned"):
    r = train.get(name)
    if r is None:
      lines.append(f"| {name} | not run | | | | | |")
      continue
    note = r.get("note", "")
    if r.get("timed_out"):
      note = (f"stopped after {r.get('epochs_done')} epochs; projected whole process "
              f"{_fmt(r.get('projected_wall_s'), 1)} s. {note}")
    if r.get("status") != "ok" and r.get("error"):
      note = error_line(r["error"])[:200]
    lines.append(f"| {name} | {r.get('status')} | {_fmt(r.get('wall_s'), 1)} "
                 f"| {_fmt(r.get('compile_s'), 2)} | {_fmt(r.get('examples_per_s'), 0)} "
                 f"| {_fmt(r.get('test_accuracy_percent'), 2)} | {note} |")
  step = train.get("step")
  if step:
    if step.get("status") == "ok":
      lines += ["", f"Steady-state step ({step.get('rounds')} rounds of one epoch): train.py "
                f"{_fmt(step['train_py_ms']['min'], 3)} ms (median "
                f"{_fmt(step['train_py_ms']['median'], 3)}), minimal `jit` + `lax.scan` step "
                f"{_fmt(step['reference_ms']['min'], 3)} ms (median "
                f"{_fmt(step['reference_ms']['median'], 3)}); ratio "
                f"{_fmt(step['ratio_of_mins'], 3)}x of minima, "
                f"{_fmt(step['ratio_median'], 3)}x median of rounds. With `grad_groups=0`: "
                f"{_fmt((step.get('train_py_grad_groups_0_ms') or {}).get('min'), 3)} ms, "
                f"{_fmt(step.get('grad_groups_0_ratio_of_mins'), 3)}x of minima."]
    else:
      lines += ["", f"Steady-state step: {step.get('status')}: {error_line(step.get('error'))}"]
  errors = results.get("errors", {})
  if errors:
    lines += ["", "## Parts that failed", ""]
    lines += [f"- {k}: {error_line(v)[:300]}" for k, v in errors.items()]
  return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------- orchestration


def stages(loss: str, dtype: str, smoke: bool) -> tuple[str, ...]:
  """The stages timed for a case; a smoke run does the forward alone only for float32 sparse."""
  if smoke and (loss != "sparse" or dtype != "float32"):
    return ("forward+backward",)
  return ("forward", "forward+backward")


MNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
               "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def read_mnist(folder: str, limit: int = 0) -> dict:
  """``{"train": (images [n, 784] uint8, labels [n] uint8), "test": ...}`` from the four IDX
  files (``.gz`` or raw) in ``folder``; the first ``limit`` training examples (``limit // 2``
  test ones) when limit > 0. Only numpy: the PyTorch runs do not import the JAX trainer."""
  import gzip  # pylint: disable=g-import-not-at-top

  import numpy as np  # pylint: disable=g-import-not-at-top

  def read(name):
    for path, opener in ((os.path.join(folder, name + ".gz"), gzip.open),
                         (os.path.join(folder, name), open)):
      if os.path.exists(path):
        with opener(path, "rb") as f:
          raw = f.read()
        ndim = raw[3]
        shape = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
        return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(shape)
    raise FileNotFoundError(f"{folder}: no {name}[.gz]")

  out = {}
  for split, (images, labels) in MNIST_FILES.items():
    x, y = read(images), read(labels)
    n = (limit if split == "train" else limit // 2) if limit else len(y)
    out[split] = (x.reshape(len(x), -1)[:n], y[:n])
  return out


def input_pipeline_module():
  """The trainer's MNIST reader (``trainer.input_pipeline``, or ``input_pipeline`` at the root)."""
  try:
    from trainer import input_pipeline  # pylint: disable=g-import-not-at-top
  except ImportError:
    import input_pipeline  # pylint: disable=g-import-not-at-top
  return input_pipeline


def write_json(path: str, data) -> None:
  """Rewrites ``path`` atomically."""
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    json.dump(data, f, indent=1, default=str)
  os.replace(tmp, path)


def read_json(path: str) -> dict:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return {}


def versions() -> dict:
  out = {}
  for name in DISTRIBUTIONS:
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      out[name] = None
  out["python"] = platform.python_version()
  return out


def nvidia_smi() -> str | None:
  if not shutil.which("nvidia-smi"):
    return None
  try:
    proc = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                           "--format=csv,noheader"], capture_output=True, text=True, timeout=30,
                          check=False)
  except (OSError, subprocess.SubprocessError):
    return None
  return proc.stdout.strip() or None


def run_process(cmd: list[str], timeout_s: float, env: dict | None = None) -> dict:
  """Runs ``cmd``; its wall time, exit status, output tails, and whether it timed out."""
  start = time.perf_counter()
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max(timeout_s, 1),
                          check=False, cwd=REPO, env=env)
    out = {"rc": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr,
           "timed_out": False}
  except subprocess.TimeoutExpired as e:
    def text(b):
      return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")
    out = {"rc": None, "stdout": text(e.stdout), "stderr": text(e.stderr), "timed_out": True}
  out["wall_s"] = time.perf_counter() - start
  return out


class Suite:
  """Runs the parts in order, each within its share of the budget, and rewrites the outputs."""

  def __init__(self, args):
    self.args = args
    self.start = time.perf_counter()
    self.deadline = self.start + args.budget
    os.makedirs(args.out, exist_ok=True)
    self.json_path = os.path.join(args.out, "gpu_suite.json")
    self.md_path = os.path.join(args.out, "gpu_suite.md")
    self.logs = os.path.join(args.out, "gpu_suite_logs.txt")
    self.results = {"meta": self.meta(), "linear": [], "sparse": [], "dense": [], "train": {},
                    "errors": {}, "targets": []}
    self.lock = threading.RLock()
    self.env = dict(os.environ)
    self.env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    if args.smoke:
      self.env["JAX_PLATFORMS"] = "cpu"
      self.env["CUDA_VISIBLE_DEVICES"] = ""
    self.save()

  def meta(self) -> dict:
    args = self.args
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": " ".join(shlex.quote(a) for a in ["python3", *sys.argv]),
            "smoke": args.smoke, "budget_s": args.budget, "versions": versions(),
            "host": platform.node(), "cpu_count": os.cpu_count(), "device": None,
            "cuda": nvidia_smi()}

  def left(self) -> float:
    return self.deadline - time.perf_counter()

  def timeout(self, seconds: float) -> float:
    """A part's time limit: ``seconds``, but never more than a minute past the suite's budget."""
    if self.args.smoke:
      return 600
    return max(min(seconds, self.left() + 60), 30)

  def share(self, part: str) -> float:
    return min(SHARES[part] * self.args.budget, max(self.left(), 1.0))

  def save(self) -> None:
    self.results["meta"]["wall_s"] = time.perf_counter() - self.start
    self.results["targets"] = evaluate_targets(self.results)
    write_json(self.json_path, self.results)
    with open(self.md_path, "w") as f:
      f.write(render_markdown(self.results))

  def log(self, part: str, proc: dict) -> None:
    with self.lock, open(self.logs, "a") as f:
      f.write(f"\n===== {part}: rc {proc.get('rc')}, {proc.get('wall_s', 0):.1f} s"
              f"{', TIMED OUT' if proc.get('timed_out') else ''}\n--- stdout\n"
              f"{proc.get('stdout', '')[-20000:]}\n--- stderr\n{proc.get('stderr', '')[-20000:]}\n")
    print(f"[gpu_suite] {part}: rc {proc.get('rc')}, {proc.get('wall_s', 0):.1f} s"
          f"{', timed out' if proc.get('timed_out') else ''}; {self.left():.0f} s left",
          flush=True)

  def out_of_time(self, part: str) -> bool:
    """Records ``part`` as not run when the budget is spent (never in a smoke run: it checks
    that every part runs)."""
    if self.args.smoke or self.left() >= 15:
      return False
    with self.lock:
      self.results["errors"][part] = f"not run: {self.left():.0f} s of the budget left"
    return True

  def worker(self, part: str, script: str, extra: list[str]) -> dict:
    """Runs a worker that writes its results to a JSON file; returns them (partial on a crash)."""
    if self.out_of_time(part):
      return {}
    budget = self.share(part)
    path = os.path.join(self.tmp, f"{part}.json")
    cmd = [sys.executable, os.path.join(HERE, script), "--result", path,
           "--budget", f"{budget:.0f}", *(["--smoke"] if self.args.smoke else []), *extra]
    proc = run_process(cmd, self.timeout(budget * 1.5 + 60), self.env)
    self.log(part, proc)
    result = read_json(path)
    if proc["rc"] != 0:
      with self.lock:
          self.results["errors"][part] = (
            f"{'timed out' if proc['timed_out'] else 'exit ' + str(proc['rc'])}: "
            f"{proc['stderr'][-2000:]}")
    return result

  def run(self) -> dict:
    """Runs the parts one after the other (with --smoke, side by side: nothing is measured)."""
    args = self.args
    with tempfile.TemporaryDirectory(prefix="gpu_suite_") as self.tmp:
      parts = [fn for name, fn in (("jax", self.part_jax), ("torch", self.part_torch),
                                   ("train", self.train_parts)) if name in args.parts]
      if args.smoke:
        with concurrent.futures.ThreadPoolExecutor(len(parts) or 1) as pool:
          for future in [pool.submit(fn) for fn in parts]:
            future.result()
      else:
        for fn in parts:
          fn()
    self.save()
    return self.results

  def merge(self, got: dict) -> None:
    with self.lock:
      for key in ("linear", "sparse", "dense"):
        self.results[key] = merge_cases(self.results[key], got.get(key, []))
      self.save()

  def part_jax(self) -> None:
    got = self.worker("jax", "gpu_suite_jax.py", ["--mnist", self.args.mnist])
    with self.lock:
      self.results["meta"]["device"] = got.get("device")
      self.results["meta"]["jax_environment"] = got.get("environment")
      self.results["meta"]["jaxce_path"] = got.get("jaxce_path")
      if got.get("step"):
        self.results["train"]["step"] = got["step"]
    self.merge(got)

  def part_torch(self) -> None:
    got = self.worker("torch", "gpu_suite_torch.py", ["--mode", "losses"])
    with self.lock:
      self.results["meta"]["torch_device"] = got.get("device") or got.get("skipped")
    self.merge(got)

  # ------------------------------------------------------------------- train.py and PyTorch

  def train_parts(self) -> None:
    args, train = self.args, self.results["train"]
    if not args.mnist:
      for name in ("train.py", "torch seed", "torch tuned"):
        train[name] = {"status": "skipped", "error": "no --mnist folder given"}
      return
    got = self.train_py(self.share("train.py"))
    with self.lock:
      train["train.py"] = got
      self.save()
    budget = self.share("torch-tuned")
    got = self.torch_run("tuned", budget, budget * 2 + 30)
    with self.lock:
      train["torch tuned"] = got
      self.save()
    budget = max(self.left() - 5, 20)
    got = self.torch_run("seed", budget, budget)
    with self.lock:
      train["torch seed"] = got
      self.save()

  def epochs(self) -> int:
    return 1 if self.args.smoke else 10

  def smoke_sizes(self) -> list[str]:
    if not self.args.smoke:
      return []
    return [f"--config.num_train_examples={self.args.smoke_examples}",
            f"--config.num_test_examples={self.args.smoke_examples // 2}"]

  def train_py(self, timeout_s: float) -> dict:
    if self.out_of_time("train.py"):
      return {"status": "skipped", "error": "out of budget"}
    with tempfile.TemporaryDirectory(prefix="gpu_suite_train_") as workdir:
      cmd = [sys.executable, os.path.join(REPO, "train.py"), "--config",
             os.path.join(REPO, "configs", "default.py"), f"--workdir={workdir}",
             f"--config.data_dir={os.path.abspath(self.args.mnist)}",
             f"--config.num_epochs={self.epochs()}", *self.smoke_sizes()]
      proc = run_process(cmd, self.timeout(max(timeout_s, 60)), self.env)
    self.log("train.py", proc)
    out = {"wall_s": proc["wall_s"], "epochs": self.epochs()}
    try:
      summary = json.loads(proc["stdout"].strip().splitlines()[-1])
    except (ValueError, IndexError):
      summary = None
    if proc["rc"] != 0 or summary is None:
      return {**out, "status": "failed", "timed_out": proc["timed_out"],
              "error": proc["stderr"][-2000:] or proc["stdout"][-2000:]}
    return {**out, "status": "ok", "compile_s": summary.get("compile_seconds"),
            "train_s": summary.get("train_seconds"),
            "examples_per_s": summary.get("examples_per_sec"),
            "test_accuracy_percent": summary.get("test_accuracy_percent"),
            "num_train": summary.get("num_train"), "devices": summary.get("devices"),
            "note": "examples/s: the epochs' training time, compilation excluded"}

  def torch_run(self, mode: str, budget_s: float, timeout_s: float) -> dict:
    """A PyTorch MNIST run (``seed`` or ``tuned``) as a whole process; a seed run cut by the
    budget is projected from the epochs it finished."""
    if self.out_of_time(f"torch {mode}"):
      return {"status": "skipped", "error": "out of budget"}
    path = os.path.join(self.tmp, f"torch-{mode}.json")
    cmd = [sys.executable, os.path.join(HERE, "gpu_suite_torch.py"), "--mode", mode, "--result",
           path, "--budget", f"{budget_s:.0f}", "--mnist", os.path.abspath(self.args.mnist),
           "--epochs", str(self.epochs()),
           *(["--smoke", f"--max-examples={self.args.smoke_examples}"] if self.args.smoke else [])]
    proc = run_process(cmd, self.timeout(timeout_s), self.env)
    self.log(f"torch {mode}", proc)
    got = read_json(path)
    out = {"wall_s": proc["wall_s"], "epochs": self.epochs(), **got}
    if got.get("status") == "skipped":
      return out
    if proc["timed_out"]:
      done = got.get("epoch_ends_s") or []
      out.update(status="ok" if done else "failed", timed_out=True, epochs_done=len(done))
      if done:
        startup = got.get("startup_s", 0.0)
        per_epoch = (done[-1] - startup) / len(done)
        out["projected_wall_s"] = startup + per_epoch * self.epochs()
      return out
    if proc["rc"] != 0:
      return {**out, "status": "failed", "error": proc["stderr"][-2000:]}
    return {**out, "status": "ok"}


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--out", required=True, help="folder for gpu_suite.json, gpu_suite.md, logs")
  p.add_argument("--mnist", default="", help="folder with the four MNIST IDX files (.gz or raw); "
                 "without it the train.py part is skipped")
  p.add_argument("--budget", type=float, default=None,
                 help="seconds for the whole suite (default 420; --smoke: 50)")
  p.add_argument("--parts", default="jax,torch,train", help="which parts: jax, torch, train")
  p.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, 2 rounds: a check that "
                 "the suite runs, not a measurement")
  p.add_argument("--smoke-examples", type=int, default=256, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  args.budget = args.budget or (50.0 if args.smoke else 420.0)
  args.parts = [s for s in args.parts.split(",") if s]
  return args


def main(argv=None):
  args = parse_args(argv)
  results = Suite(args).run()
  print(render_markdown(results))
  print(f"[gpu_suite] wrote {os.path.join(args.out, 'gpu_suite.json')} and gpu_suite.md in "
        f"{results['meta']['wall_s']:.0f} s")


if __name__ == "__main__":
  main()
