"""Torch-exact image resizing for the multi-scale quantizer.

The reference resizes latents with `F.interpolate(mode='bicubic')` (up) and
`mode='area'` (down). Neither matches `jax.image.resize`: torch's bicubic is cubic
convolution with a = -0.75, align_corners=False and border-clamped taps, without
antialiasing; its area mode is adaptive average pooling with overlapping windows.
Shapes are static, so each resize is an (out x in) weight matrix per axis, built
with numpy at trace time and applied with one einsum per axis.
"""
from __future__ import annotations

import functools
from typing import Tuple

import jax
import jax.numpy as jnp
import numpy as np

_CUBIC_A = -0.75


def _cubic_near(t: np.ndarray) -> np.ndarray:
  """Cubic-convolution weight for a tap at distance |t| <= 1."""
  a = _CUBIC_A
  return ((a + 2) * t - (a + 3)) * t * t + 1


def _cubic_far(t: np.ndarray) -> np.ndarray:
  """Cubic-convolution weight for a tap at distance 1 < |t| < 2."""
  a = _CUBIC_A
  return ((a * t - 5 * a) * t + 8 * a) * t - 4 * a


@functools.lru_cache(maxsize=None)
def bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
  """(n_out, n_in) float32 weights of torch's bicubic interpolation along one axis."""
  scale = n_in / n_out
  src = (np.arange(n_out, dtype=np.float64) + 0.5) * scale - 0.5
  base = np.floor(src)
  t = src - base
  taps = (_cubic_far(t + 1), _cubic_near(t), _cubic_near(1 - t), _cubic_far(2 - t))
  w = np.zeros((n_out, n_in), np.float64)
  rows = np.arange(n_out)
  for offset, coef in zip((-1, 0, 1, 2), taps):
    cols = np.clip(base.astype(np.int64) + offset, 0, n_in - 1)
    np.add.at(w, (rows, cols), coef)
  return w.astype(np.float32)


@functools.lru_cache(maxsize=None)
def area_matrix(n_in: int, n_out: int) -> np.ndarray:
  """(n_out, n_in) float32 weights of adaptive average pooling along one axis.

  Output cell i averages inputs floor(i*in/out) .. ceil((i+1)*in/out)-1; the windows
  overlap when out does not divide in.
  """
  w = np.zeros((n_out, n_in), np.float64)
  for i in range(n_out):
    lo = (i * n_in) // n_out
    hi = -((-(i + 1) * n_in) // n_out)
    w[i, lo:hi] = 1.0 / (hi - lo)
  return w.astype(np.float32)


def _check(x_BHWC: jax.Array, size: Tuple[int, int], what: str) -> Tuple[int, int]:
  if x_BHWC.ndim != 4:
    raise ValueError(f'{what} expects a (B, H, W, C) array, got shape {x_BHWC.shape}')
  h, w = (int(s) for s in size)
  if h < 1 or w < 1:
    raise ValueError(f'{what} output size must be positive, got {size}')
  return h, w


def _apply(x_BHWC: jax.Array, w_hH: np.ndarray, w_wW: np.ndarray) -> jax.Array:
  """Separable linear resize; float32 inputs run at full precision (no TF32)."""
  precision = jax.lax.Precision.HIGHEST if x_BHWC.dtype == jnp.float32 else None
  dt = x_BHWC.dtype
  x = x_BHWC
  if w_hH.shape[0] != w_hH.shape[1] or not np.array_equal(w_hH, np.eye(w_hH.shape[0])):
    x = jnp.einsum('hH,BHWC->BhWC', jnp.asarray(w_hH, dt), x, precision=precision)
  if w_wW.shape[0] != w_wW.shape[1] or not np.array_equal(w_wW, np.eye(w_wW.shape[0])):
    x = jnp.einsum('wW,BhWC->BhwC', jnp.asarray(w_wW, dt), x, precision=precision)
  return x


def bicubic_resize(x_BHWC: jax.Array, size: Tuple[int, int]) -> jax.Array:
  """`F.interpolate(x, size, mode='bicubic', align_corners=False)` on NHWC."""
  h, w = _check(x_BHWC, size, 'bicubic_resize')
  B, H, W, C = x_BHWC.shape
  if H == 1 and W == 1:   # every tap clamps onto the single pixel
    return jnp.broadcast_to(x_BHWC, (B, h, w, C))
  return _apply(x_BHWC, bicubic_matrix(H, h), bicubic_matrix(W, w))


def area_resize(x_BHWC: jax.Array, size: Tuple[int, int]) -> jax.Array:
  """`F.interpolate(x, size, mode='area')` (adaptive average pooling) on NHWC."""
  h, w = _check(x_BHWC, size, 'area_resize')
  B, H, W, C = x_BHWC.shape
  if h == 1 and w == 1:
    return jnp.mean(x_BHWC, axis=(1, 2), keepdims=True, dtype=jnp.float32).astype(x_BHWC.dtype)
  return _apply(x_BHWC, area_matrix(H, h), area_matrix(W, w))
