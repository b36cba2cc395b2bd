"""Tests for train.py, the command line: runs on 1/2/4/8 fake devices and 2 processes (the same
bits on each), every mistake as one line, --help, Ctrl-C, and the README's commands."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time

import chex
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from trainer_helpers import NUM_TEST
from trainer_helpers import NUM_TRAIN
from trainer_helpers import epoch_records
from trainer_helpers import fixture_mnist_dir  # noqa: F401  (pytest fixture)
from trainer_helpers import tiny_config

from configs import default
from trainer import checkpoints as checkpoints_lib
from trainer import input_pipeline
from trainer import loop

from mnist_fixtures import idx_bytes
from mnist_fixtures import write_file
from mnist_fixtures import write_mnist_dir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(devices: int) -> dict[str, str]:
  env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
  env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  return env


def command(workdir: str, *flags: str, config: str = "smoke.py") -> list[str]:
  return [sys.executable, os.path.join(REPO, "train.py"), "--config",
          os.path.join(REPO, "configs", config), f"--workdir={workdir}", *flags]


def run_cli(workdir: str, devices: int, *flags: str, **kwargs) -> subprocess.CompletedProcess:
  return subprocess.run(command(workdir, *flags, **kwargs), env=_env(devices),
                        capture_output=True, text=True, timeout=300, check=False, cwd=REPO)


def cli_flags(data_dir: str) -> list[str]:
  return [f"--config.data_dir={data_dir}", "--config.num_epochs=2",
          "--config.num_train_examples=0", "--config.num_test_examples=0",
          "--config.max_steps_per_call=3", "--config.eval_batch_size=16"]


def checkpoint_params(workdir: str, epoch: int):
  path = os.path.join(workdir, "checkpoints", str(epoch), "default")
  return ocp.StandardCheckpointer().restore(path)["params"]


@pytest.fixture(name="cli_runs", scope="module")
def fixture_cli_runs(mnist_dir, tmp_path_factory):
  """The smoke run through the command line on 1, 2, 4 and 8 fake CPU devices."""
  runs = {}
  for devices in (1, 2, 4, 8):
    workdir = str(tmp_path_factory.mktemp(f"cli{devices}"))
    proc = run_cli(workdir, devices, *cli_flags(mnist_dir))
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs[devices] = (workdir, json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr)
  return runs


class TestRuns:

  @pytest.mark.parametrize("devices", [1, 2, 4, 8])
  def test_smoke(self, cli_runs, devices):
    workdir, summary, _ = cli_runs[devices]
    assert summary["devices"] == devices and summary["epochs"] == 2
    assert (summary["num_train"], summary["num_test"]) == (NUM_TRAIN, NUM_TEST)
    assert 0.0 <= summary["test_accuracy_percent"] <= 100.0
    assert all(r["num_evaluated"] == NUM_TEST for r in epoch_records(workdir))

  def test_log_and_progress_bar(self, cli_runs):
    err = cli_runs[1][2]
    assert "epoch 1/2 (compiling)" in err and "loss=" in err
    assert re.search(r"compiled the training and evaluation steps in \d+\.\d s", err)
    assert re.search(r"epoch 2/2: train_loss=\d\.\d{4} test_loss=\d\.\d{4} "
                     r"test_accuracy=\d+\.\d\d% \(train \d+\.\d\d s", err)
    assert "Traceback" not in err and "tpu" not in err.lower()  # No library chatter.

  @pytest.mark.parametrize("devices", [2, 4, 8])
  def test_every_device_count_trains_the_same_bits(self, cli_runs, devices):
    """Parameters and training losses bit-identical to one device's (the steps' matmuls differ
    in shape between device counts unless each step works in fixed groups of rows)."""
    chex.assert_trees_all_equal(checkpoint_params(cli_runs[devices][0], 2),
                                checkpoint_params(cli_runs[1][0], 2))
    one, other = (epoch_records(cli_runs[d][0]) for d in (1, devices))
    for a, b in zip(one, other, strict=True):
      assert a["train_loss"] == b["train_loss"]
      # Evaluation splits the test set by device count: sums in another order.
      np.testing.assert_allclose(a["test_loss"], b["test_loss"], rtol=1e-5)
      assert abs(a["test_accuracy_percent"] - b["test_accuracy_percent"]) <= 100 / NUM_TEST


def test_other_device_counts_train_one_group_per_device(mnist_dir, cli_runs, tmp_path):
  """3 devices (a count that does not divide 8 groups) train too, close to one device."""
  workdir = str(tmp_path / "three")
  proc = run_cli(workdir, 3, *cli_flags(mnist_dir), "--config.batch_size=66")
  assert proc.returncode == 0, proc.stderr[-3000:]
  one = str(tmp_path / "one")
  assert run_cli(one, 1, *cli_flags(mnist_dir), "--config.batch_size=66").returncode == 0
  chex.assert_trees_all_close(checkpoint_params(workdir, 2), checkpoint_params(one, 2),
                              atol=1e-5, rtol=0)


def test_grad_groups_0_sums_each_devices_rows_at_once(mnist_dir, cli_runs, tmp_path):
  """grad_groups=0 (a psum of each device's gradient): the same maths as the grouped default."""
  workdir = str(tmp_path / "psum")
  proc = run_cli(workdir, 2, *cli_flags(mnist_dir), "--config.grad_groups=0")
  assert proc.returncode == 0, proc.stderr[-3000:]
  chex.assert_trees_all_close(checkpoint_params(workdir, 2), checkpoint_params(cli_runs[1][0], 2),
                              atol=1e-5, rtol=0)


MULTIHOST_DRIVER = textwrap.dedent("""
    import sys, numpy as np, jax
    import train, trainer
    from configs import smoke
    workdir, data_dir, port, pid, out = sys.argv[1:]
    train.init_distributed(f"localhost:{port}", 2, int(pid), force=False)
    assert (jax.process_count(), jax.local_device_count(), jax.device_count()) == (2, 2, 4)
    config = smoke.get_config()
    config.unlock()
    config.update(data_dir=data_dir, num_epochs=2, num_train_examples=0, num_test_examples=0,
                  max_steps_per_call=3, eval_batch_size=16)
    state, summary = trainer.train_and_evaluate(config, workdir)
    leaves = jax.tree_util.tree_leaves_with_path(state.params)
    np.savez(out, **{jax.tree_util.keystr(k): v for k, v in leaves}, loss=summary["train_loss"])
""")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_two_devices_each(mnist_dir, cli_runs, tmp_path):
  """2 processes x 2 CPU devices (gloo): identical params, equal to 1 process x 1 device."""
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
  chex.assert_trees_all_equal(first, second)  # Bit-identical on both processes,
  reference = checkpoint_params(cli_runs[1][0], 2)  # and to one process on one device.
  flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(reference)}
  chex.assert_trees_all_equal({k: first[k] for k in flat}, flat)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["1", "2"]


# ----------------------------------------------------------------------------- mistakes


def assert_one_line_error(proc: subprocess.CompletedProcess, message: str, code: int) -> None:
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == code, proc.stderr[-3000:]
  assert len(lines) == 1 and lines[0].startswith("train.py: error: "), proc.stderr[-3000:]
  assert message in lines[0]


@pytest.mark.parametrize("flags,message", [
    (["--config.nope=1"], "--config.nope: no such config field; see --help for the fields"),
    (["--config.learnin_rate=1"], "(did you mean --config.learning_rate?)"),
    (["--config.seed=abc"], "flag --config.seed=abc: invalid literal for int()"),
    (["extra"], "unexpected arguments ['extra']"),
])
def test_command_line_mistakes(tmp_path, flags, message):
  assert_one_line_error(run_cli(str(tmp_path), 1, *flags), message, 2)


@pytest.mark.parametrize("config,message", [
    ("nope.py", "nope.py: no such file"),
    ("__init__.py", "cannot be loaded: AttributeError: module 'train_config' has no attribute "
     "'get_config'"),
])
def test_config_file_mistakes(tmp_path, config, message):
  assert_one_line_error(run_cli(str(tmp_path), 1, config=config), message, 2)


def test_missing_workdir(tmp_path):
  proc = subprocess.run(command("x")[:-1], env=_env(1), capture_output=True, text=True,
                        check=False, cwd=REPO)
  assert_one_line_error(proc, "--workdir is required (see --help)", 2)


def test_run_mistakes(mnist_dir, tmp_path):
  """Each stops before any data is loaded or anything compiled, with one line."""
  a_file = tmp_path / "a_file"
  a_file.write_text("")
  assert_one_line_error(run_cli(str(a_file), 1), "is a file, not a directory", 1)
  assert_one_line_error(run_cli(str(tmp_path / "w"), 1, "--config.learning_rate=inf"),
                        "config.learning_rate must be finite and > 0, got inf", 1)
  proc = run_cli(str(tmp_path / "w"), 4, f"--config.data_dir={mnist_dir}",
                 "--config.batch_size=66")
  assert_one_line_error(proc, "config.batch_size=66 is not divisible by the 4 devices", 1)
  assert not os.path.exists(tmp_path / "w" / "checkpoints")


def test_bad_data(tmp_path):
  data_dir = write_mnist_dir(str(tmp_path / "m"), num_train=10, num_test=5)
  images, _ = input_pipeline.IDX_FILES["test"]
  write_file(os.path.join(data_dir, images + ".gz"),
             idx_bytes(np.zeros((0, 28, 28), np.uint8), 2051))
  proc = run_cli(str(tmp_path / "w"), 1, f"--config.data_dir={data_dir}")
  assert_one_line_error(proc, f"{images}.gz: holds 0 examples", 1)


def test_help_lists_every_config_field_with_its_default(tmp_path):
  proc = run_cli(str(tmp_path), 1, "--help")
  assert proc.returncode == 0, proc.stderr[-2000:]
  text = " ".join(proc.stdout.split())  # absl wraps the help text.
  for name, value in default.get_config().items():
    assert f"--config.{name}={value!r}:" in text, name
  assert "--[no]fresh" in text


# ----------------------------------------------------------------------------- Ctrl-C, SIGTERM


@pytest.mark.parametrize("signum,code,how", [(signal.SIGINT, 130, "interrupted"),
                                             (signal.SIGTERM, 143, "stopped by SIGTERM")])
def test_a_stop_signal_says_where_it_stopped_and_the_same_command_resumes(mnist_dir, tmp_path,
                                                                          signum, code, how):
  workdir, log = str(tmp_path / "w"), tmp_path / "stderr.txt"
  cmd = command(workdir, *cli_flags(mnist_dir), "--config.num_epochs=30")
  with open(log, "w") as err:
    proc = subprocess.Popen(cmd, env=_env(1), cwd=REPO, stdout=subprocess.PIPE, stderr=err,
                            text=True)
    deadline = time.monotonic() + 240
    while "epoch 2/30: train_loss" not in log.read_text() and time.monotonic() < deadline:
      time.sleep(0.05)
    proc.send_signal(signum)
    proc.communicate(timeout=120)
  stderr = log.read_text()
  last = stderr.strip().splitlines()[-1]
  match = re.fullmatch(rf"train\.py: {how} (in|after) epoch (\d+)/30; the last checkpoint "
                       r"is epoch (\d+); rerun the same command to resume", last)
  assert proc.returncode == code and match, stderr[-2000:]
  assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
  saved = int(match.group(3))
  assert saved >= 2 and int(match.group(2)) == saved + (match.group(1) == "in")
  assert max(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints"))) == saved
  checkpoints_lib.verify_manifest(os.path.join(workdir, "checkpoints", str(saved)))
  resumed = subprocess.run(cmd, env=_env(1), cwd=REPO, capture_output=True, text=True,
                           timeout=300, check=False)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"resuming after epoch {saved}" in resumed.stderr
  assert [r["epoch"] for r in epoch_records(workdir)] == list(range(1, 31))
  assert not [f for f in os.listdir(workdir) if f.endswith(".lock")]
  if signum == signal.SIGTERM:  # Bit-identical to the run never stopped (in this process).
    config = tiny_config(mnist_dir, num_epochs=30, eval_batch_size=16)
    state, _ = loop.train_and_evaluate(config, str(tmp_path / "uninterrupted"))
    chex.assert_trees_all_equal(checkpoint_params(workdir, 30), state.params)


# ------------------------------------------------------------------ resumes across device counts


@pytest.mark.parametrize("before,after", [(1, 4), (4, 2), (2, 1)])
def test_resume_on_another_device_count_ends_as_the_uninterrupted_run(mnist_dir, cli_runs,
                                                                      tmp_path, before, after):
  """Epoch 1 on ``before`` devices, epoch 2 on ``after``: bit-identical to the 1-device run."""
  workdir = shutil.copytree(cli_runs[before][0], str(tmp_path / "w"))
  shutil.rmtree(os.path.join(workdir, "checkpoints", "2"))  # As if stopped after epoch 1.
  proc = run_cli(workdir, after, *cli_flags(mnist_dir))
  assert proc.returncode == 0 and "resuming after epoch 1" in proc.stderr, proc.stderr[-3000:]
  chex.assert_trees_all_equal(checkpoint_params(workdir, 2), checkpoint_params(cli_runs[1][0], 2))


def test_training_page_commands_use_separate_workdirs():
  with open(os.path.join(REPO, "docs", "training.md")) as f:
    workdirs = re.findall(r"python train\.py .*--workdir[= ](\S+)", f.read())
  assert len(workdirs) >= 3 and len(set(workdirs)) == len(workdirs), workdirs
