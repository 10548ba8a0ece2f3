"""Image-reconstruction metrics in JAX: PSNR, SSIM, codebook usage.

Images are NHWC in [-1, 1] (the VQVAE's range) unless `data_range` says otherwise;
every metric returns one value per image so a caller can mask padded eval examples
and average over the whole split. SSIM is the standard one (Wang et al. 2004):
11x11 Gaussian window with sigma 1.5, K1 = 0.01, K2 = 0.03, 'valid' filtering,
computed per channel and averaged, like skimage's `gaussian_weights=True` variant.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def psnr(x_BHWC: jax.Array, y_BHWC: jax.Array, data_range: float = 2.0) -> jax.Array:
  """Peak signal-to-noise ratio per image (B,), in dB; inf-free (mse floored at 1e-10)."""
  x, y = jnp.asarray(x_BHWC, jnp.float32), jnp.asarray(y_BHWC, jnp.float32)
  mse = jnp.mean((x - y) ** 2, axis=(1, 2, 3))
  return 10.0 * jnp.log10(data_range ** 2 / jnp.maximum(mse, 1e-10))


def _gaussian_1d(size: int, sigma: float) -> np.ndarray:
  t = np.arange(size, dtype=np.float64) - (size - 1) / 2
  g = np.exp(-(t * t) / (2 * sigma * sigma))
  return (g / g.sum()).astype(np.float32)


def _filter(x_BHWC: jax.Array, g: np.ndarray) -> jax.Array:
  """Separable 'valid' Gaussian filtering of every channel."""
  k = len(g)
  H, W = x_BHWC.shape[1:3]
  rows = jnp.stack([x_BHWC[:, i:H - k + 1 + i] for i in range(k)], 0)
  x = jnp.tensordot(jnp.asarray(g), rows, axes=(0, 0))
  cols = jnp.stack([x[:, :, j:W - k + 1 + j] for j in range(k)], 0)
  return jnp.tensordot(jnp.asarray(g), cols, axes=(0, 0))


def ssim(x_BHWC: jax.Array, y_BHWC: jax.Array, data_range: float = 2.0, win_size: int = 11,
         sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03) -> jax.Array:
  """Structural similarity per image (B,), mean over pixels and channels."""
  x, y = jnp.asarray(x_BHWC, jnp.float32), jnp.asarray(y_BHWC, jnp.float32)
  if x.shape != y.shape or x.ndim != 4:
    raise ValueError(f'ssim needs two NHWC arrays of one shape, got {x.shape} and {y.shape}')
  if min(x.shape[1:3]) < win_size:
    raise ValueError(f'images {x.shape[1:3]} are smaller than the SSIM window {win_size}')
  g = _gaussian_1d(win_size, sigma)
  mu_x, mu_y = _filter(x, g), _filter(y, g)
  sxx = _filter(x * x, g) - mu_x ** 2
  syy = _filter(y * y, g) - mu_y ** 2
  sxy = _filter(x * y, g) - mu_x * mu_y
  c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
  s = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (sxx + syy + c2))
  return jnp.mean(s, axis=(1, 2, 3))


def code_hits(idx_list: Sequence[jax.Array], vocab_size: int,
              mask_B: jax.Array | None = None) -> jax.Array:
  """(S, V) float32 counts of each code at each scale (masked examples do not count)."""
  rows = []
  for idx_Bl in idx_list:
    w = jnp.ones(idx_Bl.shape, jnp.float32)
    if mask_B is not None:
      w = w * jnp.asarray(mask_B, jnp.float32)[:, None]
    rows.append(jnp.zeros((vocab_size,), jnp.float32).at[idx_Bl.reshape(-1)].add(w.reshape(-1)))
  return jnp.stack(rows)


def codebook_usage(hits_SV: np.ndarray) -> np.ndarray:
  """Per scale: percentage of the codebook used at least once (S,), plus nothing else."""
  hits = np.asarray(hits_SV)
  return 100.0 * np.mean(hits > 0, axis=-1)


def codebook_perplexity(hits_SV: np.ndarray) -> np.ndarray:
  """Per scale: exp(entropy) of the code distribution, the effective number of codes used."""
  p = np.asarray(hits_SV, np.float64)
  p = p / np.maximum(p.sum(-1, keepdims=True), 1e-12)
  ent = -np.sum(np.where(p > 0, p * np.log(np.maximum(p, 1e-30)), 0.0), axis=-1)
  return np.exp(ent)
