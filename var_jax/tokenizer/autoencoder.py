"""Encoder / decoder of the VQVAE (the reference's models/basic_vae.py), NHWC.

Submodules are named after the reference modules with the rule of
var_jax/convert/naming.py (`down.0.block.1.conv1` -> `down_0/block_1/conv1`), so
reference state dicts map 1:1 onto these parameter trees. Every parameter carries
logical axis names (conv_h, conv_w, conv_in, conv_out, norm).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

Dtype = Any

# torch's Conv2d default (kaiming_uniform with a=sqrt(5)): U(+-1/sqrt(fan_in)).
_kernel_init = nn.initializers.variance_scaling(1 / 3, 'fan_in', 'uniform')
CONV_KERNEL_AXES = ('conv_h', 'conv_w', 'conv_in', 'conv_out')


def conv(features: int, kernel: int, name: str, *, dtype: Dtype, param_dtype: Dtype,
         stride: int = 1, padding=None, precision=None) -> nn.Conv:
  """A Conv2d in NHWC with torch's 'same' padding (k // 2) unless `padding` is given."""
  if padding is None:
    p = kernel // 2
    padding = ((p, p), (p, p))
  return nn.Conv(
      features, (kernel, kernel), strides=(stride, stride), padding=padding,
      kernel_init=nn.with_logical_partitioning(_kernel_init, CONV_KERNEL_AXES),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ('conv_out',)),
      dtype=dtype, param_dtype=param_dtype, precision=precision, name=name)


def group_norm(name: str, *, dtype: Dtype, param_dtype: Dtype) -> nn.GroupNorm:
  """GroupNorm(32, eps=1e-6) with two-pass variance like torch (stats in float32)."""
  return nn.GroupNorm(
      num_groups=32, epsilon=1e-6, use_fast_variance=False,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ('norm',)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ('norm',)),
      dtype=dtype, param_dtype=param_dtype, name=name)


class _Base(nn.Module):
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  precision: Any = None

  def conv(self, features, kernel, name, **kw):
    return conv(features, kernel, name, dtype=self.dtype, param_dtype=self.param_dtype,
                precision=self.precision, **kw)

  def norm(self, name):
    return group_norm(name, dtype=self.dtype, param_dtype=self.param_dtype)

  def sub(self, cls, name, **kw):
    return cls(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision,
               name=name, **kw)


class ResnetBlock(_Base):
  """norm-SiLU-conv twice, plus a 1x1 `nin_shortcut` when the width changes."""
  out_channels: int = 0
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x_BHWC, train: bool = False):
    h = self.conv(self.out_channels, 3, 'conv1')(nn.silu(self.norm('norm1')(x_BHWC)))
    h = nn.silu(self.norm('norm2')(h))
    if self.dropout > 1e-6:
      h = nn.Dropout(self.dropout, deterministic=not train)(h)
    h = self.conv(self.out_channels, 3, 'conv2')(h)
    if x_BHWC.shape[-1] != self.out_channels:
      x_BHWC = self.conv(self.out_channels, 1, 'nin_shortcut')(x_BHWC)
    return x_BHWC + h


class AttnBlock(_Base):
  """Single-head spatial self-attention; q, k, v from one 1x1 conv, scale C^-0.5."""

  @nn.compact
  def __call__(self, x_BHWC):
    B, H, W, C = x_BHWC.shape
    qkv = self.conv(3 * C, 1, 'qkv')(self.norm('norm')(x_BHWC))
    q_BLC, k_BLC, v_BLC = jnp.split(qkv.reshape(B, H * W, 3 * C), 3, axis=-1)
    w_BLL = jnp.einsum('BqC,BkC->Bqk', q_BLC, k_BLC, precision=self.precision,
                       preferred_element_type=jnp.float32) * (C ** -0.5)
    w_BLL = jax.nn.softmax(w_BLL, axis=-1).astype(self.dtype)
    h_BLC = jnp.einsum('Bqk,BkC->BqC', w_BLL, v_BLC, precision=self.precision)
    return x_BHWC + self.conv(C, 1, 'proj_out')(h_BLC.reshape(B, H, W, C))


class Downsample(_Base):
  """Zero-pad right/bottom by one, then a 3x3 stride-2 conv without padding."""

  @nn.compact
  def __call__(self, x_BHWC):
    return self.conv(x_BHWC.shape[-1], 3, 'conv', stride=2, padding=((0, 1), (0, 1)))(x_BHWC)


class Upsample(_Base):
  """Nearest-neighbour x2 (a plain repeat), then a 3x3 conv."""

  @nn.compact
  def __call__(self, x_BHWC):
    B, H, W, C = x_BHWC.shape
    x = jnp.broadcast_to(x_BHWC[:, :, None, :, None, :], (B, H, 2, W, 2, C))
    return self.conv(C, 3, 'conv')(x.reshape(B, 2 * H, 2 * W, C))


class Level(_Base):
  """One resolution: `block_i` (each followed by `attn_i` if attention), then resampling."""
  out_channels: int = 0
  num_blocks: int = 1
  attention: bool = False
  resample: Optional[str] = None   # 'downsample' | 'upsample' | None
  dropout: float = 0.0

  @nn.compact
  def __call__(self, h, train: bool = False):
    for i in range(self.num_blocks):
      h = self.sub(ResnetBlock, f'block_{i}', out_channels=self.out_channels,
                   dropout=self.dropout)(h, train)
      if self.attention:
        h = self.sub(AttnBlock, f'attn_{i}')(h)
    if self.resample == 'downsample':
      h = self.sub(Downsample, 'downsample')(h)
    elif self.resample == 'upsample':
      h = self.sub(Upsample, 'upsample')(h)
    return h


class Mid(_Base):
  """block_1, attn_1 (optional), block_2 at the lowest resolution."""
  using_attn: bool = True
  dropout: float = 0.0

  @nn.compact
  def __call__(self, h, train: bool = False):
    C = h.shape[-1]
    h = self.sub(ResnetBlock, 'block_1', out_channels=C, dropout=self.dropout)(h, train)
    if self.using_attn:
      h = self.sub(AttnBlock, 'attn_1')(h)
    return self.sub(ResnetBlock, 'block_2', out_channels=C, dropout=self.dropout)(h, train)


class Encoder(_Base):
  """Image (B, H, W, in_channels) -> latent (B, H/2^(n-1), W/2^(n-1), z_channels)."""
  ch: int = 128
  ch_mult: Sequence[int] = (1, 1, 2, 2, 4)
  num_res_blocks: int = 2
  z_channels: int = 32
  using_sa: bool = True
  using_mid_sa: bool = True
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x_BHWC, train: bool = False):
    n = len(self.ch_mult)
    h = self.conv(self.ch, 3, 'conv_in')(x_BHWC.astype(self.dtype))
    for i, mult in enumerate(self.ch_mult):
      h = self.sub(Level, f'down_{i}', out_channels=self.ch * mult, num_blocks=self.num_res_blocks,
                   attention=self.using_sa and i == n - 1, dropout=self.dropout,
                   resample='downsample' if i != n - 1 else None)(h, train)
    h = self.sub(Mid, 'mid', using_attn=self.using_mid_sa, dropout=self.dropout)(h, train)
    return self.conv(self.z_channels, 3, 'conv_out')(nn.silu(self.norm('norm_out')(h)))


class Decoder(_Base):
  """Latent (B, h, w, z_channels) -> image; `up_i` are stored by level, run last to first."""
  ch: int = 128
  ch_mult: Sequence[int] = (1, 1, 2, 2, 4)
  num_res_blocks: int = 2
  out_channels: int = 3
  using_sa: bool = True
  using_mid_sa: bool = True
  dropout: float = 0.0

  @nn.compact
  def __call__(self, z_BhwC, train: bool = False):
    n = len(self.ch_mult)
    h = self.conv(self.ch * self.ch_mult[-1], 3, 'conv_in')(z_BhwC.astype(self.dtype))
    h = self.sub(Mid, 'mid', using_attn=self.using_mid_sa, dropout=self.dropout)(h, train)
    for i in reversed(range(n)):
      h = self.sub(Level, f'up_{i}', out_channels=self.ch * self.ch_mult[i],
                   num_blocks=self.num_res_blocks + 1, attention=self.using_sa and i == n - 1,
                   dropout=self.dropout, resample='upsample' if i != 0 else None)(h, train)
    return self.conv(self.out_channels, 3, 'conv_out')(nn.silu(self.norm('norm_out')(h)))
