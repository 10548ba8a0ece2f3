"""`var-jax demo [--out DIR] [--edit]`: the embedded digits model, offline.

Loads the digits checkpoint shipped in the package (var_jax/assets/digits), draws
--per-class samples of each of the 10 classes with the shipped sampling defaults,
and writes DIR/grid.png (a row per class) and DIR/samples.npz (images: uint8 NHWC,
labels: int32). With --edit, zero-shot class editing instead: the first held-out
digit of each class keeps its upper half and has its lower half regenerated as each
class 0-9; writes DIR/edit_grid.png (a row per digit: the digit, the kept half, the
10 edits) and DIR/edits.npz (originals, sources, edits [digit, class], predicted),
and prints how many edits the demo's classifier reads as the requested class.
See var_jax.demo and README.md ("The embedded digits model").
"""
from __future__ import annotations

import time

from var_jax.commands._common import USAGE, CommandError, guarded, show_info_logs

OUTPUTS = {'sample': ('grid.png', 'samples.npz'), 'edit': ('edit_grid.png', 'edits.npz')}


def add_arguments(parser):
  parser.add_argument('--out', default='var_jax_demo', help='output folder (default: ./var_jax_demo)')
  parser.add_argument('--force', action='store_true', help='replace the files of an earlier run')
  parser.add_argument('--per-class', type=int, default=None, help='samples per class (default 10)')
  parser.add_argument('--cfg', type=float, default=None, help='guidance scale (default: shipped)')
  parser.add_argument('--top-k', type=int, default=None, help='top-k filter, 0 off (default: shipped)')
  parser.add_argument('--top-p', type=float, default=None, help='nucleus filter, 0 off (default: shipped)')
  parser.add_argument('--seed', type=int, default=None, help='sampling seed (default 0)')
  parser.add_argument('--edit', action='store_true',
                      help='zero-shot editing: held-out digits, lower half regenerated as each class')


def _run(args) -> int:
  if args.per_class is not None and args.per_class < 1:
    raise CommandError(f'--per-class must be >= 1, got {args.per_class}', USAGE)
  if args.seed is not None and not 0 <= args.seed < 2**31:
    raise CommandError(f'--seed must be in [0, {2**31 - 1}], got {args.seed}', USAGE)
  from var_jax.sampling_args import check_sampling_args
  check_sampling_args(0.0 if args.cfg is None else args.cfg, args.top_k or 0,
                      0.0 if args.top_p is None else args.top_p,
                      names={'cfg': '--cfg', 'top_k': '--top-k', 'top_p': '--top-p'})
  if args.edit and args.per_class is not None:
    raise CommandError('--per-class is for sampling; --edit edits one held-out digit per class',
                       USAGE)
  _check_outputs(args)
  show_info_logs()
  from var_jax import demo
  t0 = time.perf_counter()
  if args.edit:
    r = demo.run_edit(args.out, cfg=args.cfg, top_k=args.top_k, top_p=args.top_p,
                      seed=0 if args.seed is None else args.seed)
    print(f'wrote {r["grid"]} (a row per held-out digit: the digit, its kept upper half, its lower '
          f'half regenerated as 0-9) and {r["edits"]} in {time.perf_counter() - t0:.1f}s; the '
          f'classifier reads {round(r["accuracy"] * r["count"])} of the {r["count"]} edits toward '
          f'another class as that class ({r["accuracy"]:.0%})')
    return 0
  paths = demo.run(args.out, per_class=args.per_class, cfg=args.cfg, top_k=args.top_k,
                   top_p=args.top_p, seed=args.seed)
  print(f'wrote {paths["grid"]} (one row per digit 0-9) and {paths["samples"]} '
        f'(images: uint8 NHWC, labels: int32) in {time.perf_counter() - t0:.1f}s')
  return 0


def _check_outputs(args) -> None:
  """--out is a folder (new or existing); the files this run writes there must be new
  (or --force): checked before anything is sampled."""
  import os
  from var_jax import safe_io
  safe_io.check_output(args.out, kind='into')
  for name in OUTPUTS['edit' if getattr(args, 'edit', False) else 'sample']:
    safe_io.check_output(os.path.join(args.out, name), force=args.force, flag='--out')


def run(args) -> int:
  return guarded('demo', _run, args, signals=True)
