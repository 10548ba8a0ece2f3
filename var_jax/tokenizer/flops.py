"""Analytic FLOPs of the VQVAE encoder and decoder (convolutions and attention matmuls).

    vqvae_flops(VQVAEConfig(), batch=64, what='decode')    # -> 2.25e13 for the release VQVAE

Benchmarks divide by time with this count: XLA's cost analysis does not count
convolutions it hands to cuDNN. A multiply-add is 2 FLOPs; normalisation,
activations and the quantizer are not counted (they are memory-bound, and a few
percent of the work). The walk mirrors autoencoder.Encoder/Decoder; the decoder's
upsampling convs are counted as run: one 2x2 conv with 4x the outputs on the
(h+1) x (w+1) padded low-resolution grid (subpixel=True, the default), or a 3x3 conv
on the upsampled image (subpixel=False).
"""
from __future__ import annotations

from var_jax.config import VQVAEConfig

WHATS = ('encode', 'decode', 'both')


def conv_flops(k: int, c_in: int, c_out: int, h: int, w: int) -> int:
  """A k x k convolution producing an h x w map."""
  return 2 * k * k * c_in * c_out * h * w


def _resnet(c_in: int, c_out: int, r: int) -> int:
  f = conv_flops(3, c_in, c_out, r, r) + conv_flops(3, c_out, c_out, r, r)
  return f + (conv_flops(1, c_in, c_out, r, r) if c_in != c_out else 0)


def _attn(c: int, r: int) -> int:
  """1x1 qkv and proj_out convs, and the (L x L) q.k and p.v matmuls (L = r*r)."""
  L = r * r
  return conv_flops(1, c, 3 * c, r, r) + conv_flops(1, c, c, r, r) + 2 * (2 * L * L * c)


def _mid(c: int, r: int, attn: bool) -> int:
  return 2 * _resnet(c, c, r) + (_attn(c, r) if attn else 0)


def encoder_flops(cfg: VQVAEConfig) -> int:
  """One image through Encoder and quant_conv."""
  n, r = len(cfg.ch_mult), cfg.image_size
  f, c = conv_flops(3, cfg.in_channels, cfg.ch, r, r), cfg.ch
  for i, mult in enumerate(cfg.ch_mult):
    for _ in range(cfg.num_res_blocks):
      f += _resnet(c, cfg.ch * mult, r)
      c = cfg.ch * mult
      if cfg.using_sa and i == n - 1:
        f += _attn(c, r)
    if i != n - 1:
      r //= 2
      f += conv_flops(3, c, c, r, r)            # stride 2, output at r/2
  f += _mid(c, r, cfg.using_mid_sa)
  f += conv_flops(3, c, cfg.Cvae, r, r)
  return f + conv_flops(cfg.quant_conv_ks, cfg.Cvae, cfg.Cvae, r, r)


def decoder_flops(cfg: VQVAEConfig, subpixel: bool = True) -> int:
  """One latent through post_quant_conv and Decoder."""
  n, r = len(cfg.ch_mult), cfg.v_patch_nums[-1]
  c = cfg.ch * cfg.ch_mult[-1]
  f = conv_flops(cfg.quant_conv_ks, cfg.Cvae, cfg.Cvae, r, r) + conv_flops(3, cfg.Cvae, c, r, r)
  f += _mid(c, r, cfg.using_mid_sa)
  for i in reversed(range(n)):
    for _ in range(cfg.num_res_blocks + 1):
      f += _resnet(c, cfg.ch * cfg.ch_mult[i], r)
      c = cfg.ch * cfg.ch_mult[i]
      if cfg.using_sa and i == n - 1:
        f += _attn(c, r)
    if i != 0:
      f += (conv_flops(2, c, 4 * c, r + 1, r + 1) if subpixel
            else conv_flops(3, c, c, 2 * r, 2 * r))
      r *= 2
  return f + conv_flops(3, c, cfg.in_channels, r, r)


def vqvae_flops(cfg: VQVAEConfig, batch: int = 1, what: str = 'decode',
                subpixel: bool = True) -> int:
  """FLOPs of `batch` images: 'encode' (image -> f), 'decode' (f_hat -> image) or 'both'."""
  if what not in WHATS:
    raise ValueError(f'what must be one of {WHATS}, got {what!r}')
  f = 0
  if what in ('encode', 'both'):
    f += encoder_flops(cfg)
  if what in ('decode', 'both'):
    f += decoder_flops(cfg, subpixel)
  return batch * f
