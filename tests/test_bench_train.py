"""Tests for benchmarks/bench_train.py: the PyTorch tutorial's data pipeline is faithful, and the
benchmark runs end to end (a smoke run on a small MNIST folder)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from trainer_helpers import fixture_mnist_dir  # noqa: F401  (pytest fixture)

from trainer import data as data_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

import bench_train  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position


def test_tutorial_dataset_normalises_each_image_as_train_py_does(mnist_dir):
  torch = pytest.importorskip("torch")
  pytest.importorskip("PIL")
  from trainer import input_pipeline  # pylint: disable=g-import-not-at-top

  split = input_pipeline.load_idx_dir(mnist_dir).train
  dataset = bench_train.tutorial_dataset(split)
  x, y = dataset[7]
  assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and y == split.labels[7]
  np.testing.assert_allclose(x.numpy().reshape(-1), data_lib.normalize(split.images[7]),
                             rtol=1e-6, atol=1e-6)
  loader = torch.utils.data.DataLoader(dataset, batch_size=64, shuffle=True)
  images, labels = next(iter(loader))
  assert images.shape == (64, 1, 28, 28) and labels.shape == (64,)


def test_smoke_run_prints_every_measurement(mnist_dir):
  pytest.importorskip("torch")
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO, "benchmarks", "bench_train.py"),
       f"--data_dir={mnist_dir}", "--epochs=1", "--repeats=1", "--step_rounds=1"],
      capture_output=True, text=True, timeout=600, check=False, cwd=REPO)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  step, run = result["step"], result["run"]
  assert step["ratio_of_mins"] > 0 and step["ratio_median"] > 0
  assert step["train_py_ms"]["min"] > 0 and step["reference_ms"]["min"] > 0
  assert step["train_py_grad_groups_0_ms"]["min"] > 0 and step["grad_groups_0_ratio_of_mins"] > 0
  assert run["jax_wall"]["min"] > 0 and run["torch_wall"]["min"] > 0
  assert 0 <= run["torch"][0]["test_accuracy_percent"] <= 100
  assert "steady-state step" in proc.stdout and "whole run" in proc.stdout
