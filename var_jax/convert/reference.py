"""Reference checkpoints (.pth) <-> (config, params, buffers), whole.

    config, params, buffers = load_reference('vae_ch160v4096z32.pth', 'var_d16.pth')
    params['vae'], params['var']          # unboxed Flax trees (numpy); 'var' is None without a VAR
    save_reference('vae.pth', 'var.pth', config, params, buffers)   # the inverse, bit-identical

`load_reference` reads the files with the safe reader (torch_io, no pickled code
runs), infers the ModelConfig from the shapes unless one is given (convert.infer),
maps every key onto the Flax tree and checks it (convert.mapping), and checks the
VAR's derived buffers against the config (a checkpoint built for another
patch_nums schedule is refused). `buffers` keeps the buffers that carry
information ({'vae': {'quantize.ema_vocab_hit_SV': ...}}); derived ones are
regenerated on export. The trainer loads its frozen tokenizer with it, and
`var_jax.from_torch` wraps it in a Pipeline.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Mapping, NamedTuple, Optional, Tuple

import numpy as np

from var_jax import safe_io
from var_jax.config import ModelConfig
from var_jax.convert import mapping
from var_jax.convert.infer import infer_config
from var_jax.convert.torch_io import load_pth, save_pth

PathLike = str | os.PathLike


class Reference(NamedTuple):
  """What a pair of reference files holds. Unpacks as (config, params, buffers)."""
  config: ModelConfig
  params: Dict[str, Any]                        # {'vae': tree, 'var': tree or None}
  buffers: Dict[str, Dict[str, np.ndarray]]     # {'vae': {key: array}, 'var': {...}}


def as_config(config: Any) -> ModelConfig:
  """A ModelConfig from a ModelConfig, a config.json-style dict, JSON text or a path to one."""
  if isinstance(config, ModelConfig):
    return config
  if isinstance(config, Mapping):
    return ModelConfig.from_dict(config)
  if isinstance(config, (str, os.PathLike)):
    text = os.fspath(config)
    if not text.lstrip().startswith('{') and not os.path.isfile(text):
      raise FileNotFoundError(f'config file not found: {text}')
    return ModelConfig.from_json(text)
  raise TypeError(f'config must be a ModelConfig, a dict or a JSON path, got {type(config).__name__}')


def _to_params(sd, config: ModelConfig, what: str, path) -> Tuple[Any, Dict[str, np.ndarray]]:
  part = config.vae if what == mapping.VQVAE else config.var
  try:
    return mapping.state_dict_to_params(sd, mapping.abstract_params(config, what=what), what=what,
                                        config=part)
  except ValueError as e:
    raise ValueError(f'{os.fspath(path)}: {e}') from e


def _informative_buffers(buffers: Mapping[str, np.ndarray], config: ModelConfig,
                         path) -> Dict[str, np.ndarray]:
  """The VAR's derived buffers must be what the config implies (patch_nums!); drop them."""
  want = mapping.make_buffers(config.var, what=mapping.VAR)
  for key, value in buffers.items():
    if key in want and not np.array_equal(np.asarray(value), want[key]):
      raise ValueError(f'{os.fspath(path)}: buffer {key} does not match the config '
                       f'(patch_nums {config.patch_nums}); the checkpoint was built with another '
                       'schedule: pass the right config')
  return {k: v for k, v in buffers.items() if k not in want}


def load_reference(vae_path: PathLike, var_path: Optional[PathLike] = None,
                   config: Any = None) -> Reference:
  """(config, params, buffers) of reference .pth files; the config is inferred when None.

  `config`: a ModelConfig, a config.json-style dict, JSON text or a path. Without
  var_path the returned config has var=None and params['var'] is None. Raises
  ValueError naming the file and every mismatched key, FileNotFoundError, or
  torch_io.CheckpointError for an unreadable file.
  """
  vae_sd = load_pth(vae_path)
  var_sd = load_pth(var_path) if var_path is not None else None
  if config is None:
    cfg = infer_config(vae_sd, var_sd)
  else:
    cfg = as_config(config)
    if var_sd is not None and cfg.var is None:
      raise ValueError("the config has no 'var' section but a VAR checkpoint was given")
  if var_sd is None:
    cfg = ModelConfig(vae=cfg.vae, var=None)
  vae_params, vae_bufs = _to_params(vae_sd, cfg, mapping.VQVAE, vae_path)
  params: Dict[str, Any] = {'vae': vae_params, 'var': None}
  buffers = {'vae': dict(vae_bufs)}
  if var_sd is not None:
    params['var'], var_bufs = _to_params(var_sd, cfg, mapping.VAR, var_path)
    buffers['var'] = _informative_buffers(var_bufs, cfg, var_path)
  return Reference(cfg, params, buffers)


def state_dicts(config: ModelConfig, params: Mapping[str, Any],
                buffers: Optional[Mapping[str, Mapping[str, Any]]] = None
                ) -> Tuple[Dict[str, np.ndarray], Optional[Dict[str, np.ndarray]]]:
  """The reference state dicts (numpy, torch layout and key order) of (config, params)."""
  import jax
  buffers = buffers or {}
  vae = mapping.params_to_state_dict(jax.device_get(params['vae']), buffers.get('vae'),
                                     config=config.vae, what=mapping.VQVAE)
  var = None
  if params.get('var') is not None:
    var = mapping.params_to_state_dict(jax.device_get(params['var']), buffers.get('var'),
                                       config=config.var, what=mapping.VAR)
  return vae, var


def save_reference(vae_path: PathLike, var_path: Optional[PathLike], config: ModelConfig,
                   params: Mapping[str, Any],
                   buffers: Optional[Mapping[str, Mapping[str, Any]]] = None) -> None:
  """Writes reference-format .pth files (torch.load(..., weights_only=True) reads them):
  the inverse of load_reference (a round trip gives the original bytes per tensor)."""
  safe_io.check_distinct({'vae_path': vae_path, 'var_path': var_path})   # one over the other
  vae, var = state_dicts(config, params, buffers)
  if var_path is not None and var is None:
    raise ValueError('there is no VAR to export (params["var"] is None)')
  save_pth(vae, vae_path)
  if var_path is not None:
    save_pth(var, var_path)
