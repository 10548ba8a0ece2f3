"""`var-jax edit`: zero-shot in-painting, out-painting and class-conditional editing.

    var-jax edit --checkpoint ckpt/d16 --image photo.png --box 0.1,0.1,0.8,0.8 --out grid.png
    var-jax edit --checkpoint ckpt/d16 --image photo.png --box 0.2,0.2,0.8,0.8 --outpaint \
        --label 207 --num 8 --out grid.png
    var-jax edit --checkpoint ckpt/d16 --image photo.png --mask mask.png --label 88 --out grid.png

What is regenerated:
  --box y0,x0,y1,x1  fractions of the image in [0, 1] (top, left, bottom, right), as the
                     reference's notebook: the box is regenerated and the rest kept, or
                     with --outpaint the box is kept and the rest regenerated. The box is
                     rounded to the token grid (patch_nums[-1] tokens a side).
  --mask PNG         white = regenerate, black = keep (grey: in between), at the image's
                     size or at the token grid's; a token is regenerated when its patch of
                     pixels averages at least half white (var_jax.edit, pixel masks).
The image must have the model's size (e.g. 256x256). --label is the class to edit
toward; without it the unconditional class (plain in-/out-painting). The grid shows
the input, the mask (the regenerated tokens greyed out) and --num edits (one batch,
seed --seed). --out is never overwritten unless --force.
"""
from __future__ import annotations

import os

import numpy as np

from var_jax.commands._common import (FAILURE, USAGE, CommandError, add_sampling_arguments, guarded,
                                      reading, show_info_logs)

FLAGS = {'cfg': '--cfg', 'top_k': '--top-k', 'top_p': '--top-p'}


def add_arguments(parser):
  parser.add_argument('--checkpoint', required=True, help='var-jax checkpoint directory')
  parser.add_argument('--image', required=True, help="image to edit, at the model's size")
  which = parser.add_mutually_exclusive_group(required=True)
  which.add_argument('--mask', help='PNG: white = regenerate, black = keep (image or token size)')
  which.add_argument('--box', help='y0,x0,y1,x1 in fractions of the image: the box to regenerate')
  parser.add_argument('--outpaint', action='store_true', help='with --box: keep the box, regenerate the rest')
  parser.add_argument('--label', type=int, default=None,
                      help='class to edit toward (default: none, i.e. num_classes: plain in-/out-painting)')
  add_sampling_arguments(parser)
  parser.add_argument('--num', type=int, default=4, help='number of edits (one batch)')
  parser.add_argument('--dtype', choices=('float32', 'bfloat16'), default='float32')
  parser.add_argument('--out', required=True, help='PNG grid: input, mask, edits')
  parser.add_argument('--tokens-out', default=None, help='npz of the edits\' token maps idx_0..idx_{K-1}')
  parser.add_argument('--force', action='store_true', help='overwrite --out / --tokens-out')


def parse_box(text: str):
  try:
    box = [float(v) for v in text.split(',')]
  except ValueError:
    box = []
  if len(box) != 4:
    raise CommandError(f'--box must be four comma-separated fractions y0,x0,y1,x1, got {text!r}', USAGE)
  return box


def _check_args(args) -> None:
  """What needs no model: flags, output files, input files."""
  from var_jax.sampling_args import check_sampling_args
  check_sampling_args(args.cfg, args.top_k, args.top_p, names=FLAGS)
  if args.num < 1:
    raise CommandError(f'--num must be >= 1, got {args.num}', USAGE)
  if args.outpaint and args.box is None:
    raise CommandError('--outpaint goes with --box (a --mask says itself what is kept)', USAGE)
  if args.box is not None:
    from var_jax.edit import box_mask
    box_mask(2, *parse_box(args.box))            # the box's own checks (ValueError)
  from var_jax import safe_io
  outputs = {'--out': args.out, '--tokens-out': args.tokens_out}
  safe_io.check_distinct(outputs)
  safe_io.check_not_inputs(outputs, {'--image': args.image, '--mask': args.mask})
  for flag, path in outputs.items():
    safe_io.check_output(path, force=args.force, flag=flag)
  if not os.path.isdir(args.checkpoint):
    raise CommandError(f'checkpoint directory not found: {args.checkpoint}', FAILURE)
  for what, path in (('image', args.image), ('mask', args.mask)):
    if path is not None and not os.path.isfile(path):
      raise CommandError(f'{what} not found: {path}', FAILURE)


def keep_mask(args, config) -> np.ndarray:
  """(h, w) float32 at token resolution, 1 = keep; refuses masks that keep or regenerate all."""
  from var_jax import edit, io_utils
  h, size = config.patch_nums[-1], config.image_size
  if args.box is not None:
    mask = edit.box_mask(h, *parse_box(args.box), inpainting=not args.outpaint)
    what = '--box'
  else:
    with reading(args.mask):   # an unreadable mask is a bad file (exit 1)
      white = io_utils.read_image(args.mask, 'L').astype(np.float32) / 255.0
    if white.shape not in ((size, size), (h, h)):
      raise CommandError(f'--mask is {white.shape[1]}x{white.shape[0]}; it must be {size}x{size} '
                         f'(the image) or {h}x{h} (the token grid)', USAGE)
    mask = edit.token_mask(1.0 - white, config, 1)[0]
    what = '--mask'
  kept = mask > 0.5                               # the last scale's keep mask
  if kept.all():
    raise CommandError(f'{what} regenerates nothing: every token of the {h}x{h} grid is kept, so the '
                       'edit would be the input\'s reconstruction (a token is regenerated when its '
                       'patch of the mask is at least half white)', USAGE)
  if not kept.any():
    raise CommandError(f'{what} keeps nothing: every token is regenerated, which is sampling, not '
                       'editing (use var-jax sample)', USAGE)
  return mask


def _run(args) -> int:
  _check_args(args)
  show_info_logs()
  import jax.numpy as jnp
  from var_jax import checkpoint, io_utils
  from var_jax.pipeline import load
  config = checkpoint.read_config(args.checkpoint)   # the checks first, then the weights
  if config.var is None:
    raise CommandError(f'{args.checkpoint} has no VAR transformer (convert it with --var)')
  size, n_cls = config.image_size, config.var.num_classes
  with reading(args.image):   # an unreadable image is a bad file (exit 1), as in reconstruct
    rgb = io_utils.read_image(args.image)
  if rgb.shape[:2] != (size, size):
    raise CommandError(f'--image is {rgb.shape[1]}x{rgb.shape[0]}; this model edits {size}x{size} '
                       'images (resize or crop it first)', USAGE)
  label = n_cls if args.label is None else args.label
  if not 0 <= label <= n_cls:
    raise CommandError(f'--label must be a class in [0, {n_cls}) or {n_cls} (unconditional), '
                       f'got {args.label}', USAGE)
  mask = keep_mask(args, config)
  pipe = load(args.checkpoint, dtype=jnp.bfloat16 if args.dtype == 'bfloat16' else jnp.float32)
  x = rgb.astype(np.float32) / 127.5 - 1.0
  images, tokens = pipe.edit(np.repeat(x[None], args.num, axis=0), mask, label, cfg=args.cfg,
                             top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                             more_smooth=args.more_smooth)
  f = size // config.patch_nums[-1]
  kept = np.repeat(np.repeat(mask > 0.5, f, axis=0), f, axis=1)[..., None]
  shown = np.where(kept, rgb, np.uint8(128))
  tiles = np.concatenate([rgb[None], shown[None], io_utils.to_uint8(np.asarray(images))])
  io_utils.save_png(args.out, io_utils.make_grid(tiles, nrow=min(len(tiles), 10)))
  if args.tokens_out:
    io_utils.save_npz(args.tokens_out, io_utils.tokens_to_arrays(tokens))
  target = 'unconditional' if label == n_cls else f'class {label}'
  print(f'{args.num} edit(s) ({target}, {int((mask <= 0.5).sum())} of {mask.size} tokens '
        f'regenerated) -> {args.out}')
  return 0


def run(args) -> int:
  return guarded('edit', _run, args, signals=True)
