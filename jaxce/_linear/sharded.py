"""Vocabulary-parallel execution: each pass runs per device under ``shard_map``.

Every device holds its tokens' rows (``hidden``, labels and per-row numbers,
split over the token axes) and its slice of the vocabulary (``weight``'s
columns, ``bias``, ``class_weights``, split over the vocabulary axis). The
passes merge per-row statistics over the vocabulary axis
(:func:`blocks.combine`) and :func:`reduce_grads` sums the partial gradients,
so no weight-sized array is gathered (Megatron's vocab-parallel
cross-entropy).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any
from typing import NamedTuple

import jax
from jax import lax
from jax.sharding import PartitionSpec as P

from jaxce._linear import blocks


class Layout(NamedTuple):
  """Where a pass runs: on one device (``mesh`` None) or vocabulary-parallel on a mesh.

  Inside ``shard_map`` the passes read the axis names from the same value.
  """

  mesh: jax.sharding.Mesh | None = None
  tokens: tuple[str, ...] = ()  # mesh axes the tokens are split over
  vocab: tuple[str, ...] = ()  # mesh axes the vocabulary is split over

  @property
  def vocab_axis(self) -> tuple[str, ...] | None:
    """The axis names per-row statistics are combined over, or None."""
    return self.vocab or None

  @property
  def rows(self) -> P:
    """Arrays with one entry (or row) per token: split over the token axes."""
    return P(self.tokens or None)

  @property
  def classes(self) -> P:
    """Arrays with one entry per class: split over the vocabulary axis."""
    return P(self.vocab_axis)

  @property
  def params(self) -> blocks.Params:
    """Specs of the parameters."""
    return blocks.Params(hidden=P(self.tokens or None, None), weight=P(None, self.vocab_axis),
                         bias=self.classes, class_weights=self.classes)

  @property
  def grads(self) -> blocks.Grads:
    """Specs of the gradients: each its parameter's."""
    return blocks.Grads(*self.params)


def _axis_names(value: Any, name: str, fn: str) -> tuple[str, ...]:
  if value is None:
    return ()
  names = (value,) if isinstance(value, str) else value
  if not isinstance(names, (tuple, list)) or not all(isinstance(n, str) for n in names):
    raise TypeError(f"{fn}: {name} must be a mesh axis name, a tuple of names or None; "
                    f"got {value!r}.")
  return tuple(names)


def make_layout(mesh, token_axes, vocab_axis, num_rows: int, num_classes: int, fn: str) -> Layout:
  """The validated :class:`Layout` of ``linear_cross_entropy``'s mesh options."""
  tokens = _axis_names(token_axes, "token_axes", fn)
  vocab = _axis_names(vocab_axis, "vocab_axis", fn)
  if mesh is None:
    if tokens or vocab:
      raise ValueError(f"{fn}: token_axes and vocab_axis need a mesh.")
    return Layout()
  if not isinstance(mesh, jax.sharding.Mesh):
    raise TypeError(f"{fn}: mesh must be a jax.sharding.Mesh or None; got {type(mesh).__name__}.")
  for axis in tokens + vocab:
    if axis not in mesh.shape:
      raise ValueError(f"{fn}: {axis!r} is not an axis of the mesh {dict(mesh.shape)}.")
  if set(tokens) & set(vocab):
    raise ValueError(f"{fn}: token_axes {tokens} and vocab_axis {vocab} must not share an axis.")
  for axes, size, what in ((tokens, num_rows, "tokens"), (vocab, num_classes, "classes (V)")):
    parts = math.prod(mesh.shape[a] for a in axes)
    if size % parts:
      raise ValueError(f"{fn}: {size} {what} do not split evenly over mesh axes {axes} "
                       f"({parts} devices).")
  return Layout(mesh, tokens, vocab)


def vocab_offset(layout: Layout, num_local_classes: int):
  """Global index of this device's first vocabulary column."""
  axis = layout.vocab_axis
  return 0 if axis is None else lax.axis_index(axis) * num_local_classes


def reduce_grads(grads: blocks.Grads, layout: Layout) -> blocks.Grads:
  """Sums the per-device partial gradients: hidden over the vocabulary, the rest over tokens."""
  if layout.mesh is None:
    return grads
  hidden = grads.hidden if layout.vocab_axis is None else lax.psum(grads.hidden, layout.vocab)
  rest = grads._replace(hidden=None)
  if layout.tokens:
    rest = lax.psum(rest, layout.tokens)
  return rest._replace(hidden=hidden)


def run(layout: Layout, fn: Callable, args, in_specs, out_specs):
  """``fn(*args, layout)`` on one device, or per device under ``shard_map`` on ``layout.mesh``.

  ``in_specs``/``out_specs`` are :class:`PartitionSpec` prefixes of the
  arguments and outputs: one spec stands for every array of its subtree.
  """
  if layout.mesh is None:
    return fn(*args, layout)
  out_shape = jax.eval_shape(lambda *a: fn(*a, Layout()), *args)  # structure only
  return _shard_map(lambda *a: fn(*a, layout), layout.mesh, _expand(in_specs, args),
                    _expand(out_specs, out_shape))(*args)


def _expand(specs, tree):
  """The full tree of specs of ``tree``, from a prefix of it."""
  return jax.tree.map(lambda spec, sub: jax.tree.map(lambda _: spec, sub), specs, tree,
                      is_leaf=lambda s: isinstance(s, P))


def _shard_map(f, mesh, in_specs, out_specs):
  """``jax.shard_map`` without replication checks (jax ≥ 0.6), or the experimental one."""
  if hasattr(jax, "shard_map"):
    return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
  from jax.experimental.shard_map import shard_map  # noqa: PLC0415 (older jax)

  return shard_map(f, mesh, in_specs, out_specs, check_rep=False)
