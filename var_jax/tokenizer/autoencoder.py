"""Encoder / decoder of the VQVAE (the reference's models/basic_vae.py), NHWC.

Submodules are named after the reference modules with the rule of
var_jax/convert/naming.py (`down.0.block.1.conv1` -> `down_0/block_1/conv1`), so
reference state dicts map 1:1 onto these parameter trees. Every parameter carries
logical axis names (conv_h, conv_w, conv_in, conv_out, norm).

Compute: activations stay NHWC in `dtype` end to end (channels-last is the layout
tensor-core convolutions want: no transposes). GroupNorm takes its statistics in
float32 inside the reduction and applies scale, shift and the SiLU that follows it
in one elementwise pass, casting once to `dtype`; with 16-bit compute the variance
is one-pass (E[x^2] - E[x]^2 in float32: one read of the input instead of two).
Float32 compute keeps torch's two-pass variance and flax's operation order, so it
is bit-identical to nn.GroupNorm + nn.silu. The decoder's nearest-x2 upsample +
3x3 conv runs as one 2x2 conv on the low-resolution input with 4x the output
channels (the "sub-pixel" form: the same function, 16/36 of the FLOPs, and the
upsampled input is never materialised), interleaved into the 2x output.
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


class GroupNorm(nn.Module):
  """GroupNorm(32, eps=1e-6) over NHWC, optionally followed by SiLU (`act`), in one pass.

  Parameters `scale`, `bias` (C,) like nn.GroupNorm. Statistics in float32; the
  variance is two-pass like torch for float32 compute, one-pass for 16-bit.
  """
  num_groups: int = 32
  epsilon: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BHWC: jax.Array, act: bool = False) -> jax.Array:
    B, H, W, C = x_BHWC.shape
    G = self.num_groups
    init = lambda f: nn.with_logical_partitioning(f, ('norm',))
    scale = self.param('scale', init(nn.initializers.ones), (C,), self.param_dtype)
    bias = self.param('bias', init(nn.initializers.zeros), (C,), self.param_dtype)
    x = x_BHWC.astype(jnp.float32).reshape(B, H, W, G, C // G)
    axes = (1, 2, 4)
    mean = x.mean(axes, keepdims=True)
    if jnp.dtype(self.dtype) == jnp.float32:
      var = jnp.square(x - mean).mean(axes, keepdims=True)
    else:
      var = jnp.maximum(jnp.square(x).mean(axes, keepdims=True) - jnp.square(mean), 0.0)
    mul = jax.lax.rsqrt(var + self.epsilon) * scale.astype(jnp.float32).reshape(G, C // G)
    y = (x - mean) * mul + bias.astype(jnp.float32).reshape(G, C // G)
    if act:
      y = nn.silu(y)
    return y.reshape(B, H, W, C).astype(self.dtype)


class _Base(nn.Module):
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  precision: Any = None

  def conv(self, features, kernel, name, **kw):
    return conv(features, kernel, name, dtype=self.dtype, param_dtype=self.param_dtype,
                precision=self.precision, **kw)

  def norm(self, name):
    return GroupNorm(dtype=self.dtype, param_dtype=self.param_dtype, name=name)

  def sub(self, cls, name, **kw):
    return cls(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision,
               name=name, **kw)


class ResnetBlock(_Base):
  """norm-SiLU-conv twice, plus a 1x1 `nin_shortcut` when the width changes."""
  out_channels: int = 0
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x_BHWC, train: bool = False):
    h = self.conv(self.out_channels, 3, 'conv1')(self.norm('norm1')(x_BHWC, act=True))
    h = self.norm('norm2')(h, act=True)
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


def _phase_taps(w_3X: jax.Array) -> jax.Array:
  """(3, ...) taps of the 3x3 kernel along one axis -> (2 phases, 2 taps, ...)."""
  return jnp.stack([jnp.stack([w_3X[0], w_3X[1] + w_3X[2]]),
                    jnp.stack([w_3X[0] + w_3X[1], w_3X[2]])])


def subpixel_kernel(kernel_33IO: jax.Array) -> jax.Array:
  """(2, 2, I, 4*O) kernel of a 2x2 conv on x (padded by 1) whose output channel block
  (a, b) is pixel (2i+a, 2j+b) of conv3x3(nearest_upsample_x2(x)) (at window (i+a, j+b)).

  Output row 2i (a=0) reads upsampled rows 2i-1, 2i, 2i+1 = input rows i-1, i, i, so
  its taps on input rows (i-1, i) are (w0, w1+w2); row 2i+1 (a=1) reads i, i, i+1:
  taps on (i, i+1) are (w0+w1, w2). Same along columns. Sums in float32.
  """
  rows = _phase_taps(kernel_33IO.astype(jnp.float32))            # (a, r, 3, I, O)
  both = _phase_taps(jnp.moveaxis(rows, 2, 0))                    # (b, s, a, r, I, O)
  k = jnp.transpose(both, (3, 1, 4, 2, 0, 5))                     # (r, s, I, a, b, O)
  r, s, i, _, _, o = k.shape
  return k.reshape(r, s, i, 4 * o)


class SubpixelUpConv(_Base):
  """conv3x3(nearest_upsample_x2(x)) with the parameters of that conv (`kernel`
  (3, 3, C, features), `bias`), computed as one 2x2 conv at the input resolution."""
  features: int = 0

  @nn.compact
  def __call__(self, x_BhwC):
    B, h, w, C = x_BhwC.shape
    O = self.features
    kernel = self.param('kernel', nn.with_logical_partitioning(_kernel_init, CONV_KERNEL_AXES),
                        (3, 3, C, O), self.param_dtype)
    bias = self.param('bias', nn.with_logical_partitioning(nn.initializers.zeros, ('conv_out',)),
                      (O,), self.param_dtype)
    y = jax.lax.conv_general_dilated(
        x_BhwC.astype(self.dtype), subpixel_kernel(kernel).astype(self.dtype), (1, 1),
        ((1, 1), (1, 1)), dimension_numbers=('NHWC', 'HWIO', 'NHWC'), precision=self.precision)
    y = y + jnp.tile(bias, 4).astype(self.dtype)           # (B, h+1, w+1, [a, b, O])
    y = y.reshape(B, h + 1, w + 1, 2, 2, O)
    rows = [jnp.stack([y[:, a:a + h, b:b + w, a, b] for b in (0, 1)], axis=3) for a in (0, 1)]
    return jnp.stack(rows, axis=2).reshape(B, 2 * h, 2 * w, O)     # (B, h, a, w, b, O)


class Upsample(_Base):
  """Nearest-neighbour x2 (a plain repeat), then a 3x3 conv; `subpixel` computes the
  same thing as one 2x2 conv at the low resolution (see SubpixelUpConv)."""
  subpixel: bool = True

  @nn.compact
  def __call__(self, x_BHWC):
    B, H, W, C = x_BHWC.shape
    if self.subpixel:
      return self.sub(SubpixelUpConv, 'conv', features=C)(x_BHWC)
    x = jnp.broadcast_to(x_BHWC[:, :, None, :, None, :], (B, H, 2, W, 2, C))
    return self.conv(C, 3, 'conv')(x.reshape(B, 2 * H, 2 * W, C))


class Level(_Base):
  """One resolution: `block_i` (each followed by `attn_i` if attention), then resampling."""
  out_channels: int = 0
  num_blocks: int = 1
  attention: bool = False
  resample: Optional[str] = None   # 'downsample' | 'upsample' | None
  dropout: float = 0.0
  subpixel: bool = True            # Upsample's form

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
      h = self.sub(Upsample, 'upsample', subpixel=self.subpixel)(h)
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
    return self.conv(self.z_channels, 3, 'conv_out')(self.norm('norm_out')(h, act=True))


class Decoder(_Base):
  """Latent (B, h, w, z_channels) -> image; `up_i` are stored by level, run last to first."""
  ch: int = 128
  ch_mult: Sequence[int] = (1, 1, 2, 2, 4)
  num_res_blocks: int = 2
  out_channels: int = 3
  using_sa: bool = True
  using_mid_sa: bool = True
  dropout: float = 0.0
  subpixel_upsample: bool = True

  @nn.compact
  def __call__(self, z_BhwC, train: bool = False):
    n = len(self.ch_mult)
    h = self.conv(self.ch * self.ch_mult[-1], 3, 'conv_in')(z_BhwC.astype(self.dtype))
    h = self.sub(Mid, 'mid', using_attn=self.using_mid_sa, dropout=self.dropout)(h, train)
    for i in reversed(range(n)):
      h = self.sub(Level, f'up_{i}', out_channels=self.ch * self.ch_mult[i],
                   num_blocks=self.num_res_blocks + 1, attention=self.using_sa and i == n - 1,
                   dropout=self.dropout, resample='upsample' if i != 0 else None,
                   subpixel=self.subpixel_upsample)(h, train)
    return self.conv(self.out_channels, 3, 'conv_out')(self.norm('norm_out')(h, act=True))
