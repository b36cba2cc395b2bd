"""Run-time label checks for jitted code, via ``jax.experimental.checkify``."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from jax.experimental import checkify

try:  # A context in jit's cache key: a program traced outside ``checked`` holds no check.
  from jax._src import config as _jax_config

  _ENABLED = _jax_config.bool_state(
      "jaxce_runtime_checks", False,
      "Trace jaxce's run-time value checks (set by jaxce.checked).", include_in_jit_key=True,
      include_in_trace_context=True)
except (ImportError, AttributeError, TypeError):  # pragma: no cover
  _ENABLED = None


def enabled() -> bool:
  """True while :func:`checked` traces: the losses then add their ``checkify`` checks."""
  return True if _ENABLED is None else bool(_ENABLED.value)


def checked(fn: Callable[..., Any]) -> Callable[..., Any]:
  """Wraps ``fn`` so that invalid labels inside it raise, even under ``jit``.

  Eagerly, jaxce's losses raise ``ValueError`` on out-of-range labels. Inside
  ``jax.jit`` the values are unknown at trace time, so such examples give NaN;
  ``checked`` runs ``fn`` under :func:`jax.experimental.checkify.checkify` and
  raises ``checkify.JaxRuntimeError`` naming the loss and the number of bad
  labels. The check costs one reduction; without ``checked`` the losses trace
  no check at all, so their programs hold no ``checkify`` effect (``jax.export``
  serializes them).

  Args:
    fn: any function calling jaxce losses, typically already ``jax.jit``-ed
      (the error is raised by the wrapper, outside the compiled call).

  Returns:
    A function with ``fn``'s signature and outputs that raises on a failed check.

  Examples:
    >>> import jax, jaxce
    >>> loss = jax.jit(lambda x, y: jaxce.sparse_cross_entropy(x, y, reduction="mean"))
    >>> jaxce.checked(loss)(jnp.zeros((2, 3)), jnp.array([0, 3]))
    Traceback (most recent call last):
      ...
    jax...JaxRuntimeError: jaxce.sparse_cross_entropy: labels must be in [0, 3); got 1 bad...
  """
  checked_fn = checkify.checkify(fn, errors=checkify.user_checks)

  @functools.wraps(fn)
  def wrapper(*args: Any, **kwargs: Any) -> Any:
    if _ENABLED is None:
      err, out = checked_fn(*args, **kwargs)
    else:
      with _ENABLED(True):
        err, out = checked_fn(*args, **kwargs)
    err.throw()
    return out

  return wrapper
