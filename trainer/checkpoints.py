"""Outputs, 1/3: checkpoints. Orbax, one per epoch, each verified before it is trusted.

Orbax writes a step into a temporary folder and renames it when complete, so an interrupted save
never becomes a step. On top of that every finished save gets a ``sha256sums.json`` (size and
SHA-256 of each file), and a restore trusts a checkpoint only when every file matches, orbax reads
it without error and every value is finite. A checkpoint that fails is moved aside, with a warning,
to ``checkpoints_unusable/`` and the next older one is tried. When none is intact the run stops,
unless every failure is a save that never finished (killed between orbax's commit and the
manifest): those are set aside too and the run starts from its initial state. A non-finite state
is never saved. Each checkpoint may carry small files of the run (the metrics history), covered by
its manifest like the state.
"""

from __future__ import annotations

import hashlib
import json
import os
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


class Unfinished(Unusable):
  """A checkpoint whose save never finished (no manifest): no loss, it is set aside."""


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
    raise Unfinished(f"no {MANIFEST} (its save did not finish)") from None
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

  def save(self, epoch: int, state: Any, files: dict[str, str] | None = None) -> None:
    """Saves a host state as ``epoch``, then ``files`` (name: text) and the manifest over all.

    Refuses a non-finite state.
    """
    bad = first_non_finite(state)
    if bad:
      raise DivergedError(f"epoch {epoch} ended with non-finite values in state{bad}; it was not "
                          "saved (lower config.learning_rate)")
    self._manager.save(epoch, args=ocp.args.StandardSave(state))
    self._manager.wait_until_finished()
    if self.is_main:
      for name, text in (files or {}).items():
        with open(os.path.join(self.step_dir(epoch), name), "w") as f:
          f.write(text)
      write_manifest(self.step_dir(epoch))
    _sync("checkpoint saved")

  def read_file(self, epoch: int, name: str) -> str | None:
    """A file saved with checkpoint ``epoch`` (verified by its manifest at restore), if any."""
    try:
      with open(os.path.join(self.step_dir(epoch), name)) as f:
        return f.read()
    except OSError:
      return None

  def restore_latest(self, template: Any) -> tuple[Any, int]:
    """The newest intact checkpoint and its epoch, or ``(template, 0)`` when there is none."""
    failures = []
    for epoch in sorted(self._manager.all_steps(), reverse=True):
      try:
        state = self._restore_verified(epoch, template)
      except Unusable as e:
        failures.append((epoch, e))
        continue
      self._set_aside(failures, f"falling back to epoch {epoch}")
      return state, epoch
    if not all(isinstance(e, Unfinished) for _, e in failures):
      reasons = "; ".join(f"epoch {epoch}: {why}" for epoch, why in failures)
      raise CheckpointError(f"no intact checkpoint in {self.directory} ({reasons}); move that "
                            "folder away, or rerun with --fresh to start afresh")
    self._set_aside(failures, "starting from the initial state")
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

  def _set_aside(self, failures: list[tuple[int, Unusable]], then: str) -> None:
    """Moves unusable newer checkpoints to ``checkpoints_unusable/`` so the epochs can be redone."""
    for epoch, why in failures:
      target = os.path.join(self.unusable_dir, f"{epoch}-{time.strftime('%Y%m%d-%H%M%S')}")
      if self.is_main:
        logging.warning("checkpoint of epoch %d is unusable (%s); moved to %s, %s", epoch, why,
                        target, then)
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
