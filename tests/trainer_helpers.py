"""Shared pieces of the trainer tests: a tiny config on a small real-MNIST folder, a baseline."""

from __future__ import annotations

import json
import os

import pytest

from configs import smoke
from trainer import loop

from mnist_fixtures import write_mnist_dir

NUM_TRAIN, NUM_TEST = 200, 90  # 4 batches an epoch, the last one partial (200 = 3 * 64 + 8).


def tiny_config(data_dir: str, **overrides):
  config = smoke.get_config()
  config.data_dir = data_dir
  config.num_train_examples = config.num_test_examples = 0
  config.num_epochs = 2
  config.max_steps_per_call = 3  # 4 steps: a call of 3, then a call that runs 1 of its 3.
  config.eval_batch_size = 32
  config.update(overrides)
  return config


def arrays(state):
  """A train state's arrays (its apply_fn and tx differ between otherwise equal states)."""
  return state.step, state.params, state.opt_state


def epoch_records(workdir: str) -> list[dict]:
  """metrics.jsonl without the timings (which differ between identical runs)."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  return [{k: v for k, v in r.items() if not k.endswith(("_seconds", "_per_sec"))}
          for r in records]


@pytest.fixture(name="mnist_dir", scope="module")
def fixture_mnist_dir(tmp_path_factory):
  return write_mnist_dir(str(tmp_path_factory.mktemp("mnist")), num_train=NUM_TRAIN,
                         num_test=NUM_TEST)


@pytest.fixture(name="baseline", scope="module")
def fixture_baseline(mnist_dir, tmp_path_factory):
  """An uninterrupted 3-epoch run: its workdir, final host state and summary."""
  workdir = str(tmp_path_factory.mktemp("baseline"))
  state, summary = loop.train_and_evaluate(tiny_config(mnist_dir, num_epochs=3), workdir)
  return workdir, state, summary
