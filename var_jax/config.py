"""Model configuration: the two reference constructors as frozen dataclasses.

`VQVAEConfig` mirrors the keyword arguments of the reference `VQVAE` (plus the
encoder/decoder structure it hard-codes), `VARConfig` those of `VAR`. Values a
port derives from them (L, begin_ends, which phi conv each scale uses, ...) are
properties, never stored. `ModelConfig` pairs them and reads/writes the fixtures'
config.json layout ({"vae": ..., "vae_ddconfig": ..., "var": ...}).

Experiment configs (optimiser, data, mesh) are ml_collections files in configs/;
these dataclasses hold only what defines the network and its checkpoint. A config's
model section maps onto them 1:1: `VARConfig.from_section(c.model, ...)`,
`VQVAEConfig.from_section(c.vae)`.
"""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Iterable, Mapping, Sequence, Tuple

import numpy as np

PATCH_NUMS_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
PATCH_NUMS_512 = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)


def _tuple(x) -> Tuple[int, ...]:
  return tuple(int(v) for v in x)


def _from_section(cls, section: Mapping[str, Any], ignore: Iterable[str],
                  aliases: Mapping[str, str], override: Mapping[str, Any]):
  """cls(**section) for a config section whose keys are cls's fields (or their aliases).

  Keys in `ignore` configure the run, not the network (e.g. model.attention); any other
  key that is not a field is an error, so the section and the dataclass stay 1:1."""
  fields = {f.name for f in dataclasses.fields(cls)}
  items = section.items() if hasattr(section, 'items') else dict(section).items()
  kw, unknown = {}, []
  for k, v in items:
    name = aliases.get(k, k)
    if k in ignore:
      continue
    if name not in fields:
      unknown.append(k)
      continue
    kw[name] = tuple(v) if isinstance(v, list) else v
  if unknown:
    raise ValueError(f'{cls.__name__} has no field(s) {sorted(unknown)} (fields: {sorted(fields)})')
  kw.update(override)
  return cls(**kw)


def phi_ticks(k: int) -> np.ndarray:
  """Tick positions of K partially shared phi convs, in float64 like the reference."""
  if k == 4:
    return np.linspace(1 / 3 / k, 1 - 1 / 3 / k, k)
  return np.linspace(1 / 2 / k, 1 - 1 / 2 / k, k)


@dataclasses.dataclass(frozen=True)
class VQVAEConfig:
  """Multi-scale residual VQVAE; defaults are the released vae_ch160v4096z32."""
  vocab_size: int = 4096
  z_channels: int = 32          # Cvae
  ch: int = 160
  ch_mult: Tuple[int, ...] = (1, 1, 2, 2, 4)
  num_res_blocks: int = 2
  using_sa: bool = True          # attention at the lowest resolution level
  using_mid_sa: bool = True      # attention in the middle block
  in_channels: int = 3
  dropout: float = 0.0
  beta: float = 0.25
  using_znorm: bool = False
  quant_conv_ks: int = 3
  quant_resi: float = 0.5
  share_quant_resi: int = 4      # 0: one phi per scale, 1: one shared, K>1: K phis
  default_qresi_counts: int = 0  # phi count when share_quant_resi == 0 (0: one per scale)
  v_patch_nums: Tuple[int, ...] = PATCH_NUMS_256

  def __post_init__(self):
    object.__setattr__(self, 'ch_mult', _tuple(self.ch_mult))
    object.__setattr__(self, 'v_patch_nums', _tuple(self.v_patch_nums))
    if self.ch % 32:
      raise ValueError(f'VQVAE ch={self.ch} must be a multiple of 32 (GroupNorm with 32 groups)')
    if not self.v_patch_nums or list(self.v_patch_nums) != sorted(self.v_patch_nums):
      raise ValueError(f'v_patch_nums must be non-empty and increasing, got {self.v_patch_nums}')
    if self.share_quant_resi < 0:
      raise ValueError(f'share_quant_resi must be >= 0, got {self.share_quant_resi}')

  @classmethod
  def from_section(cls, section: Mapping[str, Any], *, ignore: Iterable[str] = (),
                   **override) -> 'VQVAEConfig':
    """From a training config's tokenizer section (`patch_nums` names `v_patch_nums`)."""
    return _from_section(cls, section, ignore, {'patch_nums': 'v_patch_nums'}, override)

  # --- derived -------------------------------------------------------------
  @property
  def Cvae(self) -> int:
    return self.z_channels

  @property
  def downsample(self) -> int:
    return 2 ** (len(self.ch_mult) - 1)

  @property
  def image_size(self) -> int:
    return self.v_patch_nums[-1] * self.downsample

  @property
  def num_scales(self) -> int:
    return len(self.v_patch_nums)

  @property
  def phi_enabled(self) -> bool:
    """|quant_resi| <= 1e-6 makes every phi the identity (no conv parameters)."""
    return abs(self.quant_resi) > 1e-6

  @property
  def num_phi(self) -> int:
    """Number of phi convs stored in the checkpoint's quantizer."""
    if self.share_quant_resi == 0:
      return self.default_qresi_counts or self.num_scales
    if self.share_quant_resi == 1:
      return 1
    return self.share_quant_resi

  @property
  def phi_index_per_scale(self) -> Tuple[int, ...]:
    """Which phi conv scale k uses: nearest tick to k/(S-1), first on ties, float64."""
    s = self.num_scales
    if self.share_quant_resi == 1:
      return (0,) * s
    ticks = phi_ticks(self.num_phi)
    ats = [si / (s - 1) if s > 1 else 0.0 for si in range(s)]
    return tuple(int(np.argmin(np.abs(ticks - at))) for at in ats)


@dataclasses.dataclass(frozen=True)
class VARConfig:
  """Next-scale transformer; defaults are var_d16 as built by the reference's build_vae_var."""
  num_classes: int = 1000
  depth: int = 16
  embed_dim: int = 1024
  num_heads: int = 16
  mlp_ratio: float = 4.0
  drop_rate: float = 0.0
  attn_drop_rate: float = 0.0
  drop_path_rate: float = 0.0
  norm_eps: float = 1e-6
  shared_aln: bool = False
  cond_drop_rate: float = 0.1
  attn_l2_norm: bool = True
  patch_nums: Tuple[int, ...] = PATCH_NUMS_256

  def __post_init__(self):
    object.__setattr__(self, 'patch_nums', _tuple(self.patch_nums))
    if self.embed_dim % self.num_heads:
      raise ValueError(f'embed_dim={self.embed_dim} is not divisible by num_heads={self.num_heads}')

  @classmethod
  def from_section(cls, section: Mapping[str, Any], *, ignore: Iterable[str] = (),
                   **override) -> 'VARConfig':
    """From a training config's model section; `override` adds what it does not hold
    (patch_nums comes from the tokenizer)."""
    return _from_section(cls, section, ignore, {}, override)

  @classmethod
  def for_depth(cls, depth: int, **kw) -> 'VARConfig':
    """The release convention: width 64*depth, depth heads, drop path 0.1*depth/24."""
    kw.setdefault('drop_path_rate', 0.1 * depth / 24)
    return cls(depth=depth, embed_dim=64 * depth, num_heads=depth, **kw)

  @property
  def L(self) -> int:
    return sum(pn * pn for pn in self.patch_nums)

  @property
  def first_l(self) -> int:
    return self.patch_nums[0] ** 2

  @property
  def begin_ends(self) -> Tuple[Tuple[int, int], ...]:
    out, cur = [], 0
    for pn in self.patch_nums:
      out.append((cur, cur + pn * pn))
      cur += pn * pn
    return tuple(out)

  @property
  def head_dim(self) -> int:
    return self.embed_dim // self.num_heads

  @property
  def mlp_hidden(self) -> int:
    return round(self.embed_dim * self.mlp_ratio)

  @property
  def attn_scale(self) -> float:
    return 1.0 if self.attn_l2_norm else 0.25 / math.sqrt(self.head_dim)

  @property
  def max_scale_mul(self) -> float:
    return float(np.log(np.float32(100.0)).astype(np.float32))


_VAE_KEYS = {f.name for f in dataclasses.fields(VQVAEConfig)}
_VAR_KEYS = {f.name for f in dataclasses.fields(VARConfig)}
_DD_KEYS = ('ch_mult', 'num_res_blocks', 'using_sa', 'using_mid_sa', 'in_channels', 'dropout')


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The tokenizer and (optionally) the transformer that go together."""
  vae: VQVAEConfig = VQVAEConfig()
  var: VARConfig | None = VARConfig()

  def __post_init__(self):
    if self.var is not None and self.var.patch_nums != self.vae.v_patch_nums:
      raise ValueError(
          f'VAR patch_nums {self.var.patch_nums} != VQVAE v_patch_nums {self.vae.v_patch_nums}')

  @property
  def patch_nums(self) -> Tuple[int, ...]:
    return self.vae.v_patch_nums

  @property
  def image_size(self) -> int:
    return self.vae.image_size

  # --- (de)serialisation in the fixtures' config.json layout -----------------
  def to_dict(self) -> dict:
    vae = dataclasses.asdict(self.vae)
    dd = {k: vae.pop(k) for k in _DD_KEYS}
    out = {'vae': _jsonable(vae), 'vae_ddconfig': _jsonable(dd)}
    if self.var is not None:
      out['var'] = _jsonable(dataclasses.asdict(self.var))
    return out

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> 'ModelConfig':
    """Accepts the fixtures' config.json dict (unknown keys such as 'test_mode' or
    'flash_if_available' are ignored; 'derived', 'observed', ... too)."""
    if 'vae' not in d:
      raise ValueError("config has no 'vae' section")
    vae_kw = {k: v for k, v in dict(d['vae']).items() if k in _VAE_KEYS}
    for k, v in dict(d.get('vae_ddconfig') or {}).items():
      if k in _DD_KEYS:
        vae_kw[k] = v
    vae = VQVAEConfig(**vae_kw)
    var = None
    if d.get('var') is not None:
      var_kw = {k: v for k, v in dict(d['var']).items() if k in _VAR_KEYS}
      var_kw.setdefault('patch_nums', vae.v_patch_nums)
      var = VARConfig(**var_kw)
    return cls(vae=vae, var=var)

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=1)

  @classmethod
  def from_json(cls, text_or_path: str) -> 'ModelConfig':
    text = text_or_path
    if not text_or_path.lstrip().startswith('{'):
      with open(text_or_path) as f:
        text = f.read()
    return cls.from_dict(json.loads(text))


def _jsonable(d: dict) -> dict:
  return {k: (list(v) if isinstance(v, Sequence) and not isinstance(v, str) else v)
          for k, v in d.items()}
