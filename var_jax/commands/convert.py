"""`var-jax convert`: reference .pth files -> a native var-jax checkpoint directory.

    var-jax convert --vae vae_ch160v4096z32.pth --var var_d16.pth --out ckpt/d16

The model config is inferred from the state dicts' shapes (release conventions;
see var_jax.convert.infer) unless --config gives a config.json. Every key and
shape is checked; the target directory is never overwritten without --force.
"""
from __future__ import annotations

from var_jax.commands._common import guarded


def add_arguments(parser):
  parser.add_argument('--vae', required=True, help='reference VQVAE state dict (.pth)')
  parser.add_argument('--var', default=None, help='reference VAR state dict (.pth), optional')
  parser.add_argument('--config', default=None,
                      help='config.json (fixtures layout); default: inferred from the weights')
  parser.add_argument('--out', required=True, help='checkpoint directory to write')
  parser.add_argument('--force', action='store_true', help='replace a non-empty --out directory')


def _run(args) -> int:
  import os
  if os.path.isdir(args.out) and os.listdir(args.out) and not args.force:  # fail before the work
    raise FileExistsError(f'{args.out} is not empty; choose a new directory or pass --force')
  from var_jax.pipeline import from_torch
  pipe = from_torch(args.vae, args.var, config=args.config)
  out = pipe.save(args.out, force=args.force)
  how = f'from {args.config}' if args.config else 'inferred from the weights'
  print(f'{pipe} (config {how}) -> {out}')
  return 0


def run(args) -> int:
  return guarded('convert', _run, args)
