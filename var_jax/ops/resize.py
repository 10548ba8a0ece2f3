"""Torch-exact image resizing for the multi-scale quantizer.

The reference resizes latents with `F.interpolate(mode='bicubic')` (up) and
`mode='area'` (down), and zero-shot editing's keep masks with `mode='bilinear'`. Neither matches `jax.image.resize`: torch's bicubic is cubic
convolution with a = -0.75, align_corners=False and border-clamped taps, without
antialiasing; its area mode is adaptive average pooling with overlapping windows; its bilinear
mode does not antialias when downsampling (jax's 'linear' does).
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


@functools.lru_cache(maxsize=None)
def bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
  """(n_out, n_in) float32 weights of torch's bilinear interpolation along one axis
  (align_corners=False, no antialiasing): output i reads the source coordinate
  s = max((i + 0.5) * in/out - 0.5, 0), i.e. rows floor(s) and floor(s) + 1 (clamped)
  with weights 1 - frac(s) and frac(s). The coordinate and the weights are computed in
  float32 as torch's CPU kernel does, so a weight of exactly 0.5 stays exactly 0.5."""
  f32 = np.float32
  scale = f32(n_in) / f32(n_out)
  src = np.maximum(scale * (np.arange(n_out, dtype=f32) + f32(0.5)) - f32(0.5), f32(0))
  i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
  lam1 = np.clip(src - i0.astype(f32), f32(0), f32(1)).astype(f32)
  lam0 = (f32(1) - lam1).astype(f32)
  i1 = np.where(i0 < n_in - 1, i0 + 1, i0)
  w = np.zeros((n_out, n_in), f32)
  rows = np.arange(n_out)
  np.add.at(w, (rows, i0), lam0)
  np.add.at(w, (rows, i1), lam1)
  return w


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


def bilinear_resize(x_BHWC: jax.Array, size: Tuple[int, int]) -> jax.Array:
  """`F.interpolate(x, size, mode='bilinear', align_corners=False)` on NHWC (no antialiasing)."""
  h, w = _check(x_BHWC, size, 'bilinear_resize')
  _, H, W, _ = x_BHWC.shape
  return _apply(x_BHWC, bilinear_matrix(H, h), bilinear_matrix(W, w))


def area_resize(x_BHWC: jax.Array, size: Tuple[int, int]) -> jax.Array:
  """`F.interpolate(x, size, mode='area')` (adaptive average pooling) on NHWC."""
  h, w = _check(x_BHWC, size, 'area_resize')
  B, H, W, C = x_BHWC.shape
  if h == 1 and w == 1:
    return jnp.mean(x_BHWC, axis=(1, 2), keepdims=True, dtype=jnp.float32).astype(x_BHWC.dtype)
  return _apply(x_BHWC, area_matrix(H, h), area_matrix(W, w))
