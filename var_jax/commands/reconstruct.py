"""`var-jax reconstruct`: images -> multi-scale tokens -> images, with the VQVAE.

    var-jax reconstruct --checkpoint ckpt/d16 --images a.png b.jpg --out grid.png

Each image is resized (shorter side, Lanczos) and centre-cropped to the model's
size. The grid shows the inputs on one row and their reconstructions below
(groups of 8); --tokens-out saves the token maps idx_0..idx_{K-1}. Inputs and outputs
are checked before the model loads; an existing output is replaced only with --force.
"""
from __future__ import annotations

import numpy as np

from var_jax.commands._common import FAILURE, USAGE, CommandError, guarded, reading


def add_arguments(parser):
  parser.add_argument('--checkpoint', required=True, help='var-jax checkpoint directory')
  parser.add_argument('--images', nargs='+', required=True, help='image files (any PIL format)')
  parser.add_argument('--out', required=True, help='PNG grid: inputs above reconstructions')
  parser.add_argument('--tokens-out', default=None, help='npz of token maps idx_0..idx_{K-1}')
  parser.add_argument('--batch-size', type=int, default=16, help='images per encoder call')
  parser.add_argument('--force', action='store_true', help='replace existing output files')


def _run(args) -> int:
  import os
  from var_jax import checkpoint, io_utils, safe_io
  from var_jax.commands.sample import check_checkpoint_dir
  if args.batch_size < 1:
    raise CommandError(f'--batch-size must be >= 1, got {args.batch_size}', USAGE)
  outputs = {'--out': args.out, '--tokens-out': args.tokens_out}
  safe_io.check_distinct(outputs)
  safe_io.check_not_inputs(outputs, {'--images': args.images})
  check_checkpoint_dir(args.checkpoint)
  for p in args.images:
    if os.path.isdir(p):
      raise CommandError(f'--images {p} is a folder; give image files', FAILURE)
    if not os.path.isfile(p):
      raise CommandError(f'image not found: {p}', FAILURE)
  size = checkpoint.read_config(args.checkpoint).image_size
  with reading():   # an unreadable image fails before the weights load
    images = np.stack([io_utils.load_image(p, size) for p in args.images])
  for flag, path in outputs.items():
    safe_io.check_output(path, force=args.force, flag=flag)
  from var_jax.pipeline import load
  pipe = load(args.checkpoint)
  recons, tokens = [], []
  for i in range(0, len(images), args.batch_size):
    idx = pipe.encode(images[i:i + args.batch_size])
    recons.append(np.asarray(pipe.decode(idx)))
    tokens.append([np.asarray(t) for t in idx])
  recon = np.concatenate(recons)
  cols = min(8, len(images))
  rows = []
  for i in range(0, len(images), cols):
    for block in (images[i:i + cols], recon[i:i + cols]):
      blank = np.full((cols - len(block),) + block.shape[1:], -1.0, np.float32)
      rows.append(np.concatenate([block, blank]))
  grid = io_utils.make_grid(io_utils.to_uint8(np.concatenate(rows), low=-1.0), nrow=cols)
  io_utils.save_png(args.out, grid)
  if args.tokens_out:
    merged = [np.concatenate([t[k] for t in tokens]) for k in range(len(tokens[0]))]
    io_utils.save_npz(args.tokens_out, io_utils.tokens_to_arrays(merged))
  print(f'{len(images)} image(s) at {size}x{size} -> {args.out}')
  return 0


def run(args) -> int:
  return guarded('reconstruct', _run, args, signals=True)
