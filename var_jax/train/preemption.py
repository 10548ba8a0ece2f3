"""SIGTERM (preemption) as a flag that a training loop polls: finish the step, save, exit."""
from __future__ import annotations

import signal

import jax


class StopFlag:
  """`stop = StopFlag().install()` ... `if stop.requested:` save and leave ... `stop.restore()`
  (or `with StopFlag() as stop:`).

  In a single process the flag is set by SIGTERM; with several processes the
  local handler is not installed (jax.distributed's preemption service makes all
  hosts agree on the step, via CheckpointManager.reached_preemption).
  """

  def __init__(self):
    self.requested = False
    self._old = None

  def install(self) -> 'StopFlag':
    self.requested = False
    if jax.process_count() == 1:
      try:
        self._old = signal.signal(signal.SIGTERM, self._on_sigterm)
      except ValueError:   # not the main thread: no handler, the loop runs to its end
        self._old = None
    return self

  def _on_sigterm(self, signum, frame):
    del signum, frame
    self.requested = True

  def restore(self) -> None:
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)
      self._old = None

  def __enter__(self) -> 'StopFlag':
    return self.install()

  def __exit__(self, *exc) -> None:
    self.restore()
