"""Native var-jax checkpoints: orbax-saved parameters plus a readable config.

Layout of a checkpoint directory:

    config.json            the ModelConfig, in the fixtures' config.json layout
    var_jax_format.json    format marker: {"format": "var-jax", "version": 1, items, buffers}
    params/                orbax (StandardCheckpointer) tree {'vae': ..., 'var': ..., 'buffers': ...}

'buffers' holds the reference buffers that carry information (the VQVAE's
`quantize.ema_vocab_hit_SV` training statistic) so that a converted checkpoint
exports back to the identical .pth files; derived buffers are regenerated.

Saving never overwrites a non-empty directory unless force=True, and then
writes a complete new checkpoint beside it before swapping it in, so an
interrupted save leaves the old one intact. Restoring builds the expected tree
from the config (`jax.eval_shape`, nothing allocated), checks every key, shape
and dtype against the stored metadata, then reads.
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np

from var_jax.config import ModelConfig
from var_jax.convert import mapping, naming

FORMAT, VERSION = 'var-jax', 1
MARKER, CONFIG, PARAMS = 'var_jax_format.json', 'config.json', 'params'


class CheckpointError(ValueError):
  """A var-jax checkpoint directory that is missing, incomplete, corrupt or mismatched."""


def _buffers_tree(buffers: Mapping[str, Mapping[str, Any]]) -> Dict[str, Any]:
  """{'vae': {'quantize.ema_vocab_hit_SV': arr}} -> nested dicts orbax can name."""
  return {part: naming.unflatten({tuple(k.split('.')): np.asarray(v) for k, v in bufs.items()})
          for part, bufs in buffers.items() if bufs}


def save(directory: str | os.PathLike, config: ModelConfig, vae_params: Any,
         var_params: Any = None, *, buffers: Optional[Mapping[str, Mapping[str, Any]]] = None,
         force: bool = False) -> pathlib.Path:
  """Writes a checkpoint to `directory` (refuses a non-empty one unless force)."""
  import orbax.checkpoint as ocp
  target = pathlib.Path(directory).absolute()
  if target.exists() and not target.is_dir():
    raise FileExistsError(f'{target} exists and is not a directory')
  if target.is_dir() and any(target.iterdir()) and not force:
    raise FileExistsError(f'{target} is not empty; choose a new directory or pass force=True '
                          '(--force) to replace it')
  if (var_params is None) != (config.var is None):
    raise ValueError('VAR params and config.var must be given together')
  tree: Dict[str, Any] = {'vae': vae_params}
  if var_params is not None:
    tree['var'] = var_params
  bufs = _buffers_tree(buffers or {})
  if bufs:
    tree['buffers'] = bufs
  marker = {'format': FORMAT, 'version': VERSION, 'items': sorted(k for k in tree if k != 'buffers'),
            'buffers': {f'{part}:{".".join(path)}': [list(np.shape(v)), str(np.asarray(v).dtype)]
                        for part, sub in bufs.items() for path, v in naming.flatten(sub).items()}}
  target.parent.mkdir(parents=True, exist_ok=True)
  tmp = target.parent / f'.{target.name}.tmp-{os.getpid()}'
  old = target.parent / f'.{target.name}.old-{os.getpid()}'
  shutil.rmtree(tmp, ignore_errors=True)
  tmp.mkdir()
  try:
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(tmp / PARAMS, tree)
    ckptr.wait_until_finished()
    ckptr.close()
    (tmp / CONFIG).write_text(config.to_json() + '\n')
    (tmp / MARKER).write_text(json.dumps(marker, indent=1) + '\n')
    if target.exists():
      target.rename(old)
    tmp.rename(target)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)
  return target


def read_config(directory: str | os.PathLike) -> ModelConfig:
  d = pathlib.Path(directory)
  if not d.is_dir():
    raise FileNotFoundError(f'checkpoint directory not found: {d}')
  marker = d / MARKER
  if not marker.is_file():
    raise CheckpointError(f'{d} is not a var-jax checkpoint ({MARKER} missing); convert reference '
                          'weights with `var-jax convert`')
  try:
    info = json.loads(marker.read_text())
  except json.JSONDecodeError as e:
    raise CheckpointError(f'{marker} is corrupt: {e}') from e
  if info.get('format') != FORMAT or int(info.get('version', -1)) > VERSION:
    raise CheckpointError(f'{marker}: unsupported format {info.get("format")!r} version '
                          f'{info.get("version")!r} (this var-jax reads {FORMAT} <= {VERSION})')
  if not (d / CONFIG).is_file():
    raise CheckpointError(f'{d}: {CONFIG} is missing')
  try:
    return ModelConfig.from_json(str(d / CONFIG))
  except (ValueError, TypeError, KeyError) as e:
    raise CheckpointError(f'{d / CONFIG} is not a valid model config: {e}') from e


def _expected_tree(directory: pathlib.Path, config: ModelConfig) -> Dict[str, Any]:
  import jax
  info = json.loads((directory / MARKER).read_text())
  tree = {'vae': mapping.abstract_params(config, what=mapping.VQVAE)}
  if config.var is not None:
    tree['var'] = mapping.abstract_params(config, what=mapping.VAR)
  bufs: Dict[str, Dict[tuple, Any]] = {}
  for name, (shape, dtype) in info.get('buffers', {}).items():
    part, key = name.split(':', 1)
    bufs.setdefault(part, {})[tuple(key.split('.'))] = jax.ShapeDtypeStruct(tuple(shape), np.dtype(dtype))
  if bufs:
    tree['buffers'] = {part: naming.unflatten(flat) for part, flat in bufs.items()}
  return tree


def _check_against_metadata(directory: pathlib.Path, expected: Dict[str, Any], stored: Any) -> None:
  want = naming.flatten(expected)
  have = naming.flatten(stored)
  problems = []
  for path, leaf in want.items():
    if path not in have:
      problems.append(f'{"/".join(path)}: missing (expected shape {tuple(leaf.shape)})')
      continue
    got = have[path]
    if tuple(got.shape) != tuple(leaf.shape) or np.dtype(got.dtype) != np.dtype(leaf.dtype):
      problems.append(f'{"/".join(path)}: stored {tuple(got.shape)} {np.dtype(got.dtype)}, '
                      f'expected {tuple(leaf.shape)} {np.dtype(leaf.dtype)}')
  problems += [f'{"/".join(p)}: unexpected (stored shape {tuple(have[p].shape)})'
               for p in have if p not in want]
  if problems:
    raise CheckpointError(f'{directory}: parameters do not match {CONFIG} ({len(problems)} '
                          'problem(s)):\n  ' + '\n  '.join(problems[:12]))


def restore(directory: str | os.PathLike) -> Tuple[ModelConfig, Any, Any, Dict[str, Dict[str, np.ndarray]]]:
  """Returns (config, vae_params, var_params or None, buffers) of a checkpoint."""
  import orbax.checkpoint as ocp
  d = pathlib.Path(directory).absolute()
  config = read_config(d)
  expected = _expected_tree(d, config)
  params_dir = d / PARAMS
  if not params_dir.is_dir():
    raise CheckpointError(f'{d}: the {PARAMS}/ directory is missing')
  ckptr = ocp.StandardCheckpointer()
  try:
    try:
      stored = ckptr.metadata(params_dir).item_metadata.tree
    except Exception as e:  # orbax raises assorted types for unreadable metadata
      raise CheckpointError(f'{params_dir}: unreadable or corrupt checkpoint ({type(e).__name__}: {e})') from e
    _check_against_metadata(d, expected, stored)
    try:
      tree = ckptr.restore(params_dir, expected)
    except Exception as e:
      raise CheckpointError(f'{params_dir}: corrupt checkpoint ({type(e).__name__}: {e})') from e
  finally:
    ckptr.close()
  buffers = {part: {'.'.join(p): np.asarray(v) for p, v in naming.flatten(sub).items()}
             for part, sub in tree.get('buffers', {}).items()}
  return config, tree['vae'], tree.get('var'), buffers
