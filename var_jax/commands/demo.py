"""`var-jax demo [--out DIR]`: sample every digit class from the embedded model, offline.

Loads the digits checkpoint shipped in the package (var_jax/assets/digits), draws
--per-class samples of each of the 10 classes with the shipped sampling defaults,
and writes DIR/grid.png (a row per class) and DIR/samples.npz (images: uint8 NHWC,
labels: int32). See var_jax.demo and README.md ("The embedded digits model").
"""
from __future__ import annotations

import time

from var_jax.commands._common import USAGE, CommandError, guarded, show_info_logs


def add_arguments(parser):
  parser.add_argument('--out', default='var_jax_demo', help='output folder (default: ./var_jax_demo)')
  parser.add_argument('--per-class', type=int, default=None, help='samples per class (default 10)')
  parser.add_argument('--cfg', type=float, default=None, help='guidance scale (default: shipped)')
  parser.add_argument('--top-k', type=int, default=None, help='top-k filter, 0 off (default: shipped)')
  parser.add_argument('--top-p', type=float, default=None, help='nucleus filter, 0 off (default: shipped)')
  parser.add_argument('--seed', type=int, default=None, help='sampling seed (default 0)')


def _run(args) -> int:
  if args.per_class is not None and args.per_class < 1:
    raise CommandError(f'--per-class must be >= 1, got {args.per_class}', USAGE)
  show_info_logs()
  from var_jax import demo
  t0 = time.perf_counter()
  paths = demo.run(args.out, per_class=args.per_class, cfg=args.cfg, top_k=args.top_k,
                   top_p=args.top_p, seed=args.seed)
  print(f'wrote {paths["grid"]} (one row per digit 0-9) and {paths["samples"]} '
        f'(images: uint8 NHWC, labels: int32) in {time.perf_counter() - t0:.1f}s')
  return 0


def run(args) -> int:
  return guarded('demo', _run, args)
