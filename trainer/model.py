"""Model: the ReLU MLP and its SGD-momentum training state."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from flax.training import train_state

NUM_INPUTS = 28 * 28
# The standard deviation of a standard normal truncated to (-2, 2), as jax.nn.initializers uses.
_TRUNCATED_STD = 0.87962566103423978


class MLP(nn.Module):
  """ReLU multilayer perceptron; returns logits. Kernels lecun_normal, biases zero."""

  features: Sequence[int] = (512, 256, 128, 64)
  num_classes: int = 10

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    init = nn.initializers.lecun_normal()
    for width in self.features:
      x = nn.relu(nn.Dense(width, kernel_init=init)(x))
    return nn.Dense(self.num_classes, kernel_init=init)(x)


def create_train_state(seed: int, *, features: Sequence[int], learning_rate: float,
                       momentum: float) -> train_state.TrainState:
  """The MLP's initial parameters (see :func:`init_params`) and ``optax.sgd`` with momentum."""
  model, tx = _model_and_optimizer(tuple(features), learning_rate, momentum)
  return _create(init_params(seed, model), model, tx)


@functools.cache
def _model_and_optimizer(features: tuple[int, ...], learning_rate: float, momentum: float):
  """One model and one optimiser object per hyperparameters.

  They are static parts of the train state, so the compiled steps are keyed on them: sharing
  them lets every run in a process (tests, notebooks) reuse the steps instead of compiling again.
  """
  return MLP(features=features), optax.sgd(learning_rate=learning_rate, momentum=momentum)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _create(params, model: MLP, tx: optax.GradientTransformation) -> train_state.TrainState:
  return train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)


def init_params(seed: int, model: MLP) -> dict:
  """``model``'s parameters drawn as its lecun_normal initialiser does, with numpy on the host.

  XLA:CPU spends seconds compiling Flax's jitted initialisers (threefry bits and an ``erf_inv``
  per layer), as long as the whole training step takes to compile. numpy draws the same
  distribution (kernels: a normal truncated to two standard deviations, scaled to variance
  1 / fan_in; biases: zero) in milliseconds, deterministically from ``seed``.
  """
  rng = np.random.default_rng(seed)
  abstract = jax.eval_shape(model.init, jax.ShapeDtypeStruct((2,), jnp.uint32),
                            jax.ShapeDtypeStruct((1, NUM_INPUTS), jnp.float32))["params"]

  def draw(path, leaf):
    if path[-1].key == "bias":
      return np.zeros(leaf.shape, leaf.dtype)
    std = np.sqrt(1.0 / leaf.shape[0]) / _TRUNCATED_STD
    return (truncated_normal(rng, leaf.shape) * std).astype(leaf.dtype)

  return jax.tree_util.tree_map_with_path(draw, abstract)


def truncated_normal(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
  """Standard normal samples conditioned on (-2, 2): the ones outside are drawn again."""
  x = rng.standard_normal(shape)
  outside = np.abs(x) >= 2
  while outside.any():
    x[outside] = rng.standard_normal(np.count_nonzero(outside))
    outside = np.abs(x) >= 2
  return x
