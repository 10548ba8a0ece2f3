"""The VQVAE of VAR (the reference's models/vqvae.py): encoder, multi-scale quantizer, decoder.

Images are NHWC in [-1, 1]; latents are (B, h, w, Cvae) with h = w = patch_nums[-1];
token maps are int32 (B, pn*pn) in raster order, one per scale. Call the methods
with `VQVAE(cfg).apply({'params': params}, ..., method='name')`.

With dtype=jnp.bfloat16 the encoder and decoder compute in bfloat16 (NHWC, float32
GroupNorm statistics; see autoencoder.py) while the quantizer (quant_conv output,
distances, argmin, f_hat accumulation, phi) stays in float32, like the reference.
`var_jax.tokenizer.flops.vqvae_flops` counts the encoder/decoder FLOPs analytically.
"""
from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
from flax import linen as nn

from var_jax.config import VQVAEConfig
from var_jax.tokenizer.autoencoder import Decoder, Encoder, conv
from var_jax.tokenizer.quantizer import MultiScaleQuantizer

_F32 = jnp.float32


class VQVAE(nn.Module):
  """Submodules: encoder, quant_conv, quantize, post_quant_conv, decoder (reference names)."""
  config: VQVAEConfig = VQVAEConfig()
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  # Of the encoder/decoder convs; None: HIGHEST for float32 compute (no TF32 on GPUs, for
  # parity), the backend default otherwise. The quantizer always uses HIGHEST.
  precision: Any = None
  # The decoder's upsample+conv as one 2x2 conv at low resolution (same function, 16/36
  # of the FLOPs; see autoencoder.SubpixelUpConv); False: repeat, then the 3x3 conv.
  subpixel_upsample: bool = True

  @property
  def _precision(self):
    if self.precision is not None:
      return self.precision
    return jax.lax.Precision.HIGHEST if jnp.dtype(self.dtype) == jnp.float32 else None

  def setup(self):
    cfg = self.config
    common = dict(ch=cfg.ch, ch_mult=cfg.ch_mult, num_res_blocks=cfg.num_res_blocks,
                  using_sa=cfg.using_sa, using_mid_sa=cfg.using_mid_sa, dropout=cfg.dropout,
                  dtype=self.dtype, param_dtype=self.param_dtype, precision=self._precision)
    self.encoder = Encoder(z_channels=cfg.Cvae, **common)
    self.decoder = Decoder(out_channels=cfg.in_channels, subpixel_upsample=self.subpixel_upsample,
                           **common)
    ks = cfg.quant_conv_ks
    self.quant_conv = conv(cfg.Cvae, ks, None, dtype=_F32, param_dtype=self.param_dtype,
                           precision=jax.lax.Precision.HIGHEST)
    self.post_quant_conv = conv(cfg.Cvae, ks, None, dtype=self.dtype,
                                param_dtype=self.param_dtype, precision=self._precision)
    self.quantize = MultiScaleQuantizer(cfg, self.param_dtype)

  # --- checks ----------------------------------------------------------------
  def _check_img(self, img_BHWC):
    S, C = self.config.image_size, self.config.in_channels
    if img_BHWC.ndim != 4 or img_BHWC.shape[1:] != (S, S, C):
      raise ValueError(f'images must be NHWC of shape (B, {S}, {S}, {C}) for image size {S} '
                       f'(patch_nums[-1]={self.config.v_patch_nums[-1]} x downsample '
                       f'{self.config.downsample}), got {tuple(img_BHWC.shape)}')

  # --- encoder / decoder ----------------------------------------------------------
  def encode_f(self, img_BHWC: jax.Array, train: bool = False) -> jax.Array:
    """quant_conv(encoder(img)): the float32 latent f (B, h, w, Cvae)."""
    self._check_img(img_BHWC)
    h = self.encoder(img_BHWC, train)
    return self.quant_conv(h.astype(_F32))

  def decode_fhat(self, f_hat_BhwC: jax.Array, train: bool = False,
                  clamp: bool = True) -> jax.Array:
    """decoder(post_quant_conv(f_hat)) in float32, clamped to [-1, 1] unless clamp=False."""
    if f_hat_BhwC.ndim != 4 or f_hat_BhwC.shape[-1] != self.config.Cvae:
      raise ValueError(f'f_hat must be (B, h, w, {self.config.Cvae}), got {tuple(f_hat_BhwC.shape)}')
    img = self.decoder(self.post_quant_conv(f_hat_BhwC.astype(self.dtype)), train).astype(_F32)
    return jnp.clip(img, -1, 1) if clamp else img

  # --- tokens ------------------------------------------------------------------
  def img_to_idx(self, img_BHWC: jax.Array) -> List[jax.Array]:
    """Token maps of every scale, int32 (B, pn*pn) each."""
    return self.quantize.encode(self.encode_f(img_BHWC))[0]

  def f_to_fhats(self, f_BhwC: jax.Array) -> List[jax.Array]:
    """The accumulated f_hat after each scale."""
    return self.quantize.encode(f_BhwC)[1]

  def f_to_idx_and_fhats(self, f_BhwC: jax.Array) -> Tuple[List[jax.Array], List[jax.Array]]:
    return self.quantize.encode(f_BhwC)

  def idx_to_fhat(self, idx_list: Sequence[jax.Array]) -> jax.Array:
    return self.quantize.decode(idx_list)

  def idx_to_img(self, idx_list: Sequence[jax.Array]) -> jax.Array:
    return self.decode_fhat(self.quantize.decode(idx_list))

  def img_to_recon(self, img_BHWC: jax.Array) -> jax.Array:
    """The reference's img_to_reconstructed_img(last_one=True)."""
    return self.decode_fhat(self.quantize.encode(self.encode_f(img_BHWC))[1][-1])

  # --- VAR interface ----------------------------------------------------------------
  def idx_to_var_input(self, idx_list: Sequence[jax.Array]) -> jax.Array:
    """Teacher-forcing input (B, L - first_l, Cvae) float32."""
    return self.quantize.var_input(idx_list)

  def embed_tokens(self, idx_Bl: jax.Array) -> jax.Array:
    """Code vectors (B, l, Cvae) float32."""
    return self.quantize.embed(idx_Bl)

  def next_ar_input(self, si: int, f_hat_BhwC: jax.Array,
                    h_BlCv: jax.Array) -> Tuple[jax.Array, Optional[jax.Array]]:
    """Adds scale si to f_hat; returns (f_hat, area(f_hat, pn_{si+1}) as (B, l, Cvae) or None)."""
    return self.quantize.next_ar_input(si, f_hat_BhwC, h_BlCv)

  # --- training -----------------------------------------------------------------
  def quantize_train(self, f_BhwC: jax.Array):
    """(straight-through f_hat, vq_loss, token maps) like the reference quantizer's forward."""
    return self.quantize.train_forward(f_BhwC)

  def forward_train(self, img_BHWC: jax.Array, train: bool = True):
    """The reference's VQVAE.forward: (unclamped reconstruction, vq_loss, token maps)."""
    f_hat_st, vq_loss, idx_list = self.quantize.train_forward(self.encode_f(img_BHWC, train))
    return self.decode_fhat(f_hat_st, train, clamp=False), vq_loss, idx_list

  def __call__(self, img_BHWC: jax.Array, train: bool = False) -> jax.Array:
    """Reconstruction clamped to [-1, 1] (straight-through); creates every parameter at init."""
    if self.is_initializing():
      self.quantize.touch_all()
    f_hat_st, _, _ = self.quantize.train_forward(self.encode_f(img_BHWC, train))
    return self.decode_fhat(f_hat_st, train)
