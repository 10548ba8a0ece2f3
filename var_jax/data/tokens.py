"""Pre-tokenised training data: token maps of every image in ArrayRecord shards.

A tokens folder (written by `var-jax tokenize`, var_jax.train.tokenize) holds

  manifest.json                     what made it (tokenizer fingerprint, patch_nums, crops,
                                    flip, seed, data), each split's shards with their sizes,
                                    and `complete` once every shard is written
  train-00000-of-00042.array_record one record per image: label (int32, -1 = unreadable)
  ...                               + V crop variants x L token ids (uint16 or int32)
  eval-00000-of-00001.array_record  the eval split: one centre crop per image

Reuse:
  source = TokenSource(path, 'train')             # checks the manifest and every shard's size
  source.check(fingerprint, patch_nums)           # ValueError if made with another tokenizer
  it = make_pipeline(source, global_batch_size=256, train=True, seed=0)
  next(it)  # {'tokens': (local_B, L) uint16/int32, 'label': int32}; one random variant per
            # image per epoch, the same stream order as the image pipelines (data.images)
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Dict, Optional, Sequence

import grain
import numpy as np

from var_jax.data import images

FORMAT, VERSION = 'var-jax-tokens', 1


class TokensError(ValueError):
  """A tokens folder that cannot be used: incomplete, truncated, corrupt, or made with
  another tokenizer or patch_nums (`var-jax train` exits 1 on it, as for a bad file)."""

MANIFEST = 'manifest.json'
_LABEL = np.dtype('<i4')


def token_dtype(vocab_size: int) -> np.dtype:
  return np.dtype('<u2') if vocab_size <= 1 << 16 else np.dtype('<i4')


def shard_name(split: str, index: int, count: int) -> str:
  return f'{split}-{index:05d}-of-{count:05d}.array_record'


def encode_record(label: int, tokens_VL: np.ndarray, dtype: np.dtype) -> bytes:
  return np.asarray([label], _LABEL).tobytes() + np.ascontiguousarray(tokens_VL, dtype).tobytes()


def decode_record(raw: bytes, variants: int, L: int, dtype: np.dtype):
  """(label, tokens (variants, L)); ValueError if the record has the wrong length."""
  want = _LABEL.itemsize + variants * L * dtype.itemsize
  if len(raw) != want:
    raise TokensError(f'token record of {len(raw)} bytes, expected {want}: corrupt shard')
  label = int(np.frombuffer(raw, _LABEL, 1)[0])
  return label, np.frombuffer(raw, dtype, variants * L, _LABEL.itemsize).reshape(variants, L)


def read_manifest(path: str) -> Optional[Dict[str, Any]]:
  """The manifest of a tokens folder, or None when there is none; ValueError if unreadable."""
  f = os.path.join(path, MANIFEST)
  if not os.path.isfile(f):
    return None
  try:
    with open(f) as fh:
      m = json.load(fh)
  except (OSError, ValueError) as e:
    raise TokensError(f'{f}: unreadable tokens manifest ({e})') from None
  if not isinstance(m, dict) or m.get('format') != FORMAT:
    raise TokensError(f'{f} is not a var-jax tokens manifest')
  if m.get('version') != VERSION:
    raise TokensError(f'{f}: tokens format version {m.get("version")}, this var-jax reads {VERSION}')
  return m


def write_manifest(path: str, manifest: Dict[str, Any]) -> None:
  tmp = os.path.join(path, f'.{MANIFEST}.tmp-{os.getpid()}')
  with open(tmp, 'w') as f:
    json.dump(manifest, f, indent=1)
  os.replace(tmp, os.path.join(path, MANIFEST))


class TokenSource:
  """Random access to one split of a tokens folder: {'tokens': (V, L), 'label': int}."""

  def __init__(self, path: str, split: str = 'train'):
    if not os.path.isdir(path):
      raise FileNotFoundError(f'tokens folder {path!r} not found (make it with var-jax tokenize)')
    m = read_manifest(path)
    if m is None:
      raise FileNotFoundError(f'{path} has no {MANIFEST}: not a tokens folder (var-jax tokenize)')
    if not m.get('complete'):
      raise TokensError(f'{path} is incomplete (tokenize was interrupted): rerun the same '
                       'var-jax tokenize command to finish it')
    if split not in m['splits']:
      raise TokensError(f'{path} has no {split!r} split (it has {sorted(m["splits"])})')
    self.path, self.split, self.manifest = path, split, m
    info = m['splits'][split]
    self.variants, self.L = int(info['variants']), int(m['L'])
    self.dtype = np.dtype(m['token_dtype'])
    self.num_classes = m.get('num_classes')
    self._n = int(info['num_images'])
    files = []
    for s in info['shards']:
      f = os.path.join(path, s['file'])
      if not os.path.isfile(f):
        raise FileNotFoundError(f'tokens shard {f} is missing')
      size = os.path.getsize(f)
      if size != s['bytes']:
        raise TokensError(f'tokens shard {f} is truncated or damaged: {size} bytes, the manifest '
                         f'says {s["bytes"]}; rerun var-jax tokenize into a new folder')
      files.append(f)
    self._files = files
    self._ds = None

  def check(self, fingerprint: str, patch_nums: Sequence[int]) -> None:
    """ValueError unless the tokens were made by this tokenizer and schedule."""
    m = self.manifest
    if tuple(m['patch_nums']) != tuple(patch_nums):
      raise TokensError(f'{self.path} holds tokens for patch_nums {tuple(m["patch_nums"])}, the '
                       f'config uses {tuple(patch_nums)}: tokenize again with this config')
    if m['fingerprint'] != fingerprint:
      raise TokensError(f'{self.path} was made with another tokenizer (fingerprint '
                       f'{m["fingerprint"][:12]}, config.vae gives {fingerprint[:12]}): '
                       'tokenize again with this config.vae, or point config.vae at the one used')

  def _records(self):
    if self._ds is None:   # opened lazily: the source is pickled into grain workers
      self._ds = grain.sources.ArrayRecordDataSource(self._files)
      if len(self._ds) != self._n:
        raise TokensError(f'{self.path}: {len(self._ds)} {self.split} records, the manifest says {self._n}')
    return self._ds

  def __len__(self) -> int:
    return self._n

  def __getstate__(self):
    return dict(self.__dict__, _ds=None)

  def __getitem__(self, i: int) -> Dict[str, Any]:
    label, tokens = decode_record(self._records()[i], self.variants, self.L, self.dtype)
    return {'tokens': tokens, 'label': label}


@dataclasses.dataclass
class _LoadTokens:
  """Stream position + source index -> one variant of an image's tokens (random in train)."""
  source: TokenSource
  train: bool
  seed: int

  def __call__(self, g_src):
    g, src = g_src
    if src < 0:   # eval padding
      return {'tokens': np.zeros((self.source.L,), self.source.dtype), 'label': 0, 'mask': 0, 'ok': 1}
    rec = self.source[src]
    v = int(np.random.default_rng([self.seed, g]).integers(self.source.variants)) if self.train else 0
    ok = int(rec['label'] >= 0)   # -1: the image could not be read when tokenising
    return {'tokens': rec['tokens'][v], 'label': max(rec['label'], 0), 'mask': ok, 'ok': ok}


def make_pipeline(source: TokenSource, *, global_batch_size: int, train: bool, seed: int = 0,
                  num_epochs: int | None = None, shard=None, num_threads: int = 8,
                  prefetch: int = 2, worker_count: int = 0) -> images.ImagePipeline:
  """Batches of token maps for this process, in the image pipelines' order (images.stream)."""
  ds, lb = images.stream(len(source), global_batch_size, train=train, seed=seed,
                         num_epochs=num_epochs, shard=shard)
  ds = ds.map(_LoadTokens(source, train, seed))
  it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                               prefetch_buffer_size=max(lb * prefetch, num_threads)))
  it_ds = images.worker_processes(it_ds, worker_count)
  counter = None
  if train:
    counter = images.CountBad(2 * len(source))
    it_ds = it_ds.filter(counter)
  it_ds = it_ds.batch(lb, drop_remainder=train).map(lambda b: _finish(b, train))
  return images.ImagePipeline(it_ds, counter)


def _finish(b, train: bool):
  out = {'tokens': b['tokens'], 'label': b['label'].astype(np.int32)}
  if not train:
    out.update(mask=b['mask'].astype(np.int32), ok=b['ok'])
  return out
