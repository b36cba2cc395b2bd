"""Tests for the trainer's outputs: fault injection on real checkpoints, metrics.jsonl and
TensorBoard."""

from __future__ import annotations

import glob
import json
import os
import pathlib
import re
import shutil
import signal
import struct
import subprocess
import sys

import chex
import numpy as np
import orbax.checkpoint as ocp
import pytest
from trainer_helpers import arrays
from trainer_helpers import epoch_records
from trainer_helpers import fixture_baseline  # noqa: F401  (pytest fixture)
from trainer_helpers import fixture_mnist_dir  # noqa: F401  (pytest fixture)
from trainer_helpers import tiny_config

from trainer import checkpoints as checkpoints_lib
from trainer import errors
from trainer import loop
from trainer import metrics as metrics_lib


def largest_file(folder: str) -> str:
  files = [f for f in glob.glob(os.path.join(folder, "**"), recursive=True)
           if os.path.isfile(f) and not f.endswith(checkpoints_lib.MANIFEST)]
  return max(files, key=os.path.getsize)


def flip_bytes(path: str) -> None:
  with open(path, "r+b") as f:
    data = bytearray(f.read())
    for i in range(len(data) // 3, len(data) // 3 + 4):
      data[i] ^= 0xFF
    f.seek(0)
    f.write(data)


def truncate(path: str) -> None:
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


def remove_manifest(step_dir: str) -> None:
  os.remove(os.path.join(step_dir, checkpoints_lib.MANIFEST))


def garble_manifest(step_dir: str) -> None:
  with open(os.path.join(step_dir, checkpoints_lib.MANIFEST), "w") as f:
    f.write("{garbled")


class TestCheckpointFaults:
  """A damaged latest checkpoint is never trusted: the run falls back and redoes the epoch."""

  @pytest.mark.parametrize("damage,reason", [
      (lambda d: flip_bytes(largest_file(d)), "does not match its SHA-256"),
      (lambda d: truncate(largest_file(d)), "bytes, .* were saved"),
      (remove_manifest, "no sha256sums.json"),
      (garble_manifest, "sha256sums.json unreadable"),
  ])
  def test_falls_back_to_the_newest_intact_one(self, mnist_dir, baseline, tmp_path, caplog,
                                               damage, reason):
    workdir = shutil.copytree(baseline[0], str(tmp_path / "w"))
    damage(os.path.join(workdir, "checkpoints", "3"))
    with caplog.at_level("WARNING"):
      state, summary = loop.train_and_evaluate(tiny_config(mnist_dir, num_epochs=3), workdir)
    warning = next(m for m in caplog.messages if "checkpoint of epoch 3 is unusable" in m)
    assert re.search(reason, warning) and "falling back to epoch 2" in warning, warning
    chex.assert_trees_all_equal(arrays(state), arrays(baseline[1]))  # Epoch 3 redone from epoch 2.
    assert summary["epochs"] == 3 and epoch_records(workdir) == epoch_records(baseline[0])
    assert len(os.listdir(os.path.join(workdir, "checkpoints_unusable"))) == 1

  def test_stops_when_no_checkpoint_is_intact(self, mnist_dir, baseline, tmp_path):
    workdir = shutil.copytree(baseline[0], str(tmp_path / "w"))
    for epoch in (1, 2, 3):
      flip_bytes(largest_file(os.path.join(workdir, "checkpoints", str(epoch))))
    with pytest.raises(errors.CheckpointError, match=r"no intact checkpoint in .*checkpoints "
                       r"\(epoch 3: .*SHA-256.*; epoch 2: .*; epoch 1: .*\); .*--fresh"):
      loop.train_and_evaluate(tiny_config(mnist_dir, num_epochs=3), workdir)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["1", "2", "3"]

  def test_non_finite_values_are_never_restored(self, baseline, tmp_path):
    """Even with a matching manifest (a NaN saved by some other writer), the values are checked."""
    directory = str(tmp_path / "checkpoints")
    state = baseline[1].replace(params={**baseline[1].params})
    kernel = np.array(state.params["Dense_0"]["kernel"])
    kernel[0, 0] = np.nan
    state.params["Dense_0"] = {**state.params["Dense_0"], "kernel": kernel}
    with ocp.CheckpointManager(directory) as manager:
      manager.save(1, args=ocp.args.StandardSave(state))
    checkpoints_lib.write_manifest(os.path.join(directory, "1"))
    with pytest.raises(errors.CheckpointError, match=r"epoch 1: non-finite values in "
                       r"state\.params\['Dense_0'\]\['kernel'\]"):
      checkpoints_lib.Checkpoints(directory, is_main=True).restore_latest(baseline[1])

  def test_a_non_finite_state_is_never_saved(self, baseline, tmp_path):
    state = baseline[1].replace(opt_state=np.float32(np.inf))
    ckpts = checkpoints_lib.Checkpoints(str(tmp_path / "checkpoints"), is_main=True)
    with pytest.raises(errors.DivergedError, match=r"epoch 4 ended with non-finite values in "
                       r"state\.opt_state"):
      ckpts.save(4, state)
    assert os.listdir(tmp_path / "checkpoints") == []

  def test_manifest_covers_every_file(self, baseline):
    step_dir = os.path.join(baseline[0], "checkpoints", "3")
    with open(os.path.join(step_dir, checkpoints_lib.MANIFEST)) as f:
      listed = set(json.load(f))
    on_disk = {os.path.relpath(p, step_dir) for p in glob.glob(f"{step_dir}/**", recursive=True)
               if os.path.isfile(p)}
    assert listed == on_disk - {checkpoints_lib.MANIFEST} and len(listed) > 3
    checkpoints_lib.verify_manifest(step_dir)


class TestMetricsFile:

  def test_rewrite_is_atomic(self, tmp_path, monkeypatch):
    path = str(tmp_path / "metrics.jsonl")
    metrics_lib.write_atomically(path, "old\n")

    def crash(*_):
      raise OSError("killed before the rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
      metrics_lib.write_atomically(path, "new\n")
    assert pathlib.Path(path).read_text() == "old\n"

  def test_history_keeps_the_restored_epochs_and_drops_garbage(self, tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"epoch": 1}\n{"epo\n{"epoch": 2}\n{"epoch": 3}\n')
    with caplog.at_level("WARNING"):
      assert metrics_lib.read_history(str(path), 2) == [{"epoch": 1}, {"epoch": 2}]
    assert any("line 2 is not an epoch record" in m for m in caplog.messages)


def read_events(folder: str) -> list:
  """Every Event in a TensorBoard folder (TFRecord framing: length, crc, data, crc)."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top

  events = []
  for path in sorted(glob.glob(os.path.join(folder, "events.out.tfevents.*"))):
    with open(path, "rb") as f:
      data = f.read()
    offset = 0
    while offset < len(data):
      (length,) = struct.unpack("<Q", data[offset:offset + 8])
      events.append(event_pb2.Event.FromString(data[offset + 12:offset + 12 + length]))
      offset += 12 + length + 4
  return events


class TestTensorBoard:

  def test_config_as_hparams_and_scalars_per_epoch(self, baseline):
    events = read_events(os.path.join(baseline[0], "tensorboard"))
    values = [v for e in events for v in e.summary.value]
    hparams = next(v for v in values if v.tag == "_hparams_/session_start_info")
    content = hparams.metadata.plugin_data.content
    for name in ("learning_rate", "momentum", "batch_size", "seed", "hidden_sizes", "dataset"):
      assert name.encode() in content
    accuracy = [(e.step, v.simple_value) for e in events for v in e.summary.value
                if v.tag == "test_accuracy_percent"]
    assert [s for s, _ in accuracy] == [1, 2, 3] and all(1 < a <= 100 for _, a in accuracy)
    assert any(v.tag == "config/text_summary" for v in values)

  def test_resumed_run_discards_redone_epochs(self, mnist_dir, baseline, tmp_path):
    workdir = shutil.copytree(baseline[0], str(tmp_path / "w"))
    remove_manifest(os.path.join(workdir, "checkpoints", "3"))
    loop.train_and_evaluate(tiny_config(mnist_dir, num_epochs=3), workdir)
    events = read_events(os.path.join(workdir, "tensorboard"))
    assert any(e.HasField("session_log") and e.step == 3 for e in events)  # purge from step 3



KILLED_BEFORE_MANIFEST = """
import os, signal, sys
from trainer import checkpoints, loop
from trainer_helpers import tiny_config
checkpoints.write_manifest = lambda folder: os.kill(os.getpid(), signal.SIGKILL)
loop.train_and_evaluate(tiny_config(sys.argv[1], num_epochs=1), sys.argv[2])
"""


def test_a_kill_before_the_first_manifest_does_not_lock_the_run_out(mnist_dir, baseline, tmp_path,
                                                                     caplog):
  """Killed after orbax committed checkpoint 1 but before its manifest: the rerun starts afresh."""
  workdir, tests = str(tmp_path / "w"), os.path.dirname(os.path.abspath(__file__))
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(tests), tests])}
  proc = subprocess.run([sys.executable, "-c", KILLED_BEFORE_MANIFEST, mnist_dir, workdir],
                        env=env, capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
  assert os.listdir(os.path.join(workdir, "checkpoints")) == ["1"]  # Committed, no manifest.
  with caplog.at_level("WARNING"):
    state, summary = loop.train_and_evaluate(tiny_config(mnist_dir, num_epochs=3), workdir)
  assert any("checkpoint of epoch 1 is unusable (no sha256sums.json (its save did not finish))"
             in m and "starting from the initial state" in m for m in caplog.messages)
  chex.assert_trees_all_equal(arrays(state), arrays(baseline[1]))
  assert summary["epochs"] == 3 and epoch_records(workdir) == epoch_records(baseline[0])
  assert len(os.listdir(os.path.join(workdir, "checkpoints_unusable"))) == 1


class TestHistory:
  """A resume restores lost metrics.jsonl records from the checkpoint's copy."""

  @pytest.mark.parametrize("damage", ["delete", "empty", "truncate", "short"])
  def test_lost_records_are_restored(self, mnist_dir, baseline, tmp_path, caplog, damage):
    workdir = shutil.copytree(baseline[0], str(tmp_path / "w"))
    path = pathlib.Path(workdir, "metrics.jsonl")
    text = path.read_text()
    if damage == "delete":
      path.unlink()
    else:
      path.write_text({"empty": "", "truncate": text[:len(text) // 2],
                       "short": text.split("\n", 1)[0] + "\n"}[damage])
    with caplog.at_level("WARNING"):
      _, summary = loop.train_and_evaluate(tiny_config(mnist_dir, num_epochs=4), workdir)
    assert [r["epoch"] for r in epoch_records(workdir)] == [1, 2, 3, 4]
    assert epoch_records(workdir)[:3] == epoch_records(baseline[0])
    assert summary["missing_epochs"] == [] and summary["epochs"] == 4
    assert any("restored them from the checkpoint's copy" in m for m in caplog.messages)

  def test_records_found_nowhere_are_named(self, mnist_dir, baseline, tmp_path, caplog):
    """A checkpoint without the copy, and metrics.jsonl gone: the lost epochs are named."""
    workdir = shutil.copytree(baseline[0], str(tmp_path / "w"))
    step_dir = os.path.join(workdir, "checkpoints", "3")
    os.remove(os.path.join(step_dir, loop.METRICS_COPY))
    checkpoints_lib.write_manifest(step_dir)
    os.remove(os.path.join(workdir, "metrics.jsonl"))
    with caplog.at_level("WARNING"):
      _, summary = loop.train_and_evaluate(tiny_config(mnist_dir, num_epochs=4), workdir)
    assert summary["missing_epochs"] == [1, 2, 3]
    assert any("lacks the records of epochs 1, 2, 3" in m for m in caplog.messages)
    assert [r["epoch"] for r in epoch_records(workdir)] == [4]
