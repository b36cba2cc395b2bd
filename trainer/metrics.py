"""Outputs, 2/3: metrics. ``metrics.jsonl``, TensorBoard and ``curves.png``, on process 0 only.

Every epoch's record goes into ``metrics.jsonl`` (the whole file rewritten atomically each epoch)
and TensorBoard (``tensorboard/``: scalars per epoch, the run's config as hparams and text). A
resumed run keeps the records up to its checkpoint and redoes the rest; TensorBoard is told to
discard the redone epochs' old points. Each checkpoint keeps a copy of the records up to its epoch:
a resume that finds ``metrics.jsonl`` missing, truncated or short takes the lost records from there,
and names any epoch whose record is nowhere. Accuracy is a percentage everywhere.
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
  with open(path) as f:
    return parse_history(f.read(), upto_epoch, path)


def parse_history(text: str, upto_epoch: int, name: str) -> list[dict[str, Any]]:
  """The epoch records in a ``metrics.jsonl`` text up to ``upto_epoch``, one per epoch."""
  records = {}
  for number, line in enumerate(text.splitlines(), 1):
    try:
      record = json.loads(line)
      if record["epoch"] <= upto_epoch:
        records[record["epoch"]] = record
    except (ValueError, TypeError, KeyError):
      logging.warning("%s: line %d is not an epoch record; dropped", name, number)
  return [records[e] for e in sorted(records)]


def merge_history(kept: list[dict[str, Any]], saved: list[dict[str, Any]],
                  upto_epoch: int) -> tuple[list[dict[str, Any]], list[int]]:
  """``kept`` records completed by ``saved`` ones, and the epochs to ``upto_epoch`` in neither."""
  by_epoch = {r["epoch"]: r for r in saved} | {r["epoch"]: r for r in kept}
  history = [by_epoch[e] for e in sorted(by_epoch)]
  return history, [e for e in range(1, upto_epoch + 1) if e not in by_epoch]


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
    self.missing: list[int] = []  # Epochs before the resume whose records are lost.
    self._writer = None

  def start(self, start_epoch: int, hparams: dict[str, Any], config_text: str, *,
            saved_history: str | None = None) -> None:
    """Keeps the records up to ``start_epoch`` and opens TensorBoard with the run's config.

    Records missing from ``metrics.jsonl`` are taken from ``saved_history`` (the checkpoint's
    copy); epochs in neither are listed in :attr:`missing`.
    """
    kept = read_history(self.path, start_epoch)
    saved = parse_history(saved_history or "", start_epoch, "the checkpoint's metrics.jsonl")
    self.history, self.missing = merge_history(kept, saved, start_epoch)
    restored = len(self.history) - len(kept)
    if restored and self.is_main:
      logging.warning("%s lacked %d epoch records; restored them from the checkpoint's copy",
                      self.path, restored)
    if not self.is_main:
      return
    write_atomically(self.path, self.text())
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
    write_atomically(self.path, self.text())
    for key in SCALARS:
      self._writer.add_scalar(key, record[key], record["epoch"])
    self._writer.flush()

  def text(self) -> str:
    """The history as ``metrics.jsonl``'s text: one JSON record a line."""
    return "".join(json.dumps(r) + "\n" for r in self.history)

  def close(self, title: str) -> None:
    """Closes TensorBoard and draws ``curves.png`` over all epochs of the run."""
    if not self.is_main or self._writer is None:
      return
    self._writer.close()
    if self.history:
      plot_curves(self.history, os.path.join(self.workdir, "curves.png"), title)


def plot_curves(history: Sequence[dict[str, Any]], path: str, title: str) -> None:
  """Loss and accuracy per epoch to a PNG."""
  curves_figure(history, title).savefig(path, dpi=100)


def curves_figure(history: Sequence[dict[str, Any]], title: str):
  """Loss and accuracy per epoch, ticks on whole epochs (a bare matplotlib Figure: no pyplot)."""
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
    ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True, min_n_ticks=1))
  fig.suptitle(title, fontsize=9, wrap=True)
  return fig
