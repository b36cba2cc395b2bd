"""Loop: the run from config to summary, epoch by epoch.

:func:`train_and_evaluate` is the library's entry point (the only function here that reads the
config): it claims the workdir, loads the data, checks it is the workdir's run, restores the newest
intact checkpoint, compiles the two steps (timed on their own), then trains, evaluates, records
and checkpoints each epoch.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import time
from typing import Any
from typing import NamedTuple

import jax
import numpy as np

from trainer import data as data_lib
from trainer import input_pipeline
from trainer import model as model_lib
from trainer import signals
from trainer import step
from trainer import workdir as workdir_lib
from trainer.checkpoints import Checkpoints
from trainer.console import Console
from trainer.errors import ConfigError
from trainer.errors import DivergedError
from trainer.errors import Interrupted
from trainer.metrics import Metrics

# Config fields that change what a run computes: a rerun in the same workdir must keep them.
RESULT_FIELDS = ("hidden_sizes", "learning_rate", "momentum", "batch_size", "seed",
                 "num_train_examples", "num_test_examples", "grad_groups")
# Fields a rerun may change: where the data is read from, how long to train, how work is cut up.
FREE_FIELDS = ("data_dir", "tfds_data_dir", "num_epochs", "max_steps_per_call", "eval_batch_size")
# The copy of metrics.jsonl that each checkpoint keeps (a resume restores lost records from it).
METRICS_COPY = "metrics.jsonl"


def validate_config(config, num_devices: int) -> None:
  """Rejects a bad configuration before any data is loaded or anything is compiled."""
  fields = set(RESULT_FIELDS) | set(FREE_FIELDS)
  if set(config) != fields:
    raise ConfigError(f"config lacks fields {sorted(fields - set(config))} and has unknown "
                      f"fields {sorted(set(config) - fields)}; variants should start from "
                      "configs/default.py's get_config()")
  sizes = tuple(config.hidden_sizes)
  checks = [
      (config.batch_size > 0, f"config.batch_size must be positive, got {config.batch_size}"),
      (config.batch_size % num_devices == 0,
       f"config.batch_size={config.batch_size} is not divisible by the {num_devices} devices; "
       f"use a multiple of {num_devices}"),
      (config.num_epochs >= 0, f"config.num_epochs must be >= 0, got {config.num_epochs}"),
      (math.isfinite(config.learning_rate) and config.learning_rate > 0,
       f"config.learning_rate must be finite and > 0, got {config.learning_rate}"),
      (math.isfinite(config.momentum) and 0 <= config.momentum < 1,
       f"config.momentum must be in [0, 1), got {config.momentum}"),
      (0 <= config.seed < 2**32, f"config.seed must be in [0, 2**32), got {config.seed}"),
      (len(sizes) > 0 and min(sizes) > 0,
       f"config.hidden_sizes must be positive widths, got {sizes}"),
      (isinstance(config.grad_groups, int) and config.grad_groups >= 0,
       f"config.grad_groups must be an int >= 0 (0: one group per device), got "
       f"{config.grad_groups!r}"),
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


def data_description(data: input_pipeline.Dataset) -> dict[str, Any]:
  """Which examples the run uses: how they were chosen, and how many of each class."""
  return {"subset": data.subset or "all examples", "train_per_class": data.train.class_counts(),
          "test_per_class": data.test.class_counts()}


def run_identity(config, data: input_pipeline.Dataset) -> dict[str, Any]:
  """What the run computes: the result fields of the config and the dataset's identity."""
  return {"config": {k: config[k] for k in RESULT_FIELDS},
          "dataset": {"name": data.name, "num_train": len(data.train), "num_test": len(data.test),
                      "sha256": data.fingerprint}}


# ------------------------------------------------------------------------- one epoch


def train_epoch(state, data: data_lib.DeviceData, calls: list[data_lib.Call],
                progress, grad_groups: int = step.GROUPS) -> tuple[Any, float, float]:
  """Runs one epoch's calls; returns the state, the mean training loss and the seconds taken.

  Two calls are in flight: the next one is queued before the previous one's metrics are read, so
  the device never waits for the host. Stops early once the loss is not finite.
  """
  start, totals, pending = time.perf_counter(), np.zeros(2), []
  for call in calls:
    state, metrics = step.train_chunk(state, data.images, data.labels, *call, grad_groups)
    pending.append((metrics, call.steps))
    if len(pending) == 2:
      totals = _report(*pending.pop(0), totals, progress)
      if not np.isfinite(totals[0]):
        break
  for metrics, steps in pending:
    totals = _report(metrics, steps, totals, progress)
  jax.block_until_ready(state)
  return state, float(totals[0] / max(totals[1], 1.0)), time.perf_counter() - start


def _report(metrics, steps: int, totals: np.ndarray, progress) -> np.ndarray:
  """Adds one call's [loss sum, examples] (waiting for it) and moves the bar."""
  totals = totals + np.asarray(metrics)[0]
  progress.update(steps)
  progress.set_postfix(loss=f"{totals[0] / max(totals[1], 1.0):.4f}")  # Redraws: once a call.
  return totals


def evaluate(state, data: data_lib.DeviceData, layout: data_lib.EvalLayout) -> dict[str, float]:
  """Test loss and accuracy (in %) over every test example exactly once."""
  loss_sum, correct, count = np.asarray(step.eval_chunk(state, *data, *layout))[0]
  return {"test_loss": float(loss_sum / max(count, 1.0)),
          "test_accuracy_percent": float(100 * correct / max(count, 1.0)),
          "num_evaluated": int(count)}


def compile_steps(state, train_data, test_data, call: data_lib.Call,
                  layout: data_lib.EvalLayout, grad_groups: int = step.GROUPS) -> tuple[Any, float]:
  """Compiles the training and evaluation calls; returns the state and the seconds it took.

  Each is called once with a trip count of 0: compiled (or found compiled) and run, doing nothing.
  """
  start = time.perf_counter()
  none = np.zeros_like(call.num_steps)
  state, metrics = step.train_chunk(state, *train_data, *call._replace(num_steps=none),
                                    grad_groups)
  jax.block_until_ready((metrics, step.eval_chunk(state, *test_data, *layout[:2], none)))
  return state, time.perf_counter() - start


def host_state(state):
  """The first local device's copy of a replicated state, as numpy arrays (no compiled slicing)."""
  return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)).reshape(x.shape[1:]), state)


# ------------------------------------------------------------------------- the run


@dataclasses.dataclass
class Position:
  """Where the run is, for the message when a signal stops it."""

  epoch: int = 0
  saved: int = 0

  def interrupted(self, num_epochs: int, signum: int) -> Interrupted:
    if not self.epoch:
      where = "before training started"
    else:
      where = f"{'after' if self.saved == self.epoch else 'in'} epoch {self.epoch}/{num_epochs}"
    kept = f"the last checkpoint is epoch {self.saved}" if self.saved else "no checkpoint yet"
    how = "interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"
    return Interrupted(f"{how} {where}; {kept}; rerun the same command to resume", signum)


class Outputs(NamedTuple):
  """Where a run's results go, one object per job."""

  checkpoints: Checkpoints
  metrics: Metrics
  console: Console


def train_and_evaluate(config, workdir: str, *, fresh: bool = False):
  """Trains and evaluates in ``workdir``, resuming its run; ``fresh`` deletes that run first.

  Returns the final (host) state and the summary that ``train.py`` prints.
  """
  validate_config(config, jax.device_count())
  wall_start, position, is_main = time.perf_counter(), Position(), jax.process_index() == 0
  try:
    with signals.stop_on_signals(), workdir_lib.claimed(workdir, fresh=fresh):
      data = data_lib.load_data(config.data_dir, config.tfds_data_dir,
                                num_train=config.num_train_examples,
                                num_test=config.num_test_examples, seed=config.seed)
      workdir_lib.check_run(workdir, run_identity(config, data),
                            {"config": config.to_dict(), "dataset_source": data.source,
                             "subset": data_description(data)})
      out = Outputs(Checkpoints(os.path.join(workdir, "checkpoints"), is_main=is_main),
                    Metrics(workdir, is_main=is_main),
                    Console(is_main=is_main, offline=data.offline))
      try:
        state, summary = _train(config, data, out, position)
      finally:
        out.checkpoints.close()
  except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM (signals.Stop)
    raise position.interrupted(config.num_epochs, signals.signal_number(e)) from None
  summary.update(wall_seconds=time.perf_counter() - wall_start, workdir=workdir)
  out.console.finished(summary)
  return state, summary


def _train(config, data: input_pipeline.Dataset, out: Outputs, position: Position):
  """Restores, compiles and runs the epochs; returns the host state and the summary."""
  state = data_lib.replicate(_restore(config, data, out, position))
  train_data, test_data = map(data_lib.put_on_devices, (data.train, data.test))
  topo = data_lib.current_topology()
  layout = data_lib.eval_layout(len(data.test), config.eval_batch_size, topo)
  first, compile_seconds = position.saved + 1, None
  for epoch in range(first, config.num_epochs + 1):
    position.epoch = epoch
    idx, valid = data_lib.epoch_batches(len(data.train), config.batch_size, seed=config.seed,
                                        epoch=epoch)
    calls = data_lib.shard_calls(idx, valid, topo,
                                 data_lib.chunk_length(len(idx), config.max_steps_per_call))
    with out.console.progress(epoch, config.num_epochs, len(idx)) as bar:
      if compile_seconds is None:
        state, compile_seconds = _compile(bar, out.console.epoch_label(epoch, config.num_epochs),
                                          state, train_data, test_data, calls[0], layout,
                                          config.grad_groups)
      state, train_loss, seconds = train_epoch(state, train_data, calls, bar, config.grad_groups)
    record = _finish_epoch(epoch, train_loss, seconds, state, test_data, layout, len(data.train))
    out.metrics.add({**record, "dataset": data.name})
    out.console.epoch_done(record, config.num_epochs,
                           compile_seconds if epoch == first else 0.0)
    with signals.deferred():  # A stop signal during a save lets it finish first.
      out.checkpoints.save(epoch, host_state(state), {METRICS_COPY: out.metrics.text()})
      position.saved = epoch
  out.metrics.close(plot_title(config, data))
  summary = summarize(out.metrics.history, data, compile_seconds or 0.0)
  return host_state(state), {**summary, "missing_epochs": out.metrics.missing}


def _restore(config, data: input_pipeline.Dataset, out: Outputs, position: Position):
  """The initial host state, or the newest intact checkpoint's; opens the metrics from there."""
  out.console.announce(data)
  init = model_lib.create_train_state(config.seed, features=config.hidden_sizes,
                                      learning_rate=config.learning_rate, momentum=config.momentum)
  state, position.saved = out.checkpoints.restore_latest(jax.device_get(init))
  if position.saved:
    out.console.info("resuming after epoch %d from %s", position.saved,
                     out.checkpoints.directory)
  saved = position.saved
  saved_history = out.checkpoints.read_file(saved, METRICS_COPY) if saved else None
  out.metrics.start(position.saved, hparams(config, data), config_text(config, data),
                    saved_history=saved_history)
  if out.metrics.missing:
    out.console.warning("metrics.jsonl lacks the records of epochs %s and no checkpoint holds "
                        "them; the summary covers the other epochs only",
                        ", ".join(map(str, out.metrics.missing)))
  return state


def _compile(bar, label: str, *args) -> tuple[Any, float]:
  """:func:`compile_steps`, with the bar saying so; its clock restarts afterwards."""
  bar.set_description(f"{label} (compiling)")
  state, seconds = compile_steps(*args)
  bar.set_description(label, refresh=False)
  bar.reset()
  return state, seconds


def _finish_epoch(epoch: int, train_loss: float, seconds: float, state, test_data, layout,
                  num_train: int) -> dict[str, Any]:
  """The epoch's record; a non-finite training loss stops the run before anything is saved."""
  if not math.isfinite(train_loss):
    raise DivergedError(f"the training loss became {train_loss} in epoch {epoch}; the run "
                        f"stopped and epoch {epoch} was not saved (try a lower "
                        "config.learning_rate)")
  start = time.perf_counter()
  record = {"epoch": epoch, "train_loss": train_loss, **evaluate(state, test_data, layout)}
  return {**record, "train_seconds": seconds, "examples_per_sec": num_train / seconds,
          "eval_seconds": time.perf_counter() - start}


# ------------------------------------------------------------------------- descriptions


def hparams(config, data: input_pipeline.Dataset) -> dict[str, Any]:
  """The run's identity as TensorBoard hparams (numbers and strings only)."""
  values = {k: config[k] for k in RESULT_FIELDS}
  values["hidden_sizes"] = ",".join(map(str, config.hidden_sizes))
  return {**values, "dataset": data.name, "dataset_sha256": data.fingerprint[:12]}


def config_text(config, data: input_pipeline.Dataset) -> str:
  """The whole config and the dataset, as Markdown for TensorBoard's text tab."""
  lines = [f"    {k} = {config[k]!r}" for k in config]
  return "\n".join([f"dataset: {data.name} from {data.source} (sha256 {data.fingerprint})", "",
                    *lines])


def plot_title(config, data: input_pipeline.Dataset) -> str:
  offline = " - OFFLINE SUBSET, NOT full MNIST" if data.offline else ""
  return (f"{data.name}{offline}: {len(data.train)} train / {len(data.test)} test (sha256 "
          f"{data.fingerprint[:12]}); MLP {tuple(config.hidden_sizes)}, SGD lr "
          f"{config.learning_rate} momentum {config.momentum}, batch {config.batch_size}, seed "
          f"{config.seed}")


def summarize(history: list[dict[str, Any]], data: input_pipeline.Dataset,
              compile_seconds: float) -> dict[str, Any]:
  """The run's summary; training time and examples/s are over all its epochs, resumed ones too."""
  last = history[-1] if history else {}
  train_seconds = sum(r["train_seconds"] for r in history)
  return {"dataset": data.name, "offline": data.offline, "notice": data.notice,
          "dataset_source": data.source, "dataset_sha256": data.fingerprint,
          "num_train": len(data.train), "num_test": len(data.test), **data_description(data),
          "epochs": last.get("epoch", 0), "train_loss": last.get("train_loss"),
          "test_loss": last.get("test_loss"),
          "test_accuracy_percent": last.get("test_accuracy_percent"),
          "train_seconds": train_seconds,
          "examples_per_sec": len(data.train) * len(history) / train_seconds if history else None,
          "compile_seconds": compile_seconds, "devices": jax.device_count(),
          "processes": jax.process_count()}
