"""Metrics: the writer (TensorBoard, metrics.jsonl, stdout) and MFU accounting.

Reuse: `w = Writer(workdir, resume_step=0)`; `w.scalars(step, {'train/loss': 1.2})`
(one metrics.jsonl row per call: the loop makes one call per step);
`w.text('config', cfg.to_json())`; `w.close()`. Only process 0 writes (other
processes get a no-op writer), so call it unconditionally from every host. A run
resumed from step k first drops the rows of steps > k that the interrupted run wrote,
so metrics.jsonl holds one row per step after any number of resumes (and TensorBoard
hides those steps' earlier points: SummaryWriter's purge_step).
tensorboardX is a declared dependency; if it is missing the jsonl log still works.
Also here: `MeanAccumulator` (averages scalars between logging steps),
`format_scalars` for compact stdout lines, and the MFU accounting
(`var_flops_per_image`, `peak_flops`).
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

  def __init__(self, logdir: str, *, resume_step: int | None = None, stdout: bool = True,
               tensorboard: bool = True, enabled: bool | None = None, name: str = 'metrics'):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.stdout, self.name = stdout, name
    self._tb = None
    self._jsonl = None
    if not self.enabled:
      return
    os.makedirs(logdir, exist_ok=True)
    path = os.path.join(logdir, 'metrics.jsonl')
    if resume_step is not None:
      truncate_jsonl(path, resume_step)
    self._jsonl = open(path, 'a')
    if tensorboard:
      try:
        from tensorboardX import SummaryWriter
        # purge_step: a session START event that makes TensorBoard hide the points at
        # steps > resume_step that an interrupted run wrote (they are logged again).
        self._tb = SummaryWriter(logdir=os.path.join(logdir, 'tb'), purge_step=(
            None if resume_step is None else resume_step + 1))
      except ImportError:
        log.warning('tensorboardX not installed: writing metrics.jsonl only')

  def scalars(self, step: int, values: Mapping[str, Any], prefix: str = '') -> None:
    """One metrics.jsonl row (and TensorBoard points, and a stdout line) for `step`."""
    if not self.enabled:
      return
    flat = {(f'{prefix}/{k}' if prefix else k): _to_float(v) for k, v in values.items()}
    if self._tb is not None:
      for k, v in flat.items():
        self._tb.add_scalar(k, v, step)
    self._jsonl.write(json.dumps({'step': int(step), 'time': time.time(), **flat}) + '\n')
    self._jsonl.flush()
    if self.stdout:
      print(f'[{prefix or self.name}] step {step}: {format_scalars(flat)}', flush=True)

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


def truncate_jsonl(path: str, last_step: int) -> None:
  """Keeps the rows of steps <= last_step (and drops a torn last line); atomic rewrite."""
  if not os.path.exists(path):
    return
  keep, dropped = [], 0
  with open(path) as f:
    for line in f:
      try:
        row = json.loads(line)
      except ValueError:
        dropped += 1
        continue
      if int(row.get('step', 0)) <= last_step:
        keep.append(line if line.endswith('\n') else line + '\n')
      else:
        dropped += 1
  if dropped:
    tmp = f'{path}.tmp{os.getpid()}'
    with open(tmp, 'w') as f:
      f.writelines(keep)
    os.replace(tmp, path)


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


# --- model FLOPs utilisation ----------------------------------------------------------------

def var_flops_per_image(cfg, vocab_size: int, Cvae: int) -> float:
  """Analytic training FLOPs of one image (3x forward; matmuls only; full L x L attention as
  the reference computes it). The frozen tokenizer is not counted."""
  C, L, D = cfg.embed_dim, cfg.L, cfg.depth
  hidden = cfg.mlp_hidden
  per_token = D * (2 * (3 * C * C + C * C + 2 * C * hidden) + 4 * L * C) + 2 * C * vocab_size + 2 * Cvae * C
  per_image_cond = (D if not cfg.shared_aln else 1) * 2 * C * 6 * C + 2 * C * 2 * C
  return 3.0 * (L * per_token + per_image_cond)


PEAK_FLOPS = {  # dense bf16 per device
    'tpu v4': 275e12, 'tpu v5 lite': 197e12, 'tpu v5e': 197e12, 'tpu v5p': 459e12, 'tpu v5': 459e12,
    'tpu v6 lite': 918e12, 'tpu v6e': 918e12, 'h100': 989e12, 'h200': 989e12, 'a100': 312e12,
    'l4': 121e12, 'a10g': 70e12,
}


def peak_flops(device=None) -> float:
  """Peak dense bf16 FLOP/s of a device from its kind (0.0 when unknown, e.g. CPU)."""
  kind = (device or jax.devices()[0]).device_kind.lower()
  for k in sorted(PEAK_FLOPS, key=len, reverse=True):
    if k in kind:
      return PEAK_FLOPS[k]
  return 0.0


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
