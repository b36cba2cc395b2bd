"""Every loss (but the linear one, tested in test_linear_sharded.py) on sharded inputs.

Each mode runs ``tests/sharding_driver.py`` once on 8 fake CPU devices: under
``jit`` with a mesh of Explicit axes (``jax.make_mesh`` under ``set_mesh``) and
of Auto axes, with logits split over the batch, the classes or both and in the
``axis=1`` layout, and inside ``jax.shard_map`` on per-device blocks.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-5


@functools.cache
def run_driver(mode: str) -> dict:
  env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
  env.update(XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
             PYTHONPATH=REPO)
  proc = subprocess.run([sys.executable, os.path.join(REPO, "tests", "sharding_driver.py"), mode],
                        env=env, capture_output=True, text=True, timeout=600, check=False)
  if proc.returncode:
    raise AssertionError(f"driver failed ({proc.returncode}):\n{proc.stderr[-6000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def layouts(results: dict) -> dict:
  return {k: v for k, v in results.items() if k != "sum_errors_ulp"}


@pytest.mark.parametrize("mode", ["explicit", "auto"])
def test_values_and_gradients_equal_one_device(mode):
  for layout, result in layouts(run_driver(mode)).items():
    for name, loss in result["losses"].items():
      assert loss["err"] < TOL, (layout, name, loss)


def test_explicit_gradients_keep_their_inputs_sharding():
  for layout, result in layouts(run_driver("explicit")).items():
    for name, loss in result["losses"].items():
      # Gradients w.r.t. the logits, the probability labels and the binary targets.
      assert loss["grad_specs"] == [result["spec"]] * 3, (layout, name, loss["grad_specs"])


@pytest.mark.parametrize("mode", ["explicit", "auto"])
def test_no_input_sized_array_is_gathered(mode):
  for layout, result in layouts(run_driver(mode)).items():
    if mode == "explicit":
      assert result["gathers"] == [], (layout, result["gathers"])
    else:  # XLA may gather per-row numbers (a label's row and class), never the logits
      assert all(size <= 2 * result["rows"] for size in result["gathers"]), (layout, result)


@pytest.mark.parametrize("mode", ["explicit", "auto"])
def test_sharded_sums_stay_as_accurate_as_pytorchs(mode):
  # PyTorch's cascade sum stays within 1.7 ulps on such sums (test_binary.py); so must a sum
  # split over 8 devices.
  errors = run_driver(mode)["sum_errors_ulp"]
  assert max(errors) <= 2.0, errors


@pytest.mark.parametrize("mode", ["explicit", "auto"])
def test_shard_map_blocks_sum_to_the_whole(mode):
  results = run_driver(f"shard_map-{mode}")
  assert {name.split("/")[0] for name in results} >= {
      "softmax", "log_softmax", "logsumexp", "sparse_cross_entropy",
      "sparse_cross_entropy+options", "dense_cross_entropy", "nll_loss",
      "binary_cross_entropy", "binary_cross_entropy_with_logits", "mse_loss"}
  for name, result in results.items():
    assert result["err"] < TOL, (name, result)


def test_docs_examples_on_eight_devices():
  env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
  env.update(XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
             PYTHONPATH=REPO)
  script = ("import doctest, json, jax\n"
            "assert jax.device_count() == 8\n"
            "r = doctest.testfile('docs/sharding.md', module_relative=False,\n"
            "                     optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)\n"
            "print(json.dumps([r.failed, r.attempted]))\n")
  proc = subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO, capture_output=True,
                        text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-4000:]
  failed, attempted = json.loads(proc.stdout.strip().splitlines()[-1])
  assert attempted > 10 and failed == 0, proc.stdout[-4000:]
