"""`var-jax sample`: class-conditional images from a checkpoint.

    var-jax sample --checkpoint ckpt/d16 --labels 207,360,387 --out grid.png
    var-jax sample --checkpoint ckpt/d16 --num-per-class 50 --batch-size 64 \
        --out grid.png --npz-out samples_50k.npz        # ADM evaluation format

Labels are sampled in batches of --batch-size ("chunks"); chunk i uses seed
--seed when i == 0 (so a one-batch run equals Pipeline.sample(labels, seed=seed))
and a seed derived from (--seed, i) otherwise, so every chunk is reproducible
on its own. With --npz-out (arr_0: uint8 NHWC, the ADM/guided-diffusion
evaluation format) every finished chunk is kept in `<npz-out>.parts/`: an
interrupted run resumes where it stopped when the same command is rerun
(--stop-after-chunks N ends a run early on purpose). The parts folder is removed
once the .npz is assembled.
"""
from __future__ import annotations

import hashlib
import os

import numpy as np

from var_jax.commands._common import FAILURE, USAGE, CommandError, guarded


def add_arguments(parser):
  parser.add_argument('--checkpoint', required=True, help='var-jax checkpoint directory')
  which = parser.add_mutually_exclusive_group(required=True)
  which.add_argument('--labels', help='comma-separated class labels, e.g. 1,2,3')
  which.add_argument('--num-per-class', type=int, help='N samples of every class, class by class')
  parser.add_argument('--cfg', type=float, default=1.5, help='classifier-free guidance scale (>= 0)')
  parser.add_argument('--top-k', type=int, default=900, help='top-k filter (0: off)')
  parser.add_argument('--top-p', type=float, default=0.96, help='nucleus filter in [0, 1) (0: off)')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--more-smooth', action='store_true', help="the reference's Gumbel smoothing")
  parser.add_argument('--batch-size', type=int, default=25, help='images per chunk')
  parser.add_argument('--dtype', choices=('float32', 'bfloat16'), default='float32',
                      help='compute dtype of the networks')
  parser.add_argument('--out', required=True, help='PNG grid of (the first --grid-max) samples')
  parser.add_argument('--grid-max', type=int, default=64, help='at most this many images in --out')
  parser.add_argument('--tokens-out', default=None, help='npz of token maps idx_0..idx_{K-1}')
  parser.add_argument('--npz-out', default=None,
                      help='npz with arr_0 = uint8 NHWC images (resumable, see above)')
  parser.add_argument('--stop-after-chunks', type=int, default=None,
                      help='with --npz-out: stop after this many new chunks (rerun to continue)')
  parser.add_argument('--no-progress', action='store_true', help='hide the progress bar')


def chunk_seed(seed: int, i: int) -> int:
  """The seed of chunk i: `seed` itself for the first, an independent derived one after."""
  if i == 0:
    return int(seed)
  return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, i]).generate_state(1)[0] & 0x7FFFFFFF)


def _parse_labels(args, num_classes: int | None) -> np.ndarray:
  if args.labels is not None:
    try:
      labels = [int(v) for v in args.labels.replace(' ', '').split(',') if v != '']
    except ValueError:
      raise CommandError(f'--labels must be comma-separated integers, got {args.labels!r}', USAGE)
    if not labels:
      raise CommandError('--labels is empty', USAGE)
    labels = np.asarray(labels, np.int64)
  else:
    if args.num_per_class < 1:
      raise CommandError(f'--num-per-class must be >= 1, got {args.num_per_class}', USAGE)
    labels = np.repeat(np.arange(num_classes), args.num_per_class)
  bad = labels[(labels < 0) | (labels >= num_classes)]
  if bad.size:
    raise CommandError(f'labels must be in [0, {num_classes}) for this model '
                       f'(num_classes={num_classes}), got {sorted(set(bad.tolist()))[:8]}', USAGE)
  return labels.astype(np.int32)


def _check_args(args) -> None:
  if not np.isfinite(args.cfg) or args.cfg < 0:
    raise CommandError(f'--cfg must be >= 0, got {args.cfg}', USAGE)
  if not 0 <= args.top_p < 1:
    raise CommandError(f'--top-p must be in [0, 1) (0 disables it), got {args.top_p}', USAGE)
  if args.top_k < 0:
    raise CommandError(f'--top-k must be >= 0 (0 disables it), got {args.top_k}', USAGE)
  if args.batch_size < 1 or args.grid_max < 0:
    raise CommandError('--batch-size must be >= 1 and --grid-max >= 0', USAGE)
  if args.stop_after_chunks is not None and (args.stop_after_chunks < 0 or not args.npz_out):
    raise CommandError('--stop-after-chunks needs --npz-out and a value >= 0', USAGE)
  if not os.path.isdir(args.checkpoint):
    raise CommandError(f'checkpoint directory not found: {args.checkpoint}', FAILURE)


def _run(args) -> int:
  _check_args(args)
  import jax.numpy as jnp
  from var_jax import io_utils
  from var_jax.pipeline import load
  pipe = load(args.checkpoint)
  if pipe.config.var is None:
    raise CommandError(f'{args.checkpoint} has no VAR transformer (convert it with --var)')
  vocab = pipe.config.vae.vocab_size
  if args.top_k > vocab:
    raise CommandError(f'--top-k must be in [0, {vocab}] for this model (vocab {vocab}), '
                       f'got {args.top_k}', USAGE)
  labels = _parse_labels(args, pipe.config.var.num_classes)
  n, K = labels.shape[0], len(pipe.config.patch_nums)
  batch = min(args.batch_size, n)
  num_chunks = -(-n // batch)
  dtype = jnp.bfloat16 if args.dtype == 'bfloat16' else jnp.float32

  def make_chunk(i):
    y = labels[i * batch:(i + 1) * batch]
    real = y.shape[0]
    if real < batch:  # pad the last chunk: one compiled shape for every chunk
      y = np.concatenate([y, np.full(batch - real, y[-1], y.dtype)])
    images, tokens = pipe.sample(y, cfg=args.cfg, top_k=args.top_k, top_p=args.top_p,
                                 seed=chunk_seed(args.seed, i), more_smooth=args.more_smooth,
                                 dtype=dtype)
    out = {'images': io_utils.to_uint8(np.asarray(images)[:real])}
    out.update({k: v[:real] for k, v in io_utils.tokens_to_arrays(tokens).items()})
    return out

  if args.npz_out:
    manifest = {'checkpoint': os.path.abspath(args.checkpoint), 'n': int(n), 'batch': batch,
                'labels_sha256': hashlib.sha256(labels.tobytes()).hexdigest(), 'cfg': args.cfg,
                'top_k': args.top_k, 'top_p': args.top_p, 'seed': args.seed,
                'more_smooth': args.more_smooth, 'dtype': args.dtype}
    run = io_utils.ChunkedRun(args.npz_out, manifest)
    left = io_utils.run_chunks(run, num_chunks, make_chunk, stop_after=args.stop_after_chunks,
                               progress=not args.no_progress, desc='sampling')
    if left:
      print(f'stopped with {left} of {num_chunks} chunks to go; rerun the same command to resume '
            f'(finished chunks are in {run.dir})')
      return 0
    size = pipe.config.image_size
    io_utils.write_npz_streaming(args.npz_out, 'arr_0', (n, size, size, 3), np.uint8,
                                 (run.read(i, 'images') for i in range(num_chunks)))
    grid_images, tokens = [], {f'idx_{k}': [] for k in range(K)}
    for i in range(num_chunks):
      chunk = run.read(i)
      if sum(len(g) for g in grid_images) < args.grid_max:
        grid_images.append(chunk['images'])
      if args.tokens_out:
        for k in range(K):
          tokens[f'idx_{k}'].append(chunk[f'idx_{k}'])
    _write_outputs(args, io_utils, np.concatenate(grid_images), tokens)
    run.cleanup()
    print(f'{n} samples -> {args.npz_out} (arr_0 uint8 {(n, size, size, 3)})')
  else:
    from tqdm import tqdm
    chunks = [make_chunk(i) for i in tqdm(range(num_chunks), desc='sampling', unit='chunk',
                                          disable=args.no_progress or num_chunks == 1)]
    tokens = {f'idx_{k}': [c[f'idx_{k}'] for c in chunks] for k in range(K)}
    _write_outputs(args, io_utils, np.concatenate([c['images'] for c in chunks]), tokens)
  print(f'grid of {min(n, args.grid_max)} samples -> {args.out}')
  return 0


def _write_outputs(args, io_utils, images, tokens):
  shown = images[:args.grid_max]
  if len(shown):
    io_utils.save_png(args.out, io_utils.make_grid(shown, nrow=8))
  if args.tokens_out:
    io_utils.save_npz(args.tokens_out, {k: np.concatenate(v) for k, v in tokens.items()})


def run(args) -> int:
  return guarded('sample', _run, args)
