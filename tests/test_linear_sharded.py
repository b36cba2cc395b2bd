"""linear_cross_entropy with ``mesh=`` (sharded.py): vocabulary-parallel on 8 fake CPU devices."""

from __future__ import annotations

import textwrap

import chex
import jax
import numpy as np
from absl.testing import absltest
from absl.testing import parameterized
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


if __name__ == "__main__":
  absltest.main()
