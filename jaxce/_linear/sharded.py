"""Vocabulary-parallel execution: each pass runs per device under ``shard_map``.

Every device holds its tokens' rows (``hidden``, labels and per-row numbers,
split over the token axes) and its slice of the vocabulary (``weight``'s
columns, ``bias``, ``class_weights``, split over the vocabulary axis). The
passes merge per-row statistics over the vocabulary axis
(:func:`blocks.combine`) and :func:`reduce_grads` sums the partial gradients,
so no weight-sized array is gathered (Megatron's vocab-parallel
cross-entropy).

On a mesh of Explicit axes (``jax.make_mesh``'s default) shardings are part of
the arrays' types: inputs are resharded to the passes' specs first, and
without ``mesh=`` the layout is read from the types (:func:`layout_of`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxce import _common
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
                         bias=self.classes, class_weights=self.classes, softcap=P())

  @property
  def probs(self) -> P:
    """Probability targets ``[N, V]`` (and their gradient): tokens and vocabulary split."""
    return P(self.tokens or None, self.vocab_axis)

  @property
  def row_specs(self) -> blocks.Rows:
    """Specs of :class:`blocks.Rows`."""
    return blocks.Rows(self.rows, self.rows, self.rows, self.rows, self.probs)

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


def make_layout(mesh, token_axes, vocab_axis, num_rows: int, num_classes: int, fn: str,
                arrays=()) -> Layout:
  """The validated :class:`Layout` of ``linear_cross_entropy``'s mesh options (for ``arrays``)."""
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
  typed = any(any(_explicit_axes(x)) for x in arrays if x is not None)
  if mesh.explicit_axes and jax.sharding.get_abstract_mesh().empty and not typed:
    # Outside a mesh context JAX runs no op on Explicit types eagerly (a gradient's
    # first step included): for arrays of no Explicit type its devices serve as Auto axes.
    auto = (jax.sharding.AxisType.Auto,) * len(mesh.axis_names)
    mesh = jax.sharding.Mesh(mesh.devices, mesh.axis_names, axis_types=auto)
  return _checked(Layout(mesh, tokens, vocab), num_rows, num_classes, fn)


def _checked(layout: Layout, num_rows: int, num_classes: int, fn: str) -> Layout:
  tokens, vocab, shape = layout.tokens, layout.vocab, layout.mesh.shape
  if set(tokens) & set(vocab):
    raise ValueError(f"{fn}: token_axes {tokens} and vocab_axis {vocab} must not share an axis.")
  for axes, size, what in ((tokens, num_rows, "tokens"), (vocab, num_classes, "classes (V)")):
    parts = math.prod(shape[a] for a in axes)
    if size % parts:
      raise ValueError(f"{fn}: {size} {what} do not split evenly over mesh axes {axes} "
                       f"({parts} devices).")
  return layout


def _explicit_axes(x) -> tuple[tuple[str, ...], ...]:
  """Per dimension of ``x``, the Explicit mesh axes its type says it is split over."""
  sharding = getattr(jax.typeof(x), "sharding", None)
  explicit = set(getattr(getattr(sharding, "mesh", None), "explicit_axes", ()))
  if not explicit:
    return ((),) * x.ndim
  spec = tuple(sharding.spec) + (None,) * (x.ndim - len(sharding.spec))
  names = [(e,) if isinstance(e, str) else tuple(e or ()) for e in spec]
  return tuple(tuple(n for n in axes if n in explicit) for axes in names)


def layout_of(hidden, weight, num_rows: int, num_classes: int, fn: str) -> Layout:
  """The :class:`Layout` that Explicit shardings of ``hidden`` and ``weight`` ask for.

  Their tokens (``hidden``'s first axis) and classes (``weight``'s columns) may
  be split; a split feature dimension ``D`` is refused, as is a token split on
  any but the first of ``hidden``'s leading axes.
  """
  hidden_axes, weight_axes = _explicit_axes(hidden), _explicit_axes(weight)
  if not any(hidden_axes + weight_axes):
    return Layout()

  def refuse(name, x, why):
    raise ValueError(f"{fn}: {name} has sharding {jax.typeof(x).sharding.spec} on mesh axes "
                     f"{dict(jax.typeof(x).sharding.mesh.shape)}; {why}. Reshard it "
                     f"(jax.sharding.reshard) or pass mesh=, token_axes= and vocab_axis=.")

  if hidden_axes[-1]:
    refuse("hidden", hidden, "its feature dimension D must not be split")
  if any(hidden_axes[1:-1]):
    refuse("hidden", hidden, "only its first axis may split the tokens")
  if weight_axes[0]:
    refuse("weight", weight, "its feature dimension D must not be split")
  mesh = jax.typeof(hidden if any(hidden_axes) else weight).sharding.mesh
  layout = Layout(mesh, hidden_axes[0], weight_axes[1])
  if set(layout.tokens) & set(layout.vocab):
    refuse("weight", weight, f"it splits the classes over the tokens' axes {layout.tokens}")
  return _checked(layout, num_rows, num_classes, fn)


def place_inputs(layout: Layout, params: blocks.Params, labels, mask):
  """``(params, labels, mask)`` laid out as the passes read them (flat rows; mask may be None).

  ``labels`` are ``[N]`` class indices or ``[N, V]`` probability targets.

  On a mesh of Explicit axes each array is resharded to its spec; on one
  device, small arrays split beside an unsplit ``hidden`` and ``weight`` are
  gathered.
  """
  if layout.mesh is None:
    return blocks.Params(*params[:2], *map(unsplit, params[2:])), unsplit(labels), unsplit(mask)
  params = blocks.Params(*(place(layout, x, spec) for x, spec in zip(params, layout.params,
                                                                       strict=True)))
  labels_spec = layout.probs if labels.ndim == 2 else layout.rows
  return params, place(layout, labels, labels_spec), place(layout, mask, layout.rows)


def sum_rows(layout: Layout, x: jax.Array) -> jax.Array:
  """``Σ`` of per-row numbers, in one device's order (pairwise; XLA's sum for a symbolic count)."""
  if blocks.is_symbolic(x.shape[0]):
    return jnp.sum(x)
  return _common.pairwise_sum(replicated(layout, x))


def unsplit(x):
  """``x`` replicated if its type says Explicit mesh axes split it (single-device layouts)."""
  if x is None or not any(_explicit_axes(x)):
    return x
  return jax.sharding.reshard(x, P())


def is_explicit(layout: Layout) -> bool:
  """Whether the layout's mesh has Explicit axes (shardings are part of the arrays' types)."""
  return bool(layout.mesh is not None and layout.mesh.explicit_axes)


def place(layout: Layout, tree, spec: P):
  """``tree``'s arrays laid out as ``spec`` where the mesh's axes are Explicit.

  ``shard_map`` asks Explicit inputs to come with its ``in_specs``; the
  reshard's transpose gives each gradient its input's sharding. Auto axes are
  left to ``shard_map``.
  """
  if not is_explicit(layout):
    return tree
  return jax.tree.map(lambda x: jax.sharding.reshard(x, sharding(layout, spec)), tree)


def sharding(layout: Layout, spec: P):
  """``spec`` on the layout's mesh (a bare spec names the context mesh's axes)."""
  return NamedSharding(layout.mesh, spec) if isinstance(layout.mesh, jax.sharding.Mesh) else spec


def gather_rows(layout: Layout, per_class: jax.Array, index: jax.Array) -> jax.Array:
  """``per_class[index]``: each token's entry of a small per-class array, split as the tokens."""
  if not is_explicit(layout):
    return per_class[index]
  return replicated(layout, per_class).at[index].get(out_sharding=sharding(layout, layout.rows))


def replicated(layout: Layout, x):
  """``x`` on every device where the mesh's axes are Explicit (per-class or per-row numbers)."""
  return place(layout, x, P())


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
  if rest.softcap is not None and layout.vocab_axis is not None:  # each device had its classes
    rest = rest._replace(softcap=lax.psum(rest.softcap, layout.vocab))
  return rest._replace(hidden=hidden)


def run(layout: Layout, fn: Callable, args, in_specs, out_specs):
  """``fn(*args, layout)`` on one device, or per device under ``shard_map`` on ``layout.mesh``.

  ``in_specs``/``out_specs`` are :class:`PartitionSpec` prefixes of the
  arguments and outputs: one spec stands for every array of its subtree.
  """
  if layout.mesh is None:
    return fn(*args, layout)
  args = tuple(place(layout, a, s) if isinstance(s, P) else
               type(s)(*(place(layout, x, t) for x, t in zip(a, s, strict=True)))
               for a, s in zip(args, in_specs, strict=True))
  return _shard_map(lambda *a: fn(*a, layout), layout.mesh, tuple(in_specs), out_specs)(*args)


def _shard_map(f, mesh, in_specs, out_specs):
  """``jax.shard_map`` without replication checks (jax ≥ 0.6), or the experimental one."""
  if hasattr(jax, "shard_map"):
    return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
  from jax.experimental.shard_map import shard_map  # noqa: PLC0415 (older jax)

  return shard_map(f, mesh, in_specs, out_specs, check_rep=False)
