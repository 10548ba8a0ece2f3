"""Metrics writer: TensorBoard event files (tensorboardX), a metrics.jsonl log and stdout.

Reuse: `w = Writer(workdir)`; `w.scalars(step, {'loss': 1.2}, prefix='train')`;
`w.text('config', cfg.to_json())`; `w.close()`. Only process 0 writes (other
processes get a no-op writer), so call it unconditionally from every host.
tensorboardX is a declared dependency; if it is missing the jsonl log still works.
Also here: `MeanAccumulator` (averages scalars between logging steps) and
`format_scalars` for compact stdout lines.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Any, Dict, Mapping

import jax
import numpy as np

log = logging.getLogger('var_jax.train')


def _to_float(v: Any) -> float:
  return float(np.asarray(v).reshape(()))


class Writer:
  """Scalar/text writer for one run directory (process 0 only)."""

  def __init__(self, logdir: str, *, stdout: bool = True, tensorboard: bool = True,
               enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.stdout = stdout
    self._tb = None
    self._jsonl = None
    if not self.enabled:
      return
    os.makedirs(logdir, exist_ok=True)
    self._jsonl = open(os.path.join(logdir, 'metrics.jsonl'), 'a')
    if tensorboard:
      try:
        from tensorboardX import SummaryWriter
        self._tb = SummaryWriter(logdir=os.path.join(logdir, 'tb'))
      except ImportError:
        log.warning('tensorboardX not installed: writing metrics.jsonl only')

  def scalars(self, step: int, values: Mapping[str, Any], prefix: str = '') -> None:
    if not self.enabled:
      return
    flat = {(f'{prefix}/{k}' if prefix else k): _to_float(v) for k, v in values.items()}
    if self._tb is not None:
      for k, v in flat.items():
        self._tb.add_scalar(k, v, step)
    self._jsonl.write(json.dumps({'step': int(step), 'time': time.time(), **flat}) + '\n')
    self._jsonl.flush()
    if self.stdout:
      print(f'[{prefix or "metrics"}] step {step}: {format_scalars(values)}', flush=True)

  def text(self, tag: str, text: str, step: int = 0) -> None:
    if self.enabled and self._tb is not None:
      self._tb.add_text(tag, text, step)

  def flush(self) -> None:
    if self._tb is not None:
      self._tb.flush()
    if self._jsonl is not None:
      self._jsonl.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None
    if self._jsonl is not None:
      self._jsonl.close()
      self._jsonl = None


def format_scalars(values: Mapping[str, Any]) -> str:
  parts = []
  for k, v in values.items():
    f = _to_float(v)
    if f != 0 and (abs(f) < 1e-3 or abs(f) >= 1e5) and math.isfinite(f):
      parts.append(f'{k}={f:.3e}')
    else:
      parts.append(f'{k}={f:.4f}')
  return ' '.join(parts)


class MeanAccumulator:
  """Running means of scalar metrics between two `result()` calls."""

  def __init__(self):
    self._sums: Dict[str, float] = {}
    self._counts: Dict[str, int] = {}

  def add(self, values: Mapping[str, Any]) -> None:
    for k, v in values.items():
      a = np.asarray(v)
      if a.ndim:
        continue  # vectors (e.g. per-scale losses) are logged separately
      self._sums[k] = self._sums.get(k, 0.0) + float(a)
      self._counts[k] = self._counts.get(k, 0) + 1

  def result(self, reset: bool = True) -> Dict[str, float]:
    out = {k: self._sums[k] / self._counts[k] for k in self._sums}
    if reset:
      self._sums.clear()
      self._counts.clear()
    return out


def print0(*args, **kw) -> None:
  """print on process 0 only."""
  if jax.process_index() == 0:
    kw.setdefault('flush', True)
    print(*args, **kw)


def sum_over_batches(batches, step_fn, max_batches: int = -1) -> Dict[str, Any]:
  """Adds up a (jitted) eval step's outputs over `batches`; returns host numpy sums.

  max_batches < 0 reads them all. The sums stay on the device until the end.
  """
  total = None
  for i, batch in enumerate(batches):
    if 0 <= max_batches <= i:
      break
    out = step_fn(batch)
    total = out if total is None else jax.tree_util.tree_map(lambda a, b: a + b, total, out)
  if total is None:
    raise ValueError('the eval split yielded no batch')
  return jax.device_get(total)
