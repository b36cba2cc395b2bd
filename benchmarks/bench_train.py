r"""Benchmark: train.py's speed against a minimal JAX step and against the PyTorch tutorial.

  python benchmarks/bench_train.py --data_dir /path/to/mnist-idx --repeats 5
  python benchmarks/bench_train.py --data_dir /path/to/mnist-idx --epochs 1 --repeats 1  # smoke

Two measurements, both on the IDX files in ``--data_dir``:

1. **Steady-state step, in this process.** One epoch of train.py's training loop (its compiled,
   pmapped ``lax.scan`` calls over data on the device, fed by its host loop; with the default
   ``grad_groups=8`` and with ``grad_groups=0``) against one epoch of
   a minimal reference: the same Flax MLP and ``optax.sgd(0.01, momentum=0.5)``, the optax loss
   ``softmax_cross_entropy_with_integer_labels(...).mean()``, one device, ``jax.jit`` of a
   ``lax.scan`` over the epoch's batches (full batches of 64; the data normalised on the device
   beforehand). Both compiled before timing; ``--step_rounds`` rounds, interleaved; per-step
   times and their ratio (min, and median of the per-round ratios).
2. **Whole run, separate processes.** ``python train.py --config configs/default.py`` (fresh
   workdir, ``--config.num_epochs=--epochs``) against the tutorial-faithful PyTorch MLP run by
   this script in another process (``--worker=torch``): a ``Dataset`` that does per image what
   ``torchvision.datasets.MNIST`` with ``Compose([ToTensor(), Normalize((0.1307,), (0.3081,))])``
   does (PIL image, float tensor in [0, 1], normalise), a shuffling ``DataLoader`` with batch 64
   (test batch 1000, no workers, as in the tutorial), the same MLP, ``SGD(lr=0.01, momentum=0.5)``
   and a test pass every epoch. Both timed as whole processes (imports, data loading, compiling,
   checkpoints and plots included), ``--repeats`` times, interleaved; min and median of each and
   the ratio PyTorch / JAX of each.

Prints one line per measurement, then one JSON line with everything.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

FLAGS = flags.FLAGS
flags.DEFINE_string("data_dir", None, "Folder with the four MNIST IDX files.", required=True)
flags.DEFINE_integer("epochs", 10, "Epochs of each whole run (both frameworks).")
flags.DEFINE_integer("repeats", 5, "Whole runs of each framework.")
flags.DEFINE_integer("step_rounds", 7, "Timed epochs of train.py's loop and of the reference.")
flags.DEFINE_list("parts", ["step", "run"], "Which measurements: step, run.")
flags.DEFINE_enum("worker", None, ["torch"], "Internal: run the PyTorch tutorial and print JSON.")

BATCH, LEARNING_RATE, MOMENTUM, GRAD_GROUPS = 64, 0.01, 0.5, 8
FEATURES = (512, 256, 128, 64)


def spread(values: list[float]) -> dict[str, float]:
  return {"min": min(values), "median": statistics.median(values)}


# ----------------------------------------------------------------------- 1. steady-state step


def reference_epoch_fn(model, tx, num_steps: int):
  """The minimal step: jit + lax.scan over the epoch's batches, optax loss, one device."""
  import jax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from jax import lax  # pylint: disable=g-import-not-at-top

  def loss_fn(params, x, y):
    logits = model.apply({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  def step(carry, batch):
    params, opt_state = carry
    loss, grads = jax.value_and_grad(loss_fn)(params, *batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), loss

  @jax.jit
  def epoch(params, opt_state, images, labels, perm):
    x = images[perm].reshape(num_steps, BATCH, -1)
    y = labels[perm].reshape(num_steps, BATCH)
    (params, opt_state), losses = lax.scan(step, (params, opt_state), (x, y))
    return params, opt_state, losses.mean()

  return epoch


def step_contenders(data) -> dict:
  """``{name: (prepare, run)}`` for train.py's epoch loop and for the reference, each with its own
  state: ``prepare(epoch)`` builds an epoch's host-side inputs (untimed, as in train.py), ``run``
  trains the epoch and returns its number of steps once the device is done."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import tqdm  # pylint: disable=g-import-not-at-top

  from trainer import data as data_lib  # pylint: disable=g-import-not-at-top
  from trainer import loop  # pylint: disable=g-import-not-at-top
  from trainer import model as model_lib  # pylint: disable=g-import-not-at-top

  n, topo = len(data.train), data_lib.current_topology()
  init = jax.device_get(model_lib.create_train_state(0, features=FEATURES,
                                                     learning_rate=LEARNING_RATE,
                                                     momentum=MOMENTUM))
  train_data = data_lib.put_on_devices(data.train)
  ref = {"state": (init.params, init.opt_state), "steps": n // BATCH,
         "images": jnp.asarray(data_lib.normalize(data.train.images)),
         "labels": jnp.asarray(data.train.labels)}
  ref["epoch"] = reference_epoch_fn(model_lib.MLP(FEATURES), init.tx, ref["steps"])

  def prepare_ours(epoch):
    idx, valid = data_lib.epoch_batches(n, BATCH, seed=0, epoch=epoch)
    return data_lib.shard_calls(idx, valid, topo, data_lib.chunk_length(len(idx), 100))

  def ours(grad_groups):
    state = {"state": data_lib.replicate(init)}

    def run(calls):
      state["state"], _, _ = loop.train_epoch(state["state"], train_data, calls,
                                              tqdm.tqdm(disable=True), grad_groups)
      return sum(c.steps for c in calls)

    return prepare_ours, run

  def prepare_ref(epoch):
    idx, _ = data_lib.epoch_batches(n, BATCH, seed=0, epoch=epoch)
    return jnp.asarray(idx.reshape(-1)[:ref["steps"] * BATCH])

  def run_ref(perm):
    params, opt_state, loss = ref["epoch"](*ref["state"], ref["images"], ref["labels"], perm)
    ref["state"] = jax.block_until_ready((params, opt_state, loss))[:2]
    return ref["steps"]

  return {"train.py": ours(GRAD_GROUPS), "train.py grad_groups=0": ours(0),
          "reference": (prepare_ref, run_ref)}


def measure_step(data, rounds: int) -> dict:
  """Per-step seconds of train.py's epoch loop and of the reference: one epoch each a round,
  alternating which goes first; round 0 compiles both and is not counted."""
  import jax  # pylint: disable=g-import-not-at-top

  contenders = step_contenders(data)
  times = {name: [] for name in contenders}
  for r in range(rounds + 1):
    names = list(contenders)
    for name in names[r % len(names):] + names[:r % len(names)]:  # rotating order
      prepare, run = contenders[name]
      inputs = prepare(r + 1)
      start = time.perf_counter()
      steps = run(inputs)
      if r:
        times[name].append((time.perf_counter() - start) / steps)
  ours, fast, ref = times["train.py"], times["train.py grad_groups=0"], times["reference"]
  return {"devices": jax.device_count(), "steps_per_epoch": -(-len(data.train) // BATCH),
          "train_py_ms": spread([1e3 * t for t in ours]),
          "train_py_grad_groups_0_ms": spread([1e3 * t for t in fast]),
          "reference_ms": spread([1e3 * t for t in ref]),
          "ratio_of_mins": min(ours) / min(ref),
          "ratio_median": statistics.median(a / b for a, b in zip(ours, ref, strict=True)),
          "grad_groups_0_ratio_of_mins": min(fast) / min(ref),
          "grad_groups_0_ratio_median": statistics.median(
              a / b for a, b in zip(fast, ref, strict=True))}


# ----------------------------------------------------------------------- 2. whole runs


def run_jax_process(data_dir: str, epochs: int) -> dict:
  """``python train.py`` on the default config in a fresh workdir; its process wall time."""
  with tempfile.TemporaryDirectory() as workdir:
    cmd = [sys.executable, os.path.join(REPO, "train.py"), "--config",
           os.path.join(REPO, "configs", "default.py"), f"--workdir={workdir}",
           f"--config.data_dir={data_dir}", f"--config.num_epochs={epochs}"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=REPO)
    wall = time.perf_counter() - start
  if proc.returncode:
    raise RuntimeError(f"train.py failed:\n{proc.stderr[-3000:]}")
  summary = json.loads(proc.stdout.strip().splitlines()[-1])
  return {"wall_seconds": wall, "test_accuracy_percent": summary["test_accuracy_percent"],
          "train_seconds": summary["train_seconds"],
          "compile_seconds": summary["compile_seconds"]}


def run_torch_process(data_dir: str, epochs: int) -> dict:
  """This script's ``--worker=torch`` in another process; its process wall time."""
  cmd = [sys.executable, os.path.abspath(__file__), "--worker=torch", f"--data_dir={data_dir}",
         f"--epochs={epochs}"]
  start = time.perf_counter()
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=REPO)
  wall = time.perf_counter() - start
  if proc.returncode:
    raise RuntimeError(f"PyTorch worker failed:\n{proc.stderr[-3000:]}")
  return {"wall_seconds": wall, **json.loads(proc.stdout.strip().splitlines()[-1])}


def measure_runs(data_dir: str, epochs: int, repeats: int) -> dict:
  runs = {"jax": [], "torch": []}
  for r in range(repeats):
    for name in (("jax", "torch") if r % 2 == 0 else ("torch", "jax")):
      run = run_jax_process if name == "jax" else run_torch_process
      runs[name].append(run(data_dir, epochs))
  jax_walls, torch_walls = ([r["wall_seconds"] for r in runs[k]] for k in ("jax", "torch"))
  return {"epochs": epochs, "repeats": repeats, "jax": runs["jax"], "torch": runs["torch"],
          "jax_wall": spread(jax_walls), "torch_wall": spread(torch_walls),
          "speedup_of_mins": min(torch_walls) / min(jax_walls),
          "speedup_of_medians": statistics.median(torch_walls) / statistics.median(jax_walls)}


# ----------------------------------------------------------------------- the PyTorch tutorial


def torch_tutorial(data_dir: str, epochs: int, seed: int = 0) -> dict:
  """The PyTorch MNIST tutorial's pipeline and loop with the project's MLP (``--worker=torch``)."""
  import torch  # pylint: disable=g-import-not-at-top

  from trainer import input_pipeline  # pylint: disable=g-import-not-at-top

  start = time.perf_counter()
  torch.manual_seed(seed)
  data = input_pipeline.load_idx_dir(data_dir)
  train_loader = torch.utils.data.DataLoader(tutorial_dataset(data.train), batch_size=BATCH,
                                             shuffle=True)
  test_loader = torch.utils.data.DataLoader(tutorial_dataset(data.test), batch_size=1000)
  model = torch_mlp(torch)
  optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE, momentum=MOMENTUM)
  for _ in range(epochs):
    model.train()
    for images, labels in train_loader:
      optimizer.zero_grad()
      torch.nn.functional.cross_entropy(model(images), labels).backward()
      optimizer.step()
    accuracy = torch_test(torch, model, test_loader)
  return {"seconds_after_imports": time.perf_counter() - start,
          "test_accuracy_percent": accuracy, "threads": torch.get_num_threads()}


def tutorial_dataset(split):
  """What ``torchvision.datasets.MNIST(transform=Compose([ToTensor(), Normalize(...)]))`` gives.

  Per item, as torchvision does: ``Image.fromarray`` of the uint8 digit; ``ToTensor`` (a copy
  as a (1, 28, 28) tensor, float, divided by 255); ``Normalize((0.1307,), (0.3081,))`` (a copy,
  minus mean, divided by std). torchvision itself has no CPU build on this machine.
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top

  class TutorialMNIST(torch.utils.data.Dataset):

    def __init__(self):
      self.data = torch.from_numpy(split.images.reshape(-1, 28, 28).copy())
      self.targets = torch.from_numpy(split.labels.astype(np.int64))
      self.mean = torch.as_tensor((0.1307,)).view(-1, 1, 1)
      self.std = torch.as_tensor((0.3081,)).view(-1, 1, 1)

    def __len__(self):
      return len(self.data)

    def __getitem__(self, index):
      img, target = self.data[index], int(self.targets[index])
      img = Image.fromarray(img.numpy())
      x = torch.from_numpy(np.array(img, np.uint8, copy=True)).view(28, 28, 1)
      x = x.permute((2, 0, 1)).contiguous().to(torch.get_default_dtype()).div(255)
      return x.clone().sub_(self.mean).div_(self.std), target

  return TutorialMNIST()


def torch_mlp(torch, sizes=(784, *FEATURES, 10)):
  layers = [torch.nn.Flatten()]
  for n_in, n_out in zip(sizes[:-1], sizes[1:], strict=True):
    layers += [torch.nn.Linear(n_in, n_out), torch.nn.ReLU()]
  return torch.nn.Sequential(*layers[:-1])


def torch_test(torch, model, loader) -> float:
  model.eval()
  correct = total = 0
  with torch.no_grad():
    for images, labels in loader:
      correct += (model(images).argmax(1) == labels).sum().item()
      total += len(labels)
  return 100.0 * correct / total


# ----------------------------------------------------------------------- main


def main(argv):
  del argv
  if FLAGS.worker == "torch":
    print(json.dumps(torch_tutorial(FLAGS.data_dir, FLAGS.epochs)))
    return
  result = {}
  if "step" in FLAGS.parts:
    from trainer import input_pipeline  # pylint: disable=g-import-not-at-top

    step = measure_step(input_pipeline.load_idx_dir(FLAGS.data_dir), FLAGS.step_rounds)
    print(f"steady-state step ({step['devices']} device(s), {step['steps_per_epoch']} steps an "
          f"epoch, {FLAGS.step_rounds} rounds): train.py {step['train_py_ms']['min']:.3f} ms min "
          f"/ {step['train_py_ms']['median']:.3f} median, reference "
          f"{step['reference_ms']['min']:.3f} / {step['reference_ms']['median']:.3f}; ratio "
          f"{step['ratio_of_mins']:.3f} (mins), {step['ratio_median']:.3f} (median of rounds)")
    print(f"  train.py with grad_groups=0: {step['train_py_grad_groups_0_ms']['min']:.3f} ms min / "
          f"{step['train_py_grad_groups_0_ms']['median']:.3f} median; ratio "
          f"{step['grad_groups_0_ratio_of_mins']:.3f} (mins), "
          f"{step['grad_groups_0_ratio_median']:.3f} (median of rounds)")
    result["step"] = step
  if "run" in FLAGS.parts:
    runs = measure_runs(FLAGS.data_dir, FLAGS.epochs, FLAGS.repeats)
    print(f"whole run, {FLAGS.epochs} epochs, {FLAGS.repeats} repeats: train.py "
          f"{runs['jax_wall']['min']:.1f} s min / {runs['jax_wall']['median']:.1f} s median "
          f"(test accuracy {runs['jax'][-1]['test_accuracy_percent']:.2f} %); PyTorch tutorial "
          f"{runs['torch_wall']['min']:.1f} / {runs['torch_wall']['median']:.1f} s "
          f"({runs['torch'][-1]['test_accuracy_percent']:.2f} %, "
          f"{runs['torch'][-1]['threads']} threads); PyTorch time / train.py time: "
          f"{runs['speedup_of_mins']:.2f}x (mins), {runs['speedup_of_medians']:.2f}x (medians)")
    result["run"] = runs
  print(json.dumps(result))


if __name__ == "__main__":
  app.run(main)
