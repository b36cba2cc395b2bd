"""Data: MNIST on the devices, and each epoch as index arrays for the compiled calls.

The dataset lives on every local device as uint8 (a quarter of float32's memory and transfer);
the compiled steps normalise the rows each batch gathers. An epoch is a fresh
permutation cut into global batches; each global batch is split over all devices of all processes
in ``jax.pmap``'s order, and each process feeds only its own devices' shares. The last partial batch
is padded with masked rows, and the steps that fill up the last call hold no real example at all.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import jax_utils

from trainer import input_pipeline

AXIS = "batch"  # The pmap axis: all devices of all processes.
MEAN, STD = 0.1307, 0.3081


def load_data(data_dir: str, tfds_data_dir: str, *, num_train: int, num_test: int,
              seed: int) -> input_pipeline.Dataset:
  """MNIST (see :func:`input_pipeline.load_mnist`); N > 0 examples keeps a seeded, class-balanced
  subset of N (see :func:`input_pipeline.balanced_subset`)."""
  data = input_pipeline.load_mnist(data_dir, tfds_data_dir=tfds_data_dir)
  return input_pipeline.balanced_subset(data, num_train, num_test, seed=seed)


def normalize(images):
  """uint8 pixels to float32 scaled to [0, 1] and standardised with MNIST's mean and std.

  Works on numpy arrays (float32 out) and, inside the compiled steps, on jax arrays.
  """
  xp = np if isinstance(images, np.ndarray) else jnp
  return ((images.astype(xp.float32) / 255.0 - MEAN) / STD).astype(xp.float32)


class DeviceData(NamedTuple):
  """A split on every local device: uint8 ``images`` ``(devices, n, 784)`` and ``labels``."""

  images: jax.Array
  labels: jax.Array


def replicate(tree):
  """One copy per local device, sharded the way ``jax.pmap`` returns its outputs (no recompiles)."""
  return jax_utils.replicate(tree, axis_name=AXIS)


def put_on_devices(split: input_pipeline.Split) -> DeviceData:
  """Replicates a split onto every local device."""
  return DeviceData(*replicate((split.images, split.labels)))


class Topology(NamedTuple):
  """Where this process's devices sit among all devices (pmap's global order)."""

  num_devices: int
  device_offset: int
  local_devices: int


def current_topology() -> Topology:
  local = jax.local_device_count()
  return Topology(jax.device_count(), jax.process_index() * local, local)


def epoch_batches(num_examples: int, batch_size: int, *, seed: int,
                  epoch: int) -> tuple[np.ndarray, np.ndarray]:
  """An epoch as ``(steps, batch_size)`` indices and mask: fresh permutation, last batch padded."""
  perm = np.random.default_rng([seed, epoch]).permutation(num_examples)
  steps = -(-num_examples // batch_size)
  idx = np.zeros(steps * batch_size, np.int32)
  idx[:num_examples] = perm
  valid = np.arange(steps * batch_size) < num_examples
  return idx.reshape(steps, batch_size), valid.reshape(steps, batch_size)


def chunk_length(num_steps: int, max_steps_per_call: int) -> int:
  """Steps per compiled call: as even as possible with at most ``max_steps_per_call``."""
  calls = -(-num_steps // max_steps_per_call)
  return -(-num_steps // calls)


class Call(NamedTuple):
  """One compiled call's inputs for this process's devices.

  ``idx`` and ``valid`` are ``(local_devices, steps, batch / num_devices)``; ``count`` is
  ``(local_devices, steps)``: the real examples in each step's *global* batch. The call runs the
  first ``num_steps`` (``(local_devices,)``, all equal) steps; the rest only pad the shapes.
  """

  idx: np.ndarray
  valid: np.ndarray
  count: np.ndarray
  num_steps: np.ndarray

  @property
  def steps(self) -> int:
    return int(self.num_steps[0])


def _local_slices(a: np.ndarray, topo: Topology) -> np.ndarray:
  """``(..., num_devices * k)`` to this process's ``(local_devices, ..., k)``."""
  a = a.reshape(*a.shape[:-1], topo.num_devices, -1)
  a = a[..., topo.device_offset:topo.device_offset + topo.local_devices, :]
  return np.moveaxis(a, -2, 0)


def shard_calls(idx: np.ndarray, valid: np.ndarray, topo: Topology,
                steps_per_call: int) -> list[Call]:
  """Splits an epoch into calls of ``steps_per_call`` steps; the last may run fewer."""
  pad = -len(idx) % steps_per_call
  steps = np.minimum(len(idx) - np.arange(0, len(idx), steps_per_call), steps_per_call)
  idx, valid = np.pad(idx, ((0, pad), (0, 0))), np.pad(valid, ((0, pad), (0, 0)))
  count = np.broadcast_to(valid.sum(axis=1, dtype=np.float32), (topo.local_devices, len(idx)))
  calls = len(idx) // steps_per_call
  return [Call(_local_slices(i, topo), _local_slices(v, topo), c,
               np.full(topo.local_devices, n, np.int32))
          for i, v, c, n in zip(np.split(idx, calls), np.split(valid, calls),
                                np.split(count, calls, axis=1), steps, strict=True)]


class EvalLayout(NamedTuple):
  """The test set for this process's devices: ``(local_devices, chunks, batch)`` indices and
  mask, and ``num_chunks`` (``(local_devices,)``) to evaluate."""

  idx: np.ndarray
  valid: np.ndarray
  num_chunks: np.ndarray


def eval_layout(num_examples: int, batch_size: int, topo: Topology) -> EvalLayout:
  """Each test example exactly once."""
  per_device = -(-num_examples // topo.num_devices)
  batch_size = max(1, min(batch_size, per_device))
  chunks = -(-per_device // batch_size)
  total = topo.num_devices * chunks * batch_size
  idx = np.minimum(np.arange(total), max(num_examples - 1, 0)).astype(np.int32)
  valid = np.arange(total) < num_examples
  shape = (topo.num_devices, chunks, batch_size)
  sl = slice(topo.device_offset, topo.device_offset + topo.local_devices)
  return EvalLayout(idx.reshape(shape)[sl], valid.reshape(shape)[sl],
                    np.full(topo.local_devices, chunks, np.int32))
