"""Input pipeline throughput: the grain image-folder pipeline and the token pipeline, images/s.

  python benchmarks/input_bench.py                       # 512 generated JPEGs, 256 px crops
  python benchmarks/input_bench.py --workers 0,1,2,4,8 --threads 1,8 --images 2048

Generates JPEGs of ImageNet's typical size (500x375, quality 90) in a class-folder
layout, then times `var_jax.data.images.make_pipeline` as the trainer runs it (JPEG
decode, shorter side to 1.125 x size with LANCZOS, random crop, flip, batch) for each
(worker processes, read threads) pair, and the token pipeline (`var_jax.data.tokens`:
one ArrayRecord read + one random variant per image) on a generated tokens folder of
the same number of images (L = 680, 4096 codes, 10 variants). Reports images/s and
images/s per CPU core used; with `--target 350 --gpus 8` it says how many cores a
host needs to feed its GPUs from JPEGs (from the single-core rate, which is the one
that scales: each worker process decodes independently).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
from PIL import Image


def make_jpegs(root: str, n: int, size=(500, 375), classes: int = 8, seed: int = 0) -> None:
  rng = np.random.default_rng(seed)
  w, h = size
  for i in range(n):
    d = os.path.join(root, 'train', f'class_{i % classes:03d}')
    os.makedirs(d, exist_ok=True)
    low = rng.uniform(0, 255, (h // 16 + 1, w // 16 + 1, 3)).astype(np.uint8)
    img = Image.fromarray(low).resize((w, h), Image.BILINEAR)   # smooth, photo-like entropy
    noise = rng.integers(-12, 13, (h, w, 3))
    arr = np.clip(np.asarray(img, np.int16) + noise, 0, 255).astype(np.uint8)
    Image.fromarray(arr).save(os.path.join(d, f'{i:06d}.JPEG'), quality=90)


def make_tokens(root: str, n: int, L: int = 680, variants: int = 10, vocab: int = 4096,
                shard_size: int = 1024, seed: int = 0) -> None:
  from var_jax.data import tokens
  from var_jax.train.tokenize import _write_shard
  rng = np.random.default_rng(seed)
  dtype = tokens.token_dtype(vocab)
  count = -(-n // shard_size)
  shards = []
  for s in range(count):
    lo, hi = s * shard_size, min((s + 1) * shard_size, n)
    recs = [tokens.encode_record(i % 1000, rng.integers(0, vocab, (variants, L)), dtype)
            for i in range(lo, hi)]
    name = tokens.shard_name('train', s, count)
    _write_shard(os.path.join(root, name), recs)
    shards.append({'file': name, 'bytes': os.path.getsize(os.path.join(root, name))})
  tokens.write_manifest(root, {
      'format': tokens.FORMAT, 'version': tokens.VERSION, 'complete': True, 'job': {},
      'fingerprint': 'bench', 'patch_nums': [], 'L': L, 'vocab_size': vocab,
      'token_dtype': dtype.str, 'num_classes': 1000,
      'splits': {'train': {'num_images': n, 'variants': variants, 'shards': shards}}})


def rate(it, batch: int, batches: int, warmup: int = 2) -> float:
  for _ in range(warmup):
    next(it)
  t0 = time.perf_counter()
  for _ in range(batches):
    next(it)
  return batch * batches / (time.perf_counter() - t0)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--images', type=int, default=512, help='JPEGs to generate')
  ap.add_argument('--size', type=int, default=256, help='crop size')
  ap.add_argument('--batch', type=int, default=64)
  ap.add_argument('--batches', type=int, default=8, help='timed batches per setting')
  ap.add_argument('--workers', default='0,1,2', help='grain worker processes to try')
  ap.add_argument('--threads', default='1,4', help='read threads per process to try')
  ap.add_argument('--target', type=float, default=350.0, help='images/s per GPU to feed')
  ap.add_argument('--gpus', type=int, default=8)
  ap.add_argument('--dir', default='', help='reuse/keep the generated data here')
  ap.add_argument('--json', default='')
  args = ap.parse_args(argv)
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  from var_jax.data import images, tokens

  root = args.dir or tempfile.mkdtemp(prefix='var_jax_input_bench_')
  if not os.path.isdir(os.path.join(root, 'train')):
    t0 = time.perf_counter()
    make_jpegs(root, args.images)
    print(f'# generated {args.images} JPEGs (500x375) in {time.perf_counter() - t0:.1f} s', flush=True)
  tok_root = os.path.join(root, 'tokens')
  if not os.path.isdir(tok_root):
    os.makedirs(tok_root)
    make_tokens(tok_root, args.images)
  cores = os.cpu_count()
  print(f'# {cores} CPU cores; batch {args.batch}, {args.batches} timed batches, crops {args.size} px',
        flush=True)
  source = images.FolderSource(os.path.join(root, 'train'))
  tsource = tokens.TokenSource(tok_root, 'train')
  rows = []
  for kind in ('jpeg', 'tokens'):
    for w in [int(x) for x in args.workers.split(',')]:
      for t in [int(x) for x in args.threads.split(',')]:
        if kind == 'jpeg':
          it = images.make_pipeline(source, global_batch_size=args.batch, image_size=args.size,
                                    train=True, seed=0, hflip=True, num_threads=t, worker_count=w)
        else:
          it = tokens.make_pipeline(tsource, global_batch_size=args.batch, train=True, seed=0,
                                    num_threads=t, worker_count=w)
        row = {'pipeline': kind, 'workers': w, 'threads': t,
               'images_per_s': rate(it, args.batch, args.batches)}
        rows.append(row)
        print(json.dumps(row), flush=True)
        del it
  print('| pipeline | worker processes | read threads | images/s |\n|---|---|---|---|')
  for r in rows:
    print(f'| {r["pipeline"]} | {r["workers"]} | {r["threads"]} | {r["images_per_s"]:.0f} |')
  single = max((r['images_per_s'] for r in rows
                if r['pipeline'] == 'jpeg' and r['workers'] == 0 and r['threads'] == 1), default=0)
  need = args.target * args.gpus
  if single:
    print(f'# JPEG pipeline, one read thread in one process: {single:.0f} images/s; {args.gpus} '
          f'GPUs x {args.target:g} = {need:.0f} images/s need about {need / single:.0f} such '
          'cores (+ headroom for the training process)')
  best = max((r for r in rows if r['pipeline'] == 'tokens'), key=lambda r: r['images_per_s'])
  print(f'# token pipeline: {best["images_per_s"]:.0f} images/s at best ({best["workers"]} '
        f'worker processes, {best["threads"]} threads): {need / best["images_per_s"]:.2f} of that '
        f'for {need:.0f} images/s')
  if args.json:
    with open(args.json, 'a') as f:
      for r in rows:
        f.write(json.dumps(r) + '\n')
  return 0


if __name__ == '__main__':
  sys.exit(main())
