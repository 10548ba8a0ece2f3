"""Sampling and editing arguments, checked in one place for the API (Pipeline.sample,
Pipeline.edit, sampler.sample, edit.edit) and the command line (var-jax sample, edit).

    args = check_sampling_args(cfg, top_k, top_p, labels=labels, config=config)

numpy only (no jax import), so the CLI checks its flags before loading anything.
"""
from __future__ import annotations

import logging
from typing import Any, NamedTuple, Optional

import numpy as np

log = logging.getLogger('var_jax')

BATCH_AXES = ('data', 'fsdp')   # mesh axes the sampling batch is split over
RANGE_TOL = 1e-3                # images may overshoot [-1, 1] by this much (rounding in preprocessing)


class SamplingArgs(NamedTuple):
  labels: Optional[np.ndarray]   # int32 (B,), or None when none were given
  cfg: float
  top_k: int                     # 0: no top-k cut (also when the request reached the vocabulary)
  top_p: float                   # 0: no nucleus cut


_CLIP_SAID = set()


_NO_LABELS = object()   # labels not passed (the CLI's check before a model loads)


def check_sampling_args(cfg: Any, top_k: Any, top_p: Any, *, labels: Any = _NO_LABELS,
                        config: Any = None, mesh: Any = None,
                        names: Optional[dict] = None) -> SamplingArgs:
  """The sampling arguments, checked; ValueError naming the problem.

  Without `config` only what needs no model is checked (the CLI calls this before
  loading the checkpoint, then again with it). A top_k at or above the
  vocabulary means no top-k cut (said once at info level). `names` maps argument
  names to what the caller calls them (e.g. {'top_k': '--top-k'}).
  """
  name = lambda n: (names or {}).get(n, n)
  if (isinstance(cfg, bool) or not _is_real(cfg) or not np.isfinite(cfg) or cfg < 0
      or float(cfg) > float(np.finfo(np.float32).max)):   # inf in float32: NaN logits
    raise ValueError(f'{name("cfg")} must be >= 0 and finite in float32 (the guidance scale), '
                     f'got {cfg!r}')
  if isinstance(top_k, bool) or not _is_real(top_k) or int(top_k) != top_k:
    raise ValueError(f'{name("top_k")} must be an integer >= 0 (0 disables it), got {top_k!r}')
  if top_k < 0:
    raise ValueError(f'{name("top_k")} must be >= 0 (0 disables it), got {top_k}')
  if isinstance(top_p, bool) or not _is_real(top_p) or not np.isfinite(top_p) or not 0 <= top_p < 1:
    raise ValueError(f'{name("top_p")} must be in [0, 1) (0 disables it), got {top_p!r}')
  top_k = int(top_k)
  if config is not None:
    if config.var is None:
      raise ValueError('this model has no VAR transformer: sampling needs one')
    vocab = config.vae.vocab_size
    if top_k >= vocab:
      if (top_k, vocab) not in _CLIP_SAID:
        _CLIP_SAID.add((top_k, vocab))
        log.info('%s=%d >= the vocabulary (%d codes): no top-k cut', name('top_k'), top_k, vocab)
      top_k = 0
  arr = None
  if labels is not _NO_LABELS:   # labels=None is a mistake, not "no labels"
    arr = check_labels(labels, None if config is None else config.var.num_classes, name('labels'))
    if mesh is not None:
      shards = int(np.prod([mesh.shape[a] for a in BATCH_AXES if a in mesh.shape]))
      if arr.shape[0] % shards:
        raise ValueError(f'batch {arr.shape[0]} is not divisible by the {shards} batch shards '
                         'of the mesh')
  return SamplingArgs(arr, float(cfg), top_k, float(top_p))


def check_labels(labels: Any, num_classes: Optional[int], what: str = 'labels') -> np.ndarray:
  """Class ids as int32 numpy (B,): a non-empty 1-D integer sequence (a scalar is one label)."""
  if labels is None:
    raise ValueError(f'{what} must be given: a non-empty 1-D sequence of class ids, got None')
  arr = np.asarray(labels)
  if arr.ndim == 0:
    arr = arr[None]
  if arr.ndim != 1 or arr.shape[0] == 0:
    raise ValueError(f'{what} must be a non-empty 1-D sequence of class ids, got shape {arr.shape}')
  if not np.issubdtype(arr.dtype, np.integer):
    raise ValueError(f'{what} must be integers (class ids), got dtype {arr.dtype}')
  if num_classes is not None and (arr.min() < 0 or arr.max() >= num_classes):
    bad = sorted(set(arr[(arr < 0) | (arr >= num_classes)].tolist()))
    raise ValueError(f'{what} must be in [0, {num_classes}) (num_classes={num_classes}), got {bad[:8]}')
  return arr.astype(np.int32)


def check_images(images: Any, config: Any) -> Any:
  """NHWC float images of the model's size in [-1, 1] (small tolerance), returned as
  given (numpy or jax; only their min and max come to the host)."""
  size, cin = config.image_size, config.vae.in_channels
  x = images if hasattr(images, 'dtype') and hasattr(images, 'ndim') else np.asarray(images)
  if x.ndim != 4:
    raise ValueError(f'images must be a 4-D NHWC batch (B, {size}, {size}, {cin}), got shape '
                     f'{tuple(x.shape)}')
  if not _is_float(x.dtype):
    raise ValueError(f'images must be floats in [-1, 1], got dtype {x.dtype} '
                     '(for uint8 pixels use x / 127.5 - 1)')
  if tuple(x.shape[1:]) != (size, size, cin):
    hint = ' (NCHW? transpose to NHWC)' if x.shape[1] == cin else ''
    raise ValueError(f'images must be {size}x{size} with {cin} channels, NHWC (B, {size}, {size}, '
                     f'{cin}); got {tuple(x.shape)}{hint}')
  if x.shape[0] == 0:
    raise ValueError(f'images must hold at least one image, got shape {tuple(x.shape)}')
  lo, hi = float(x.min()), float(x.max())
  if not (np.isfinite(lo) and np.isfinite(hi)) or lo < -1 - RANGE_TOL or hi > 1 + RANGE_TOL:
    raise ValueError(f'images must be in [-1, 1], got values in [{lo:.4g}, {hi:.4g}] '
                     '(for [0, 1] images use 2 * x - 1)')
  return x


def compute_dtype(dtype: Any) -> np.dtype:
  """A compute dtype (float32, bfloat16, float16, ...) as np.dtype; ValueError for any
  other (an integer dtype failed deep inside jax)."""
  try:
    dt = np.dtype(dtype)
  except TypeError:
    dt = None
  if dt is None or not _is_float(dt):
    raise ValueError(f'dtype must be a floating-point type (float32, bfloat16), got {dtype!r}')
  return dt


def _is_float(dtype) -> bool:
  """numpy floats, and jax's bfloat16 (and other ml_dtypes floats) that numpy does not
  count as np.floating."""
  if np.issubdtype(dtype, np.floating):
    return True
  try:
    import ml_dtypes   # installed with jax; no jax import
    ml_dtypes.finfo(dtype)
    return True
  except (ImportError, ValueError, TypeError):
    return False


def _is_real(x) -> bool:
  try:
    float(x)
  except (TypeError, ValueError):
    return False
  return np.ndim(x) == 0
