"""The PyTorch part of the GPU suite (run by ``gpu_suite.py``; writes its results to ``--result``).

``--mode losses``: the linear cross-entropy (``loss.backward()`` into hidden and weight, mean,
bf16) of naive PyTorch (``F.cross_entropy(F.linear(h, w).float(), y)``), Liger Kernel's
``LigerFusedLinearCrossEntropyLoss``, Cut Cross-Entropy's ``linear_cross_entropy`` (default, and
exact: ``impl="cce_exact"`` where the installed version has it, else ``filter_eps=None``, which
turns off its gradient filtering) and ``F.linear_cross_entropy`` (chunked, where the installed
torch has it); the sparse cross-entropy of ``F.cross_entropy`` and Liger's
``LigerCrossEntropyLoss``; the dense cross-entropy of ``F.cross_entropy`` with probabilities.
Inputs are those of the JAX worker (the linear ones identical, from the same numpy generators).

``--mode seed``: the PyTorch MNIST tutorial's pipeline (``benchmarks/bench_train.py``'s dataset:
a PIL image per item, ``ToTensor``, ``Normalize``; a shuffling ``DataLoader`` with batch 64; SGD
0.01 / 0.5; a test pass each epoch) on the device. ``--mode tuned``: the same model and optimiser
with the normalised data already on the device, batches indexed from a permutation, one host
synchronisation per epoch. Both record when each epoch ended, so a run cut short is projected.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
import types

PROCESS_START = time.perf_counter()
HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path[:0] = [REPO, HERE]

import gpu_suite  # noqa: E402  pylint: disable=wrong-import-position

MiB = 2**20


def error_text(e: BaseException) -> str:
  return "".join(traceback.format_exception_only(type(e), e)).strip()[-1500:]


class Losses:
  """Runs the loss cases; the results dict mirrors the JAX worker's."""

  def __init__(self, args, torch):
    self.args, self.torch = args, torch
    self.cuda = torch.cuda.is_available()
    self.device = torch.device("cuda" if self.cuda else "cpu")
    self.start = time.perf_counter()
    self.deadline = self.start + args.budget
    self.lo, self.hi = (2, 2) if args.smoke else (3, 30)
    name = torch.cuda.get_device_name(0) if self.cuda else "cpu"
    self.out = {"device": f"torch {torch.__version__} on {name}, CUDA {torch.version.cuda}",
                "linear": [], "sparse": [], "dense": []}

  def save(self):
    gpu_suite.write_json(self.args.result, self.out)

  def left(self):
    return self.deadline - time.perf_counter()

  def sync(self):
    if self.cuda:
      self.torch.cuda.synchronize()

  def timed(self, case, calls, name):
    """Seconds of one call of ``calls[name]``; a call that fails is recorded and dropped."""
    t = time.perf_counter()
    try:
      calls[name]()
      self.sync()
    except Exception as e:  # noqa: BLE001  (an out-of-memory error, say: recorded, never fatal)
      case["candidates"][name] = {"framework": "torch", "status": "failed",
                                  "error": error_text(e)}
      del calls[name]
      return None
    return time.perf_counter() - t

  def budget(self, cases_left, share):
    return max(self.left() * share / max(cases_left, 1), 0.5)

  # --------------------------------------------------------------------- shared machinery

  def measure_once(self, call):
    """Runs ``call()`` once: its result and its peak temporary memory (MiB, CUDA only)."""
    torch = self.torch
    self.sync()
    if self.cuda:
      torch.cuda.reset_peak_memory_stats()
    out = call()
    self.sync()
    if not self.cuda:
      return out, None
    after = torch.cuda.memory_allocated()
    return out, (torch.cuda.max_memory_allocated() - after) / MiB

  def run_case(self, case, candidates, ref, budget_s):
    """``candidates``: {name: call or error string}; a call returns (loss, grads or None)."""
    start = time.perf_counter()
    calls = {}
    for name, call in candidates.items():
      if isinstance(call, str):
        case["candidates"][name] = {"framework": "torch", "status": "skipped", "error": call}
        continue
      try:
        call()  # warm up (Triton compiles on the first call)
        (loss, grads), memory = self.measure_once(call)
        entry = {"framework": "torch", "status": "ok", "memory_kind": "peak",
                 "memory_mib": memory}
        if loss is not None:
          entry["loss"] = float(loss)
          entry["loss_error"] = gpu_suite.relative_error(float(loss), ref[0])
        if grads:
          entry["grad_error"] = {k: self.max_error(g, r) for (k, g), r
                                 in zip(grads.items(), ref[1], strict=True)}
        case["candidates"][name], calls[name] = entry, call
      except Exception as e:  # noqa: BLE001  (recorded, never fatal)
        case["candidates"][name] = {"framework": "torch", "status": "failed",
                                    "error": error_text(e)}
    probe = {name: self.timed(case, calls, name) for name in list(calls)}
    probe = {name: t for name, t in probe.items() if t is not None}
    rounds = gpu_suite.rounds_for(budget_s - (time.perf_counter() - start),
                                  sum(probe.values()), lo=self.lo, hi=self.hi)
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
    return case

  def max_error(self, got, ref):
    got = got.float()
    return float((got - ref).abs().max() / ref.abs().max())

  # --------------------------------------------------------------------- linear cross-entropy

  def linear(self, share):
    torch = self.torch
    shapes = gpu_suite.SMOKE_LINEAR_SHAPES if self.args.smoke else gpu_suite.LINEAR_SHAPES
    liger, no_liger = optional("liger_kernel.transformers.fused_linear_cross_entropy",
                               "LigerFusedLinearCrossEntropyLoss")
    cce, no_cce = optional("cut_cross_entropy", "linear_cross_entropy")
    exact = {"filter_eps": None}
    if cce is not None:
      import cut_cross_entropy  # pylint: disable=g-import-not-at-top
      impls = getattr(cut_cross_entropy, "LinearCrossEntropyImpl", None)
      if impls is not None and "CCE_EXACT" in impls.__members__:
        exact = {"impl": "cce_exact"}
      self.out["cce_exact_means"] = exact
    imports = {"liger": (liger, no_liger), "cce": (cce, no_cce), "exact": exact}
    weight_np = None
    for i, (n, d, v) in enumerate(shapes):
      budget = self.budget(len(shapes) - i, share)
      case = {"shape": [n, d, v], "dtype": "bfloat16", "candidates": {}}
      try:
        if weight_np is None or weight_np.shape != (d, v):
          weight_np = gpu_suite.linear_weight(d, v)
        hidden_np, labels_np = gpu_suite.linear_hidden(n, d, v)
        y = torch.from_numpy(labels_np).long().to(self.device)
        # The weight as every PyTorch loss takes it: [V, D], the layout of nn.Linear.
        w32 = torch.from_numpy(weight_np).to(self.device).t().contiguous()
        h32 = torch.from_numpy(hidden_np).to(self.device)
        ref = self.linear_reference(h32, w32, y)
        fns = self.linear_candidates(h32.bfloat16().requires_grad_(True),
                                     w32.bfloat16().requires_grad_(True), y, imports)
        del h32, w32
        self.run_case(case, fns, ref, budget)
        del fns, ref
      except Exception as e:  # noqa: BLE001
        case["candidates"]["(case)"] = {"framework": "torch", "status": "failed",
                                        "error": error_text(e)}
      self.out["linear"].append(case)
      self.save()
      if self.cuda:
        torch.cuda.empty_cache()

  def linear_candidates(self, h, w, y, imports):
    """``{name: call or why it cannot run}``; each call runs loss and backward into h and w."""
    torch, F = self.torch, self.torch.nn.functional
    (liger_cls, no_liger), (cce, no_cce) = imports["liger"], imports["cce"]
    liger = None if liger_cls is None else liger_cls()

    def backward(loss_fn):
      def call():
        h.grad = w.grad = None
        loss = loss_fn()
        loss.backward()
        return loss.detach(), {"hidden": h.grad, "weight": w.grad}
      return call

    fns = {"naive torch": backward(lambda: F.cross_entropy(F.linear(h, w).float(), y))}
    fns["liger"] = no_liger or backward(lambda: liger(w, h, y))
    fns["cce"] = no_cce or backward(lambda: cce(h, w, y))
    fns["cce exact"] = no_cce or backward(lambda: cce(h, w, y, **imports["exact"]))
    if hasattr(F, "linear_cross_entropy"):
      options = getattr(torch.nn, "LinearCrossEntropyOptions", None)
      kwargs = {"options": options()} if options is not None else {}
      fns["torch F.linear_cross_entropy"] = backward(
          lambda: F.linear_cross_entropy(h, w, y, **kwargs))
    else:
      fns["torch F.linear_cross_entropy"] = (
          f"torch {torch.__version__} has no F.linear_cross_entropy")
    return fns

  def linear_reference(self, h32, w32, y):
    """Loss and gradients in float32 (TF32 off) from the bf16-rounded inputs."""
    torch = self.torch
    matmul_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
      h = h32.bfloat16().float().requires_grad_(True)
      w = w32.bfloat16().float().requires_grad_(True)
      loss = torch.nn.functional.cross_entropy(h @ w.t(), y)
      loss.backward()
      return float(loss.detach()), [h.grad, w.grad]
    finally:
      torch.backends.cuda.matmul.allow_tf32 = matmul_tf32

  # --------------------------------------------------------------------- sparse and dense

  def softmax_losses(self, share):
    torch, F = self.torch, self.torch.nn.functional
    smoke = self.args.smoke
    ce_cls, no_liger = optional("liger_kernel.transformers.cross_entropy",
                                "LigerCrossEntropyLoss")
    sparse_shapes = gpu_suite.SMOKE_SPARSE_SHAPES if smoke else gpu_suite.SPARSE_SHAPES
    dense_shapes = gpu_suite.SMOKE_DENSE_SHAPES if smoke else gpu_suite.DENSE_SHAPES
    cases = [("sparse", s, dt) for s in sparse_shapes for dt in ("float32", "bfloat16")]
    cases += [("dense", s, "float32") for s in dense_shapes]
    gen = torch.Generator(device=self.device).manual_seed(0)
    for i, (loss_kind, (n, c), dtype) in enumerate(cases):
      budget = self.budget(len(cases) - i, share)
      try:
        x0 = (2 * torch.randn(n, c, device=self.device, generator=gen)).to(getattr(torch, dtype))
        x0 = x0.detach()
        if loss_kind == "sparse":
          y = torch.randint(0, c, (n,), device=self.device, generator=gen)
        else:
          y = torch.softmax(torch.randn(n, c, device=self.device, generator=gen), dim=1)
        xr = x0.float().clone().requires_grad_(True)
        ref_loss = F.cross_entropy(xr, y)
        ref_loss.backward()
        ref = (float(ref_loss.detach()), [xr.grad])
        del xr
        # Liger's cross-entropy writes the gradient into its input: it gets its own copy, and
        # its error is measured on a fresh one.
        x, x_liger = x0.clone().requires_grad_(True), x0.clone().requires_grad_(True)
        liger = None if ce_cls is None else ce_cls()
        for stage in gpu_suite.stages(loss_kind, dtype, smoke):
          case = {"shape": [n, c], "dtype": dtype, "stage": stage, "candidates": {}}
          fns = self.softmax_candidates(stage, loss_kind, x, x_liger, y, liger, no_liger)
          self.run_case(case, fns, ref, budget / 2)
          if stage == "forward+backward" and loss_kind == "sparse" and liger is not None:
            self.liger_errors(case, liger, x0, y, ref)
          self.out[loss_kind].append(case)
          self.save()
        del x, x_liger, x0, y, ref
      except Exception as e:  # noqa: BLE001
        self.out[loss_kind].append({"shape": [n, c], "dtype": dtype, "stage": "forward+backward",
                                    "candidates": {"(case)": {"framework": "torch",
                                                              "status": "failed",
                                                              "error": error_text(e)}}})
        self.save()
      if self.cuda:
        torch.cuda.empty_cache()

  def softmax_candidates(self, stage, loss_kind, x, x_liger, y, liger, no_liger):
    """``{name: call or why it cannot run}`` for one stage of a sparse or dense case."""
    torch, F = self.torch, self.torch.nn.functional
    fns = {}
    if stage == "forward":
      x_fwd = x.detach()  # no gradient asked for, in either loss
      fns["torch"] = lambda: no_grad(torch, lambda: (F.cross_entropy(x_fwd, y), None))
      if loss_kind == "sparse":
        x_liger_fwd = x_liger.detach()
        fns["liger"] = no_liger or (lambda: no_grad(torch, lambda: (liger(x_liger_fwd, y), None)))
      return fns

    def torch_call():
      x.grad = None
      loss = F.cross_entropy(x, y)
      loss.backward()
      return loss.detach(), {"logits": x.grad}

    def liger_call():
      x_liger.grad = None
      loss = liger(x_liger, y)
      loss.backward()
      return loss.detach(), None

    fns["torch"] = torch_call
    if loss_kind == "sparse":
      fns["liger"] = no_liger or liger_call
    return fns

  def liger_errors(self, case, liger, x0, y, ref):
    entry = case["candidates"].get("liger")
    if not entry or entry.get("status") != "ok":
      return
    x = x0.clone().requires_grad_(True)
    loss = liger(x, y)
    loss.backward()
    entry["loss"] = float(loss)
    entry["loss_error"] = gpu_suite.relative_error(float(loss), ref[0])
    entry["grad_error"] = {"logits": self.max_error(x.grad, ref[1][0])}


def no_grad(torch, fn):
  with torch.no_grad():
    return fn()


def optional(module: str, name: str):
  """``(getattr(import module, name), None)``, or ``(None, why it does not import)``."""
  try:
    mod = __import__(module, fromlist=[name])
    return getattr(mod, name), None
  except Exception as e:  # noqa: BLE001  (no CUDA, no triton, not installed...)
    return None, f"{module} does not import: {error_text(e)}"


# ----------------------------------------------------------------------- MNIST runs


def mnist_run(args, torch, tuned: bool) -> dict:
  """The seed's PyTorch pipeline or the tuned loop; epoch end times (since process start)."""
  import bench_train  # pylint: disable=g-import-not-at-top

  out = {"epoch_ends_s": []}
  device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  torch.manual_seed(0)
  data = {k: types.SimpleNamespace(images=x, labels=y)
          for k, (x, y) in gpu_suite.read_mnist(args.mnist, args.max_examples).items()}
  model = bench_train.torch_mlp(torch).to(device)
  opt = torch.optim.SGD(model.parameters(), lr=bench_train.LEARNING_RATE,
                        momentum=bench_train.MOMENTUM)
  batch = bench_train.BATCH
  loss_fn = torch.nn.functional.cross_entropy
  if tuned:
    def normalised(split):
      x = torch.from_numpy(split.images.reshape(-1, 784).astype("float32") / 255.0)
      return ((x - 0.1307) / 0.3081).to(device), torch.from_numpy(
          split.labels.astype("int64")).to(device)
    train_x, train_y = normalised(data["train"])
    test_x, test_y = normalised(data["test"])
  else:
    train_loader = torch.utils.data.DataLoader(bench_train.tutorial_dataset(data["train"]),
                                               batch_size=batch, shuffle=True)
    test_loader = torch.utils.data.DataLoader(bench_train.tutorial_dataset(data["test"]),
                                              batch_size=1000)
  out["startup_s"] = time.perf_counter() - PROCESS_START
  for _ in range(args.epochs):
    model.train()
    epoch_start = time.perf_counter()
    if tuned:
      perm = torch.randperm(len(train_y), device=device)
      for k in range(0, len(perm), batch):
        idx = perm[k:k + batch]
        opt.zero_grad(set_to_none=True)
        loss_fn(model(train_x[idx]), train_y[idx]).backward()
        opt.step()
      if device.type == "cuda":
        torch.cuda.synchronize()
    else:
      for images, labels in train_loader:
        images, labels = images.to(device), labels.to(device)
        opt.zero_grad()
        loss_fn(model(images), labels).backward()
        opt.step()
    train_s = time.perf_counter() - epoch_start
    model.eval()
    with torch.no_grad():
      if tuned:
        correct = int((model(test_x).argmax(1) == test_y).sum())
        total = len(test_y)
      else:
        correct = total = 0
        for images, labels in test_loader:
          images, labels = images.to(device), labels.to(device)
          correct += int((model(images).argmax(1) == labels).sum())
          total += len(labels)
    out["epoch_ends_s"].append(time.perf_counter() - PROCESS_START)
    out.setdefault("epoch_train_s", []).append(train_s)
    out["test_accuracy_percent"] = 100.0 * correct / total
    gpu_suite.write_json(args.result, out)
  steady = out["epoch_train_s"][1:] or out["epoch_train_s"]
  out["examples_per_s"] = len(data["train"].labels) / min(steady)
  out["device"] = str(device)
  out["note"] = ("examples/s: the fastest epoch after the first" if len(out["epoch_train_s"]) > 1
                 else "examples/s: the only epoch")
  return out


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--mode", choices=("losses", "seed", "tuned"), required=True)
  p.add_argument("--result", required=True, help="JSON file to write (rewritten as it goes)")
  p.add_argument("--budget", type=float, default=120.0, help="seconds for this part")
  p.add_argument("--mnist", default="", help="MNIST IDX folder (seed, tuned)")
  p.add_argument("--epochs", type=int, default=10, help="epochs (seed, tuned)")
  p.add_argument("--max-examples", type=int, default=0, help="0: all; N: the first N training "
                 "and N/2 test examples (seed, tuned)")
  p.add_argument("--smoke", action="store_true", help="tiny shapes, 2 rounds")
  return p.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except Exception as e:  # noqa: BLE001
    gpu_suite.write_json(args.result, {"status": "skipped",
                                       "skipped": f"torch does not import: {error_text(e)}",
                                       "error": f"torch does not import: {error_text(e)}"})
    return
  if args.mode == "losses":
    losses = Losses(args, torch)
    losses.save()
    losses.linear(0.55)
    losses.softmax_losses(0.9)
    losses.save()
  else:
    result = mnist_run(args, torch, tuned=args.mode == "tuned")
    gpu_suite.write_json(args.result, result)
    print(json.dumps({k: v for k, v in result.items() if k != "epoch_ends_s"}))


if __name__ == "__main__":
  main()
