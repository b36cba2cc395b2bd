"""Doctest namespace: ``jnp`` is available in every docstring example."""

import jax.numpy as jnp
import pytest


@pytest.fixture(autouse=True)
def _doctest_namespace(doctest_namespace):
  doctest_namespace["jnp"] = jnp
