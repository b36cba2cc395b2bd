"""What an array's type says about its sharding: explicit mesh axes and symbolic dimensions.

Under ``jax.sharding.set_mesh`` with a mesh of Explicit axes (``jax.make_mesh``'s
default), an array's type carries the mesh axes each dimension is split over,
and JAX refuses operations whose output sharding it cannot infer. The helpers
here read that type so the losses can keep sharded dimensions whole, and give
the cotangents of custom VJPs their primals' types. Auto axes (``Mesh(devices,
names)``) are invisible in types: XLA partitions those programs itself.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

try:
  from jax.export import is_symbolic_dim as _is_symbolic_dim
except ImportError:  # pragma: no cover
  _is_symbolic_dim = None


def is_symbolic(dim: Any) -> bool:
  """True for a symbolic dimension (``jax.export.symbolic_shape``)."""
  if _is_symbolic_dim is not None:
    return _is_symbolic_dim(dim)
  return not isinstance(dim, int)


def explicit_axes(x: Any) -> tuple[tuple[str, ...], ...]:
  """Per dimension of ``x``, the Explicit mesh axes it is split over (``()`` when none)."""
  ndim = jnp.ndim(x)
  try:
    sharding = jax.typeof(x).sharding
    mesh, spec = sharding.mesh, sharding.spec
    explicit = set(mesh.explicit_axes)
  except (AttributeError, TypeError):
    return ((),) * ndim
  if not explicit:
    return ((),) * ndim
  out = []
  for entry in tuple(spec) + (None,) * (ndim - len(spec)):
    names = entry if isinstance(entry, tuple) else (() if entry is None else (entry,))
    out.append(tuple(n for n in names if n in explicit))
  return tuple(out)


def is_explicitly_sharded(x: Any) -> bool:
  return any(explicit_axes(x))


def shard_counts(x: jax.Array) -> tuple[int, ...]:
  """Per dimension, the number of pieces the Explicit mesh axes split it into."""
  axes = explicit_axes(x)
  if not any(axes):
    return (1,) * x.ndim
  mesh = jax.typeof(x).sharding.mesh
  return tuple(math.prod(mesh.shape[n] for n in names) for names in axes)


def split_axes_first(x: jax.Array) -> tuple[int, ...]:
  """An order of ``x``'s axes that puts those split over Explicit mesh axes first.

  Flattening axes in that order keeps each device's elements together, so JAX
  can merge them without moving data; the identity for unsplit arrays.
  """
  axes = explicit_axes(x)
  return tuple(sorted(range(x.ndim), key=lambda d: not axes[d]))


def rows_like(labels: jax.Array, x: jax.Array) -> jax.Array:
  """Per-row ``labels [...]`` laid out as the rows of ``x [..., C]`` (labels are small to move)."""
  want = explicit_axes(x)[:-1]
  if want == explicit_axes(labels):
    return labels
  spec = jax.sharding.PartitionSpec(*(n if n else None for n in want))
  return jax.sharding.reshard(labels, spec)


def replicated(x: jax.Array) -> jax.Array:
  """``x`` on every device of the context mesh (small per-class arrays gathered by labels).

  Under a mesh of Explicit axes a gather needs its operand on that mesh, even
  an operand made outside it.
  """
  if x is None:
    return x
  if is_explicitly_sharded(x) or in_explicit_mesh():
    return jax.sharding.reshard(x, jax.sharding.PartitionSpec())
  return x


def in_explicit_mesh() -> bool:
  """True under ``set_mesh`` of a mesh with Explicit axes (array types then carry shardings)."""
  mesh = jax.sharding.get_abstract_mesh()
  return not mesh.empty and bool(mesh.explicit_axes)


@dataclasses.dataclass(frozen=True)
class ArrayType:
  """The parts of an array's type a cotangent must match: its explicit sharding and,
  inside ``shard_map``, the manual axes it varies over.

  A static pytree leaf-less node, so custom-VJP rules can keep it among their
  residuals (a residual's own type may change between the two rules).
  """

  explicit: tuple[tuple[str, ...], ...]
  varying: frozenset


jax.tree_util.register_static(ArrayType)


def type_of(x: jax.Array | None) -> ArrayType | None:
  return None if x is None else ArrayType(explicit_axes(x), _varying(x))


def like(value: jax.Array | None, primal: ArrayType | None) -> jax.Array | None:
  """``value`` (a cotangent) given the type ``primal`` recorded by :func:`type_of`.

  Varying manual axes the primal does not vary over are summed, as JAX's own
  transpose of the implicit broadcast does; the explicit sharding is resharded.
  """
  if value is None or primal is None:
    return value
  value = jnp.asarray(value)
  extra = tuple(sorted(_varying(value) - primal.varying))
  if extra:
    value = lax.psum(value, extra)
  missing = tuple(sorted(primal.varying - _varying(value)))
  if missing:
    pcast = getattr(lax, "pcast", None)
    value = pcast(value, missing, to="varying") if pcast else lax.pvary(value, missing)
  if explicit_axes(value) != primal.explicit:
    spec = jax.sharding.PartitionSpec(*(n if n else None for n in primal.explicit))
    value = jax.sharding.reshard(value, spec)
  return value


def _varying(x) -> frozenset:
  """The manual (``shard_map``) axes ``x`` varies over."""
  try:
    aval = jax.typeof(x)
  except TypeError:
    return frozenset()
  mat = getattr(aval, "manual_axis_type", None)  # jax >= 0.10
  if mat is not None:
    return frozenset(mat.varying)
  return frozenset(getattr(aval, "vma", ()) or ())
