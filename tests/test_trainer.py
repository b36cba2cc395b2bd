"""Tests for the trainer library: data layout, model, compiled steps, config checks, and whole runs
in process (outputs, determinism, resume, run identity, lock, divergence, offline fallback)."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys

import chex
import filelock
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from trainer_helpers import NUM_TEST
from trainer_helpers import NUM_TRAIN
from trainer_helpers import arrays
from trainer_helpers import epoch_records
from trainer_helpers import fixture_baseline  # noqa: F401  (pytest fixture)
from trainer_helpers import fixture_mnist_dir  # noqa: F401  (pytest fixture)
from trainer_helpers import tiny_config

from configs import default
from trainer import checkpoints as checkpoints_lib
from trainer import data as data_lib
from trainer import errors
from trainer import input_pipeline
from trainer import loop
from trainer import model as model_lib
from trainer import step
from trainer import workdir as workdir_lib

from mnist_fixtures import write_mnist_dir


def checkpoint_params(workdir: str, epoch: int):
  path = os.path.join(workdir, "checkpoints", str(epoch), "default")
  return ocp.StandardCheckpointer().restore(path)["params"]


# ----------------------------------------------------------------------------- layout


class TestLayout:

  def test_epoch_uses_every_example_once(self):
    idx, valid = data_lib.epoch_batches(200, 64, seed=0, epoch=1)
    assert idx.shape == valid.shape == (4, 64)
    np.testing.assert_array_equal(np.sort(idx[valid]), np.arange(200))
    assert valid.sum() == 200 and valid[-1].sum() == 8

  def test_fresh_permutation_per_epoch_and_deterministic(self):
    a, _ = data_lib.epoch_batches(200, 64, seed=0, epoch=1)
    b, _ = data_lib.epoch_batches(200, 64, seed=0, epoch=2)
    c, _ = data_lib.epoch_batches(200, 64, seed=0, epoch=1)
    d, _ = data_lib.epoch_batches(200, 64, seed=1, epoch=1)
    assert not np.array_equal(a, b) and not np.array_equal(a, d)
    np.testing.assert_array_equal(a, c)

  @pytest.mark.parametrize("steps,max_steps,expected", [(938, 100, 94), (4, 3, 2), (5, 10, 5)])
  def test_chunk_length(self, steps, max_steps, expected):
    assert data_lib.chunk_length(steps, max_steps) == expected

  def test_calls_run_every_step_once_and_count_real_examples(self):
    idx, valid = data_lib.epoch_batches(200, 64, seed=0, epoch=1)
    calls = data_lib.shard_calls(idx, valid, data_lib.Topology(1, 0, 1), steps_per_call=3)
    assert [c.steps for c in calls] == [3, 1]
    assert all(c.idx.shape == (1, 3, 64) and c.count.shape == (1, 3) for c in calls)
    np.testing.assert_array_equal(calls[0].count[0], [64, 64, 64])
    assert calls[1].count[0, 0] == 8

  @pytest.mark.parametrize("processes,local", [(1, 1), (1, 4), (2, 2)])
  def test_processes_feed_disjoint_shares_of_each_global_batch(self, processes, local):
    idx, valid = data_lib.epoch_batches(200, 64, seed=0, epoch=3)
    shares = []
    for p in range(processes):
      topo = data_lib.Topology(processes * local, p * local, local)
      calls = data_lib.shard_calls(idx, valid, topo, steps_per_call=3)
      assert all(c.idx.shape == (local, 3, 64 // (processes * local)) for c in calls)
      assert all(c.num_steps.shape == (local,) for c in calls)
      shares.append(np.concatenate([np.concatenate(list(c.idx), axis=-1) for c in calls]))
    rebuilt = np.concatenate(shares, axis=-1)  # Devices in pmap order -> the global batch.
    np.testing.assert_array_equal(rebuilt[:4], idx)

  @pytest.mark.parametrize("n,devices,batch", [(10_000, 1, 1000), (10_000, 4, 1000), (90, 4, 7),
                                               (3, 4, 32)])
  def test_eval_counts_every_test_example_once(self, n, devices, batch):
    seen = []
    for p in range(devices):
      idx, valid, _ = data_lib.eval_layout(n, batch, data_lib.Topology(devices, p, 1))
      seen.append(idx[valid])
    np.testing.assert_array_equal(np.sort(np.concatenate(seen)), np.arange(n))

  def test_normalize_numpy_and_jax_agree(self):
    x = np.array([[0, 1, 128, 255]], np.uint8)
    expected = (np.array([[0, 1, 128, 255]]) / 255 - 0.1307) / 0.3081
    np.testing.assert_allclose(data_lib.normalize(x), expected, rtol=1e-6)
    np.testing.assert_allclose(data_lib.normalize(jnp.asarray(x)), expected, rtol=1e-6)
    assert data_lib.normalize(x).dtype == np.float32


# ----------------------------------------------------------------------------- model


class TestModel:

  def test_mlp_shapes(self):
    state = model_lib.create_train_state(0, features=(512, 256, 128, 64), learning_rate=0.01,
                                         momentum=0.5)
    kernels = [state.params[f"Dense_{i}"]["kernel"].shape for i in range(5)]
    assert kernels == [(784, 512), (512, 256), (256, 128), (128, 64), (64, 10)]
    chex.assert_shape(state.apply_fn({"params": state.params}, jnp.zeros((3, 784))), (3, 10))

  def test_host_init_has_flax_structure_and_lecun_normal_statistics(self):
    model = model_lib.MLP((512, 64))
    params = model_lib.init_params(0, model)
    flax_params = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 784)))
    chex.assert_trees_all_equal_shapes_and_dtypes(params, flax_params["params"])
    for layer in ("Dense_0", "Dense_1"):
      kernel, fan_in = params[layer]["kernel"], params[layer]["kernel"].shape[0]
      np.testing.assert_allclose(np.std(kernel), np.sqrt(1 / fan_in), rtol=0.02)  # lecun_normal
      assert np.max(np.abs(kernel)) < 2 * np.sqrt(1 / fan_in) / 0.8796256610342398
      assert np.mean(np.abs(kernel) > 1.9 * np.sqrt(1 / fan_in) / 0.8796256610342398) > 0
      assert not np.any(params[layer]["bias"])

  def test_host_init_is_deterministic_per_seed(self):
    model = model_lib.MLP((16, 8))
    chex.assert_trees_all_equal(model_lib.init_params(3, model), model_lib.init_params(3, model))
    a, b = model_lib.init_params(3, model), model_lib.init_params(4, model)
    assert not np.array_equal(a["Dense_0"]["kernel"], b["Dense_0"]["kernel"])


# ----------------------------------------------------------------------------- compiled steps


def _state():
  return data_lib.replicate(jax.device_get(model_lib.create_train_state(
      0, features=(16, 8), learning_rate=0.1, momentum=0.5)))


def _call(idx, valid, num_steps=2):
  """A call of two steps of 8 rows on one device (every test shares these shapes)."""
  idx, valid = np.asarray(idx, np.int32).reshape(2, 8), np.asarray(valid, bool).reshape(2, 8)
  count = valid.sum(axis=1).astype(np.float32)
  return data_lib.Call(idx[None], valid[None], count[None], np.array([num_steps], np.int32))


@pytest.mark.skipif(jax.local_device_count() != 1, reason="one device")
class TestSteps:

  def setup_method(self):
    rng = np.random.default_rng(0)
    self.images = rng.integers(0, 256, size=(40, 784)).astype(np.uint8)
    self.labels = rng.integers(0, 10, size=40).astype(np.int32)
    self.data = data_lib.put_on_devices(input_pipeline.Split(self.images, self.labels))

  def run_chunk(self, call, grad_groups=step.GROUPS):
    state, metrics = step.train_chunk(_state(), *self.data, *call, grad_groups)
    return loop.host_state(state), np.asarray(metrics[0])

  @pytest.mark.parametrize("grad_groups", [8, 2, 0])
  def test_one_step_is_sgd_on_the_mean_loss_of_the_real_rows(self, grad_groups):
    """4 real rows and 4 masked padding rows: the step of the mean loss over the 4 rows, however
    the batch's gradient is grouped."""
    real, valid = np.arange(4), np.arange(8) < 4
    a, ma = self.run_chunk(_call([*real, 30, 31, 32, 33, *range(8)], [*valid, *valid], 1),
                           grad_groups)
    b, mb = self.run_chunk(_call([*real, 5, 6, 7, 8, *range(8)], [*valid, *valid], 1),
                           grad_groups)
    chex.assert_trees_all_equal(arrays(a), arrays(b))  # What padding points to is irrelevant.
    init = jax.device_get(model_lib.create_train_state(0, features=(16, 8), learning_rate=0.1,
                                                       momentum=0.5))

    def mean_loss(params):
      logits = init.apply_fn({"params": params}, data_lib.normalize(self.images[real]))
      return optax.softmax_cross_entropy_with_integer_labels(logits, self.labels[real]).mean()

    expected = jax.tree.map(lambda p, g: p - 0.1 * g, init.params, jax.grad(mean_loss)(init.params))
    chex.assert_trees_all_close(a.params, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ma, [4 * mean_loss(init.params), 4], rtol=1e-5)

  def test_steps_past_num_steps_do_not_run(self):
    """The last call of an epoch runs fewer steps than its shapes hold: the rest never run."""
    a, ma = self.run_chunk(_call(range(16), np.ones(16), num_steps=1))
    b, mb = self.run_chunk(_call([*range(8), *range(20, 28)], np.ones(16), num_steps=1))
    chex.assert_trees_all_equal(arrays(a), arrays(b))
    np.testing.assert_array_equal(ma, mb)
    assert a.step == 1 and ma[1] == 8

  @pytest.mark.parametrize("grad_groups", [8, 0])
  def test_one_device_step_has_no_collective(self, grad_groups):
    """On one device a collective would be a copy of every gradient each step (XLA:CPU keeps it)."""
    lowered = step.train_chunk.lower(_state(), *self.data, *_call(range(16), np.ones(16)),
                                     grad_groups)
    text = lowered.compile().as_text()
    assert "all-reduce" not in text and "all-gather" not in text

  def test_a_batch_is_summed_in_up_to_8_equal_groups(self):
    assert [step.num_groups(b) for b in (64, 8, 24, 100, 12, 7)] == [8, 8, 8, 4, 4, 1]
    # The same groups on 1, 2, 4 and 8 devices; one group per device on other counts.
    assert [step.num_groups(64, d) for d in (1, 2, 4, 8, 16, 3)] == [8, 8, 8, 8, 16, 3]
    assert [step.num_groups(64, d, 0) for d in (1, 2, 4)] == [1, 2, 4]  # grad_groups=0
    assert [step.num_groups(64, d, 4) for d in (1, 2, 4, 8)] == [4, 4, 4, 8]

  def test_pairwise_sum_of_any_count_is_the_sum(self):
    x = np.arange(1.0, 8.0)[:, None] * np.ones((7, 3))
    for n in range(1, 8):
      np.testing.assert_array_equal(step._pairwise_sum(jnp.asarray(x[:n])), x[:n].sum(0))

  def test_eval_counts_and_accuracy_in_percent(self):
    state = _state()
    metrics = loop.evaluate(state, self.data,
                            data_lib.eval_layout(40, 16, data_lib.current_topology()))
    assert metrics["num_evaluated"] == 40
    logits = model_lib.MLP((16, 8)).apply({"params": loop.host_state(state).params},
                                          data_lib.normalize(self.images))
    expected = 100 * np.mean(np.argmax(logits, -1) == self.labels)
    np.testing.assert_allclose(metrics["test_accuracy_percent"], expected, rtol=1e-6)


# ----------------------------------------------------------------------------- configs


class TestConfig:

  def test_default_matches_the_issue(self):
    c = default.get_config()
    assert (c.batch_size, c.num_epochs, c.seed, c.learning_rate, c.momentum) == (
        64, 10, 0, 0.01, 0.5)
    assert tuple(c.hidden_sizes) == (512, 256, 128, 64)

  def test_every_field_is_described_and_classified(self):
    fields = set(default.get_config())
    assert fields == set(default.HELP)
    assert fields == set(loop.RESULT_FIELDS) | set(loop.FREE_FIELDS)
    assert not set(loop.RESULT_FIELDS) & set(loop.FREE_FIELDS)

  def test_missing_and_unknown_fields(self):
    config = default.get_config()
    del config["seed"]
    config.extra = 1
    with pytest.raises(errors.ConfigError, match=r"config lacks fields \['seed'\] and has "
                       r"unknown fields \['extra'\]"):
      loop.validate_config(config, 1)

  @pytest.mark.parametrize("overrides,devices,message", [
      ({"batch_size": 63}, 4, r"config.batch_size=63 is not divisible by the 4 devices; use a "
       r"multiple of 4"),
      ({"batch_size": 0}, 1, r"config.batch_size must be positive, got 0"),
      ({"grad_groups": -1}, 1, r"config.grad_groups must be an int >= 0 \(0: one group per "
       r"device\), got -1"),
      ({"num_epochs": -1}, 1, r"config.num_epochs must be >= 0, got -1"),
      ({"learning_rate": 0.0}, 1, r"config.learning_rate must be finite and > 0, got 0.0"),
      ({"learning_rate": float("inf")}, 1, r"config.learning_rate must be finite and > 0, got inf"),
      ({"learning_rate": float("nan")}, 1, r"config.learning_rate must be finite"),
      ({"momentum": 1.0}, 1, r"config.momentum must be in \[0, 1\), got 1.0"),
      ({"momentum": float("nan")}, 1, r"config.momentum must be in \[0, 1\), got nan"),
      ({"seed": -1}, 1, r"config.seed must be in \[0, 2\*\*32\), got -1"),
      ({"seed": 2**32}, 1, r"config.seed must be in \[0, 2\*\*32\)"),
      ({"hidden_sizes": (512, 0)}, 1, r"config.hidden_sizes must be positive widths"),
      ({"max_steps_per_call": 0}, 1, r"config.max_steps_per_call must be > 0, got 0"),
      ({"eval_batch_size": -5}, 1, r"config.eval_batch_size must be > 0, got -5"),
      ({"num_train_examples": -1}, 1, r"num_train_examples / num_test_examples must be >= 0"),
  ])
  def test_bad_configs(self, overrides, devices, message):
    config = default.get_config()
    config.update(overrides)
    with pytest.raises(errors.ConfigError, match=message):
      loop.validate_config(config, devices)


# ----------------------------------------------------------------------------- whole runs


class TestRun:

  def test_outputs(self, baseline):
    workdir, state, summary = baseline
    assert sorted(os.listdir(workdir)) == [  # No lock file is left behind.
        "checkpoints", "curves.png", "metrics.jsonl", "run.json", "tensorboard"]
    records = epoch_records(workdir)
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert all(r["num_evaluated"] == NUM_TEST and r["dataset"] == "mnist" for r in records)
    assert all(0 <= r["test_accuracy_percent"] <= 100 for r in records)
    assert records[-1]["train_loss"] < records[0]["train_loss"]
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["1", "2", "3"]
    chex.assert_trees_all_equal(checkpoint_params(workdir, 3), state.params)
    assert (summary["num_train"], summary["num_test"], summary["epochs"]) == (200, 90, 3)
    assert summary["test_accuracy_percent"] == records[-1]["test_accuracy_percent"]
    assert not summary["offline"] and summary["dataset_sha256"] in pathlib.Path(
        os.path.join(workdir, "run.json")).read_text()

  def test_timings_are_honest(self, baseline):
    """Epoch times leave compilation out; the summary's examples/s is the run's average."""
    workdir, _, summary = baseline
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      records = [json.loads(line) for line in f]
    train_seconds = sum(r["train_seconds"] for r in records)
    assert summary["compile_seconds"] > 0 and summary["train_seconds"] == train_seconds
    assert summary["examples_per_sec"] == pytest.approx(3 * NUM_TRAIN / train_seconds)
    assert summary["wall_seconds"] > summary["compile_seconds"] + train_seconds
    for r in records:
      assert r["examples_per_sec"] == pytest.approx(NUM_TRAIN / r["train_seconds"])

  def test_same_seed_same_run(self, mnist_dir, baseline, tmp_path):
    state, _ = loop.train_and_evaluate(tiny_config(mnist_dir, num_epochs=3), str(tmp_path))
    chex.assert_trees_all_equal(state.params, baseline[1].params)
    assert epoch_records(str(tmp_path)) == epoch_records(baseline[0])

  def test_resume_equals_uninterrupted(self, mnist_dir, baseline, tmp_path):
    """Stopped after epoch 1, then again in the middle of saving epoch 2."""
    workdir = str(tmp_path)
    loop.train_and_evaluate(tiny_config(mnist_dir, num_epochs=1), workdir)
    # A save of epoch 2 cut short: orbax's temporary folder exists, the rename never happened;
    # the metrics line of epoch 2 was already written.
    os.makedirs(os.path.join(workdir, "checkpoints", "2.orbax-checkpoint-tmp-1234567", "default"))
    with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
      f.write(json.dumps({"epoch": 2, "train_loss": 9.0}) + "\n")
    resumed, summary = loop.train_and_evaluate(tiny_config(mnist_dir, num_epochs=3), workdir)
    chex.assert_trees_all_equal(arrays(resumed), arrays(baseline[1]))
    assert epoch_records(workdir) == epoch_records(baseline[0])
    assert summary["epochs"] == 3

  def test_progress_bar_says_compiling_and_shows_the_loss(self, mnist_dir, tmp_path, capsys):
    loop.train_and_evaluate(tiny_config(mnist_dir, num_epochs=1), str(tmp_path))
    err = capsys.readouterr().err
    assert "epoch 1/1 (compiling)" in err and "loss=" in err

  def test_offline_fallback_says_so_everywhere(self, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(input_pipeline, "tfds_unavailable_reason", lambda _: "offline (test)")
    config = tiny_config("", num_epochs=1, num_train_examples=NUM_TRAIN,
                         num_test_examples=NUM_TEST)  # The shapes of the other runs: no compiling.
    with caplog.at_level("INFO"):
      _, summary = loop.train_and_evaluate(config, str(tmp_path))
    assert summary["offline"] and summary["dataset"] == input_pipeline.OFFLINE_DATASET
    assert "--config.data_dir" in summary["notice"]
    assert all(r["dataset"] == "mnist-offline-subset" for r in epoch_records(str(tmp_path)))
    epoch_lines = [m for m in caplog.messages if "test_accuracy=" in m]
    assert epoch_lines and all(m.startswith("[OFFLINE SUBSET") for m in epoch_lines)
    assert any(input_pipeline.OFFLINE_NOTICE in m for m in caplog.messages)
    assert "OFFLINE SUBSET" in loop.plot_title(config, input_pipeline.load_offline_subset())


class TestRunIdentity:

  @pytest.mark.parametrize("overrides,difference", [
      ({"learning_rate": 0.1}, "config.learning_rate 0.01 -> 0.1"),
      ({"seed": 1}, "config.seed 0 -> 1"),
      ({"num_train_examples": 150}, "config.num_train_examples 0 -> 150"),
  ])
  def test_a_different_rerun_is_refused(self, mnist_dir, baseline, tmp_path, overrides,
                                        difference):
    workdir = shutil.copytree(baseline[0], str(tmp_path / "w"))
    before = pathlib.Path(os.path.join(workdir, "metrics.jsonl")).read_text()
    with pytest.raises(errors.WorkdirError, match="holds another run") as e:
      loop.train_and_evaluate(tiny_config(mnist_dir, num_epochs=4, **overrides), workdir)
    assert difference in str(e.value) and "--fresh" in str(e.value)
    assert pathlib.Path(os.path.join(workdir, "metrics.jsonl")).read_text() == before

  def test_other_data_is_refused(self, baseline, tmp_path):
    other = write_mnist_dir(str(tmp_path / "other"), num_train=150, num_test=NUM_TEST)
    workdir = shutil.copytree(baseline[0], str(tmp_path / "w"))
    with pytest.raises(errors.WorkdirError, match=r"dataset mnist \(200 train / 90 test, sha256 "
                       r"\w{12}\) -> mnist \(150 train / 90 test"):
      loop.train_and_evaluate(tiny_config(other, num_epochs=4), workdir)

  def test_offline_subset_never_continues_a_full_mnist_run(self, baseline, tmp_path, monkeypatch):
    monkeypatch.setattr(input_pipeline, "tfds_unavailable_reason", lambda _: "offline (test)")
    workdir = shutil.copytree(baseline[0], str(tmp_path / "w"))
    with pytest.raises(errors.WorkdirError, match=r"dataset mnist .* -> mnist-offline-subset"):
      loop.train_and_evaluate(tiny_config("", num_epochs=4), workdir)

  def test_same_examples_elsewhere_and_more_epochs_are_accepted(self, baseline, tmp_path):
    """Raw instead of .gz files, in another folder: the same examples, the same run."""
    raw = write_mnist_dir(str(tmp_path / "raw"), num_train=NUM_TRAIN, num_test=NUM_TEST, gz=False)
    workdir = shutil.copytree(baseline[0], str(tmp_path / "w"))
    _, summary = loop.train_and_evaluate(tiny_config(raw, num_epochs=4), workdir)
    assert summary["epochs"] == 4

  def test_free_fields_may_change(self, mnist_dir, tmp_path):
    data = input_pipeline.load_idx_dir(mnist_dir)
    identity = loop.run_identity(tiny_config(mnist_dir), data)
    assert not workdir_lib.check_run(str(tmp_path), identity, {})
    changed = tiny_config("elsewhere", num_epochs=9, max_steps_per_call=2, eval_batch_size=7,
                          tfds_data_dir="x")
    assert workdir_lib.check_run(str(tmp_path), loop.run_identity(changed, data), {})

  def test_fresh_starts_afresh(self, mnist_dir, baseline, tmp_path):
    workdir = shutil.copytree(baseline[0], str(tmp_path / "w"))
    _, summary = loop.train_and_evaluate(tiny_config(mnist_dir, num_epochs=1, seed=5), workdir,
                                         fresh=True)
    assert summary["epochs"] == 1 and [r["epoch"] for r in epoch_records(workdir)] == [1]
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["1"]
    with open(os.path.join(workdir, "run.json")) as f:
      assert json.load(f)["identity"]["config"]["seed"] == 5

  def test_checkpoints_without_a_run_record_are_refused(self, mnist_dir, baseline, tmp_path):
    workdir = shutil.copytree(baseline[0], str(tmp_path / "w"))
    os.remove(os.path.join(workdir, "run.json"))
    with pytest.raises(errors.WorkdirError, match="holds checkpoints but no run.json"):
      loop.train_and_evaluate(tiny_config(mnist_dir, num_epochs=3), workdir)

  def test_a_second_concurrent_run_is_refused(self, mnist_dir, tmp_path):
    with filelock.FileLock(str(tmp_path / "train.0.lock"), timeout=0):
      with pytest.raises(errors.WorkdirError, match="is in use by another train.py run"):
        loop.train_and_evaluate(tiny_config(mnist_dir), str(tmp_path))
    assert not os.path.exists(tmp_path / "run.json")

  def test_unusable_workdirs(self, tmp_path, monkeypatch):
    a_file = tmp_path / "file"
    a_file.write_text("")
    with pytest.raises(errors.WorkdirError, match="is a file, not a directory"):
      workdir_lib.claimed(str(a_file), fresh=False).__enter__()
    with pytest.raises(errors.WorkdirError, match=r"cannot be created \(Not a directory\)"):
      workdir_lib.claimed(str(a_file / "sub"), fresh=False).__enter__()
    monkeypatch.setattr(os, "access", lambda *_: False)  # As on a read-only mount.
    with pytest.raises(errors.WorkdirError, match="is not writable"):
      workdir_lib.claimed(str(tmp_path / "w"), fresh=False).__enter__()


class TestDivergence:

  def test_nan_in_the_first_epoch_stops_before_anything_is_saved(self, mnist_dir, tmp_path):
    with pytest.raises(errors.DivergedError, match=r"the training loss became (nan|inf) in "
                       r"epoch 1; the run stopped and epoch 1 was not saved"):
      loop.train_and_evaluate(tiny_config(mnist_dir, learning_rate=1e30), str(tmp_path))
    assert os.listdir(tmp_path / "checkpoints") == []
    assert pathlib.Path(tmp_path / "metrics.jsonl").read_text() == ""

  def test_nan_later_keeps_the_last_good_checkpoint_latest(self, mnist_dir, tmp_path,
                                                           monkeypatch):
    real_train_epoch, calls = loop.train_epoch, []

    def nan_in_epoch_2(*args):
      state, loss, seconds = real_train_epoch(*args)
      calls.append(1)
      return state, (float("nan") if len(calls) == 2 else loss), seconds

    monkeypatch.setattr(loop, "train_epoch", nan_in_epoch_2)
    with pytest.raises(errors.DivergedError, match="became nan in epoch 2"):
      loop.train_and_evaluate(tiny_config(mnist_dir, num_epochs=3), str(tmp_path))
    assert os.listdir(tmp_path / "checkpoints") == ["1"]
    assert [r["epoch"] for r in epoch_records(str(tmp_path))] == [1]


class TestStopSignals:

  def test_sigterm_during_a_save_lets_it_finish_and_the_rerun_is_identical(
      self, mnist_dir, baseline, tmp_path, monkeypatch):
    """SIGTERM arrives while epoch 2 is being saved: the save completes, then the run stops."""
    def fail_the_test(signum, _frame):  # Only reached if the run leaves SIGTERM unhandled.
      raise AssertionError(f"signal {signum} was not handled by the run")

    real_write_manifest, saves = checkpoints_lib.write_manifest, []

    def terminated_while_saving(folder):
      saves.append(folder)
      if len(saves) == 2:
        signal.raise_signal(signal.SIGTERM)
      real_write_manifest(folder)

    monkeypatch.setattr(checkpoints_lib, "write_manifest", terminated_while_saving)
    previous = signal.signal(signal.SIGTERM, fail_the_test)
    workdir = str(tmp_path)
    try:
      with pytest.raises(errors.Interrupted) as e:
        loop.train_and_evaluate(tiny_config(mnist_dir, num_epochs=3), workdir)
    finally:
      signal.signal(signal.SIGTERM, previous)
    assert str(e.value) == ("stopped by SIGTERM after epoch 2/3; the last checkpoint is epoch 2; "
                            "rerun the same command to resume")
    assert e.value.exit_code == 143
    checkpoints_lib.verify_manifest(os.path.join(workdir, "checkpoints", "2"))
    monkeypatch.setattr(checkpoints_lib, "write_manifest", real_write_manifest)
    resumed, _ = loop.train_and_evaluate(tiny_config(mnist_dir, num_epochs=3), workdir)
    chex.assert_trees_all_equal(arrays(resumed), arrays(baseline[1]))
    assert epoch_records(workdir) == epoch_records(baseline[0])


class TestSubsets:

  def test_offline_smoke_subset_holds_every_digit(self, monkeypatch):
    """The offline set is sorted by class: its first 2,048 / 512 examples are digits 0-5 only."""
    monkeypatch.setattr(input_pipeline, "tfds_unavailable_reason", lambda _: "offline (test)")
    data = data_lib.load_data("", "", num_train=2048, num_test=512, seed=0)
    for split, n in ((data.train, 2048), (data.test, 512)):
      counts = split.class_counts()
      assert len(split) == n and sum(counts) == n
      assert max(counts) - min(counts) <= 1, counts
    assert "class-balanced" in data.subset and "2048 of 4000 train" in data.subset

  def test_subset_is_seeded_and_deterministic(self):
    labels = np.repeat(np.arange(10), 30)
    a = input_pipeline.balanced_indices(labels, 50, seed=0)
    np.testing.assert_array_equal(a, input_pipeline.balanced_indices(labels, 50, seed=0))
    assert not np.array_equal(a, input_pipeline.balanced_indices(labels, 50, seed=1))
    assert len(set(a.tolist())) == 50 and np.bincount(labels[a]).tolist() == [5] * 10

  def test_uneven_classes_fill_up_from_the_others(self):
    labels = np.array([0] * 3 + [1] * 50 + [2] * 50)
    picked = input_pipeline.balanced_indices(labels, 20, seed=0)
    assert np.bincount(labels[picked]).tolist() == [3, 9, 8] and len(set(picked.tolist())) == 20

  def test_summary_run_file_and_log_say_which_subset(self, mnist_dir, tmp_path, caplog):
    config = tiny_config(mnist_dir, num_epochs=1, num_train_examples=150, num_test_examples=60)
    with caplog.at_level("INFO"):
      _, summary = loop.train_and_evaluate(config, str(tmp_path))
    assert any(m.startswith("examples of each digit 0-9: train [") and "150 of 200" in m
               for m in caplog.messages)
    assert summary["num_train"] == 150 and sum(summary["train_per_class"]) == 150
    assert sum(summary["test_per_class"]) == 60 and "150 of 200 train" in summary["subset"]
    with open(tmp_path / "run.json") as f:
      assert json.load(f)["subset"]["subset"] == summary["subset"]

  def test_curves_of_one_epoch_have_whole_epoch_ticks(self):
    from trainer import metrics as metrics_lib  # pylint: disable=g-import-not-at-top

    record = {"epoch": 1, "train_loss": 1.0, "test_loss": 1.0, "test_accuracy_percent": 50.0}
    for ax in metrics_lib.curves_figure([record], "one epoch").axes:
      ticks = ax.get_xticks()
      np.testing.assert_array_equal(ticks, np.round(ticks))


def test_trainer_imports_no_repository_root_module(tmp_path):
  """The package stands alone: nothing from the repository root (input_pipeline, configs)."""
  code = ("import sys, pkgutil, importlib, trainer\n"
          "for m in pkgutil.iter_modules(trainer.__path__):\n"
          "  importlib.import_module(f'trainer.{m.name}')\n"
          "print(sorted({'input_pipeline', 'configs', 'train'} & set(sys.modules)))\n")
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run([sys.executable, "-c", code], cwd=str(tmp_path), capture_output=True,
                        text=True, timeout=120, check=False, env={**os.environ, "PYTHONPATH": repo})
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.strip() == "[]"
