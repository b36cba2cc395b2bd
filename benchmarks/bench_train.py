r"""Benchmark: train.py's default config vs the same MLP in plain PyTorch, on full MNIST.

  python benchmarks/bench_train.py --data_dir ../shared/data/mnist

Both runs use the same data (the IDX files in ``--data_dir``), the same normalisation
((x / 255 - 0.1307) / 0.3081), the same 784-512-256-128-64-10 ReLU MLP, batch 64, SGD with
learning rate 0.01 and momentum 0.5, a fresh permutation each epoch with the last partial batch
kept, and a test evaluation after every epoch. PyTorch keeps the normalised tensors in memory and
slices batches from a ``randperm`` (no DataLoader, no per-image transforms), so it is measured at
its best, not at the speed of the tutorial's DataLoader pipeline.

JAX wall time is the whole ``train.train_and_evaluate`` call in this process: putting the data on
the device, compiling, training, evaluating, checkpointing, metrics, TensorBoard and the plot each
epoch. PyTorch wall time is its training and evaluation loop. Prints both wall times, their ratio,
both test accuracies and examples/s, then one JSON line.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import input_pipeline  # noqa: E402
import train  # noqa: E402
from configs import default  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("data_dir", None, "Folder with the four MNIST IDX files.", required=True)
flags.DEFINE_integer("epochs", 10, "Epochs for both frameworks.")
flags.DEFINE_bool("torch", True, "Also run the PyTorch baseline when torch is installed.")


def run_jax(data_dir: str, epochs: int) -> dict:
  """train.py's default config, in a fresh workdir; wall time of the whole call."""
  config = default.get_config()
  config.data_dir, config.num_epochs = data_dir, epochs
  with tempfile.TemporaryDirectory() as workdir:
    start = time.perf_counter()
    _, summary = train.train_and_evaluate(config, workdir)
    wall = time.perf_counter() - start
  return {"wall_seconds": wall, "train_seconds": summary["train_seconds"],
          "test_accuracy": summary["test_accuracy"], "devices": summary["devices"],
          "examples_per_sec": summary["num_train"] * epochs / wall}


def torch_mlp(torch, sizes=(784, 512, 256, 128, 64, 10)):
  layers = []
  for n_in, n_out in zip(sizes[:-1], sizes[1:], strict=True):
    layers += [torch.nn.Linear(n_in, n_out), torch.nn.ReLU()]
  return torch.nn.Sequential(*layers[:-1])


def run_torch(data: input_pipeline.Dataset, epochs: int, seed: int = 0) -> dict:
  """The same MLP, optimiser, batch and epochs in plain PyTorch (tensors in memory)."""
  import torch  # pylint: disable=g-import-not-at-top

  torch.manual_seed(seed)
  x, y = (torch.from_numpy(train.normalize(data.train.images)),
          torch.from_numpy(data.train.labels.astype("int64")))
  x_test, y_test = (torch.from_numpy(train.normalize(data.test.images)),
                    torch.from_numpy(data.test.labels.astype("int64")))
  model = torch_mlp(torch)
  opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.5)
  start = time.perf_counter()
  for _ in range(epochs):
    perm = torch.randperm(len(y))
    for i in range(0, len(y), 64):  # The last partial batch is kept, as in train.py.
      idx = perm[i:i + 64]
      opt.zero_grad()
      torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
      opt.step()
    with torch.no_grad():
      accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
  wall = time.perf_counter() - start
  return {"wall_seconds": wall, "test_accuracy": accuracy, "threads": torch.get_num_threads(),
          "examples_per_sec": len(y) * epochs / wall}


def main(argv):
  del argv
  train.quiet_library_logs()
  jax_result = run_jax(FLAGS.data_dir, FLAGS.epochs)
  print(f"JAX    : {jax_result['wall_seconds']:8.1f} s wall ({jax_result['train_seconds']:.1f} s "
        f"in training epochs), test accuracy {100 * jax_result['test_accuracy']:.2f}%, "
        f"{jax_result['examples_per_sec']:,.0f} examples/s, {jax_result['devices']} device(s)")
  result = {"epochs": FLAGS.epochs, "jax": jax_result}
  try:
    import torch  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    print("PyTorch: not installed, baseline skipped")
  else:
    if FLAGS.torch:
      torch_result = run_torch(input_pipeline.load_idx_dir(FLAGS.data_dir), FLAGS.epochs)
      ratio = torch_result["wall_seconds"] / jax_result["wall_seconds"]
      print(f"PyTorch: {torch_result['wall_seconds']:8.1f} s wall, test accuracy "
            f"{100 * torch_result['test_accuracy']:.2f}%, "
            f"{torch_result['examples_per_sec']:,.0f} examples/s, "
            f"{torch_result['threads']} thread(s)")
      print(f"speed-up: JAX is {ratio:.1f}x faster than PyTorch (wall time)")
      result.update(torch=torch_result, speedup=ratio)
  print(json.dumps(result))


if __name__ == "__main__":
  app.run(main)
