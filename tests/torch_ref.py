"""PyTorch as an optional reference: parity tests skip where it is not installed.

``needs_torch`` checks when the test runs, not when it is collected, so it also
reaches the cases that absl's ``parameterized`` generates (a ``pytest.mark``
on the undecorated method does not). Put it below the ``parameterized``
decorator, directly on the test function.
"""

from __future__ import annotations

import functools

import pytest

try:
  import torch
  import torch.nn.functional as F  # noqa: N812
except ImportError:  # pragma: no cover - torch is optional
  torch = F = None


def needs_torch(test):
  """Skips ``test`` at run time when PyTorch is not installed."""

  @functools.wraps(test)
  def wrapper(*args, **kwargs):
    if torch is None:
      pytest.skip("PyTorch is not installed")
    return test(*args, **kwargs)

  return wrapper
