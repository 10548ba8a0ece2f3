"""Deterministic random weights for the FID Inception, from a seed and the state-dict shapes.

numpy only (no jax, no torch), so the same recipe runs in var-jax's environment and in
a throwaway PyTorch environment: the tests compare var-jax's network against golden
features that pytorch-fid computed with exactly these weights, and the CLI test and the
benchmark use them where the real file (a 100 MB download) is not at hand.

    sd = random_state_dict(shapes, seed=0)   # shapes: {torch key: shape}

Each tensor gets its own generator, seeded by (seed, crc32(key)), so a tensor's values
do not depend on which other keys exist or their order. The scales keep activations
sane through the 94 convolutions (features neither vanish nor explode):
  conv weight        normal, std = sqrt(2 / fan_in) (He), so ReLU layers keep their scale
  bn weight / bias   uniform [0.8, 1.2] / uniform [-0.1, 0.1]
  bn running_mean    uniform [-0.1, 0.1]
  bn running_var     uniform [0.8, 1.2] (positive, near 1)
  fc weight / bias   normal, std = 1 / sqrt(fan_in) / normal, std = 0.1
Everything is float32; keys ending in num_batches_tracked get int64 zero.
"""
from __future__ import annotations

import collections
import zlib
from typing import Dict, Mapping, Sequence

import numpy as np


def _rng(seed: int, key: str) -> np.random.Generator:
  return np.random.default_rng(np.random.SeedSequence([int(seed), zlib.crc32(key.encode())]))


def random_tensor(key: str, shape: Sequence[int], seed: int = 0) -> np.ndarray:
  """The recipe's value of one state-dict entry (see the module docstring)."""
  shape = tuple(int(s) for s in shape)
  if key.endswith('num_batches_tracked'):
    return np.zeros(shape, np.int64)
  r = _rng(seed, key)
  leaf = key.rsplit('.', 2)
  kind = '.'.join(leaf[-2:])
  if key.endswith('conv.weight'):
    fan_in = int(np.prod(shape[1:]))
    x = r.standard_normal(shape) * np.sqrt(2.0 / fan_in)
  elif kind in ('bn.weight', 'bn.running_var'):
    x = r.uniform(0.8, 1.2, shape)
  elif kind in ('bn.bias', 'bn.running_mean'):
    x = r.uniform(-0.1, 0.1, shape)
  elif key == 'fc.weight':
    x = r.standard_normal(shape) / np.sqrt(shape[1])
  elif key == 'fc.bias':
    x = r.standard_normal(shape) * 0.1
  else:
    raise ValueError(f'no recipe for state-dict key {key!r}')
  return x.astype(np.float32)


def random_state_dict(shapes: Mapping[str, Sequence[int]], seed: int = 0) -> Dict[str, np.ndarray]:
  """{key: array} in the order of `shapes`, by the recipe above."""
  return collections.OrderedDict((k, random_tensor(k, s, seed)) for k, s in shapes.items())
