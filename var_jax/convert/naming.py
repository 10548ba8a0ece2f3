"""The one naming rule between reference state-dict keys and Flax parameter paths.

Flax modules in var_jax are named after the reference's modules, with a list
index folded into its parent's name:

    encoder.down.0.block.1.conv1.weight   ->  encoder/down_0/block_1/conv1/kernel
    blocks.3.ada_lin.1.weight             ->  blocks_3/ada_lin_1/kernel
    quantize.embedding.weight             ->  quantize/embedding/embedding
    blocks.0.attn.scale_mul_1H11          ->  blocks_0/attn/scale_mul_1H11  (raw parameter, torch shape)

Leaves: `weight` becomes `kernel` (Dense: transposed (in, out); Conv: OIHW ->
HWIO), `scale` (GroupNorm/LayerNorm) or `embedding` (nn.Embed), whichever the
Flax tree holds; `bias` and raw `nn.Parameter`s keep their names and shapes.
The only reference names that end in `_<digit>` themselves are the middle blocks
(`mid.block_1`, `mid.attn_1`, `mid.block_2`), so the reverse rule leaves
children of `mid` alone.
"""
from __future__ import annotations

import re
from typing import Any, Dict, Mapping, Tuple

import numpy as np

Path = Tuple[str, ...]
_WEIGHT_LEAVES = ('kernel', 'scale', 'embedding')
_INDEXED = re.compile(r'^(.+)_(\d+)$')


def torch_key_to_path(key: str) -> Path:
  """'a.b.0.c.weight' -> ('a', 'b_0', 'c', 'weight') (the leaf is resolved later)."""
  out = []
  for part in key.split('.'):
    if part.isdigit() and out:
      out[-1] = f'{out[-1]}_{part}'
    else:
      out.append(part)
  return tuple(out)


def path_to_torch_key(path: Path) -> str:
  parts = []
  for i, name in enumerate(path):
    last = i == len(path) - 1
    if last and name in _WEIGHT_LEAVES:
      parts.append('weight')
      continue
    m = _INDEXED.match(name)
    if m and not last and (i == 0 or path[i - 1] != 'mid'):
      parts.extend([m.group(1), m.group(2)])
    else:
      parts.append(name)
  return '.'.join(parts)


def torch_to_flax_array(leaf: str, value: np.ndarray) -> np.ndarray:
  if leaf == 'kernel' and value.ndim == 2:
    return value.T
  if leaf == 'kernel' and value.ndim == 4:
    return value.transpose(2, 3, 1, 0)
  return value


def flax_to_torch_array(leaf: str, value: np.ndarray) -> np.ndarray:
  if leaf == 'kernel' and value.ndim == 2:
    return value.T
  if leaf == 'kernel' and value.ndim == 4:
    return value.transpose(3, 2, 0, 1)
  return value


def flatten(tree: Mapping[str, Any], prefix: Path = ()) -> Dict[Path, Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(flatten(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def unflatten(flat: Mapping[Path, Any]) -> Dict[str, Any]:
  out: Dict[str, Any] = {}
  for path, v in flat.items():
    d = out
    for k in path[:-1]:
      d = d.setdefault(k, {})
    d[path[-1]] = v
  return out


def resolve_path(key: str, expected: Mapping[Path, Any]) -> Path | None:
  """The Flax path of a torch key, given the flat expected Flax tree (None if absent)."""
  path = torch_key_to_path(key)
  if path[-1] == 'weight':
    for leaf in _WEIGHT_LEAVES:
      cand = path[:-1] + (leaf,)
      if cand in expected:
        return cand
    return None
  return path if path in expected else None
