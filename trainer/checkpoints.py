"""Outputs, 1/3: checkpoints. Orbax, one per epoch, each verified before it is trusted.

Orbax writes a step into a temporary folder and renames it when complete, so an interrupted save
never becomes a step. On top of that every finished save gets a ``sha256sums.json`` (size and
SHA-256 of each file), and a restore trusts a checkpoint only when every file matches, orbax reads
it without error and every value is finite. A checkpoint that fails is moved aside, with a warning,
to ``checkpoints_unusable/`` and the next older one is tried; when none is intact the run stops.
A non-finite state is never saved; :func:`sigint_deferred` lets a save finish before Ctrl-C.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import threading
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from trainer.errors import CheckpointError
from trainer.errors import DivergedError

MANIFEST = "sha256sums.json"


class Unusable(Exception):
  """One checkpoint cannot be trusted; the message says why."""


def file_digests(folder: str) -> dict[str, list]:
  """``{relative path: [size, sha256]}`` of every file under ``folder`` but the manifest."""
  digests = {}
  for root, _, files in os.walk(folder):
    for name in sorted(files):
      path = os.path.join(root, name)
      rel = os.path.relpath(path, folder)
      if not rel.startswith(MANIFEST):
        digests[rel] = [os.path.getsize(path), _sha256(path)]
  return digests


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def write_manifest(folder: str) -> None:
  """Records every file's size and SHA-256 in ``folder/sha256sums.json`` (atomically)."""
  digests = file_digests(folder)
  tmp = os.path.join(folder, MANIFEST + ".tmp")
  with open(tmp, "w") as f:
    json.dump(digests, f, indent=0, sort_keys=True)
  os.replace(tmp, os.path.join(folder, MANIFEST))


def verify_manifest(folder: str) -> None:
  """Raises :class:`Unusable` naming the first file that is missing, truncated or altered."""
  try:
    with open(os.path.join(folder, MANIFEST)) as f:
      expected = json.load(f)
  except FileNotFoundError:
    raise Unusable(f"no {MANIFEST} (its save did not finish)") from None
  except (OSError, ValueError) as e:
    raise Unusable(f"{MANIFEST} unreadable ({e})") from None
  for rel, (size, digest) in sorted(expected.items()):
    path = os.path.join(folder, rel)
    if not os.path.isfile(path):
      raise Unusable(f"{rel} is missing")
    if os.path.getsize(path) != size:
      raise Unusable(f"{rel} has {os.path.getsize(path)} bytes, {size} were saved")
    if _sha256(path) != digest:
      raise Unusable(f"{rel} does not match its SHA-256 (corrupted)")


def first_non_finite(tree) -> str | None:
  """The path of the first leaf holding a NaN or infinity, else ``None``."""
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    leaf = np.asarray(leaf)
    if np.issubdtype(leaf.dtype, np.inexact) and not np.all(np.isfinite(leaf)):
      return jax.tree_util.keystr(path)
  return None


@contextlib.contextmanager
def sigint_deferred():
  """Holds Ctrl-C back until the block is done (then raises ``KeyboardInterrupt``)."""
  if threading.current_thread() is not threading.main_thread() or (
      signal.getsignal(signal.SIGINT) is None):
    yield
    return
  received = []
  previous = signal.signal(signal.SIGINT, lambda *_: received.append(True))
  try:
    yield
  finally:
    signal.signal(signal.SIGINT, previous)
  if received:
    raise KeyboardInterrupt


class Checkpoints:
  """The run's checkpoints in ``directory``: all processes save, process 0 writes manifests."""

  def __init__(self, directory: str, *, is_main: bool, max_to_keep: int = 3):
    self.directory = os.path.abspath(directory)
    self.unusable_dir = self.directory + "_unusable"
    self.is_main = is_main
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                             enable_async_checkpointing=False))

  def step_dir(self, epoch: int) -> str:
    return os.path.join(self.directory, str(epoch))

  def save(self, epoch: int, state: Any) -> None:
    """Saves a host state as ``epoch`` with its manifest; refuses a non-finite state."""
    bad = first_non_finite(state)
    if bad:
      raise DivergedError(f"epoch {epoch} ended with non-finite values in state{bad}; it was not "
                          "saved (lower config.learning_rate)")
    self._manager.save(epoch, args=ocp.args.StandardSave(state))
    self._manager.wait_until_finished()
    if self.is_main:
      write_manifest(self.step_dir(epoch))
    _sync("checkpoint saved")

  def restore_latest(self, template: Any) -> tuple[Any, int]:
    """The newest intact checkpoint and its epoch, or ``(template, 0)`` when there is none."""
    failures = []
    for epoch in sorted(self._manager.all_steps(), reverse=True):
      try:
        state = self._restore_verified(epoch, template)
      except Unusable as e:
        failures.append((epoch, str(e)))
        continue
      self._set_aside(failures)
      return state, epoch
    if failures:
      reasons = "; ".join(f"epoch {e}: {why}" for e, why in failures)
      raise CheckpointError(f"no intact checkpoint in {self.directory} ({reasons}); move that "
                            "folder away, or rerun with --fresh to start afresh")
    return template, 0

  def _restore_verified(self, epoch: int, template: Any) -> Any:
    verify_manifest(self.step_dir(epoch))
    try:
      state = self._manager.restore(epoch, args=ocp.args.StandardRestore(template))
    except Exception as e:  # noqa: BLE001  (whatever orbax cannot read is unusable)
      raise Unusable(f"orbax cannot restore it: {type(e).__name__}: "
                     f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}") from None
    bad = first_non_finite(state)
    if bad:
      raise Unusable(f"non-finite values in state{bad}")
    return state

  def _set_aside(self, failures: list[tuple[int, str]]) -> None:
    """Moves unusable newer checkpoints to ``checkpoints_unusable/`` so the epochs can be redone."""
    for epoch, why in failures:
      target = os.path.join(self.unusable_dir, f"{epoch}-{time.strftime('%Y%m%d-%H%M%S')}")
      if self.is_main:
        logging.warning("checkpoint of epoch %d is unusable (%s); moved to %s and falling back",
                        epoch, why, target)
        os.makedirs(self.unusable_dir, exist_ok=True)
        os.rename(self.step_dir(epoch), target)
    if failures:
      _sync("unusable checkpoints set aside")
      self._manager.reload()

  def close(self) -> None:
    self._manager.close()


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)
