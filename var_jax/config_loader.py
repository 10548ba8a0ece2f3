"""Experiment configs: load a configs/*.py file and apply `--config.key=value` overrides.

Reuse: any trainer calls `cfg = load_config('configs/x.py', ['--config.optim.base_lr=3e-4'])`.
A config file defines `get_config(arg: str | None = None) -> ml_collections.ConfigDict`;
`path:arg` passes `arg` (big_vision style, e.g. `configs/var_d16.py:smoke`). The returned
dict is locked, so an override of an unknown key is an error, and every override is
parsed with the type of the value it replaces (bool/int/float/str/tuple/list/None).

The reference's short names (`optim.tblr`, `model.aln`, `pg`, ...) and the VQVAE
configs' former ones (`optim.wd`, `optim.clip`, ...) are still accepted, on the command
line and in config files, with a one-line deprecation message: see `RENAMED`.
"""
from __future__ import annotations

import ast
import difflib
import importlib.util
import os
import sys
from typing import Any, Callable, Dict, Iterable, Sequence, Tuple

import ml_collections

_TRUE = ('1', 'true', 'yes', 'on')
_FALSE = ('0', 'false', 'no', 'off')

# Former key -> current key (and how to translate the value where the meaning changed).
RENAMED: Dict[str, str] = {
    'optim.tblr': 'optim.base_lr', 'optim.twd': 'optim.weight_decay',
    'optim.twde': 'optim.weight_decay_end', 'optim.tclip': 'optim.grad_clip',
    'optim.ac': 'optim.grad_accum', 'optim.ls': 'optim.label_smoothing',
    'optim.sche': 'optim.schedule', 'optim.wp': 'optim.warmup_epochs',
    'optim.wp0': 'optim.warmup_start', 'optim.wpe': 'optim.final_lr',
    'model.aln': 'init.adaln', 'model.alng': 'init.adaln_gamma', 'model.hd': 'init.head',
    'model.ini': 'init.std', 'pg': 'progressive.until', 'pg0': 'progressive.start_stage',
    'pgwp': 'progressive.warmup_epochs',
    # the VQVAE configs' former names
    'optim.wd': 'optim.weight_decay', 'optim.wd_end': 'optim.weight_decay_end',
    'optim.clip': 'optim.grad_clip', 'model.codebook_init': 'init.codebook',
}
# twde = 0 meant "= twd" in the reference; weight_decay_end says that with -1.
_TRANSLATE: Dict[str, Callable[[Any], Any]] = {
    'optim.twde': lambda v: -1.0 if v == 0 else v,
}


def canonical_key(key: str) -> Tuple[str, Callable[[Any], Any]]:
  """(current key, value translation) for `key`; a renamed key says so in one line."""
  if key not in RENAMED:
    return key, lambda v: v
  new = RENAMED[key]
  print(f'var-jax: config key {key!r} is deprecated, use {new!r}', file=sys.stderr, flush=True)
  return new, _TRANSLATE.get(key, lambda v: v)


def migrate_renamed(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Moves values a config file set under a former key (see RENAMED) to the current key."""
  for old in RENAMED:
    *parents, leaf = old.split('.')
    node = cfg
    for p in parents:
      node = node.get(p) if isinstance(node, ml_collections.ConfigDict) else None
    if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
      continue
    value = node[leaf]
    del node[leaf]
    new, translate = canonical_key(old)
    set_value(cfg, new, translate(value), ignore_type=True)
  return cfg


def load_config_file(path: str) -> ml_collections.ConfigDict:
  """Imports `path` (optionally `path:arg`) and returns its get_config(arg)."""
  arg = None
  if ':' in path and not os.path.exists(path):
    path, arg = path.rsplit(':', 1)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'config file {path!r} not found')
  name = '_var_jax_config_' + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, 'get_config'):
    raise ValueError(f'config file {path!r} defines no get_config()')
  cfg = module.get_config(arg) if arg is not None else module.get_config()
  if not isinstance(cfg, ml_collections.ConfigDict):
    raise ValueError(f'{path}: get_config() must return an ml_collections.ConfigDict')
  return cfg


def parse_override(cfg: ml_collections.ConfigDict, flag: str) -> tuple:
  """'--config.a.b=v' -> ('a.b', typed value)."""
  text = flag[2:] if flag.startswith('--') else flag
  if not text.startswith('config.') or '=' not in text:
    raise ValueError(f'bad override {flag!r}: expected --config.key=value')
  key, raw = text[len('config.'):].split('=', 1)
  key, translate = canonical_key(key)
  old = _lookup(cfg, key)
  return key, translate(_coerce(key, old, raw))


def set_value(cfg: ml_collections.ConfigDict, key: str, value: Any, *,
              ignore_type: bool = False) -> None:
  """cfg['a.b.c'] = value for a dotted key (type-checked unless ignore_type); a former
  key (RENAMED) sets the current one."""
  key, translate = canonical_key(key)
  value = translate(value)
  *parents, leaf = key.split('.')
  node = cfg
  for p in parents:
    node = node[p]
  if ignore_type:
    with node.ignore_type():
      node[leaf] = value
  else:
    node[leaf] = value


def apply_overrides(cfg: ml_collections.ConfigDict, flags: Iterable[str]) -> ml_collections.ConfigDict:
  """Applies overrides in order to a (locked) ConfigDict, in place; returns it."""
  for flag in flags or ():
    key, value = parse_override(cfg, flag)   # already coerced to the field's type
    set_value(cfg, key, value, ignore_type=True)
  return cfg


def load_config(path: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """Config file + overrides, locked (unknown keys raise)."""
  cfg = migrate_renamed(load_config_file(path))
  cfg.lock()
  return apply_overrides(cfg, overrides)


def _lookup(cfg, key: str) -> Any:
  node = cfg
  parts = key.split('.')
  for i, p in enumerate(parts):
    if not isinstance(node, ml_collections.ConfigDict) or p not in node:
      known = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
      hint = difflib.get_close_matches(p, known, n=1)
      where = '.'.join(parts[:i]) or '<root>'
      raise ValueError(f'unknown config key {key!r} (no {p!r} in {where})'
                       + (f'; did you mean {hint[0]!r}?' if hint else ''))
    node = node[p]
  if isinstance(node, ml_collections.ConfigDict):
    raise ValueError(f'config key {key!r} is a section; override its fields instead')
  return node


def _coerce(key: str, old: Any, raw: str) -> Any:
  """Parses `raw` to the type of `old`; ValueError naming the key if it does not fit."""
  try:
    if isinstance(old, bool):
      low = raw.strip().lower()
      if low in _TRUE:
        return True
      if low in _FALSE:
        return False
      raise ValueError(raw)
    if isinstance(old, int):
      value = ast.literal_eval(raw)
      if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(raw)
      return value
    if isinstance(old, float):
      return float(raw)
    if isinstance(old, str):
      return raw
    if isinstance(old, (tuple, list)):
      value = ast.literal_eval(raw) if raw.strip() else ()
      if isinstance(value, (int, float, str)):
        value = (value,)
      if not isinstance(value, (tuple, list)):
        raise ValueError(raw)
      return type(old)(value)
    if old is None:  # untyped: a Python literal if it parses, else the string
      try:
        return ast.literal_eval(raw)
      except (ValueError, SyntaxError):
        return raw
  except (ValueError, SyntaxError) as e:
    raise ValueError(f'config key {key!r} expects {type(old).__name__}, got {raw!r}') from e
  raise ValueError(f'config key {key!r} has unsupported type {type(old).__name__}')


def import_sibling(config_file: str, name: str):
  """Imports `name`.py from the folder of `config_file` (configs share helpers this way)."""
  path = os.path.join(os.path.dirname(os.path.abspath(config_file)), name + '.py')
  mod_name = '_var_jax_config_' + name
  spec = importlib.util.spec_from_file_location(mod_name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module
