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
(--stop-after-chunks N ends a run early on purpose); other settings, or another
checkpoint saved at the --checkpoint path meanwhile, are refused. The parts folder is removed
once the .npz is assembled.

Every output path is checked before the model loads: an existing file is never
replaced without --force (a resumed run may replace the outputs it began to write
itself), a folder is never taken for a file; outputs are written atomically.

Host work overlaps device work: chunk i+1 is dispatched before chunk i is copied
to the host, converted and written; images are converted to uint8 on the device.
The log ends with the images/s of the chunks after the first (which includes
compiling). A top-k at or above the model's vocabulary means no top-k cut.
"""
from __future__ import annotations

import hashlib
import os
import sys
import time

import numpy as np

from var_jax.commands._common import (FAILURE, USAGE, CommandError, add_sampling_arguments, guarded,
                                      show_info_logs)

FLAGS = {'cfg': '--cfg', 'top_k': '--top-k', 'top_p': '--top-p', 'labels': '--labels'}
MAX_SEED = 2**31 - 1


def add_arguments(parser):
  parser.add_argument('--checkpoint', required=True, help='var-jax checkpoint directory')
  which = parser.add_mutually_exclusive_group(required=True)
  which.add_argument('--labels', help='comma-separated class labels, e.g. 1,2,3')
  which.add_argument('--num-per-class', type=int, help='N samples of every class, class by class')
  add_sampling_arguments(parser)
  parser.add_argument('--batch-size', type=int, default=25, help='images per chunk')
  parser.add_argument('--dtype', choices=('float32', 'bfloat16'), default='float32',
                      help='compute dtype of the networks')
  parser.add_argument('--unrolled', action='store_true',
                      help='blocks unrolled instead of one lax.scan: same images, about twice the '
                           'compile time, faster at small batches (d16 batch 1 on an H100: '
                           '13.3 vs 21.1 ms)')
  parser.add_argument('--out', required=True, help='PNG grid of (the first --grid-max) samples')
  parser.add_argument('--grid-max', type=int, default=64, help='at most this many images in --out')
  parser.add_argument('--tokens-out', default=None, help='npz of token maps idx_0..idx_{K-1}')
  parser.add_argument('--npz-out', default=None,
                      help='npz with arr_0 = uint8 NHWC images (resumable: after an interruption, '
                           'rerun the same command)')
  parser.add_argument('--stop-after-chunks', type=int, default=None,
                      help='with --npz-out: stop after this many new chunks (rerun to continue)')
  parser.add_argument('--force', action='store_true', help='replace existing output files')
  parser.add_argument('--no-progress', action='store_true', help='hide the progress bar')


def chunk_seed(seed: int, i: int) -> int:
  """The seed of chunk i: `seed` itself for the first, an independent derived one after."""
  if i == 0:
    return int(seed)
  return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, i]).generate_state(1)[0] & 0x7FFFFFFF)


def _parse_labels(args, num_classes: int | None) -> np.ndarray:
  if args.labels is not None:
    try:
      labels = np.asarray([int(v) for v in args.labels.replace(' ', '').split(',') if v != ''],
                          np.int64)
    except (ValueError, OverflowError):
      raise CommandError(f'--labels must be comma-separated integers, got {args.labels!r}',
                         USAGE) from None
    if not labels.size:
      raise CommandError('--labels is empty', USAGE)
  else:
    labels = np.repeat(np.arange(num_classes), args.num_per_class)
  return labels


def _outputs(args) -> dict:
  return {'--out': args.out, '--npz-out': args.npz_out, '--tokens-out': args.tokens_out}


def _check_args(args) -> None:
  """What can be checked before reading anything (the model-dependent checks follow)."""
  from var_jax.safe_io import check_distinct
  from var_jax.sampling_args import check_sampling_args
  check_sampling_args(args.cfg, args.top_k, args.top_p, names=FLAGS)
  if args.batch_size < 1:
    raise CommandError(f'--batch-size must be >= 1, got {args.batch_size}', USAGE)
  if args.grid_max < 0:
    raise CommandError(f'--grid-max must be >= 0, got {args.grid_max}', USAGE)
  if args.num_per_class is not None and args.num_per_class < 1:
    raise CommandError(f'--num-per-class must be >= 1, got {args.num_per_class}', USAGE)
  if not 0 <= args.seed <= MAX_SEED:
    raise CommandError(f'--seed must be in [0, {MAX_SEED}], got {args.seed}', USAGE)
  if args.stop_after_chunks is not None and (args.stop_after_chunks < 0 or not args.npz_out):
    raise CommandError('--stop-after-chunks needs --npz-out and a value >= 0', USAGE)
  check_distinct(_outputs(args))
  check_checkpoint_dir(args.checkpoint)


def check_checkpoint_dir(path: str) -> None:
  """A --checkpoint that is not a folder fails here, before jax loads."""
  if os.path.isfile(path):
    raise CommandError(f'--checkpoint {path} is a file; a var-jax checkpoint is a folder '
                       '(reference .pth files: `var-jax convert` first)', FAILURE)
  if not os.path.isdir(path):
    raise CommandError(f'checkpoint directory not found: {path}', FAILURE)


class _Rate:
  """Images/s of the chunks after the first (the first includes compiling)."""

  def __init__(self):
    self.t0 = self.t_first = self.t_last = None
    self.first = self.rest = 0

  def done(self, n: int, bar=None):
    now = time.perf_counter()
    if self.t_first is None:
      self.t_first, self.first = now, n
    else:
      self.rest += n
      if bar is not None:
        bar.set_postfix_str(f'{self.rest / (now - self.t_first):.1f} img/s')
    self.t_last = now

  def report(self) -> str:
    total = self.first + self.rest
    if total == 0:
      return 'no new images'
    msg = f'{total} images in {self.t_last - self.t0:.1f} s'
    if self.rest:
      msg += f'; {self.rest / (self.t_last - self.t_first):.1f} images/s after the first chunk'
    return msg


def checkpoint_digest(path: str) -> str:
  """sha256 of a checkpoint's config and marker (which lists every weight file with its
  size and CRC-32): a checkpoint replaced at the same path, even re-saved, differs."""
  from var_jax.checkpoint import CONFIG, MARKER
  h = hashlib.sha256()
  for name in (CONFIG, MARKER):
    with open(os.path.join(path, name), 'rb') as f:
      h.update(hashlib.sha256(f.read()).digest())
  return h.hexdigest()


def _manifest(args, labels, batch) -> dict:
  """The settings a resumed --npz-out run must share with the run it continues (the
  checkpoint by its path and its content, so a replaced one never mixes in)."""
  return {'checkpoint': os.path.abspath(args.checkpoint),
          'checkpoint_sha256': checkpoint_digest(args.checkpoint), 'n': int(labels.shape[0]),
          'batch': batch, 'labels_sha256': hashlib.sha256(labels.tobytes()).hexdigest(),
          'cfg': args.cfg, 'top_k': args.top_k, 'top_p': args.top_p, 'seed': args.seed,
          'more_smooth': args.more_smooth, 'dtype': args.dtype}


def _run(args) -> int:
  _check_args(args)
  from var_jax import checkpoint, io_utils, safe_io
  from var_jax.sampling_args import check_labels, check_sampling_args
  config = checkpoint.read_config(args.checkpoint)   # no weights read yet
  if config.var is None:
    raise CommandError(f'{args.checkpoint} has no VAR transformer, only a tokenizer '
                       '(convert it with --var to sample)')
  labels = check_labels(_parse_labels(args, config.var.num_classes), config.var.num_classes,
                        FLAGS['labels'])
  n, K = labels.shape[0], len(config.patch_nums)
  batch = min(args.batch_size, n)
  num_chunks = -(-n // batch)
  run = None
  if args.npz_out:   # a parts folder of another run, or not ours, is refused here
    run = io_utils.ChunkedRun(args.npz_out, _manifest(args, labels, batch), create=False)
  for flag, path in _outputs(args).items():
    safe_io.check_output(path, force=args.force, flag=flag,
                         owned=run is not None and run.claims(path))
  show_info_logs()
  check_sampling_args(args.cfg, args.top_k, args.top_p, config=config, names=FLAGS)  # says a clip
  import jax
  import jax.numpy as jnp
  from var_jax.pipeline import load
  pipe = load(args.checkpoint, dtype=jnp.bfloat16 if args.dtype == 'bfloat16' else jnp.float32,
              scan_blocks=not args.unrolled)
  to_uint8 = jax.jit(lambda x: jnp.clip(jnp.floor(x * 255 + 0.5), 0, 255).astype(jnp.uint8))
  rate = _Rate()

  def start(i):
    """Dispatches chunk i (asynchronously); returns what `finish` needs."""
    if rate.t0 is None:
      rate.t0 = time.perf_counter()
    y = labels[i * batch:(i + 1) * batch]
    real = y.shape[0]
    if real < batch:  # pad the last chunk: one compiled shape for every chunk
      y = np.concatenate([y, np.full(batch - real, y[-1], y.dtype)])
    images, tokens = pipe.sample(y, cfg=args.cfg, top_k=args.top_k, top_p=args.top_p,
                                 seed=chunk_seed(args.seed, i), more_smooth=args.more_smooth)
    return real, to_uint8(images), tokens

  def finish(handle):
    """Waits for a chunk and brings it to the host: {'images': uint8, 'idx_k': int32}."""
    real, images, tokens = handle
    images, tokens = jax.device_get((images, tokens))
    out = {'images': np.asarray(images)[:real]}
    out.update({k: v[:real] for k, v in io_utils.tokens_to_arrays(tokens).items()})
    return out

  if args.npz_out:
    run = io_utils.ChunkedRun(args.npz_out, run.manifest)
    left = io_utils.run_chunks(run, num_chunks, start, finish, stop_after=args.stop_after_chunks,
                               progress=not args.no_progress, desc='sampling',
                               on_done=lambda c, bar: rate.done(len(c['images']), bar))
    print(f'sampling: {rate.report()}', file=sys.stderr)
    if left:
      print(f'stopped with {left} of {num_chunks} chunks to go; rerun the same command to resume '
            f'(finished chunks are in {run.dir})')
      return 0
    size = pipe.config.image_size
    run.claim(_outputs(args).values())   # a rerun after a kill from here on may replace them
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
    _write_outputs(args, io_utils, grid_images, tokens)
    run.cleanup()
    print(f'{n} samples -> {args.npz_out} (arr_0 uint8 {(n, size, size, 3)})')
  else:
    from tqdm import tqdm
    chunks = []
    with tqdm(total=num_chunks, desc='sampling', unit='chunk',
              disable=args.no_progress or num_chunks == 1) as bar:
      for _, chunk in io_utils.pipelined(range(num_chunks), start, finish):
        chunks.append(chunk)
        rate.done(len(chunk['images']), bar)
        bar.update(1)
    print(f'sampling: {rate.report()}', file=sys.stderr)
    tokens = {f'idx_{k}': [c[f'idx_{k}'] for c in chunks] for k in range(K)}
    _write_outputs(args, io_utils, [c['images'] for c in chunks], tokens)
  if args.grid_max:
    print(f'grid of {min(n, args.grid_max)} samples -> {args.out}')
  else:
    print(f'no grid (--grid-max 0): {args.out} not written')
  return 0


def _write_outputs(args, io_utils, images, tokens):
  """The grid of the first --grid-max images (none for 0) and --tokens-out; `images` is
  a list of uint8 NHWC chunks."""
  shown = np.concatenate(images)[:args.grid_max] if images else ()
  if len(shown):
    io_utils.save_png(args.out, io_utils.make_grid(shown, nrow=8))
  if args.tokens_out:
    io_utils.save_npz(args.tokens_out, {k: np.concatenate(v) for k, v in tokens.items()})


def run(args) -> int:
  return guarded('sample', _run, args, signals=True)
