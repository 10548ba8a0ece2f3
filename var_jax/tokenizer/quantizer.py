"""The multi-scale residual quantizer (the reference's models/quant.py), NHWC, float32.

Scale k of S: z = area(f_rest, pn_k) (f_rest itself at the last scale); the token is
the nearest code (argmin |z|^2 + |e|^2 - 2 z.e, or argmax cosine with znorm);
h = phi_k(bicubic(e[token], (H, W))) (no bicubic at the last scale);
f_hat += h; f_rest -= h. phi(h) = (1 - r) h + r conv3x3(h) with r = |quant_resi|.

Everything here runs in float32 with full-precision matmuls whatever the compute
dtype of the encoder/decoder, like the reference (its quantizer leaves autocast):
the token decisions have margins as small as 1e-4.
"""
from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
from flax import linen as nn

from var_jax.config import VQVAEConfig
from var_jax.ops.resize import area_resize, bicubic_resize
from var_jax.tokenizer.autoencoder import conv

_F32 = jnp.float32
_HIGHEST = jax.lax.Precision.HIGHEST


def _phi_conv(cvae: int, param_dtype) -> nn.Conv:
  return conv(cvae, 3, None, dtype=_F32, param_dtype=param_dtype, precision=_HIGHEST)


class PhiShared(nn.Module):
  """One phi conv for every scale (torch key `quant_resi.qresi`)."""
  cvae: int
  param_dtype: Any = jnp.float32

  def setup(self):
    self.qresi = _phi_conv(self.cvae, self.param_dtype)

  def __call__(self, index: int, h_BHWC):
    del index
    return self.qresi(h_BHWC)


class PhiPartiallyShared(nn.Module):
  """K phi convs shared by neighbouring scales (torch keys `quant_resi.qresi_ls.{i}`)."""
  cvae: int
  count: int
  param_dtype: Any = jnp.float32

  def setup(self):
    self.qresi_ls = [_phi_conv(self.cvae, self.param_dtype) for _ in range(self.count)]

  def __call__(self, index: int, h_BHWC):
    return self.qresi_ls[index](h_BHWC)


class MultiScaleQuantizer(nn.Module):
  """Codebook `embedding` (V, Cvae) and the phi convs `quant_resi...` (none if r ~ 0)."""
  config: VQVAEConfig
  param_dtype: Any = jnp.float32

  def setup(self):
    cfg = self.config
    self.embedding = nn.Embed(
        cfg.vocab_size, cfg.Cvae, param_dtype=self.param_dtype, dtype=_F32,
        embedding_init=nn.with_logical_partitioning(nn.initializers.normal(1.0),
                                                    ('codebook', 'cvae')))
    if not cfg.phi_enabled:
      return
    if cfg.share_quant_resi == 0:     # torch keys quant_resi.{i}
      self.quant_resi = [_phi_conv(cfg.Cvae, self.param_dtype) for _ in range(cfg.num_phi)]
    elif cfg.share_quant_resi == 1:
      self.quant_resi = PhiShared(cfg.Cvae, self.param_dtype)
    else:
      self.quant_resi = PhiPartiallyShared(cfg.Cvae, cfg.num_phi, self.param_dtype)

  # --- pieces ----------------------------------------------------------------
  @property
  def patch_nums(self) -> Tuple[int, ...]:
    return self.config.v_patch_nums

  def codebook(self) -> jax.Array:
    return jnp.asarray(self.embedding.embedding, _F32)

  def touch_all(self):
    """Creates every phi conv at init, also those no scale uses."""
    if not self.config.phi_enabled:
      return
    x = jnp.zeros((1, 1, 1, self.config.Cvae), _F32)
    for i in range(self.config.num_phi):
      self._conv(i, x)

  def _conv(self, i: int, h_BHWC):
    if self.config.share_quant_resi == 0:
      return self.quant_resi[i](h_BHWC)
    return self.quant_resi(i, h_BHWC)

  def phi(self, si: int, h_BHWC: jax.Array) -> jax.Array:
    """phi of scale si: (1 - r) h + r conv(h); identity when |quant_resi| <= 1e-6."""
    if not self.config.phi_enabled:
      return h_BHWC
    r = abs(self.config.quant_resi)
    return h_BHWC * (1 - r) + self._conv(self.config.phi_index_per_scale[si], h_BHWC) * r

  def nearest(self, z_BlC: jax.Array) -> jax.Array:
    """Index of the nearest code of each vector (int32 (B, l))."""
    e_VC = self.codebook()
    z_BlC = z_BlC.astype(_F32)
    if self.config.using_znorm:
      z_n = z_BlC / jnp.maximum(jnp.linalg.norm(z_BlC, axis=-1, keepdims=True), 1e-12)
      e_n = e_VC / jnp.maximum(jnp.linalg.norm(e_VC, axis=-1, keepdims=True), 1e-12)
      sim = jnp.einsum('BlC,VC->BlV', z_n, e_n, precision=_HIGHEST)
      return jnp.argmax(sim, axis=-1).astype(jnp.int32)
    d = (jnp.sum(z_BlC * z_BlC, axis=-1, keepdims=True) + jnp.sum(e_VC * e_VC, axis=-1)
         - 2 * jnp.einsum('BlC,VC->BlV', z_BlC, e_VC, precision=_HIGHEST))
    return jnp.argmin(d, axis=-1).astype(jnp.int32)

  def embed(self, idx_Bl: jax.Array) -> jax.Array:
    """Code vectors of tokens: (B, l) -> (B, l, Cvae) float32."""
    return jnp.take(self.codebook(), idx_Bl, axis=0)

  def h_of_scale(self, si: int, h_BpnpnC: jax.Array) -> jax.Array:
    """phi_si(bicubic(h, (H, W))): what scale si adds to f_hat (no resize at the last scale)."""
    H = self.patch_nums[-1]
    if si != len(self.patch_nums) - 1:
      h_BpnpnC = bicubic_resize(h_BpnpnC, (H, H))
    return self.phi(si, h_BpnpnC)

  def tokens_to_h(self, si: int, idx_Bl: jax.Array) -> jax.Array:
    B, pn = idx_Bl.shape[0], self.patch_nums[si]
    return self.h_of_scale(si, self.embed(idx_Bl).reshape(B, pn, pn, self.config.Cvae))

  # --- checks ----------------------------------------------------------------
  def check_f(self, f_BhwC: jax.Array, what: str = 'f'):
    H, C = self.patch_nums[-1], self.config.Cvae
    if f_BhwC.ndim != 4 or f_BhwC.shape[1:] != (H, H, C):
      raise ValueError(f'{what} must have shape (B, {H}, {H}, {C}) (NHWC at the last scale '
                       f'{H}x{H}, Cvae={C}), got {tuple(f_BhwC.shape)}')

  def check_idx(self, idx_list: Sequence[jax.Array], count: Optional[int] = None):
    pns = self.patch_nums if count is None else self.patch_nums[:count]
    if len(idx_list) != len(pns):
      raise ValueError(f'expected {len(pns)} token maps (patch_nums {pns}), got {len(idx_list)}')
    for si, (idx, pn) in enumerate(zip(idx_list, pns)):
      if idx.ndim != 2 or idx.shape[1] != pn * pn:
        raise ValueError(f'token map {si} must have shape (B, {pn * pn}), got {tuple(idx.shape)}')

  # --- multi-scale flows ---------------------------------------------------------
  def encode(self, f_BhwC: jax.Array) -> Tuple[List[jax.Array], List[jax.Array]]:
    """Token maps and the accumulated f_hat after each scale (no gradient)."""
    self.check_f(f_BhwC)
    f_rest = jax.lax.stop_gradient(f_BhwC.astype(_F32))
    B, _, _, C = f_rest.shape
    f_hat = jnp.zeros_like(f_rest)
    idx_list, fhats = [], []
    S = len(self.patch_nums)
    for si, pn in enumerate(self.patch_nums):
      z = area_resize(f_rest, (pn, pn)) if si != S - 1 else f_rest
      idx_Bl = self.nearest(z.reshape(B, pn * pn, C))
      h = self.tokens_to_h(si, idx_Bl)
      f_hat = f_hat + h
      f_rest = f_rest - h
      idx_list.append(idx_Bl)
      fhats.append(f_hat)
    return idx_list, fhats

  def decode(self, idx_list: Sequence[jax.Array]) -> jax.Array:
    """Final f_hat from every scale's token map."""
    self.check_idx(idx_list)
    f_hat = 0.
    for si, idx_Bl in enumerate(idx_list):
      f_hat = f_hat + self.tokens_to_h(si, idx_Bl)
    return f_hat

  def var_input(self, idx_list: Sequence[jax.Array]) -> jax.Array:
    """Teacher forcing: area(f_hat of scales < k, pn_k) for k >= 1, concatenated (B, L-first_l, C)."""
    self.check_idx(idx_list)
    pns, C, H = self.patch_nums, self.config.Cvae, self.patch_nums[-1]
    B = idx_list[0].shape[0]
    if len(pns) == 1:
      return jnp.zeros((B, 0, C), _F32)
    f_hat = jnp.zeros((B, H, H, C), _F32)
    nexts = []
    for si in range(len(pns) - 1):
      f_hat = f_hat + self.h_of_scale(
          si, self.embed(idx_list[si]).reshape(B, pns[si], pns[si], C))
      nxt = pns[si + 1]
      nexts.append(area_resize(f_hat, (nxt, nxt)).reshape(B, nxt * nxt, C))
    return jnp.concatenate(nexts, axis=1)

  def next_ar_input(self, si: int, f_hat_BhwC: jax.Array, h_BlC: jax.Array):
    """Adds scale si's code vectors to f_hat; returns (f_hat, next scale's input or None)."""
    pns, C = self.patch_nums, self.config.Cvae
    B, pn = h_BlC.shape[0], pns[si]
    if h_BlC.shape[1:] != (pn * pn, C):
      raise ValueError(f'scale {si} expects h of shape (B, {pn * pn}, {C}), got {tuple(h_BlC.shape)}')
    h = self.h_of_scale(si, h_BlC.astype(_F32).reshape(B, pn, pn, C))
    f_hat_BhwC = f_hat_BhwC.astype(_F32) + h
    if si == len(pns) - 1:
      return f_hat_BhwC, None
    nxt = pns[si + 1]
    return f_hat_BhwC, area_resize(f_hat_BhwC, (nxt, nxt)).reshape(B, nxt * nxt, C)

  def train_forward(self, f_BhwC: jax.Array):
    """The reference's training forward: (straight-through f_hat, vq loss, token maps).

    vq_loss = mean over scales of beta * mse(sg(f_hat_k), f) + mse(f_hat_k, sg(f)):
    the first term trains the encoder (commitment), the second the codebook and phi.
    """
    self.check_f(f_BhwC)
    f = f_BhwC.astype(_F32)
    f_ng = jax.lax.stop_gradient(f)
    B, _, _, C = f.shape
    f_rest, f_hat = f_ng, jnp.zeros_like(f_ng)
    S, beta = len(self.patch_nums), self.config.beta
    loss, idx_list = 0., []
    for si, pn in enumerate(self.patch_nums):
      z = area_resize(f_rest, (pn, pn)) if si != S - 1 else f_rest
      idx_Bl = jax.lax.stop_gradient(self.nearest(jax.lax.stop_gradient(z).reshape(B, pn * pn, C)))
      h = self.tokens_to_h(si, idx_Bl)
      f_hat = f_hat + h
      f_rest = jax.lax.stop_gradient(f_rest - h)
      idx_list.append(idx_Bl)
      loss = loss + beta * jnp.mean((jax.lax.stop_gradient(f_hat) - f) ** 2) \
          + jnp.mean((f_hat - f_ng) ** 2)
    f_hat_st = (jax.lax.stop_gradient(f_hat) - f_ng) + f
    return f_hat_st, loss / S, idx_list
