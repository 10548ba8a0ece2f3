"""`var-jax eval`: FID, sFID, Inception Score, precision and recall of a sample batch.

    var-jax eval --samples samples.npz --ref VIRTUAL_imagenet256_labeled.npz \\
        --inception pt_inception-2015-12-05-6726825d.pth --out metrics.json

Both .npz files are in ADM's format (arr_0: uint8 NHWC; `var-jax sample --npz-out`
writes it; `var-jax demo`'s samples.npz with key `images` is read too). Features come
from the FID InceptionV3 in JAX (var_jax/eval/inception.py) with pytorch-fid's weights,
which the user downloads once. The reference features and statistics are cached next to
--out (or next to the samples without --out); see var_jax/eval/evaluate.py. By default the
reference statistics are recomputed from arr_0 with this network; --ref-stats stored
uses a reference batch's precomputed mu/sigma/mu_s/sigma_s (TensorFlow's graph, over the
whole data set); with both, metrics.json also compares them (stored_vs_recomputed).
Every input is checked before the network loads; an existing --out is replaced only
with --force. Unusable input files are exit status 1, bad arguments 2.
"""
from __future__ import annotations

import json
import os

from var_jax.commands._common import FAILURE, USAGE, CommandError, guarded, reading


def add_arguments(parser):
  parser.add_argument('--samples', required=True, help='npz of samples (arr_0: uint8 NHWC)')
  parser.add_argument('--ref', required=True, help='reference batch npz (arr_0, optional mu/sigma)')
  parser.add_argument('--inception', required=True,
                      help='pytorch-fid weights pt_inception-2015-12-05-6726825d.pth')
  parser.add_argument('--batch-size', type=int, default=100, help='images per Inception batch')
  parser.add_argument('--out', default=None, help='write the metrics as JSON here')
  parser.add_argument('--force', action='store_true', help='overwrite an existing --out')
  parser.add_argument('--ref-stats', choices=('recompute', 'stored'), default='recompute',
                      help="reference statistics: recomputed from arr_0 with this network "
                           "(default) or the file's precomputed mu/sigma (TensorFlow's)")
  parser.add_argument('--dtype', choices=('float32', 'bfloat16'), default='float32',
                      help='Inception compute dtype (float32: full precision)')
  parser.add_argument('--sqrtm', choices=('scipy', 'eigh'), default='scipy',
                      help="FID's matrix square root: scipy.linalg.sqrtm as pytorch-fid and ADM "
                           "(default) or the same trace from a symmetric eigensolver, ~10x faster")
  parser.add_argument('--no-cache', action='store_true', help='do not cache reference statistics')
  parser.add_argument('--no-progress', action='store_true', help='hide the progress bars')


def _check_args(args) -> None:
  if args.batch_size < 1:
    raise CommandError(f'--batch-size must be >= 1, got {args.batch_size}', USAGE)
  for flag, path in (('--samples', args.samples), ('--ref', args.ref),
                     ('--inception', args.inception)):
    if os.path.isdir(path):
      raise CommandError(f'{flag} {path} is a folder; give the file', FAILURE)
    if flag != '--inception' and not os.path.isfile(path):   # inception.load says where
      raise CommandError(f'{flag} file not found: {path}', FAILURE)   # to download it
  from var_jax import safe_io
  safe_io.check_not_inputs({'--out': args.out}, {'--samples': args.samples, '--ref': args.ref,
                                                 '--inception': args.inception})
  safe_io.check_output(args.out, force=args.force, flag='--out')


def _write_json(path: str, metrics) -> None:
  from var_jax.safe_io import atomic_write
  with atomic_write(path, 'w') as f:
    json.dump(metrics, f, indent=1)
    f.write('\n')


def _run(args) -> int:
  _check_args(args)
  from var_jax.eval import evaluate as ev
  from var_jax.eval import inception
  from var_jax.eval.npz import NpzImages
  with reading():   # bad inputs fail before the network loads, as exit status 1
    for path in (args.samples, args.ref):
      NpzImages(path).close()
  import jax.numpy as jnp
  with reading():
    net = inception.load(args.inception,
                         dtype=jnp.bfloat16 if args.dtype == 'bfloat16' else jnp.float32)
  cache_dir = None if args.no_cache else os.path.dirname(os.path.abspath(args.out or args.samples))
  if cache_dir:
    os.makedirs(cache_dir, exist_ok=True)
    from var_jax.safe_io import sweep_stale
    sweep_stale(ev.cache_path(cache_dir, args.ref))   # a killed run's temporary cache file
  with reading():   # a truncated batch, a --ref-stats stored file without statistics
    metrics = ev.evaluate(net, args.samples, args.ref, cache_dir=cache_dir,
                          ref_stats=args.ref_stats, batch_size=args.batch_size,
                          progress=not args.no_progress, sqrtm=args.sqrtm)
  for key in ('fid', 'sfid', 'is', 'is_std', 'precision', 'recall'):
    print(f'{key:>10}: {metrics[key]:.4f}')
  print(f'{"images":>10}: {metrics["n_samples"]} samples, {metrics["n_ref"]} reference '
        f'(reference statistics: {metrics["ref_stats"]})')
  for key, value in metrics.get('stored_vs_recomputed', {}).items():
    print(f'{key:>26}: {value:.4f}')
  if args.out:
    _write_json(args.out, metrics)
    print(f'metrics -> {args.out}')
  return 0


def run(args) -> int:
  return guarded('eval', _run, args, signals=True)
