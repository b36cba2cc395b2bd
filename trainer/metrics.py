"""Outputs, 2/3: metrics. ``metrics.jsonl``, TensorBoard and ``curves.png``, on process 0 only.

Every epoch's record goes into ``metrics.jsonl`` (the whole file rewritten atomically each epoch)
and TensorBoard (``tensorboard/``: scalars per epoch, the run's config as hparams and text). A
resumed run keeps the records up to its checkpoint and redoes the rest; TensorBoard is told to
discard the redone epochs' old points. Accuracy is a percentage everywhere.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from absl import logging

SCALARS = ("train_loss", "test_loss", "test_accuracy_percent", "examples_per_sec",
           "train_seconds")


def read_history(path: str, upto_epoch: int) -> list[dict[str, Any]]:
  """Epoch records of ``metrics.jsonl`` up to ``upto_epoch`` (unreadable lines are dropped)."""
  if not os.path.exists(path):
    return []
  records = []
  with open(path) as f:
    for number, line in enumerate(f, 1):
      try:
        record = json.loads(line)
        if record["epoch"] <= upto_epoch:
          records.append(record)
      except (ValueError, TypeError, KeyError):
        logging.warning("%s: line %d is not an epoch record; dropped", path, number)
  return records


def write_atomically(path: str, text: str) -> None:
  """Writes ``path`` through a temporary file and a rename: readers see old or new, never half."""
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def import_tensorboardx():
  """``tensorboardX`` without the seconds it spends importing PyTorch when that is installed.

  It imports torch only to accept torch tensors, which this trainer never passes.
  """
  if "torch" in sys.modules or "tensorboardX" in sys.modules:
    import tensorboardX  # pylint: disable=g-import-not-at-top

    return tensorboardX
  sys.modules["torch"] = None  # type: ignore[assignment]  # makes `import torch` fail fast
  try:
    import tensorboardX  # pylint: disable=g-import-not-at-top
  finally:
    del sys.modules["torch"]
  return tensorboardX


class Metrics:
  """``metrics.jsonl``, TensorBoard and the curves of one run in ``workdir``.

  Every process keeps the history (for the summary); only process 0 writes.
  """

  def __init__(self, workdir: str, *, is_main: bool):
    self.workdir, self.is_main = workdir, is_main
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.history: list[dict[str, Any]] = []
    self._writer = None

  def start(self, start_epoch: int, hparams: dict[str, Any], config_text: str) -> None:
    """Keeps the records up to ``start_epoch`` and opens TensorBoard with the run's config."""
    self.history = read_history(self.path, start_epoch)
    if not self.is_main:
      return
    write_atomically(self.path, "".join(json.dumps(r) + "\n" for r in self.history))
    tensorboardx = import_tensorboardx()
    from tensorboardX.summary import hparams as hparams_summary  # pylint: disable=g-import-not-at-top

    self._writer = tensorboardx.SummaryWriter(os.path.join(self.workdir, "tensorboard"),
                                              purge_step=start_epoch + 1)
    for summary in hparams_summary(hparams, {k: 0.0 for k in SCALARS[:3]}):
      self._writer.file_writer.add_summary(summary)
    self._writer.add_text("config", config_text, start_epoch)

  def add(self, record: dict[str, Any]) -> None:
    """Records one finished epoch."""
    self.history.append(record)
    if not self.is_main:
      return
    write_atomically(self.path, "".join(json.dumps(r) + "\n" for r in self.history))
    for key in SCALARS:
      self._writer.add_scalar(key, record[key], record["epoch"])
    self._writer.flush()

  def close(self, title: str) -> None:
    """Closes TensorBoard and draws ``curves.png`` over all epochs of the run."""
    if not self.is_main or self._writer is None:
      return
    self._writer.close()
    if self.history:
      plot_curves(self.history, os.path.join(self.workdir, "curves.png"), title)


def plot_curves(history: Sequence[dict[str, Any]], path: str, title: str) -> None:
  """Loss and accuracy per epoch to a PNG (a bare matplotlib Figure: no pyplot, no GUI backend)."""
  from matplotlib import ticker  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

  epochs = [r["epoch"] for r in history]
  fig = Figure(figsize=(10, 4.4), layout="constrained")
  ax_loss, ax_acc = fig.subplots(1, 2)
  ax_loss.plot(epochs, [r["train_loss"] for r in history], "o-", label="train")
  ax_loss.plot(epochs, [r["test_loss"] for r in history], "s-", label="test")
  ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
  ax_loss.legend()
  ax_acc.plot(epochs, [r["test_accuracy_percent"] for r in history], "s-", color="C1")
  ax_acc.set(xlabel="epoch", ylabel="%", title="test accuracy (%)")
  for ax in (ax_loss, ax_acc):
    ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
  fig.suptitle(title, fontsize=9, wrap=True)
  fig.savefig(path, dpi=100)
