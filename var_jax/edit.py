"""Zero-shot editing: in-painting, out-painting and class-conditional editing.

    mask = box_mask(16, 0.1, 0.1, 0.8, 0.8)                # regenerate the box, keep the rest
    images, tokens = pipe.edit(images, mask, 1000)         # in-paint (label = num_classes)
    images, tokens = pipe.edit(images, 1 - mask, 207)      # out-paint toward class 207

VAR edits without any training (the paper's zero-shot results; the reference's
demo_zero_shot_edit.ipynb): generation runs as sampling, except that after the token
choice at scale k the positions the keep mask holds take the given image's token,
before f_hat and scale k+1's input are built, so later scales see the kept content.
The keep mask of scale k is the mask resized to pn_k x pn_k (bilinear,
align_corners=False, no antialiasing) then `> 0.5`; scales of at most 3 tokens keep
every position. It runs in the sampler's one jitted program (Sampler.edit; sampling
is the case 'keep nothing').

Masks: 1 = keep the given image, 0 = generate. At token resolution (h, w) or
(B, h, w), h = w = patch_nums[-1]; or at pixel resolution (H, W) or (B, H, W),
reduced to token resolution by averaging each token's patch of pixels (H/h x W/w),
so at the last scale a token is kept when more than half of its pixels are.
"""
from __future__ import annotations

from typing import Any, Optional, Tuple

import numpy as np

from var_jax.sampling_args import BATCH_AXES, check_images, check_labels, check_sampling_args


def box_mask(size: int, y0: float, x0: float, y1: float, x1: float, *,
             inpainting: bool = True) -> np.ndarray:
  """A (size, size) float32 keep mask from a box in fractions of the image: with
  inpainting the box is regenerated and the rest kept, else (out-painting) the box is
  kept and the rest regenerated. Rows round(y0 * size) .. round(y1 * size) - 1 (Python
  rounding, as the reference's get_edit_mask), likewise columns; `size` is the token
  side patch_nums[-1] (the reference's choice) or the pixel side."""
  for name, v in (('y0', y0), ('x0', x0), ('y1', y1), ('x1', x1)):
    if not 0 <= v <= 1:
      raise ValueError(f'box {name} must be a fraction of the image in [0, 1], got {v}')
  if not (y0 < y1 and x0 < x1):
    raise ValueError(f'box needs y0 < y1 and x0 < x1, got y0={y0}, x0={x0}, y1={y1}, x1={x1}')
  box = np.zeros((size, size), np.float32)
  box[round(y0 * size):round(y1 * size), round(x0 * size):round(x1 * size)] = 1
  return 1 - box if inpainting else box


def token_mask(keep_mask: Any, config, batch: int) -> np.ndarray:
  """The keep mask as float32 (batch, h, w) at the last scale's resolution (see the
  module docstring); ValueError naming the problem."""
  h, size = config.patch_nums[-1], config.image_size
  m = np.asarray(keep_mask)
  if m.dtype == bool:
    m = m.astype(np.float32)
  if not (np.issubdtype(m.dtype, np.floating) or np.issubdtype(m.dtype, np.integer)):
    raise ValueError(f'keep_mask must be numbers in [0, 1] (1 = keep), got dtype {m.dtype}')
  shapes = f'({h}, {h}) / (B, {h}, {h}) tokens or ({size}, {size}) / (B, {size}, {size}) pixels'
  if m.ndim not in (2, 3) or m.shape[-2:] not in ((h, h), (size, size)):
    raise ValueError(f'keep_mask must have shape {shapes}, got {tuple(m.shape)}')
  if m.ndim == 3 and m.shape[0] != batch:
    raise ValueError(f'keep_mask has batch {m.shape[0]}, the images {batch}')
  m = m.astype(np.float64)
  if m.size and (not np.isfinite(m).all() or m.min() < 0 or m.max() > 1):
    raise ValueError(f'keep_mask values must be in [0, 1] (1 = keep), got [{m.min():.4g}, '
                     f'{m.max():.4g}]')
  if m.ndim == 2:
    m = np.broadcast_to(m, (batch,) + m.shape)
  if m.shape[-1] != h:        # pixels: the mean over each token's patch
    f = size // h
    m = m.reshape(batch, h, f, h, f).mean(axis=(2, 4))
  return np.ascontiguousarray(m, np.float32)


def check_edit_labels(labels: Any, num_classes: int, batch: int) -> np.ndarray:
  """int32 (batch,): class ids in [0, num_classes], num_classes being the unconditional
  class (plain in-/out-painting); one label is used for every image."""
  arr = check_labels(labels, None)
  bad = sorted(set(arr[(arr < 0) | (arr > num_classes)].tolist()))
  if bad:
    raise ValueError(f'labels must be class ids in [0, {num_classes}) or {num_classes} (the '
                     f'unconditional class: plain in-/out-painting), got {bad[:8]}')
  if arr.shape[0] == 1:
    arr = np.repeat(arr, batch)
  if arr.shape[0] != batch:
    raise ValueError(f'{arr.shape[0]} labels for {batch} images (give one, or one per image)')
  return arr


def check_batch_splits(batch: int, mesh) -> None:
  if mesh is not None:
    shards = int(np.prod([mesh.shape[a] for a in BATCH_AXES if a in mesh.shape]))
    if batch % shards:
      raise ValueError(f'batch {batch} is not divisible by the {shards} batch shards of the mesh')


def edit_args(config, images: Any, keep_mask: Any, labels: Any, cfg: Any, top_k: Any,
              top_p: Any, mesh=None) -> Tuple[np.ndarray, np.ndarray, np.ndarray, Any]:
  """(images float32 NHWC, token mask (B, h, w), labels (B,), SamplingArgs), checked."""
  args = check_sampling_args(cfg, top_k, top_p, config=config)
  x = check_images(images, config)
  mask = token_mask(keep_mask, config, x.shape[0])
  y = check_edit_labels(labels, config.var.num_classes, x.shape[0])
  check_batch_splits(x.shape[0], mesh)
  return x, mask, y, args


def edit(config, vae_params, var_params, images: Any, keep_mask: Any, labels: Any, *,
         cfg: float = 1.5, top_k: int = 900, top_p: float = 0.96, seed: Any = 0,
         more_smooth: bool = False, dtype: Any = None, mesh: Optional[Any] = None,
         scan_blocks: bool = True, attention: str = 'auto'):
  """Zero-shot editing of `images`: (edited images NHWC float32 in [0, 1], token maps).

  images: NHWC float32 in [-1, 1]; their token maps are the content kept. The kept
    tokens are those of the WHOLE image, encoded unmasked (as the reference does):
    near the mask's edge they carry some information about the region regenerated.
  keep_mask: 1 = keep, 0 = generate; token or pixel resolution (module docstring).
  labels: class ids, or num_classes (the unconditional class) for plain in-/out-painting;
    one label for all images, or one per image.
  Returns, per scale, the int32 (B, pn_k^2) token map that scale contributed (the kept
  tokens where kept, the drawn ones elsewhere). Sampling options as sampler.sample;
  var_params as stored or Sampler.prepare'd for the same dtype.
  """
  import jax.numpy as jnp
  from var_jax.sampler import Sampler, seed_key
  x, mask, y, args = edit_args(config, images, keep_mask, labels, cfg, top_k, top_p, mesh)
  s = Sampler(config, top_k=args.top_k, use_top_p=args.top_p > 0, more_smooth=more_smooth,
              dtype=jnp.float32 if dtype is None else dtype, mesh=mesh,
              scan_blocks=scan_blocks, attention=attention)
  return s.edit(vae_params, var_params, x, mask, y, args.cfg, args.top_p, seed_key(seed))
