"""Stop signals: Ctrl-C (SIGINT) and a preemption's SIGTERM end a run the same way.

While a run trains, either signal raises :class:`Stop` in the main thread; :func:`deferred` holds
them back until a block (a checkpoint's save) is done. The process then exits with 128 + the
signal's number (130 for SIGINT, 143 for SIGTERM), as a shell reports a process the signal killed.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Stop(KeyboardInterrupt):
  """A stop signal arrived; ``signum`` says which."""

  def __init__(self, signum: int):
    super().__init__(signal.Signals(signum).name)
    self.signum = signum


def _raise_stop(signum, _frame):
  raise Stop(signum)


def _can_handle() -> bool:
  """Python handlers can be set (main thread) and restored (none was set from C)."""
  return threading.current_thread() is threading.main_thread() and all(
      signal.getsignal(s) is not None for s in STOP_SIGNALS)


@contextlib.contextmanager
def _handled_by(handler) -> Iterator[None]:
  if not _can_handle():
    yield
    return
  previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
  try:
    yield
  finally:
    for s, h in previous.items():
      signal.signal(s, h)


def stop_on_signals():
  """Turns SIGINT and SIGTERM into :class:`Stop` while the block runs."""
  return _handled_by(_raise_stop)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
  """Holds stop signals back until the block is done, then raises :class:`Stop`."""
  received = []
  with _handled_by(lambda signum, _: received.append(signum)):
    yield
  if received:
    raise Stop(received[0])


def signal_number(error: BaseException) -> int:
  """The signal behind a :class:`Stop`; a plain ``KeyboardInterrupt`` is Ctrl-C."""
  return getattr(error, "signum", signal.SIGINT)
