"""linear_cross_entropy with ``mesh=`` (sharded.py): vocabulary-parallel on 8 fake CPU devices."""

from __future__ import annotations

import textwrap

import chex
import jax
import numpy as np
from absl.testing import absltest
from absl.testing import parameterized
from jax.sharding import PartitionSpec as P
from linear_helpers import make_inputs
from linear_helpers import run_on_devices

import jaxce

SHARDED_DRIVER = textwrap.dedent("""
    import json, re, sys
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import jaxce

    assert jax.device_count() == 8, jax.devices()
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
    n, d, v = 512, 16, 1024
    rng = np.random.default_rng(0)
    h = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(d, v)) * 0.3, jnp.float32)
    b = jnp.asarray(rng.normal(size=(v,)), jnp.float32)
    y = jnp.asarray(rng.integers(0, v, size=(n,)), jnp.int32).at[5].set(-100)
    cw = jnp.asarray(rng.uniform(0.5, 2.0, size=(v,)), jnp.float32)
    keep = jnp.asarray(np.arange(n) % 7 != 3)
    put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))
    hs, ws, bs = put(h, P("data", None)), put(w, P(None, "model")), put(b, P("model"))
    ys = put(y, P("data"))
    cws, keeps = put(cw, P("model")), put(keep, P("data"))
    out = {}
    for reduction in ("mean", "none"):
      opts = dict(ignore_index=-100, label_smoothing=0.1, z_loss=1e-3, reduction=reduction,
                  token_chunk_size=32, chunk_size=64)

      def make(**sharding):
        def loss(h, w, b, y, cw, keep):
          l = jaxce.linear_cross_entropy(h, w, y, bias=b, class_weights=cw, where=keep,
                                         **opts, **sharding)
          return jnp.sum(l * jnp.linspace(0.5, 1.5, n)) if l.ndim else l
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))

      one = make()(h, w, b, y, cw, keep)
      sharded_fn = make(mesh=mesh, token_axes="data", vocab_axis="model")
      compiled = sharded_fn.lower(hs, ws, bs, ys, cws, keeps).compile()
      got = compiled(hs, ws, bs, ys, cws, keeps)
      rel = lambda got: max(float(jnp.max(jnp.abs(a - c)) / (1e-6 + jnp.max(jnp.abs(c))))
                            for a, c in zip(jax.tree.leaves(got), jax.tree.leaves(one)))
      err = rel(got)
      if reduction == "mean":  # tokens split, vocabulary whole (data parallel only)
        err = max(err, rel(make(mesh=mesh, token_axes=("data", "model"))(h, w, b, y, cw, keep)))
      hlo = compiled.as_text()
      gathers = [int(np.prod([int(s) for s in m.split(",") if s]))
                 for m in re.findall(r"= f32\\[([0-9,]*)\\][^ ]* all-gather", hlo)]
      out[reduction] = dict(
          err=err, gathers=gathers,
          all_reduces=len(re.findall(r"all-reduce\\(|all-reduce-start\\(", hlo)),
          temp=compiled.memory_analysis().temp_size_in_bytes,
          grad_shardings=[str(g.sharding.spec) for g in got[1]])
    print(json.dumps(out))
""")

# Every kind of mesh users make, with values and gradients against one device: Explicit axes
# (jax.make_mesh's default) and Auto axes (Mesh(devices, names)), inside and outside
# jax.set_mesh, inputs placed or not, eager and under jit; then a Flax NNX LM head.
MESH_KINDS_DRIVER = textwrap.dedent(r"""
    import functools
    import json
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import jaxce

    assert jax.device_count() == 8, jax.devices()
    n, d, v = 64, 8, 32
    rng = np.random.default_rng(0)
    h = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(d, v)) * 0.3, jnp.float32)
    b = jnp.asarray(rng.normal(size=(v,)), jnp.float32)
    y = jnp.asarray(rng.integers(0, v, size=(n,)), jnp.int32)
    cw = jnp.asarray(rng.uniform(0.5, 2.0, size=(v,)), jnp.float32)
    cot = jnp.linspace(0.5, 1.5, n)
    specs = (P("data", None), P(None, "model"), P("model"), P("data"), P("model"))
    opts = dict(label_smoothing=0.1, chunk_size=4, token_chunk_size=8)

    def losses(reduction, **sharding):
      def loss(h, w, b, y, cw):
        out = jaxce.linear_cross_entropy(h, w, y, bias=b, class_weights=cw, reduction=reduction,
                                         **opts, **sharding)
        return jnp.sum(out * cot) if out.ndim else out
      return loss

    def grad(reduction, **sharding):
      return jax.value_and_grad(losses(reduction, **sharding), argnums=(0, 1, 2, 4))

    args = (h, w, b, y, cw)
    want = {r: jax.jit(grad(r))(*args) for r in ("mean", "none")}
    want_rows = jaxce.linear_cross_entropy(h, w, y, bias=b, class_weights=cw, **opts)

    def err(got, ref):
      return max(float(jnp.max(jnp.abs(jnp.asarray(a) - c)) / (1e-6 + jnp.max(jnp.abs(c))))
                 for a, c in zip(jax.tree.leaves(got), jax.tree.leaves(ref), strict=True))

    out = {}
    devices = np.array(jax.devices()).reshape(2, 4)
    meshes = {"explicit": jax.make_mesh((2, 4), ("data", "model")),
              "auto": Mesh(devices, ("data", "model"))}
    cases = [("explicit", c, p) for c in (False, True) for p in (False, True)]
    cases += [("auto", False, False), ("auto", True, True)]
    for kind, context, placed in cases:
      mesh = meshes[kind]
      key = f"{kind}{'+set_mesh' if context else ''}{'+sharded' if placed else ''}"
      sharding = dict(mesh=mesh, token_axes="data", vocab_axis="model")
      with (jax.set_mesh(mesh) if context else jax.sharding.use_abstract_mesh(
          jax.sharding.get_abstract_mesh())):
        xs = args
        if placed:
          xs = tuple(jax.device_put(a, NamedSharding(mesh, s)) for a, s in zip(args, specs))
        rows = jaxce.linear_cross_entropy(xs[0], xs[1], xs[3], bias=xs[2], class_weights=xs[4],
                                          **opts, **sharding)
        # Eager differentiation of Explicit types needs a mesh context (JAX's rule).
        eager_grad = (want["none"] if kind == "explicit" and placed and not context
                      else grad("none", **sharding)(*xs))
        jit_grad = jax.jit(grad("mean", **sharding))(*xs)
      out[key] = dict(
          err=max(err(rows, want_rows), err(eager_grad, want["none"]), err(jit_grad, want["mean"]),
                  ),
          rows_spec=str(rows.sharding.spec) if placed and kind == "explicit" else None,
          grad_specs=[str(g.sharding.spec) for g in jit_grad[1]] if placed else None,
          eager_grad_specs=[str(getattr(g.sharding, "spec", None)) for g in eager_grad[1]]
          if placed else None)

    try:
      from flax import nnx
    except ImportError:
      nnx = None
    if nnx is not None:  # an LM head whose weight is split over the vocabulary
      class Head(nnx.Module):
        def __init__(self, kernel):
          self.kernel = nnx.Param(kernel)

        def __call__(self, h, y, **sharding):
          return jaxce.linear_cross_entropy(h, self.kernel[...], y, reduction="mean", **sharding)

      def step(model, h, y, **sharding):
        return nnx.value_and_grad(lambda m: m(h, y, **sharding))(model)

      mesh = meshes["explicit"]
      ref_loss, ref_grads = nnx.jit(step)(Head(w), h, y)
      for context in (False, True):
        with (jax.set_mesh(mesh) if context else jax.sharding.use_abstract_mesh(
            jax.sharding.get_abstract_mesh())):
          model = Head(jax.device_put(w, NamedSharding(mesh, P(None, "model"))))
          hs, ys = jax.device_put(h, NamedSharding(mesh, P("data"))), jax.device_put(
              y, NamedSharding(mesh, P("data")))
          loss, grads = nnx.jit(functools.partial(step, mesh=mesh, token_axes="data",
                                                  vocab_axis="model"))(model, hs, ys)
        out[f"nnx{'+set_mesh' if context else ''}"] = dict(
            err=err((loss, grads.kernel[...]), (ref_loss, ref_grads.kernel[...])),
            grad_specs=[str(grads.kernel[...].sharding.spec)])
    print(json.dumps(out))
""")

# Without mesh=: arrays whose Explicit shardings split the tokens (and the vocabulary) run as they
# are split, under jax.set_mesh; Auto meshes leave the partitioning to XLA; a split feature
# dimension is refused by name.
EXPLICIT_DRIVER = textwrap.dedent(r"""
    import functools
    import json
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, PartitionSpec as P
    import jaxce

    assert jax.device_count() == 8, jax.devices()
    n, d, v = 64, 8, 32
    rng = np.random.default_rng(0)
    h = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(d, v)) * 0.3, jnp.float32)
    y = jnp.asarray(rng.integers(0, v, size=(n,)), jnp.int32)
    opts = dict(label_smoothing=0.1, token_chunk_size=8, chunk_size=8)
    mean = functools.partial(jaxce.linear_cross_entropy, reduction="mean", **opts)
    step = jax.jit(jax.value_and_grad(mean, argnums=(0, 1)))
    rows = jax.jit(functools.partial(jaxce.linear_cross_entropy, **opts))
    want, want_rows = step(h, w, y), rows(h, w, y)

    def err(got, ref):
      return max(float(jnp.max(jnp.abs(jnp.asarray(a) - c)) / (1e-6 + jnp.max(jnp.abs(c))))
                 for a, c in zip(jax.tree.leaves(got), jax.tree.leaves(ref), strict=True))

    out = {}
    devices = np.array(jax.devices())
    meshes = {"explicit": (jax.make_mesh((8,), ("data",)), (P("data", None), P(), P("data"))),
              "explicit-2d": (jax.make_mesh((2, 4), ("data", "model")),
                              (P("data", None), P(None, "model"), P("data"))),
              "auto": (Mesh(devices, ("data",)), (P("data", None), P(), P("data")))}
    for kind, (mesh, specs) in meshes.items():
      with jax.set_mesh(mesh):
        xs = [jax.device_put(a, s) for a, s in zip((h, w, y), specs)]
        got, got_rows = step(*xs), rows(*xs)
      out[kind] = dict(err=max(err(got, want), err(got_rows, want_rows)),
                       grad_specs=[str(g.sharding.spec) for g in got[1]],
                       same_shardings=[g.sharding.is_equivalent_to(x.sharding, x.ndim)
                                       for g, x in zip(got[1], xs, strict=False)],
                       rows_spec=str(got_rows.sharding.spec))

    mesh = jax.make_mesh((2, 4), ("data", "model"))
    errors = {}
    for name, specs in (("hidden", (P(None, "model"), P())), ("weight", (P(), P("model", None)))):
      with jax.set_mesh(mesh):
        xs = [jax.device_put(a, s) for a, s in zip((h, w), specs)]
        try:
          step(*xs, y)
          errors[name] = None
        except Exception as e:  # noqa: BLE001 (the message is the result)
          errors[name] = f"{type(e).__name__}: {e}"
    out["errors"] = errors
    with jax.set_mesh(jax.make_mesh((8,), ("data",))):  # only the labels split: gathered
      out["labels-only"] = dict(err=err(step(h, w, jax.device_put(y, P("data"))), want))
    print(json.dumps(out))
""")

# docs/linear_cross_entropy.md's examples on 8 devices (pytest runs them on one).
DOCS_DRIVER = textwrap.dedent("""
    import doctest, json
    import jax
    assert jax.device_count() == 8, jax.devices()
    flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    result = doctest.testfile("docs/linear_cross_entropy.md", module_relative=False,
                              optionflags=flags)
    print(json.dumps(dict(failed=result.failed, attempted=result.attempted)))
""")


# Probability targets and the auxiliary outputs on a mesh: Explicit axes under set_mesh with
# placed inputs, and Auto axes; values, gradients (hidden, weight, bias, targets) and aux.
PROBS_AUX_DRIVER = textwrap.dedent(r"""
    import json, re
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import jaxce

    assert jax.device_count() == 8, jax.devices()
    n, d, v = 64, 8, 32
    rng = np.random.default_rng(0)
    h = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(d, v)) * 0.5, jnp.float32)
    b = jnp.asarray(rng.normal(size=(v,)), jnp.float32)
    q = jnp.asarray(rng.dirichlet(np.ones(v), size=n), jnp.float32)
    y = jnp.asarray(rng.integers(0, v, size=(n,)), jnp.int32)
    c = jnp.linspace(-1.0, 1.0, n)

    def objective(reduction, labels, **sharding):
      def f(h, w, b, t):
        loss, aux = jaxce.linear_cross_entropy(h, w, t if labels == "probs" else y, bias=b,
                                               reduction=reduction, label_smoothing=0.1,
                                               return_aux=True, chunk_size=4, token_chunk_size=8,
                                               **sharding)
        value = loss if loss.ndim == 0 else jnp.sum(jnp.sin(loss))
        return value + jnp.sum(c * aux.lse), aux
      return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3), has_aux=True))

    def err(got, ref):
      return max(float(jnp.max(jnp.abs(jnp.asarray(a, jnp.float32) - jnp.asarray(r, jnp.float32)))
                       / (1e-6 + jnp.max(jnp.abs(jnp.asarray(r, jnp.float32)))))
                 for a, r in zip(jax.tree.leaves(got), jax.tree.leaves(ref), strict=True))

    out = {}
    specs = (P("data", None), P(None, "model"), P("model"), P("data", "model"))
    meshes = {"explicit": jax.make_mesh((2, 4), ("data", "model")),
              "auto": Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))}
    for kind, mesh in meshes.items():
      for reduction in ("mean", "none"):
        for labels in ("probs", "indices"):
          want = objective(reduction, labels)(h, w, b, q)
          sharding = dict(mesh=mesh, token_axes="data", vocab_axis="model")
          with jax.set_mesh(mesh):
            args = tuple(jax.device_put(a, NamedSharding(mesh, s))
                         for a, s in zip((h, w, b, q), specs))
            fn = objective(reduction, labels, **sharding)
            got = fn(*args)
            hlo = fn.lower(*args).compile().as_text()
          gathers = [int(np.prod([int(s) for s in m.split(",") if s]))
                     for m in re.findall(r"= \w+\[([0-9,]*)\][^ ]* all-gather", hlo)]
          key = f"{kind}-{reduction}-{labels}"
          out[key] = dict(err=err(got, want),
                          predicted_equal=bool(jnp.all(got[0][1].predicted
                                                       == want[0][1].predicted)),
                          correct=int(jnp.sum(got[0][1].correct)),
                          grad_specs=[str(g.sharding.spec) for g in got[1]],
                          lse_spec=str(got[0][1].lse.sharding.spec), gathers=gathers)
    print(json.dumps(out))
""")


class ShardedTest(parameterized.TestCase):
  """Vocabulary-parallel ``shard_map`` path; multi-device cases run in one subprocess each."""

  def test_mesh_validation(self):
    hidden, weight, _, labels = make_inputs(n=12, v=20)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
    with self.assertRaisesRegex(ValueError, "'vocab' is not an axis of the mesh"):
      jaxce.linear_cross_entropy(hidden, weight, labels, mesh=mesh, vocab_axis="vocab")
    with self.assertRaisesRegex(ValueError, "must not share an axis"):
      jaxce.linear_cross_entropy(hidden, weight, labels, mesh=mesh, token_axes="data",
                                 vocab_axis="data")
    # A one-device mesh runs the sharded code path and gives the same result.
    chex.assert_trees_all_close(
        jaxce.linear_cross_entropy(hidden, weight, labels, mesh=mesh, token_axes="data",
                                   vocab_axis="model", reduction="mean"),
        jaxce.linear_cross_entropy(hidden, weight, labels, reduction="mean"), rtol=1e-6)

  def test_vocab_parallel_matches_one_device_without_gathering_the_weight(self):
    results = run_on_devices(SHARDED_DRIVER)
    n, d, v = 512, 16, 1024
    local_logits = (n // 2) * (v // 4) * 4
    for reduction, r in results.items():
      with self.subTest(reduction=reduction):
        self.assertLess(r["err"], 1e-5)
        # Per-row statistics only: nothing near a weight shard (d · v/4 elements) is gathered.
        self.assertTrue(all(size < d * v // 4 // 4 for size in r["gathers"]), r["gathers"])
        self.assertGreater(r["all_reduces"], 0)
        # No device holds a buffer as large as its full local logits block.
        self.assertLess(r["temp"], local_logits)
        self.assertEqual(r["grad_shardings"][1], str(jax.sharding.PartitionSpec(None, "model")))

  def test_every_kind_of_mesh_matches_one_device(self):
    results = run_on_devices(MESH_KINDS_DRIVER)
    specs = [str(P("data", None)), str(P(None, "model")), str(P("model")), str(P("model"))]
    self.assertIn("nnx+set_mesh", results)
    for case, r in results.items():
      with self.subTest(case=case):
        self.assertLess(r["err"], 1e-5)
        if case.startswith("nnx"):
          self.assertEqual(r["grad_specs"], specs[1:2])
        elif "sharded" in case:  # each gradient has its input's sharding
          self.assertEqual(r["grad_specs"], specs)
          if "set_mesh" in case:
            self.assertEqual(r["eager_grad_specs"], specs)
          if case.startswith("explicit"):
            self.assertEqual(r["rows_spec"], str(P("data")))

  def test_explicit_shardings_without_a_mesh_argument(self):
    results = run_on_devices(EXPLICIT_DRIVER)
    for case in ("explicit", "explicit-2d", "auto"):
      with self.subTest(case=case):
        r = results[case]
        self.assertLess(r["err"], 1e-5)
        self.assertEqual(r["rows_spec"], str(P("data")))
        if case != "auto":  # Explicit types: each gradient has its input's sharding
          self.assertEqual(r["same_shardings"], [True, True], r["grad_specs"])
    self.assertLess(results["labels-only"]["err"], 1e-5)
    for name, message in results["errors"].items():
      with self.subTest(refused=name):
        self.assertRegex(message, rf"ValueError: .*: {name} has sharding P\(.*'model'.*\) on mesh "
                                  r"axes .*feature dimension D must not be split")

  def test_probability_targets_and_aux_match_one_device(self):
    results = run_on_devices(PROBS_AUX_DRIVER)
    self.assertLen(results, 8)
    for case, r in results.items():
      with self.subTest(case=case):
        self.assertLess(r["err"], 1e-5)
        self.assertTrue(r["predicted_equal"])
        # Per-row numbers only: nothing near one device's share of the targets (64·32/8).
        self.assertTrue(all(size < 64 * 32 // 8 for size in r["gathers"]), r["gathers"])
        if case.startswith("explicit"):  # each gradient has its input's sharding
          self.assertEqual(r["grad_specs"], [str(P("data", None)), str(P(None, "model")),
                                             str(P("model")), str(P("data", "model"))])
          self.assertEqual(r["lse_spec"], str(P("data")))

  def test_docs_examples_on_eight_devices(self):
    result = run_on_devices(DOCS_DRIVER)
    self.assertGreater(result["attempted"], 0)
    self.assertEqual(result["failed"], 0)


if __name__ == "__main__":
  absltest.main()
