"""Model configuration read off the shapes of reference state dicts.

Only `.shape` and the key names are read, so this works on a dict of
`jax.ShapeDtypeStruct`s as well as on loaded arrays (cheap tests of the
billion-parameter release files).

What a state dict does not store is filled with the release's conventions:
- `quant_resi` (phi's mixing ratio r) is a plain float, not a tensor: 0.5 is
  assumed whenever phi convs are present (the released tokenizer's value), and
  0.0 (identity phi) when there are none. Pass a config to use another ratio.
- `using_znorm`, `beta`, dropout rates, `norm_eps`, `cond_drop_rate`: defaults.
- Without L2-normalised attention there is no per-head tensor, so the head
  count follows the release rule heads = depth.
- patch_nums: the 256 px schedule when the VAR has L = 680 tokens (or, for a
  lone VQVAE, 10 scales), the 512 px schedule when L = 2240; anything else
  needs an explicit config (or `patch_nums=`).
"""
from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

from var_jax.config import PATCH_NUMS_256, PATCH_NUMS_512, ModelConfig, VARConfig, VQVAEConfig

KNOWN_SCHEDULES = (PATCH_NUMS_256, PATCH_NUMS_512)
DEFAULT_QUANT_RESI = 0.5


def _shape(sd: Mapping[str, Any], key: str):
  if key not in sd:
    raise ValueError(f'cannot infer the config: key {key!r} is missing from the state dict')
  return tuple(int(d) for d in sd[key].shape)


def _indices(sd: Mapping[str, Any], pattern: str) -> list[int]:
  rx = re.compile(pattern)
  return sorted({int(m.group(1)) for k in sd for m in [rx.match(k)] if m})


def _schedule(seq_len: int | None, num_scales: int | None,
              patch_nums: Sequence[int] | None) -> tuple[int, ...]:
  if patch_nums is not None:
    return tuple(int(p) for p in patch_nums)
  for sched in KNOWN_SCHEDULES:
    if seq_len is not None:
      if sum(p * p for p in sched) == seq_len:
        return sched
    elif num_scales in (None, len(sched)):
      return sched
  what = f'{seq_len} tokens' if seq_len is not None else f'{num_scales} scales'
  raise ValueError(
      f'cannot infer patch_nums from the checkpoint ({what}; the known schedules are '
      f'{PATCH_NUMS_256} with L=680 and {PATCH_NUMS_512} with L=2240): pass a config '
      '(ModelConfig, config dict or config.json path) or patch_nums=')


def infer_vqvae(sd: Mapping[str, Any], patch_nums: Sequence[int] | None = None,
                seq_len: int | None = None) -> VQVAEConfig:
  vocab, cvae = _shape(sd, 'quantize.embedding.weight')
  ch, in_ch = _shape(sd, 'encoder.conv_in.weight')[:2]
  levels = _indices(sd, r'^encoder\.down\.(\d+)\.')
  if not levels:
    raise ValueError('cannot infer the config: no encoder.down.N keys in the VQVAE state dict')
  ch_mult = []
  for i in levels:
    out_ch = _shape(sd, f'encoder.down.{i}.block.0.conv1.weight')[0]
    if out_ch % ch:
      raise ValueError(f'encoder.down.{i} has {out_ch} channels, not a multiple of ch={ch}')
    ch_mult.append(out_ch // ch)
  num_res = len(_indices(sd, r'^encoder\.down\.0\.block\.(\d+)\.'))
  using_sa = any(k.startswith(f'encoder.down.{levels[-1]}.attn.') for k in sd)
  using_mid_sa = any(k.startswith('encoder.mid.attn_1.') for k in sd)
  ks = _shape(sd, 'quant_conv.weight')[-1]
  ls = _indices(sd, r'^quantize\.quant_resi\.qresi_ls\.(\d+)\.')
  non_shared = _indices(sd, r'^quantize\.quant_resi\.(\d+)\.')
  ema = sd.get('quantize.ema_vocab_hit_SV')
  num_scales = int(ema.shape[0]) if ema is not None else None
  pns = _schedule(seq_len, num_scales, patch_nums)
  quant_resi, share, counts = DEFAULT_QUANT_RESI, 4, 0
  if ls:
    share = len(ls)
  elif any(k.startswith('quantize.quant_resi.qresi.') for k in sd):
    share = 1
  elif non_shared:
    share = 0
    counts = len(non_shared) if len(non_shared) != len(pns) else 0
  else:
    quant_resi = 0.0  # identity phi: the reference stores no conv
  return VQVAEConfig(vocab_size=vocab, z_channels=cvae, ch=ch, ch_mult=tuple(ch_mult),
                     num_res_blocks=num_res, using_sa=using_sa, using_mid_sa=using_mid_sa,
                     in_channels=in_ch, quant_conv_ks=ks, quant_resi=quant_resi,
                     share_quant_resi=share, default_qresi_counts=counts, v_patch_nums=pns)


def infer_var(sd: Mapping[str, Any], patch_nums: Sequence[int]) -> VARConfig:
  depth = len(_indices(sd, r'^blocks\.(\d+)\.'))
  width = _shape(sd, 'word_embed.weight')[0]
  if 'blocks.0.attn.scale_mul_1H11' in sd:
    heads, l2 = _shape(sd, 'blocks.0.attn.scale_mul_1H11')[1], True
  else:
    heads, l2 = depth, False
  hidden = _shape(sd, 'blocks.0.ffn.fc1.weight')[0]
  return VARConfig(
      num_classes=_shape(sd, 'class_emb.weight')[0] - 1, depth=depth, embed_dim=width,
      num_heads=heads, mlp_ratio=hidden / width, drop_path_rate=0.1 * depth / 24,
      shared_aln='blocks.0.ada_gss' in sd, attn_l2_norm=l2, patch_nums=tuple(patch_nums))


def infer_config(vae_sd: Mapping[str, Any], var_sd: Mapping[str, Any] | None = None, *,
                 patch_nums: Sequence[int] | None = None) -> ModelConfig:
  """The ModelConfig that a pair of reference state dicts (var_sd optional) was built with."""
  seq_len = _shape(var_sd, 'pos_1LC')[1] if var_sd is not None else None
  vae = infer_vqvae(vae_sd, patch_nums, seq_len)
  if var_sd is None:
    return ModelConfig(vae=vae, var=None)
  var = infer_var(var_sd, vae.v_patch_nums)
  if sum(p * p for p in vae.v_patch_nums) != seq_len:
    raise ValueError(f'patch_nums {vae.v_patch_nums} give L={var.L}, but pos_1LC has {seq_len} tokens')
  vocab = _shape(var_sd, 'head.weight')[0]
  cvae = _shape(var_sd, 'word_embed.weight')[1]
  if (vocab, cvae) != (vae.vocab_size, vae.z_channels):
    raise ValueError(f'VAR head/word_embed expect vocab {vocab} and Cvae {cvae}, but the VQVAE has '
                     f'vocab {vae.vocab_size} and Cvae {vae.z_channels}: not a matching pair')
  return ModelConfig(vae=vae, var=var)
