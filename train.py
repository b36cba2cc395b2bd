r"""Trains a Flax MLP on MNIST with jaxce's sparse cross-entropy, data-parallel with ``jax.pmap``.

  python train.py --config configs/default.py --workdir runs/mnist --config.num_epochs=3

The dataset lives on the devices (replicated); each epoch is a handful of compiled calls, each a
``lax.scan`` over a chunk of steps inside the pmapped function, so no Python runs per step. Every
global batch is split over all devices of all processes (axis ``batch``); gradients and metrics are
summed with ``lax.psum`` and divided by the psum'd count of real examples, so the padded last batch
gives the exact mean over the examples it holds.

Multi-host: start one process per host with ``--coordinator_address=HOST:PORT --num_processes=N
--process_id=I`` (or the ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``
environment variables, or ``--distributed`` to let JAX detect Slurm / Open MPI / Cloud TPU).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging as std_logging
import os
import sys
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import tqdm
from absl import app, flags, logging
from flax import jax_utils
from flax import linen as nn
from flax.training import train_state
from jax import lax
from ml_collections import config_flags

import input_pipeline
import jaxce

AXIS = "batch"
MEAN, STD = 0.1307, 0.3081

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, TensorBoard and plots.")
flags.DEFINE_string("coordinator_address", None, "jax.distributed coordinator HOST:PORT "
                    "(default: $JAX_COORDINATOR_ADDRESS).")
flags.DEFINE_integer("num_processes", None, "Number of processes (default: $JAX_NUM_PROCESSES).")
flags.DEFINE_integer("process_id", None, "This process's index (default: $JAX_PROCESS_ID).")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() with JAX's cluster "
                  "auto-detection (Slurm, Open MPI, Cloud TPU) even without the flags above.")
config_flags.DEFINE_config_file("config", None, "Training configuration file.", lock_config=True)


class MLP(nn.Module):
  """ReLU multilayer perceptron; returns logits."""

  features: Sequence[int] = (512, 256, 128, 64)
  num_classes: int = 10

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for width in self.features:
      x = nn.relu(nn.Dense(width)(x))
    return nn.Dense(self.num_classes)(x)


class DeviceData(NamedTuple):
  """A split on every local device: normalised ``images`` ``(devices, n, 784)``, ``labels``."""

  images: jax.Array
  labels: jax.Array


def create_train_state(rng: jax.Array, *, features: Sequence[int], learning_rate: float,
                       momentum: float) -> train_state.TrainState:
  """Initialises the MLP and an ``optax.sgd`` optimiser with momentum."""
  model = MLP(features=tuple(features))
  params = _init_params(rng, model)
  tx = optax.sgd(learning_rate=learning_rate, momentum=momentum)
  return train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)


@functools.partial(jax.jit, static_argnums=(1,))
def _init_params(rng: jax.Array, model: MLP):
  """One compiled initialisation (eager init compiles every layer's initialiser separately)."""
  return model.init(rng, jnp.zeros((1, 28 * 28), jnp.float32))["params"]


def normalize(images: np.ndarray) -> np.ndarray:
  """uint8 pixels to float32 scaled to [0, 1] and standardised with MNIST's mean and std."""
  return ((images.astype(np.float32) / 255.0 - MEAN) / STD).astype(np.float32)


def put_on_devices(split: input_pipeline.Split) -> DeviceData:
  """Replicates a split onto every local device (as uint8) and normalises it there, once."""
  images, labels = replicate((split.images, split.labels))
  return DeviceData(_normalize_on_device(images), labels)


@functools.partial(jax.pmap, axis_name=AXIS)
def _normalize_on_device(images: jax.Array) -> jax.Array:
  """:func:`normalize` as one fused pass on each device."""
  return (images.astype(jnp.float32) / 255.0 - MEAN) / STD


def replicate(tree):
  """One copy per local device, sharded the way ``jax.pmap`` returns its outputs (no recompiles)."""
  return jax_utils.replicate(tree, axis_name=AXIS)


# ------------------------------------------------------------------------- device code


def train_step(state, images, labels, idx, valid):
  """One SGD step on this device's share of a global batch; ``valid=False`` rows are padding."""
  count = lax.psum(jnp.sum(valid, dtype=jnp.float32), AXIS)

  def loss_fn(params):
    logits = state.apply_fn({"params": params}, images[idx])
    loss_sum = jaxce.sparse_cross_entropy(logits, labels[idx], where=valid[:, None],
                                          reduction="sum")
    return loss_sum / jnp.maximum(count, 1.0), loss_sum

  grads, loss_sum = jax.grad(loss_fn, has_aux=True)(state.params)
  new_state = state.apply_gradients(grads=lax.psum(grads, AXIS))
  # A step with no real example at all (chunk padding) must not move the momentum either.
  new_state = jax.tree.map(lambda new, old: jnp.where(count > 0, new, old), new_state, state)
  return new_state, jnp.stack([lax.psum(loss_sum, AXIS), count])


@functools.partial(jax.pmap, axis_name=AXIS, donate_argnums=(0,))
def train_chunk(state, images, labels, idx, valid):
  """Runs ``idx.shape[0]`` steps as one ``lax.scan``; returns the state and [loss sum, count]."""

  def body(carry, batch):
    state, totals = carry
    state, metrics = train_step(state, images, labels, *batch)
    return (state, totals + metrics), None

  (state, totals), _ = lax.scan(body, (state, jnp.zeros(2, jnp.float32)), (idx, valid))
  return state, totals


@functools.partial(jax.pmap, axis_name=AXIS)
def eval_shard(state, images, labels, idx, valid):
  """[loss sum, correct, count] over the rows ``idx`` marks valid, summed over all devices."""

  def body(totals, batch):
    i, v = batch
    logits = state.apply_fn({"params": state.params}, images[i])
    loss = jaxce.sparse_cross_entropy(logits, labels[i], where=v[:, None], reduction="sum")
    correct = jnp.sum((jnp.argmax(logits, axis=-1) == labels[i]) & v, dtype=jnp.float32)
    return totals + jnp.stack([loss, correct, jnp.sum(v, dtype=jnp.float32)]), None

  totals, _ = lax.scan(body, jnp.zeros(3, jnp.float32), (idx, valid))
  return lax.psum(totals, AXIS)


# ------------------------------------------------------------------------- index layout


class Topology(NamedTuple):
  """Where this process's devices sit among all devices (pmap's global order)."""

  num_devices: int
  device_offset: int
  local_devices: int


def current_topology() -> Topology:
  local = jax.local_device_count()
  return Topology(jax.device_count(), jax.process_index() * local, local)


def epoch_batches(num_examples: int, batch_size: int, *, seed: int,
                  epoch: int) -> tuple[np.ndarray, np.ndarray]:
  """An epoch as ``(steps, batch_size)`` indices and mask: fresh permutation, last batch padded."""
  perm = np.random.default_rng([seed, epoch]).permutation(num_examples)
  steps = -(-num_examples // batch_size)
  idx = np.zeros(steps * batch_size, np.int32)
  idx[:num_examples] = perm
  valid = np.arange(steps * batch_size) < num_examples
  return idx.reshape(steps, batch_size), valid.reshape(steps, batch_size)


def chunk_length(num_steps: int, max_steps_per_call: int) -> int:
  """Steps per compiled call: as even as possible with at most ``max_steps_per_call``."""
  calls = -(-num_steps // max_steps_per_call)
  return -(-num_steps // calls)


def _local_slices(a: np.ndarray, topo: Topology) -> np.ndarray:
  """``(..., num_devices * k)`` to this process's ``(local_devices, ..., k)``."""
  a = a.reshape(*a.shape[:-1], topo.num_devices, -1)
  a = a[..., topo.device_offset:topo.device_offset + topo.local_devices, :]
  return np.moveaxis(a, -2, 0)


def shard_calls(idx: np.ndarray, valid: np.ndarray, topo: Topology,
                steps_per_call: int) -> list[tuple[np.ndarray, np.ndarray]]:
  """Splits an epoch into calls of ``(local_devices, steps_per_call, batch / num_devices)``.

  Steps added to fill the last call hold no valid example, so they leave the state unchanged.
  """
  pad = -len(idx) % steps_per_call
  idx, valid = np.pad(idx, ((0, pad), (0, 0))), np.pad(valid, ((0, pad), (0, 0)))
  calls = len(idx) // steps_per_call
  return [(_local_slices(i, topo), _local_slices(v, topo))
          for i, v in zip(np.split(idx, calls), np.split(valid, calls), strict=True)]


def eval_layout(num_examples: int, batch_size: int,
                topo: Topology) -> tuple[np.ndarray, np.ndarray]:
  """Each test example exactly once: ``(local_devices, chunks, batch)`` indices and mask."""
  per_device = -(-num_examples // topo.num_devices)
  batch_size = max(1, min(batch_size, per_device))
  chunks = -(-per_device // batch_size)
  total = topo.num_devices * chunks * batch_size
  idx = np.minimum(np.arange(total), max(num_examples - 1, 0)).astype(np.int32)
  valid = np.arange(total) < num_examples
  shape = (topo.num_devices, chunks, batch_size)
  sl = slice(topo.device_offset, topo.device_offset + topo.local_devices)
  return idx.reshape(shape)[sl], valid.reshape(shape)[sl]


# ------------------------------------------------------------------------- host loops


def train_epoch(state, data: DeviceData, calls, progress) -> tuple[Any, float]:
  """Runs one epoch's compiled calls; returns the state and the mean training loss."""
  totals = np.zeros(2)
  for idx, valid in calls:
    state, metrics = train_chunk(state, data.images, data.labels, idx, valid)
    # Fetching the metrics blocks, so at most one call is in flight: CPU collectives across
    # processes and fake devices time out when many calls are queued on two cores.
    totals += np.asarray(jax_utils.unreplicate(metrics))
    progress.update(min(idx.shape[1], progress.total - progress.n))  # Not the padding steps.
  return state, float(totals[0] / max(totals[1], 1.0))


def evaluate(state, data: DeviceData, layout: tuple[np.ndarray, np.ndarray]) -> dict[str, float]:
  """Test loss and accuracy over every test example exactly once."""
  loss_sum, correct, count = np.asarray(jax_utils.unreplicate(eval_shard(state, *data, *layout)))
  return {"test_loss": float(loss_sum / max(count, 1.0)),
          "test_accuracy": float(correct / max(count, 1.0)), "num_evaluated": int(count)}


def host_state(state) -> train_state.TrainState:
  """One copy of a replicated state as numpy arrays (for checkpoints and comparisons)."""
  return jax.device_get(jax_utils.unreplicate(state))


# ------------------------------------------------------------------------- outputs


def read_history(path: str, upto_epoch: int) -> list[dict[str, Any]]:
  """Epoch records of ``metrics.jsonl`` up to the resumed checkpoint (later ones are redone)."""
  if not os.path.exists(path):
    return []
  with open(path) as f:
    records = [json.loads(line) for line in f if line.strip()]
  return [r for r in records if r["epoch"] <= upto_epoch]


def plot_curves(history: Sequence[dict[str, Any]], path: str, title: str) -> None:
  """Loss and accuracy per epoch to a PNG (matplotlib, Agg backend)."""
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  epochs = [r["epoch"] for r in history]
  fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4), layout="constrained")
  ax_loss.plot(epochs, [r["train_loss"] for r in history], "o-", label="train")
  ax_loss.plot(epochs, [r["test_loss"] for r in history], "s-", label="test")
  ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
  ax_loss.legend()
  ax_acc.plot(epochs, [100 * r["test_accuracy"] for r in history], "s-", color="C1")
  ax_acc.set(xlabel="epoch", ylabel="%", title="test accuracy")
  for ax in (ax_loss, ax_acc):
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
  fig.suptitle(title, fontsize=9, wrap=True)
  fig.savefig(path, dpi=100)
  plt.close(fig)


class RunOutputs:
  """Everything a run leaves in ``workdir``.

  Checkpoints (orbax, one per epoch; all processes take part) and, on process 0 only: the log
  lines, ``metrics.jsonl``, TensorBoard event files and ``curves.png``.
  """

  def __init__(self, workdir: str, dataset: str, *, is_main: bool):
    self.workdir, self.dataset, self.is_main = workdir, dataset, is_main
    self.offline = dataset.startswith(input_pipeline.OFFLINE_DATASET)
    self.metrics_path = os.path.join(workdir, "metrics.jsonl")
    self.history: list[dict[str, Any]] = []
    # Orbax writes each step into a "<step>.orbax-checkpoint-tmp-*" folder and renames it when
    # complete, so an interrupted save is never listed as a step, let alone the latest one.
    self.checkpoints = ocp.CheckpointManager(
        os.path.abspath(os.path.join(workdir, "checkpoints")),
        options=ocp.CheckpointManagerOptions(max_to_keep=3, enable_async_checkpointing=False))
    self.writer = None
    if is_main:
      import tensorboardX  # pylint: disable=g-import-not-at-top

      self.writer = tensorboardX.SummaryWriter(workdir)

  def log(self, message: str, *args) -> None:
    if self.is_main:
      prefix = "[OFFLINE SUBSET - not full MNIST] " if self.offline else ""
      logging.info(prefix + message, *args)

  def announce(self, data: input_pipeline.Dataset) -> None:
    """States at start what the run trains on; the offline notice as a loud warning."""
    if self.is_main and data.notice:
      banner = "!" * 100
      logging.warning("\n%s\n%s\n%s", banner, data.notice, banner)
    self.log("data: %s from %s: %d train, %d test examples", data.name, data.source,
             len(data.train), len(data.test))
    if self.writer:
      self.writer.add_text("dataset", self.dataset)

  def restore(self, state) -> tuple[Any, int]:
    """The latest checkpoint and its epoch, or ``(state, 0)`` when there is none."""
    epoch = self.checkpoints.latest_step() or 0
    if epoch:
      state = self.checkpoints.restore(epoch, args=ocp.args.StandardRestore(state))
      self.log("resumed from the checkpoint of epoch %d in %s", epoch, self.checkpoints.directory)
    self.history = read_history(self.metrics_path, epoch)
    if self.is_main:
      with open(self.metrics_path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in self.history)
    return state, epoch

  def progress(self, epoch: int, num_epochs: int, steps: int):
    """A per-epoch progress bar (steps), on process 0 only."""
    label = "OFFLINE SUBSET " if self.offline else ""
    return tqdm.tqdm(total=steps, desc=f"{label}epoch {epoch}/{num_epochs}", unit="step",
                     disable=not self.is_main, leave=False, file=sys.stderr)

  def end_epoch(self, metrics: dict[str, Any], state) -> None:
    """Logs and records one epoch, then checkpoints it (metrics first: see :func:`read_history`)."""
    record = {**metrics, "dataset": self.dataset}
    self.history.append(record)
    self.log("epoch %d: train_loss=%.4f test_loss=%.4f test_accuracy=%.2f%% examples/s=%.0f",
             metrics["epoch"], metrics["train_loss"], metrics["test_loss"],
             100 * metrics["test_accuracy"], metrics["examples_per_sec"])
    if self.is_main:
      with open(self.metrics_path, "a") as f:
        f.write(json.dumps(record) + "\n")
      for key in ("train_loss", "test_loss", "test_accuracy", "examples_per_sec"):
        self.writer.add_scalar(key, metrics[key], metrics["epoch"])
      self.writer.flush()
    self.checkpoints.save(metrics["epoch"], args=ocp.args.StandardSave(state))
    self.checkpoints.wait_until_finished()

  def summary(self, num_train: int, num_test: int, num_devices: int) -> dict[str, Any]:
    """The final one-line JSON summary (training time summed over resumed runs too)."""
    last = self.history[-1] if self.history else {}
    if self.offline and self.is_main:
      logging.warning("Finished on the offline subset. %s", self.dataset)
    self.checkpoints.close()
    if self.writer:
      self.writer.close()
      # Drawn once at the end (about a second each time); a resumed run redraws all epochs.
      plot_curves(self.history, os.path.join(self.workdir, "curves.png"), self.dataset)
    return {"dataset": self.dataset, "num_train": num_train, "num_test": num_test,
            "test_accuracy": last.get("test_accuracy"), "test_loss": last.get("test_loss"),
            "train_loss": last.get("train_loss"), "epochs": last.get("epoch", 0),
            "devices": num_devices, "processes": jax.process_count(),
            "train_seconds": sum(r["epoch_seconds"] for r in self.history),
            "examples_per_sec": last.get("examples_per_sec"), "workdir": self.workdir}


# ------------------------------------------------------------------------- entry points


class ConfigError(ValueError):
  """The configuration cannot be trained with (raised before any data is loaded)."""


def validate_config(config, num_devices: int) -> None:
  """Rejects a bad configuration before any data is loaded or anything is compiled."""
  checks = [
      (config.batch_size > 0, f"config.batch_size must be positive, got {config.batch_size}"),
      (config.batch_size % num_devices == 0,
       f"config.batch_size={config.batch_size} is not divisible by the {num_devices} devices; "
       f"use a multiple of {num_devices}"),
      (config.num_epochs >= 0, f"config.num_epochs must be >= 0, got {config.num_epochs}"),
      (config.learning_rate > 0, f"config.learning_rate must be > 0, got {config.learning_rate}"),
      (0 <= config.momentum < 1, f"config.momentum must be in [0, 1), got {config.momentum}"),
      (len(config.hidden_sizes) > 0 and min(config.hidden_sizes) > 0,
       f"config.hidden_sizes must be positive widths, got {tuple(config.hidden_sizes)}"),
      (config.max_steps_per_call > 0,
       f"config.max_steps_per_call must be > 0, got {config.max_steps_per_call}"),
      (config.eval_batch_size > 0,
       f"config.eval_batch_size must be > 0, got {config.eval_batch_size}"),
      (config.num_train_examples >= 0 and config.num_test_examples >= 0,
       "config.num_train_examples / num_test_examples must be >= 0 (0 = all)"),
  ]
  for ok, message in checks:
    if not ok:
      raise ConfigError(message)


def load_data(config) -> input_pipeline.Dataset:
  """Loads MNIST as the config says, optionally keeping the first N examples (smoke runs)."""
  data = input_pipeline.load_mnist(config.data_dir, tfds_data_dir=config.tfds_data_dir)

  def take(split, n):
    return input_pipeline.Split(split.images[:n], split.labels[:n]) if n else split

  return dataclasses.replace(data, train=take(data.train, config.num_train_examples),
                             test=take(data.test, config.num_test_examples))


def dataset_label(data: input_pipeline.Dataset) -> str:
  """The ``dataset`` field of every output: the name, plus the offline notice when there is one."""
  return f"{data.name} -- {data.notice}" if data.notice else data.name


def train_and_evaluate(config, workdir: str):
  """Trains and evaluates; resumes from the latest checkpoint in ``workdir``.

  Returns the final (host) state and the summary dict that ``main`` prints.
  """
  validate_config(config, jax.device_count())
  data = load_data(config)
  run = RunOutputs(workdir, dataset_label(data), is_main=jax.process_index() == 0)
  run.announce(data)
  init = create_train_state(jax.random.PRNGKey(config.seed), features=config.hidden_sizes,
                            learning_rate=config.learning_rate, momentum=config.momentum)
  state, start_epoch = run.restore(jax.device_get(init))
  state = replicate(state)
  train_data, test_data = put_on_devices(data.train), put_on_devices(data.test)
  topo = current_topology()
  eval_idx = eval_layout(len(data.test), config.eval_batch_size, topo)
  for epoch in range(start_epoch + 1, config.num_epochs + 1):
    idx, valid = epoch_batches(len(data.train), config.batch_size, seed=config.seed, epoch=epoch)
    calls = shard_calls(idx, valid, topo, chunk_length(len(idx), config.max_steps_per_call))
    start = time.perf_counter()
    with run.progress(epoch, config.num_epochs, len(idx)) as bar:
      state, train_loss = train_epoch(state, train_data, calls, bar)
    seconds = time.perf_counter() - start
    metrics = {"epoch": epoch, "train_loss": train_loss, **evaluate(state, test_data, eval_idx),
               "examples_per_sec": len(data.train) / seconds, "epoch_seconds": seconds}
    run.end_epoch(metrics, host_state(state))
  return host_state(state), run.summary(len(data.train), len(data.test), jax.device_count())


def init_distributed(coordinator_address: str | None, num_processes: int | None,
                     process_id: int | None, force: bool) -> None:
  """``jax.distributed.initialize`` from flags, else the environment; a no-op for one process."""
  env = os.environ.get
  address = coordinator_address or env("JAX_COORDINATOR_ADDRESS")
  num = num_processes if num_processes is not None else env("JAX_NUM_PROCESSES")
  pid = process_id if process_id is not None else env("JAX_PROCESS_ID")
  if not (force or address or (num is not None and int(num) > 1)):
    return
  jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU: collectives over gloo
  jax.distributed.initialize(coordinator_address=address,
                             num_processes=None if num is None else int(num),
                             process_id=None if pid is None else int(pid))


class _QuietLibraries(std_logging.Filter):
  """Keeps orbax's per-checkpoint INFO chatter out of the run's log (warnings still show)."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return record.levelno >= std_logging.WARNING or f"{os.sep}orbax{os.sep}" not in record.pathname


def quiet_library_logs() -> None:
  logging.get_absl_handler().addFilter(_QuietLibraries())


def main(argv):
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  if FLAGS.config is None or FLAGS.workdir is None:
    raise app.UsageError("--config and --workdir are required.")
  quiet_library_logs()
  init_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                   FLAGS.distributed)
  logging.info("JAX process %d/%d, local devices %d, all devices %d", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  try:
    _, summary = train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except (ConfigError, input_pipeline.DataFileError) as e:
    sys.exit(f"train.py: error: {e}")
  if jax.process_index() == 0:
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
