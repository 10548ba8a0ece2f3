"""Encode a data set once with the frozen tokenizer, for training with no encoder in the step.

    summary = tokenize(load_config('configs/var_d16.py'), '/data/in_tokens', crops=4, flip=True)
    # then: var-jax train --config configs/var_d16.py --config.data.kind=tokens \
    #           --config.data.path=/data/in_tokens

Each training image gets the reference augmentation's resize (shorter side to
round(data.mid_reso x size), LANCZOS), then `crops` random crops (seeded by (seed, image
index, crop), so reruns agree) and, with `flip`, their mirror images: V = crops x (1 or
2) variants per image, each encoded by config.vae (its dtype and precision) into the L
token ids of every scale. The training pipeline reads one random variant per image per
epoch (var_jax.data.tokens), so crop and flip augmentation survive. The eval split
gets its centre crop. An unreadable image is stored with label -1 and skipped.

Shards of `shard_size` images are encoded by the processes in turn (shard s by process
s % process_count), each written to a temporary file and renamed when complete: a
killed run, rerun with the same command, keeps the finished shards and redoes the rest
(refused if the image folder changed meanwhile: the manifest holds a digest of its listing).
The manifest is written first (with the settings and the tokenizer's fingerprint) and
marked complete at the end. An --out folder that this command did not create, or that
holds tokens made with other settings, is refused: nothing is overwritten.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import os
import time
from typing import Any, Dict, List, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from var_jax import safe_io
from var_jax.data import augment, images as data_lib, tokens as tokens_lib
from var_jax.train import frozen_tokenizer

_TMP = '.tmp-'


def variants(record: Dict[str, Any], image_size: int, *, mid_reso: float, crops: int, flip: bool,
             seed: int, index: int) -> np.ndarray:
  """The (V, size, size, 3) uint8 crop variants of one source record (V = crops x (1 + flip)):
  variant 2k+1 is the mirror image of variant 2k when flipping."""
  img = augment.to_rgb(data_lib.open_image(record))
  arr = np.asarray(augment.resize_shorter(img, augment.mid_size(image_size, mid_reso)), np.uint8)
  out = []
  for k in range(crops):
    crop = augment.random_crop(arr, image_size, np.random.default_rng([seed, index, k]))
    out.append(crop)
    if flip:
      out.append(crop[:, ::-1])
  return np.stack(out)


def centre(record: Dict[str, Any], image_size: int, *, mid_reso: float) -> np.ndarray:
  """(1, size, size, 3): the eval pipeline's centre crop."""
  return augment.augment(data_lib.open_image(record), image_size, train=False,
                         mid_reso=mid_reso)[None]


def job(config, crops: int, flip: bool, shard_size: int, fingerprint: str) -> Dict[str, Any]:
  """What a tokens folder was made with; a rerun must match it to resume."""
  d = config.data
  vae = frozen_tokenizer.section_config(config.vae)
  return {'fingerprint': fingerprint, 'patch_nums': list(vae.v_patch_nums),
          'image_size': vae.image_size, 'crops': crops, 'flip': flip, 'seed': int(config.seed),
          'mid_reso': float(d.mid_reso), 'shard_size': shard_size,
          'data': {k: d.get(k) for k in ('kind', 'path', 'tfds_name', 'train_split', 'eval_split',
                                         'synthetic_examples', 'num_classes')}}


def tokenize(config, out: str, *, crops: int = 1, flip: bool | None = None, shard_size: int = 1024,
             batch_size: int = 64, num_threads: int = 8, splits=('train', 'eval'),
             log=print) -> Dict[str, Any]:
  """Writes (or finishes) the tokens folder `out`; returns its manifest."""
  if crops < 1 or shard_size < 1 or batch_size < 1:
    raise ValueError('crops, shard_size and batch_size must be >= 1')
  safe_io.require_local(out, 'out')
  if config.data.kind == 'tokens':
    raise ValueError('config.data.kind is already tokens: tokenize reads images')
  flip = bool(config.data.hflip) if flip is None else flip
  vae_cfg, params = frozen_tokenizer.load(config.vae)
  model = frozen_tokenizer.make_model(vae_cfg, config.vae)
  fp = frozen_tokenizer.fingerprint(vae_cfg, params)
  want = job(config, crops, flip, shard_size, fp)
  size = vae_cfg.image_size
  sources = {s: data_lib.make_source(config.data, s, size) for s in splits}
  manifest = _prepare(out, want, vae_cfg, sources, crops * (2 if flip else 1))
  if manifest.get('complete'):
    log(f'[tokenize] {out} is complete already')
    return manifest
  encode = _encoder(model, params)
  p, n_proc = jax.process_index(), jax.process_count()
  pool = concurrent.futures.ThreadPoolExecutor(num_threads)
  for split, source in sources.items():
    info = manifest['splits'][split]
    train = split == 'train'
    count = len(info['shards'])
    for s in shards_of(p, n_proc, count):
      path = os.path.join(out, info['shards'][s]['file'])
      if os.path.exists(path):
        continue
      t0 = time.perf_counter()
      lo, hi = s * shard_size, min((s + 1) * shard_size, len(source))

      def load(i, source=source, train=train):
        try:
          rec = source[i]
          arr = (variants(rec, size, mid_reso=want['mid_reso'], crops=crops, flip=flip,
                          seed=want['seed'], index=i) if train
                 else centre(rec, size, mid_reso=want['mid_reso']))
          return int(rec['label']), arr
        except Exception as e:   # unreadable image: label -1, skipped by the pipeline
          where = (source.items[i][0] if isinstance(source, data_lib.FolderSource) else f'#{i}')
          log(f'[tokenize] skipping unreadable image {where}: {type(e).__name__}: {e}')
          return -1, None

      records = []
      loaded = list(pool.map(load, range(lo, hi)))
      V = info['variants']
      blank = np.zeros((V, size, size, 3), np.uint8)
      for b in range(0, len(loaded), batch_size):
        chunk = loaded[b:b + batch_size]
        imgs = np.concatenate([a if a is not None else blank for _, a in chunk])
        ids = encode(imgs, batch_size * V).reshape(len(chunk), V, -1)
        records += [tokens_lib.encode_record(lab, t, np.dtype(manifest['token_dtype']))
                    for (lab, _), t in zip(chunk, ids)]
      _write_shard(path, records)
      log(f'[tokenize] {split} shard {s + 1}/{count}: {hi - lo} images x {V} variants in '
          f'{time.perf_counter() - t0:.1f} s')
  pool.shutdown()
  _barrier('var_jax_tokenize_done')
  if p == 0:
    for info in manifest['splits'].values():
      for sh in info['shards']:
        sh['bytes'] = os.path.getsize(os.path.join(out, sh['file']))
    manifest['complete'] = True
    tokens_lib.write_manifest(out, manifest)
    log(f'[tokenize] wrote {out}')
  _barrier('var_jax_tokenize_manifest')
  return manifest


def _prepare(out: str, want: Dict[str, Any], vae_cfg, sources, V: int) -> Dict[str, Any]:
  """Creates `out` with a fresh manifest, or returns the manifest of our own unfinished run.
  Every process checks (so all raise alike); process 0 writes."""
  if os.path.exists(out) and not os.path.isdir(out):
    raise FileExistsError(f'--out {out} is a file; nothing was written')
  old = tokens_lib.read_manifest(out) if os.path.isdir(out) else None
  if old is not None and old.get('job') != want:
    diff = sorted(k for k in want if old.get('job', {}).get(k) != want[k])
    raise FileExistsError(f'{out} holds tokens made with other settings ({", ".join(diff)}); '
                          'choose another --out (nothing was changed)')
  if old is not None and not old.get('complete'):
    _check_same_data(out, old, sources)
  if old is None and os.path.isdir(out) and os.listdir(out):
    raise FileExistsError(f'{out} exists and was not made by var-jax tokenize; choose another '
                          '--out (nothing was changed)')
  _barrier('var_jax_tokenize_checked')
  if jax.process_index() == 0:
    if old is not None:
      for f in os.listdir(out):   # temporary files of a killed run
        if _TMP in f:
          os.remove(os.path.join(out, f))
    else:
      os.makedirs(out, exist_ok=True)
      tokens_lib.write_manifest(out, _new_manifest(want, vae_cfg, sources, V))
  _barrier('var_jax_tokenize_prepared')
  return tokens_lib.read_manifest(out)


def listing(source) -> str | None:
  """A digest of an image folder's files and labels (None for other sources, whose
  order is fixed): shard s holds images [s x shard_size, ...) of this listing."""
  if not isinstance(source, data_lib.FolderSource):
    return None
  text = '\n'.join(f'{label}\t{p}' for p, label in source.items)
  return hashlib.sha256(text.encode('utf-8', 'surrogateescape')).hexdigest()


def _check_same_data(out: str, old: Dict[str, Any], sources) -> None:
  """FileExistsError if the images changed since the unfinished run in `out` began:
  resuming would index the remaining shards into another listing (images duplicated
  or dropped, and a record count the manifest does not match)."""
  for split, source in sources.items():
    info = old['splits'].get(split, {})
    was, now, digest = info.get('num_images'), len(source), listing(source)
    if was != now or info.get('listing', digest) != digest:
      what = f'{was} then, {now} now' if was != now else 'as many, other files'
      raise FileExistsError(f'{out} was started on other {split} images ({what}): restore '
                            'them, or choose another --out (nothing was changed)')


def _new_manifest(want, vae_cfg, sources, V: int) -> Dict[str, Any]:
  splits = {}
  for split, source in sources.items():
    n, per = len(source), want['shard_size']
    count = -(-n // per)
    splits[split] = {'num_images': n, 'variants': V if split == 'train' else 1,
                     'listing': listing(source),
                     'shards': [{'file': tokens_lib.shard_name(split, i, count)} for i in range(count)]}
  num_classes = getattr(sources.get('train'), 'num_classes', None)
  return {'format': tokens_lib.FORMAT, 'version': tokens_lib.VERSION, 'complete': False,
          'job': want, 'fingerprint': want['fingerprint'], 'patch_nums': want['patch_nums'],
          'L': int(sum(pn * pn for pn in vae_cfg.v_patch_nums)),
          'vocab_size': vae_cfg.vocab_size,
          'token_dtype': tokens_lib.token_dtype(vae_cfg.vocab_size).str,
          'num_classes': num_classes, 'splits': splits}


def _encoder(model, params):
  """uint8 images (N, H, W, 3) -> token ids (N, L) int32 on this process's devices."""
  devices = jax.local_devices()
  mesh = Mesh(np.asarray(devices), ('data',))
  batch_sh = NamedSharding(mesh, P('data'))
  params = jax.device_put(params, NamedSharding(mesh, P()))

  @jax.jit
  def fn(params, img_BHWC):
    idx_list = model.apply({'params': params}, augment.to_pm1(img_BHWC), method='img_to_idx')
    return jnp.concatenate([i.astype(jnp.int32) for i in idx_list], axis=1)

  def encode(imgs: np.ndarray, padded: int) -> np.ndarray:
    """Pads to `padded` images (one compiled shape), rounded up to the device count."""
    n = len(imgs)
    pad = max(padded, n) - n
    pad += -(n + pad) % len(devices)
    if pad:
      imgs = np.concatenate([imgs, np.zeros((pad,) + imgs.shape[1:], imgs.dtype)])
    return np.asarray(fn(params, jax.device_put(imgs, batch_sh)))[:n]
  return encode


def _write_shard(path: str, records: List[bytes]) -> None:
  """Writes a temporary file and renames it; a SIGTERM or Ctrl-C of the command line
  waits for the rename, so a stopped run leaves whole shards and no temporary."""
  from array_record.python.array_record_module import ArrayRecordWriter
  tmp = os.path.join(os.path.dirname(path), f'.{os.path.basename(path)}{_TMP}{os.getpid()}')
  with safe_io.uninterruptible():
    w = ArrayRecordWriter(tmp, 'group_size:1')
    for r in records:
      w.write(r)
    w.close()
    os.replace(tmp, path)


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def shards_of(process_index: int, process_count: int, num_shards: int) -> Tuple[int, ...]:
  """The shards a process encodes."""
  return tuple(range(process_index, num_shards, process_count))
