"""The networks behind the VQVAE trainer's perceptual and GAN losses: LPIPS and a PatchGAN.

- `LPIPS`: VGG16 features (relu1_2 .. relu5_3) of the torchvision layout, unit-normalised
  over channels, squared differences weighted per channel by the five LPIPS linear
  heads, averaged over space and summed over layers (Zhang et al. 2018, "vgg" variant).
  The weights are NOT shipped: `load_lpips_params(path, ...)` reads them from files the
  user provides (.pth or .npz): torchvision's vgg16 `features.N.weight/bias` and the
  lpips package's `lin{k}.model.1.weight` (taming's vgg.pth); one file may hold both.
- `PatchDiscriminator`: the PatchGAN of pix2pix/taming (4x4 convs, LeakyReLU 0.2) with
  GroupNorm instead of BatchNorm, so it has no batch statistics to carry.
"""
from __future__ import annotations

import logging
import math
import os
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import jax.numpy as jnp
import numpy as np
from flax import linen as nn

log = logging.getLogger('var_jax.train')

CONV_AXES = ('conv_h', 'conv_w', 'conv_in', 'conv_out')


# --- LPIPS ---------------------------------------------------------------------------

# torchvision vgg16.features: (index of each conv, its output channels); 'M' = max pool.
VGG16_LAYOUT = (64, 64, 'M', 128, 128, 'M', 256, 256, 256, 'M', 512, 512, 512, 'M', 512, 512, 512)
# LPIPS taps the relu after these conv indices of vgg16.features: relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
LPIPS_TAPS = (2, 7, 14, 21, 28)
LPIPS_CHANNELS = (64, 128, 256, 512, 512)
# LPIPS ScalingLayer: inputs in [-1, 1] to ImageNet-normalised.
_SHIFT = np.array([-.030, -.088, -.188], np.float32)
_SCALE = np.array([.458, .448, .450], np.float32)


def vgg16_conv_indices() -> Tuple[int, ...]:
  """torchvision indices of the 13 convs of vgg16.features (each conv is followed by a relu)."""
  out, i = [], 0
  for v in VGG16_LAYOUT:
    if v == 'M':
      i += 1
    else:
      out.append(i)
      i += 2
  return tuple(out)


class VGG16Features(nn.Module):
  """vgg16.features up to relu5_3, NHWC; returns the five LPIPS taps. Convs named `features_{i}`."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BHWC):
    taps, convs = [], iter(vgg16_conv_indices())
    for v in VGG16_LAYOUT:
      if v == 'M':
        x_BHWC = nn.max_pool(x_BHWC, (2, 2), (2, 2))
        continue
      i = next(convs)
      x_BHWC = nn.relu(nn.Conv(
          v, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype, name=f'features_{i}',
          kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), CONV_AXES),
          bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ('conv_out',)))(x_BHWC))
      if i in LPIPS_TAPS:
        taps.append(x_BHWC)
    return taps


class LPIPS(nn.Module):
  """Perceptual distance per image (B,) between two NHWC batches in [-1, 1]."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BHWC, y_BHWC):
    if x_BHWC.shape[-1] != 3:
      raise ValueError(f'LPIPS needs RGB images, got {x_BHWC.shape[-1]} channels')
    net = VGG16Features(self.dtype, name='net')
    B = x_BHWC.shape[0]
    both = jnp.concatenate([x_BHWC, y_BHWC], 0).astype(jnp.float32)
    feats = net(((both - _SHIFT) / _SCALE).astype(self.dtype))
    total = jnp.zeros((B,), jnp.float32)
    for k, (f, c) in enumerate(zip(feats, LPIPS_CHANNELS)):
      f = f.astype(jnp.float32)
      f = f / (jnp.sqrt(jnp.sum(f * f, axis=-1, keepdims=True)) + 1e-10)
      w = self.param(f'lin{k}', nn.with_logical_partitioning(nn.initializers.ones, ('norm',)), (c,))
      d = (f[:B] - f[B:]) ** 2
      total = total + jnp.mean(jnp.einsum('BHWC,C->BHW', d, w), axis=(1, 2))
    return total


def _read_weights(path: str) -> Dict[str, np.ndarray]:
  if path.endswith('.npz'):
    with np.load(path) as z:
      return {k: np.asarray(z[k]) for k in z.files}
  from var_jax.convert.torch_io import load_pth
  sd = load_pth(path)
  # some checkpoints nest the state dict
  for key in ('state_dict', 'model'):
    if key in sd and isinstance(sd[key], Mapping):
      sd = sd[key]
  return {k: np.asarray(v) for k, v in sd.items()}


def _vgg_key(name: str) -> Optional[Tuple[int, str]]:
  """(torchvision feature index, 'weight'|'bias') of a VGG conv key, or None.

  Accepts `features.N.*` (torchvision), `net.features.N.*` and the lpips package's
  `net.sliceK.N.*` (slices keep torchvision's indices)."""
  parts = name.split('.')
  if len(parts) < 3 or parts[-1] not in ('weight', 'bias'):
    return None
  head = parts[-3]
  if head == 'features' or head.startswith('slice'):
    try:
      return int(parts[-2]), parts[-1]
    except ValueError:
      return None
  return None


def lpips_params_from_state_dict(sd: Mapping[str, np.ndarray], *, allow_missing_lin: bool = True
                                 ) -> Dict[str, Any]:
  """LPIPS flax params from a merged torch-style state dict (VGG convs + optional lin heads)."""
  net = {}
  for key, v in sd.items():
    hit = _vgg_key(key)
    if hit is None:
      continue
    i, kind = hit
    leaf = 'kernel' if kind == 'weight' else 'bias'
    v = np.asarray(v, np.float32)
    net.setdefault(f'features_{i}', {})[leaf] = np.transpose(v, (2, 3, 1, 0)) if v.ndim == 4 else v
  want = vgg16_conv_indices()
  missing = [i for i in want if f'features_{i}' not in net or len(net[f'features_{i}']) != 2]
  if missing:
    raise ValueError(f'LPIPS weights lack VGG16 convs features.{missing} (expected torchvision '
                     f'vgg16 keys features.N.weight/bias)')
  net = {k: net[k] for k in (f'features_{i}' for i in want)}
  params: Dict[str, Any] = {'net': net}
  lin_missing = []
  for k, c in enumerate(LPIPS_CHANNELS):
    key = next((n for n in sd if n.endswith(f'lin{k}.model.1.weight')), None)
    if key is None:
      lin_missing.append(k)
      params[f'lin{k}'] = np.ones((c,), np.float32)
      continue
    w = np.asarray(sd[key], np.float32).reshape(-1)
    if w.shape != (c,):
      raise ValueError(f'{key} has {w.size} weights, expected {c}')
    params[f'lin{k}'] = w
  if lin_missing:
    if not allow_missing_lin:
      raise ValueError(f'LPIPS weights lack the linear heads lin{lin_missing}.model.1.weight')
    log.warning('LPIPS: no linear heads (lin{k}.model.1.weight) in the weights: using equal '
                'channel weights (plain normalised-VGG distance) for %s', lin_missing)
  for k, n in enumerate(want):
    kern = params['net'][f'features_{n}']['kernel']
    if kern.shape[:2] != (3, 3):
      raise ValueError(f'features.{n}.weight has shape {kern.shape}, not a 3x3 conv')
  return params


def load_lpips_params(paths: str | Sequence[str], *, allow_missing_lin: bool = True
                      ) -> Optional[Dict[str, Any]]:
  """Params for `LPIPS` from one or more weight files (comma-separated or a list).

  Returns None (perceptual loss off) when no path is given or a file is absent, and says
  so in the log; raises ValueError when a file exists but holds the wrong weights."""
  if isinstance(paths, str):
    paths = [p.strip() for p in paths.split(',') if p.strip()]
  if not paths:
    log.warning('perceptual loss OFF: no LPIPS weights given (set loss.lpips_weights to a '
                'torchvision vgg16 .pth/.npz, plus the lpips lin heads, to turn it on)')
    return None
  absent = [p for p in paths if not os.path.isfile(p)]
  if absent:
    log.warning('perceptual loss OFF: LPIPS weight file(s) not found: %s', ', '.join(absent))
    return None
  sd: Dict[str, np.ndarray] = {}
  for p in paths:
    sd.update(_read_weights(p))
  params = lpips_params_from_state_dict(sd, allow_missing_lin=allow_missing_lin)
  log.info('perceptual loss ON: LPIPS(vgg16) weights from %s', ', '.join(paths))
  return params


# --- patch discriminator ------------------------------------------------------------------

def _groups(c: int) -> int:
  return math.gcd(32, c)


class PatchDiscriminator(nn.Module):
  """PatchGAN: logits (B, h, w) of realness for overlapping patches of NHWC images in [-1, 1]."""
  ndf: int = 64
  n_layers: int = 3
  dtype: Any = jnp.float32

  def _conv(self, features: int, stride: int, name: str, bias: bool = True):
    return nn.Conv(
        features, (4, 4), strides=(stride, stride), padding=((1, 1), (1, 1)), use_bias=bias,
        dtype=self.dtype, name=name,
        kernel_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), CONV_AXES),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ('conv_out',)))

  def _norm(self, c: int, name: str):
    return nn.GroupNorm(
        num_groups=_groups(c), epsilon=1e-5, dtype=self.dtype, name=name,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ('norm',)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ('norm',)))

  @nn.compact
  def __call__(self, x_BHWC):
    x = x_BHWC.astype(self.dtype)
    x = nn.leaky_relu(self._conv(self.ndf, 2, 'conv_0')(x), 0.2)
    for n in range(1, self.n_layers + 1):
      c = self.ndf * min(2 ** n, 8)
      stride = 2 if n < self.n_layers else 1
      x = self._conv(c, stride, f'conv_{n}', bias=False)(x)
      x = nn.leaky_relu(self._norm(c, f'norm_{n}')(x), 0.2)
    x = self._conv(1, 1, f'conv_{self.n_layers + 1}')(x)
    return x[..., 0].astype(jnp.float32)
