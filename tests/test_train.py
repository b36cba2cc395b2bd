"""Tests for train.py: index layout, masking, config checks, end to end on 1/2/4 fake devices,
resume, determinism, offline fallback, and a 2-process x 2-device multi-host run."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import chex
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from mnist_fixtures import write_mnist_dir

import input_pipeline
import train
from configs import default, smoke

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_TRAIN, NUM_TEST = 200, 90  # 4 batches a epoch, the last one partial (200 = 3 * 64 + 8).


@pytest.fixture(name="mnist_dir", scope="module")
def fixture_mnist_dir(tmp_path_factory):
  return write_mnist_dir(str(tmp_path_factory.mktemp("mnist")), num_train=NUM_TRAIN,
                         num_test=NUM_TEST)


def tiny_config(data_dir: str, **overrides):
  config = smoke.get_config()
  config.data_dir = data_dir
  config.num_train_examples = config.num_test_examples = 0
  config.num_epochs = 2
  config.max_steps_per_call = 3  # 4 steps: two calls, the second padded with a no-op step.
  config.eval_batch_size = 32
  config.update(overrides)
  return config


def epoch_records(workdir: str) -> list[dict]:
  """metrics.jsonl without the timings (which differ between identical runs)."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  return [{k: v for k, v in r.items() if k not in ("examples_per_sec", "epoch_seconds")}
          for r in records]


def checkpoint_params(workdir: str, epoch: int):
  restored = ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", str(epoch),
                                                             "default"))
  return restored["params"]


# ----------------------------------------------------------------------------- layout


class TestLayout:

  def test_epoch_uses_every_example_once(self):
    idx, valid = train.epoch_batches(200, 64, seed=0, epoch=1)
    assert idx.shape == valid.shape == (4, 64)
    np.testing.assert_array_equal(np.sort(idx[valid]), np.arange(200))
    assert valid.sum() == 200 and valid[-1].sum() == 8

  def test_fresh_permutation_per_epoch_and_deterministic(self):
    a, _ = train.epoch_batches(200, 64, seed=0, epoch=1)
    b, _ = train.epoch_batches(200, 64, seed=0, epoch=2)
    c, _ = train.epoch_batches(200, 64, seed=0, epoch=1)
    d, _ = train.epoch_batches(200, 64, seed=1, epoch=1)
    assert not np.array_equal(a, b) and not np.array_equal(a, d)
    np.testing.assert_array_equal(a, c)

  @pytest.mark.parametrize("steps,max_steps,expected", [(938, 250, 235), (4, 3, 2), (5, 10, 5)])
  def test_chunk_length(self, steps, max_steps, expected):
    assert train.chunk_length(steps, max_steps) == expected

  @pytest.mark.parametrize("processes,local", [(1, 1), (1, 4), (2, 2)])
  def test_processes_feed_disjoint_shares_of_each_global_batch(self, processes, local):
    idx, valid = train.epoch_batches(200, 64, seed=0, epoch=3)
    shares = []
    for p in range(processes):
      topo = train.Topology(processes * local, p * local, local)
      calls = train.shard_calls(idx, valid, topo, steps_per_call=3)
      assert all(i.shape == (local, 3, 64 // (processes * local)) for i, _ in calls)
      shares.append(np.concatenate([np.concatenate(list(i), axis=-1) for i, _ in calls]))
    rebuilt = np.concatenate(shares, axis=-1)  # Devices in pmap order -> the global batch.
    np.testing.assert_array_equal(rebuilt[:4], idx)
    assert rebuilt.shape == (6, 64)

  @pytest.mark.parametrize("n,devices,batch", [(10_000, 1, 1000), (10_000, 4, 1000), (90, 4, 7),
                                               (3, 4, 32)])
  def test_eval_counts_every_test_example_once(self, n, devices, batch):
    seen = []
    for p in range(devices):
      idx, valid = train.eval_layout(n, batch, train.Topology(devices, p, 1))
      seen.append(idx[valid])
    np.testing.assert_array_equal(np.sort(np.concatenate(seen)), np.arange(n))


# ----------------------------------------------------------------------------- device code


def _state():
  return train.replicate(jax.device_get(train.create_train_state(
      jax.random.PRNGKey(0), features=(16, 8), learning_rate=0.1, momentum=0.5)))


def _run_chunk(state, images, labels, idx, valid):
  data = train.replicate((images, labels))
  state, metrics = train.train_chunk(state, *data, idx[None], valid[None])
  return train.host_state(state), np.asarray(metrics[0])


class TestDeviceCode:

  def setup_method(self):
    rng = np.random.default_rng(0)
    self.images = rng.normal(size=(40, 784)).astype(np.float32)
    self.labels = rng.integers(0, 10, size=40).astype(np.int32)

  def test_padded_rows_are_masked_out(self):
    """A batch of 8 real rows padded to 16 gives exactly the step of the 8 rows alone."""
    real = np.arange(8, dtype=np.int32)
    padded_idx = np.concatenate([real, np.full(8, 30, np.int32)])[None]  # Pad: any real row.
    padded_valid = (np.arange(16) < 8)[None]
    a, ma = _run_chunk(_state(), self.images, self.labels, padded_idx, padded_valid)
    b, mb = _run_chunk(_state(), self.images, self.labels, real[None], np.ones((1, 8), bool))
    chex.assert_trees_all_close(a.params, b.params, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(ma, mb, rtol=1e-6)
    assert ma[1] == 8

  def test_step_without_real_examples_changes_nothing(self):
    """Chunk padding: after a real step (momentum non-zero) an all-padding step is a no-op."""
    idx = np.arange(16, dtype=np.int32).reshape(2, 8)
    valid = np.array([[True] * 8, [False] * 8])
    a, _ = _run_chunk(_state(), self.images, self.labels, idx, valid)
    b, _ = _run_chunk(_state(), self.images, self.labels, idx[:1], valid[:1])
    chex.assert_trees_all_equal(a.params, b.params)
    chex.assert_trees_all_equal(a.opt_state, b.opt_state)
    assert a.step == b.step == 1

  def test_eval_counts_and_accuracy(self):
    state = _state()
    data = train.DeviceData(*train.replicate((self.images, self.labels)))
    idx, valid = train.eval_layout(40, 16, train.current_topology())
    metrics = train.evaluate(state, data, (idx, valid))
    assert metrics["num_evaluated"] == 40
    logits = train.MLP((16, 8)).apply({"params": train.host_state(state).params}, self.images)
    expected = np.mean(np.argmax(logits, -1) == self.labels)
    np.testing.assert_allclose(metrics["test_accuracy"], expected, rtol=1e-6)

  def test_normalize(self):
    x = train.normalize(np.array([[0, 255]], np.uint8))
    np.testing.assert_allclose(x, [[-0.1307 / 0.3081, (1 - 0.1307) / 0.3081]], rtol=1e-6)
    assert x.dtype == np.float32

  def test_mlp_shapes(self):
    state = train.create_train_state(jax.random.PRNGKey(0), features=(512, 256, 128, 64),
                                     learning_rate=0.01, momentum=0.5)
    kernels = [state.params[f"Dense_{i}"]["kernel"].shape for i in range(5)]
    assert kernels == [(784, 512), (512, 256), (256, 128), (128, 64), (64, 10)]
    chex.assert_shape(state.apply_fn({"params": state.params}, jnp.zeros((3, 784))), (3, 10))


# ----------------------------------------------------------------------------- configs


class TestConfig:

  def test_default_matches_the_issue(self):
    c = default.get_config()
    assert (c.batch_size, c.num_epochs, c.seed, c.learning_rate, c.momentum) == (
        64, 10, 0, 0.01, 0.5)
    assert tuple(c.hidden_sizes) == (512, 256, 128, 64)

  @pytest.mark.parametrize("overrides,devices,message", [
      ({"batch_size": 63}, 4, r"config.batch_size=63 is not divisible by the 4 devices; use a "
       r"multiple of 4"),
      ({"batch_size": 0}, 1, r"config.batch_size must be positive, got 0"),
      ({"num_epochs": -1}, 1, r"config.num_epochs must be >= 0, got -1"),
      ({"learning_rate": 0.0}, 1, r"config.learning_rate must be > 0, got 0.0"),
      ({"momentum": 1.0}, 1, r"config.momentum must be in \[0, 1\), got 1.0"),
      ({"hidden_sizes": (512, 0)}, 1, r"config.hidden_sizes must be positive widths"),
      ({"max_steps_per_call": 0}, 1, r"config.max_steps_per_call must be > 0, got 0"),
      ({"eval_batch_size": -5}, 1, r"config.eval_batch_size must be > 0, got -5"),
      ({"num_train_examples": -1}, 1, r"num_train_examples / num_test_examples must be >= 0"),
  ])
  def test_bad_configs(self, overrides, devices, message):
    config = default.get_config()
    config.update(overrides)
    with pytest.raises(train.ConfigError, match=message):
      train.validate_config(config, devices)


# ----------------------------------------------------------------------------- in process


class TestTrainAndEvaluate:

  def test_outputs_determinism_and_learning(self, mnist_dir, tmp_path):
    workdirs = [str(tmp_path / "a"), str(tmp_path / "b")]
    results = [train.train_and_evaluate(tiny_config(mnist_dir, num_epochs=3), w)
               for w in workdirs]
    (state, summary), (state_b, _) = results
    assert epoch_records(workdirs[0]) == epoch_records(workdirs[1])  # Same seed, same metrics.
    chex.assert_trees_all_equal(state.params, state_b.params)
    assert {"dataset", "num_train", "num_test", "test_accuracy", "epochs", "devices",
            "train_seconds"} <= set(summary)
    assert (summary["num_train"], summary["num_test"], summary["epochs"]) == (200, 90, 3)
    records = epoch_records(workdirs[0])
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert all(r["num_evaluated"] == NUM_TEST and r["dataset"] == "mnist" for r in records)
    assert records[-1]["train_loss"] < records[0]["train_loss"]
    files = os.listdir(workdirs[0])
    assert "curves.png" in files and any(f.startswith("events.out.tfevents") for f in files)
    assert sorted(os.listdir(os.path.join(workdirs[0], "checkpoints"))) == ["1", "2", "3"]
    chex.assert_trees_all_equal(checkpoint_params(workdirs[0], 3), state.params)

  def test_resume_equals_uninterrupted(self, mnist_dir, tmp_path):
    """Interrupted after epoch 1, then again in the middle of saving epoch 2."""
    full, _ = train.train_and_evaluate(tiny_config(mnist_dir, num_epochs=3), str(tmp_path / "f"))
    workdir = str(tmp_path / "r")
    train.train_and_evaluate(tiny_config(mnist_dir, num_epochs=1), workdir)
    # A save of epoch 2 cut short: orbax's temporary folder exists, the rename never happened;
    # the metrics line of epoch 2 was already written.
    tmp = os.path.join(workdir, "checkpoints", "2.orbax-checkpoint-tmp-1234567")
    os.makedirs(os.path.join(tmp, "default"))
    with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
      f.write(json.dumps({"epoch": 2, "train_loss": 9.0}) + "\n")
    resumed, summary = train.train_and_evaluate(tiny_config(mnist_dir, num_epochs=3), workdir)
    chex.assert_trees_all_equal(resumed.params, full.params)
    chex.assert_trees_all_equal(resumed.opt_state, full.opt_state)
    assert epoch_records(workdir) == epoch_records(str(tmp_path / "f"))
    assert summary["epochs"] == 3

  def test_offline_fallback_says_so_everywhere(self, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(input_pipeline, "tfds_unavailable_reason", lambda _: "offline (test)")
    config = tiny_config("", num_epochs=1, num_train_examples=128, num_test_examples=64)
    with caplog.at_level("INFO"):
      _, summary = train.train_and_evaluate(config, str(tmp_path))
    assert summary["dataset"].startswith("mnist-offline-subset -- OFFLINE SUBSET")
    assert "--config.data_dir" in summary["dataset"]
    assert all(r["dataset"] == summary["dataset"] for r in epoch_records(str(tmp_path)))
    epoch_lines = [m for m in caplog.messages if "test_accuracy=" in m]
    assert epoch_lines and all(m.startswith("[OFFLINE SUBSET") for m in epoch_lines)
    assert any(input_pipeline.OFFLINE_NOTICE in m for m in caplog.messages)


# ----------------------------------------------------------------------------- subprocesses


def _env(devices: int) -> dict[str, str]:
  env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
  env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  return env


def run_cli(workdir: str, devices: int, *flags: str) -> subprocess.CompletedProcess:
  cmd = [sys.executable, os.path.join(REPO, "train.py"), "--config",
         os.path.join(REPO, "configs", "smoke.py"), f"--workdir={workdir}", *flags]
  return subprocess.run(cmd, env=_env(devices), capture_output=True, text=True, timeout=300,
                        check=False, cwd=REPO)


def cli_flags(data_dir: str) -> list[str]:
  return [f"--config.data_dir={data_dir}", "--config.num_epochs=2",
          "--config.num_train_examples=0", "--config.num_test_examples=0",
          "--config.max_steps_per_call=3", "--config.eval_batch_size=16"]


@pytest.fixture(name="cli_runs", scope="module")
def fixture_cli_runs(mnist_dir, tmp_path_factory):
  """The smoke run through the command line on 1, 2 and 4 fake CPU devices."""
  runs = {}
  for devices in (1, 2, 4):
    workdir = str(tmp_path_factory.mktemp(f"cli{devices}"))
    proc = run_cli(workdir, devices, *cli_flags(mnist_dir))
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs[devices] = (workdir, json.loads(proc.stdout.strip().splitlines()[-1]))
  return runs


class TestCommandLine:

  @pytest.mark.parametrize("devices", [1, 2, 4])
  def test_smoke(self, cli_runs, devices):
    workdir, summary = cli_runs[devices]
    assert summary["devices"] == devices and summary["epochs"] == 2
    assert (summary["num_train"], summary["num_test"]) == (NUM_TRAIN, NUM_TEST)
    assert 0.0 <= summary["test_accuracy"] <= 1.0
    assert all(r["num_evaluated"] == NUM_TEST for r in epoch_records(workdir))

  def test_one_and_four_devices_follow_the_same_trajectory(self, cli_runs):
    one, four = (epoch_records(cli_runs[d][0]) for d in (1, 4))
    for a, b in zip(one, four, strict=True):
      np.testing.assert_allclose([a["train_loss"], a["test_loss"]],
                                 [b["train_loss"], b["test_loss"]], rtol=1e-5)
      assert abs(a["test_accuracy"] - b["test_accuracy"]) <= 1 / NUM_TEST
    chex.assert_trees_all_close(checkpoint_params(cli_runs[1][0], 2),
                                checkpoint_params(cli_runs[4][0], 2), atol=1e-6)

  def test_batch_not_divisible_by_devices(self, mnist_dir, tmp_path):
    proc = run_cli(str(tmp_path), 4, f"--config.data_dir={mnist_dir}", "--config.batch_size=66")
    assert proc.returncode == 1
    assert ("train.py: error: config.batch_size=66 is not divisible by the 4 devices"
            in proc.stderr)
    assert not os.path.exists(os.path.join(str(tmp_path), "checkpoints"))  # Before training.

  def test_bad_data_file(self, tmp_path):
    data_dir = write_mnist_dir(str(tmp_path / "m"), num_train=10, num_test=5)
    os.remove(os.path.join(data_dir, "t10k-labels-idx1-ubyte.gz"))
    proc = run_cli(str(tmp_path / "w"), 1, f"--config.data_dir={data_dir}")
    assert proc.returncode == 1
    assert "train.py: error: " in proc.stderr and "t10k-labels-idx1-ubyte[.gz]: missing" in (
        proc.stderr)


MULTIHOST_DRIVER = textwrap.dedent("""
    import sys, numpy as np, jax
    import train
    from configs import smoke
    workdir, data_dir, port, pid, out = sys.argv[1:]
    train.init_distributed(f"localhost:{port}", 2, int(pid), force=False)
    assert (jax.process_count(), jax.local_device_count(), jax.device_count()) == (2, 2, 4)
    config = smoke.get_config()
    config.unlock()
    config.update(data_dir=data_dir, num_epochs=2, num_train_examples=0, num_test_examples=0,
                  max_steps_per_call=3, eval_batch_size=16)
    state, summary = train.train_and_evaluate(config, workdir)
    leaves = jax.tree_util.tree_leaves_with_path(state.params)
    np.savez(out, **{jax.tree_util.keystr(k): v for k, v in leaves}, loss=summary["train_loss"])
""")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_two_devices_each(mnist_dir, cli_runs, tmp_path):
  """2 processes x 2 CPU devices (gloo): identical params, equal to 1 process x 4 devices."""
  port, workdir = _free_port(), str(tmp_path / "w")
  outs = [str(tmp_path / f"params{p}.npz") for p in (0, 1)]
  procs = [subprocess.Popen([sys.executable, "-c", MULTIHOST_DRIVER, workdir, mnist_dir,
                             str(port), str(p), outs[p]], env=_env(2), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for p in (0, 1)]
  for p in procs:
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
  first, second = (dict(np.load(o)) for o in outs)
  chex.assert_trees_all_equal(first, second)  # Bit-identical on both processes.
  reference = checkpoint_params(cli_runs[4][0], 2)
  flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(reference)}
  chex.assert_trees_all_close({k: first[k] for k in flat}, flat, atol=1e-6)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["1", "2"]
