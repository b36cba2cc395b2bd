"""The workdir: one run at a time, and only the run it was made for.

``run.json`` records what the run computes: the config fields that change its results and the
dataset's identity (name, number of examples, a SHA-256 of the examples). A rerun that differs
in any of them is refused, naming each difference; ``--fresh`` deletes the run's outputs and starts
afresh. A lock file per process (``train.<process>.lock``, an ``flock``) refuses a second concurrent
run on the same workdir; it is deleted when the run ends.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import time
from collections.abc import Iterator
from typing import Any

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
  with _locked(os.path.join(workdir, f"train.{jax.process_index()}.lock"), workdir):
    if fresh and jax.process_index() == 0:
      delete_outputs(workdir)
    _sync("workdir claimed")
    yield


@contextlib.contextmanager
def _locked(path: str, workdir: str) -> Iterator[None]:
  """Holds an exclusive ``flock`` on ``path``; deletes the file (still locked) at the end."""
  fd = _lock_fd(path, workdir)
  try:
    yield
  finally:
    with contextlib.suppress(FileNotFoundError):  # Before unlocking: see _lock_fd.
      os.remove(path)
    os.close(fd)


def _lock_fd(path: str, workdir: str) -> int:
  """A locked descriptor of ``path``, the file that is at ``path`` now (not one just deleted)."""
  while True:
    try:
      fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
      raise WorkdirError(f"--workdir={workdir} is not writable ({e.strerror or e})") from None
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      os.close(fd)
      raise WorkdirError(f"--workdir={workdir} is in use by another train.py run ({path} is "
                         "locked); wait for it to finish or use another --workdir") from None
    if os.path.exists(path) and os.stat(path).st_ino == os.fstat(fd).st_ino:
      return fd
    os.close(fd)  # Its holder deleted it as the run ended; lock the new file instead.


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
