"""`var-jax convert`: reference .pth files -> a native var-jax checkpoint directory.

    var-jax convert --vae vae_ch160v4096z32.pth --var var_d16.pth --out ckpt/d16

The model config is inferred from the state dicts' shapes (release conventions;
see var_jax.convert.infer) unless --config gives a config.json. Every key and
shape is checked. The inputs and --out are checked before any weights are read:
--out must be new or an empty folder; --force replaces a var-jax checkpoint there
(written beside it, then swapped in), never any other folder.
"""
from __future__ import annotations

import os

from var_jax.commands._common import FAILURE, CommandError, guarded, reading


def add_arguments(parser):
  parser.add_argument('--vae', required=True, help='reference VQVAE state dict (.pth)')
  parser.add_argument('--var', default=None, help='reference VAR state dict (.pth), optional')
  parser.add_argument('--config', default=None,
                      help='config.json (fixtures layout); default: inferred from the weights')
  parser.add_argument('--out', required=True, help='checkpoint directory to write')
  parser.add_argument('--force', action='store_true', help='replace a var-jax checkpoint at --out')


def _is_checkpoint(path) -> bool:
  from var_jax.checkpoint import MARKER
  return (path / MARKER).is_file()


def _run(args) -> int:
  from var_jax import safe_io
  for flag, path in (('--vae', args.vae), ('--var', args.var), ('--config', args.config)):
    if path is None:
      continue
    if os.path.isdir(path):
      raise CommandError(f'{flag} {path} is a folder; give the file', FAILURE)
    if not os.path.isfile(path):
      raise CommandError(f'{flag} file not found: {path}', FAILURE)
  safe_io.check_output(args.out, force=args.force, kind='dir', is_ours=_is_checkpoint)
  from var_jax.pipeline import from_torch
  with reading(args.vae, args.var, args.config):   # a damaged, unsafe or mismatched file
    pipe = from_torch(args.vae, args.var, config=args.config)
  out = pipe.save(args.out, force=args.force)
  how = f'from {args.config}' if args.config else 'inferred from the weights'
  print(f'{pipe} (config {how}) -> {out}')
  return 0


def run(args) -> int:
  return guarded('convert', _run, args, signals=True)
