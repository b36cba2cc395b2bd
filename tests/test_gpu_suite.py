"""Tests for the GPU suite (benchmarks/gpu_suite*.py, gpu_install.py): its pure helpers, and a
``--smoke`` run end to end on CPU, so the suite cannot rot before a GPU runs it."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest

from mnist_fixtures import write_mnist_dir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

import gpu_install  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
import gpu_suite  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

HAS_TORCH = importlib.util.find_spec("torch") is not None


def entry(ms, memory=None, status="ok"):
  return {"status": status, "time_ms": {"min": ms, "median": ms, "rounds": 3},
          "memory_mib": memory}


# ----------------------------------------------------------------------- pure helpers


class TestStatistics:

  def test_spread_is_min_and_median_in_ms(self):
    assert gpu_suite.spread([0.003, 0.001, 0.002, 0.010]) == {"min": 1.0, "median": 2.5,
                                                                "rounds": 4}
    assert gpu_suite.spread([]) == {"min": None, "median": None, "rounds": 0}

  def test_rounds_fit_the_budget_within_bounds(self):
    assert gpu_suite.rounds_for(10.0, 0.5, lo=3, hi=30) == 20
    assert gpu_suite.rounds_for(10.0, 0.01, lo=3, hi=30) == 30
    assert gpu_suite.rounds_for(-5.0, 1.0, lo=3, hi=30) == 3
    assert gpu_suite.rounds_for(10.0, 0.0, lo=3, hi=30) == 30

  def test_rotations_interleave_every_candidate_once_a_round(self):
    orders = list(gpu_suite.rotations(["a", "b", "c"], 4))
    assert orders == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]
    assert list(gpu_suite.rotations([], 2)) == [[], []]


class TestErrors:

  def test_relative_error(self):
    assert gpu_suite.relative_error(1.01, 1.0) == pytest.approx(0.01)
    assert gpu_suite.relative_error(0.5, 0.0) == 0.5
    assert gpu_suite.relative_error(math.nan, 1.0) == math.inf

  def test_max_relative_error_is_scaled_by_the_largest_reference_entry(self):
    ref = np.array([[4.0, -2.0], [1.0, 0.0]])
    got = ref + np.array([[0.0, 0.1], [-0.2, 0.0]])
    assert gpu_suite.max_relative_error(got, ref) == pytest.approx(0.05)
    assert gpu_suite.max_relative_error(ref, ref) == 0.0
    assert gpu_suite.max_relative_error(np.full((2, 2), np.inf), ref) == math.inf


class TestTargets:

  def test_check_passes_fails_and_reports_missing_figures(self):
    assert gpu_suite.check("t", 0.9, 1.0)["status"] == "PASS"
    assert gpu_suite.check("t", 1.1, 1.0)["status"] == "FAIL"
    assert gpu_suite.check("t", 12.0, 10.0, at_least=True)["status"] == "PASS"
    assert gpu_suite.check("t", 9.0, 10.0, at_least=True)["status"] == "FAIL"
    assert gpu_suite.check("t", None, 1.0)["status"] == "n/a"
    assert gpu_suite.check("t", math.inf, 1.0)["status"] == "n/a"

  def test_linear_targets(self):
    case = {"shape": [4096, 4096, 128256], "dtype": "bfloat16", "candidates": {
        "jaxce": entry(22.0, 600.0), "naive jax": entry(20.0, 3000.0),
        "liger": entry(30.0, 500.0), "cce": entry(21.0, 400.0),
        "cce exact": {"status": "failed", "error": "boom"},
        "tokamax chunked_xla": entry(50.0, 3100.0)}}
    got = {t["target"].split(": ", 1)[1]: t for t in gpu_suite.linear_targets(case)}
    assert got["jaxce time / liger time"]["status"] == "PASS"
    assert got["jaxce time / cce time"]["status"] == "FAIL"
    assert got["jaxce time / cce exact time"]["status"] == "n/a"
    assert got["jaxce time / tokamax xla time"]["status"] == "n/a"  # absent
    leanest = next(v for k, v in got.items() if k.startswith("jaxce memory / leanest"))
    assert leanest["value"] == pytest.approx(1.5) and leanest["status"] == "PASS"
    assert got["jaxce time / naive JAX time"]["value"] == pytest.approx(1.1)
    assert got["jaxce time / naive JAX time"]["status"] == "PASS"
    assert got["jaxce memory / naive JAX memory"]["value"] == pytest.approx(0.2)

  def test_sparse_targets(self):
    case = {"shape": [8192, 32000], "dtype": "float32", "stage": "forward+backward",
            "candidates": {"jaxce": entry(10.0, 100.0), "optax": entry(11.0, 100.0),
                           "floor": entry(8.0, 0.0), "liger": entry(9.0, 50.0)}}
    status = [t["status"] for t in gpu_suite.sparse_targets(case)]
    assert status == ["PASS", "FAIL", "PASS", "PASS"]  # 10/11, 10/9, 100/100, 10/8 = 1.25

  def test_train_targets_project_a_seed_run_cut_short(self):
    train = {"train.py": {"wall_s": 10.0},
             "step": {"ratio_of_mins": 1.05, "grad_groups_0_ratio_of_mins": 1.2},
             "torch seed": {"wall_s": 60.0, "timed_out": True, "projected_wall_s": 120.0}}
    speedup, step, fast_step = gpu_suite.train_targets(train)
    assert speedup["value"] == pytest.approx(12.0) and speedup["status"] == "PASS"
    assert "projected" in speedup["detail"]
    assert step["status"] == "PASS" and fast_step["status"] == "FAIL"
    assert [t["status"] for t in gpu_suite.train_targets({})] == ["n/a", "n/a", "n/a"]

  def test_evaluate_targets_takes_forward_backward_sparse_cases_only(self):
    fwd = {"shape": [8, 16], "dtype": "float32", "stage": "forward", "candidates": {}}
    bwd = {**fwd, "stage": "forward+backward"}
    targets = gpu_suite.evaluate_targets({"sparse": [fwd, bwd]})
    assert sum("sparse" in t["target"] for t in targets) == 4


class TestReport:

  def test_merge_cases_puts_both_frameworks_side_by_side(self):
    a = [{"shape": [8, 16], "dtype": "float32", "stage": "forward", "candidates": {"jaxce": 1}}]
    b = [{"shape": [8, 16], "dtype": "float32", "stage": "forward", "candidates": {"torch": 2}},
         {"shape": [8, 32], "dtype": "float32", "stage": "forward", "candidates": {"torch": 3}}]
    merged = gpu_suite.merge_cases(a, b)
    assert [m["candidates"] for m in merged] == [{"jaxce": 1, "torch": 2}, {"torch": 3}]
    assert a[0]["candidates"] == {"jaxce": 1}  # inputs untouched

  def test_markdown_names_failures_and_targets(self):
    results = {"meta": {"smoke": True, "versions": {"jax": "0.1"}}, "linear": [
        {"shape": [4, 8, 16], "dtype": "bfloat16", "candidates": {
            "jaxce": {**entry(1.0, 2.0), "framework": "jax", "loss": 2.5, "loss_error": 1e-7,
                      "grad_error": {"hidden": 1e-3}},
            "liger": {"status": "skipped", "framework": "torch", "error": "No module liger"}}}],
               "train": {}, "errors": {"torch": "exit 1: Traceback\nValueError: bad"}}
    results["targets"] = gpu_suite.evaluate_targets(results)
    text = gpu_suite.render_markdown(results)
    assert "SMOKE RUN" in text and "skipped: No module liger" in text
    assert "hidden 1.00e-03" in text and "ValueError: bad" in text
    assert "jaxce time / liger time" in text and "| n/a |" in text

  def test_error_line_says_what_went_wrong(self):
    jax_error = ("AttributeError: no attribute varying\n--------------------\n"
                 "For simplicity, JAX has removed its internal frames")
    assert gpu_suite.error_line(jax_error) == "AttributeError: no attribute varying"
    stderr = "Traceback (most recent call last):\n  File 'x'\nValueError: a | b\nI1203 log\n"
    assert gpu_suite.error_line(stderr) == "ValueError: a / b"  # no table-breaking pipes
    assert gpu_suite.error_line("x\ntrain.py: error: no data\n") == "train.py: error: no data"
    assert gpu_suite.error_line("just text") == "just text"
    assert gpu_suite.error_line(None) == ""

  def test_stages(self):
    assert gpu_suite.stages("sparse", "bfloat16", False) == ("forward", "forward+backward")
    assert gpu_suite.stages("sparse", "float32", True) == ("forward", "forward+backward")
    assert gpu_suite.stages("dense", "float32", True) == ("forward+backward",)


def test_read_mnist_reads_the_idx_files(tmp_path):
  folder = write_mnist_dir(str(tmp_path), num_train=20, num_test=10)
  data = gpu_suite.read_mnist(folder)
  assert data["train"][0].shape == (20, 784) and data["train"][1].shape == (20,)
  assert data["test"][0].dtype == np.uint8 and data["test"][1].max() <= 9
  assert gpu_suite.read_mnist(folder, limit=8)["test"][0].shape == (4, 784)


class TestInstall:

  def test_wheel_names_are_normalised(self):
    assert gpu_install.wheel_name_version(
        "x/pydantic_core-2.50.5-cp312-cp312-manylinux2014_x86_64.whl") == ("pydantic-core",
                                                                          "2.50.5")

  def test_keeps_what_the_image_has_in_the_same_or_a_newer_version(self, tmp_path):
    have = gpu_install.installed_version("numpy")
    wheels = [str(tmp_path / f"numpy-{have}-cp312-cp312-any.whl"),
              str(tmp_path / "numpy-999.0-cp312-cp312-any.whl"),
              str(tmp_path / "jaxce-0.0.1-py3-none-any.whl"),
              str(tmp_path / "no_such_dist_here-1.0-py3-none-any.whl")]
    install, kept = gpu_install.choose(wheels)
    assert [os.path.basename(w).split("-")[:2] for w in install] == [
        ["jaxce", "0.0.1"], ["no_such_dist_here", "1.0"], ["numpy", "999.0"]]
    assert len(kept) == 1 and kept[0].startswith("numpy")

  def test_unpack_places_purelib_data_at_the_top(self, tmp_path):
    wheel = tmp_path / "demo-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
      z.writestr("demo/__init__.py", "X = 1\n")
      z.writestr("demo-1.0.data/purelib/extra.py", "Y = 2\n")
      z.writestr("demo-1.0.data/scripts/tool", "#!/bin/sh\n")
    gpu_install.unpack([str(wheel)], str(tmp_path / "site"))
    assert (tmp_path / "site" / "demo" / "__init__.py").exists()
    assert (tmp_path / "site" / "extra.py").exists()
    assert not (tmp_path / "site" / "tool").exists()


# ----------------------------------------------------------------------- the smoke run


@pytest.fixture(name="smoke", scope="module")
def fixture_smoke(tmp_path_factory):
  mnist = write_mnist_dir(str(tmp_path_factory.mktemp("mnist")), num_train=256, num_test=128)
  out = str(tmp_path_factory.mktemp("out"))
  env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
  start = time.perf_counter()
  proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "gpu_suite.py"),
                         "--smoke", "--out", out, "--mnist", mnist],
                        capture_output=True, text=True, timeout=600, check=False, cwd=REPO,
                        env=env)
  wall = time.perf_counter() - start
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(os.path.join(out, "gpu_suite.json")) as f:
    results = json.load(f)
  with open(os.path.join(out, "gpu_suite.md")) as f:
    markdown = f.read()
  return results, markdown, wall


def ok(candidate):
  assert candidate["status"] == "ok", candidate.get("error")
  assert candidate["time_ms"]["min"] > 0 and candidate["time_ms"]["rounds"] >= 1
  return candidate


def skipped_with_reason(candidate):
  return candidate["status"] in ("skipped", "failed") and candidate["error"].strip()


class TestSmokeRun:

  def test_linear_section(self, smoke):
    results, _, _ = smoke
    (case,) = results["linear"]
    cands = case["candidates"]
    for name in ("jaxce", "jaxce f32 accumulation", "naive jax", "naive optax f32 logits"):
      c = ok(cands[name])
      assert c["memory_mib"] is not None and c["loss_error"] < 1e-3
      assert set(c["grad_error"]) == {"hidden", "weight"}
      assert max(c["grad_error"].values()) < 2e-2  # bf16 rounding
    for name in ("tokamax chunked_xla", "tokamax xla"):
      if importlib.util.find_spec("tokamax") is None:
        assert skipped_with_reason(cands[name]) and "tokamax" in cands[name]["error"]
      else:
        ok(cands[name])
    torch_names = ("naive torch", "liger", "cce", "cce exact", "torch F.linear_cross_entropy")
    if HAS_TORCH:
      assert ok(cands["naive torch"])["loss"] == pytest.approx(cands["jaxce"]["loss"], rel=1e-3)
      for name in torch_names:
        assert cands[name]["status"] == "ok" or skipped_with_reason(cands[name]), name
    else:
      assert not set(torch_names) & set(cands)
      assert "torch does not import" in results["meta"]["torch_device"]

  def test_sparse_and_dense_sections(self, smoke):
    results, _, _ = smoke
    keys = {(tuple(c["shape"]), c["dtype"], c["stage"]) for c in results["sparse"]}
    n, c = gpu_suite.SMOKE_SPARSE_SHAPES[0]
    assert keys == {((n, c), "float32", "forward"), ((n, c), "float32", "forward+backward"),
                    ((n, c), "bfloat16", "forward+backward")}
    for case in results["sparse"] + results["dense"]:
      for name in ("jaxce", "optax", "floor"):
        ok(case["candidates"][name])
      if case["stage"] == "forward+backward":
        assert case["candidates"]["jaxce"]["grad_error"]["logits"] < 1e-2
      if case in results["sparse"] and case["dtype"] == "float32":  # the kernel designs
        for name in ("jaxce max-shift", "jaxce max-shift, recompute exp"):
          assert ok(case["candidates"][name])["loss_error"] < 1e-5
      if HAS_TORCH:
        ok(case["candidates"]["torch"])
      if case in results["sparse"] and HAS_TORCH:
        liger = case["candidates"]["liger"]
        assert liger["status"] == "ok" or skipped_with_reason(liger)
    assert [c["stage"] for c in results["dense"]] == ["forward+backward"]

  def test_train_section(self, smoke):
    results, _, _ = smoke
    train = results["train"]
    assert train["train.py"]["status"] == "ok", train["train.py"].get("error")
    assert train["train.py"]["wall_s"] > 0 and 0 <= train["train.py"]["test_accuracy_percent"]
    assert train["train.py"]["examples_per_s"] > 0
    assert train["step"]["status"] == "ok", train["step"].get("error")
    assert train["step"]["ratio_of_mins"] > 0
    for name in ("torch seed", "torch tuned"):
      if HAS_TORCH:
        assert train[name]["status"] == "ok", train[name].get("error")
        assert len(train[name]["epoch_ends_s"]) == 1 and train[name]["examples_per_s"] > 0
      else:
        assert train[name]["status"] == "skipped" and "torch" in train[name]["error"]

  def test_markdown_has_every_section_and_target(self, smoke):
    results, markdown, _ = smoke
    for heading in ("## Targets", "## Linear cross-entropy", "## Sparse cross-entropy",
                    "## Dense cross-entropy", "## train.py", "Steady-state step"):
      assert heading in markdown
    assert results["targets"] and all(t["target"] in markdown for t in results["targets"])
    assert len(results["targets"]) == 8 + 4 * 2 + 3  # linear 8, sparse fwd+bwd 4 x 2, train 3
    assert results["meta"]["versions"]["jax"] and results["meta"]["smoke"]
    assert not results["errors"], results["errors"]

  def test_smoke_run_is_quick(self, smoke):
    # Under a minute on two idle cores (its parts run side by side); loose for loaded machines.
    assert smoke[2] < 300
