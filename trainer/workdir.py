"""The workdir: one run at a time, and only the run it was made for.

``run.json`` records what the run computes: the config fields that change its results and the
dataset's identity (name, number of examples, a SHA-256 of the examples). A rerun that differs
in any of them is refused, naming each difference; ``--fresh`` deletes the run's outputs and starts
afresh. A lock file per process refuses a second concurrent run on the same workdir.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from typing import Any

import filelock
import jax
from jax.experimental import multihost_utils

from trainer.errors import WorkdirError

RUN_FILE = "run.json"
# Everything a run writes into its workdir (what --fresh deletes), besides the lock files.
OUTPUTS = (RUN_FILE, f"{RUN_FILE}.tmp", "checkpoints", "checkpoints_unusable", "metrics.jsonl",
           "metrics.jsonl.tmp", "tensorboard", "curves.png")


@contextlib.contextmanager
def claimed(workdir: str, *, fresh: bool) -> Iterator[None]:
  """Creates and locks ``workdir`` for this run; with ``fresh``, deletes an earlier run first."""
  _make_dir(workdir)
  lock_path = os.path.join(workdir, f"train.{jax.process_index()}.lock")
  lock = filelock.FileLock(lock_path, timeout=0)
  try:
    lock.acquire()
  except filelock.Timeout:
    raise WorkdirError(f"--workdir={workdir} is in use by another train.py run ({lock_path} is "
                       "locked); wait for it to finish or use another --workdir") from None
  except OSError as e:
    raise WorkdirError(f"--workdir={workdir} is not writable ({e.strerror or e})") from None
  try:
    if fresh and jax.process_index() == 0:
      delete_outputs(workdir)
    _sync("workdir claimed")
    yield
  finally:
    lock.release()


def _make_dir(workdir: str) -> None:
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise WorkdirError(f"--workdir={workdir} is a file, not a directory")
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise WorkdirError(f"--workdir={workdir} cannot be created ({e.strerror or e})") from None
  if not os.access(workdir, os.W_OK | os.X_OK):
    raise WorkdirError(f"--workdir={workdir} is not writable")


def delete_outputs(workdir: str) -> None:
  """Deletes what a run wrote into ``workdir`` (and nothing else)."""
  for name in OUTPUTS:
    path = os.path.join(workdir, name)
    if os.path.isdir(path):
      shutil.rmtree(path)
    elif os.path.lexists(path):
      os.remove(path)


def check_run(workdir: str, identity: dict[str, Any], details: dict[str, Any]) -> bool:
  """Refuses a workdir that holds another run; records ``identity`` for a new one.

  Returns whether the workdir already held this run. ``details`` (the full config, where the data
  came from) are recorded too but may change between reruns.
  """
  path = os.path.join(workdir, RUN_FILE)
  identity = json.loads(json.dumps(identity))  # Tuples become lists, as in the file.
  recorded = _read_run_file(path, workdir)
  if recorded is None:
    checkpoints = os.path.join(workdir, "checkpoints")
    if os.path.isdir(checkpoints) and os.listdir(checkpoints):
      raise WorkdirError(f"--workdir={workdir} holds checkpoints but no {RUN_FILE} saying what "
                         "run they belong to; use another --workdir, or --fresh to delete them "
                         "and start afresh")
    if jax.process_index() == 0:
      _write_json(path, {"identity": identity, **details, "created": time.strftime("%F %T")})
    return False
  differences = describe_differences(recorded.get("identity", {}), identity)
  if differences:
    raise WorkdirError(f"--workdir={workdir} holds another run ({'; '.join(differences)}); use "
                       "another --workdir, or --fresh to delete that run and start afresh")
  return True


def describe_differences(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
  """``["config.seed 0 -> 1", "dataset mnist (sha256 ...) -> ..."]``; empty when identical."""
  out = []
  old_config, new_config = recorded.get("config", {}), current["config"]
  for key in sorted(set(old_config) | set(new_config)):
    if old_config.get(key) != new_config.get(key):
      out.append(f"config.{key} {_show(old_config.get(key))} -> {_show(new_config.get(key))}")
  if recorded.get("dataset") != current["dataset"]:
    out.append(f"dataset {_show_dataset(recorded.get('dataset'))} -> "
               f"{_show_dataset(current['dataset'])}")
  return out


def _show(value: Any) -> str:
  return "(unset)" if value is None else json.dumps(value)


def _show_dataset(d: dict[str, Any] | None) -> str:
  if not d:
    return "(unknown)"
  return (f"{d.get('name')} ({d.get('num_train')} train / {d.get('num_test')} test, sha256 "
          f"{str(d.get('sha256'))[:12]})")


def _read_run_file(path: str, workdir: str) -> dict[str, Any] | None:
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    return None
  except (OSError, ValueError) as e:
    raise WorkdirError(f"{path} is unreadable ({e}); use another --workdir, or --fresh to delete "
                       f"the run in {workdir} and start afresh") from None


def _write_json(path: str, value: Any) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(value, f, indent=2)
    f.write("\n")
  os.replace(tmp, path)


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)
