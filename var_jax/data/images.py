"""Grain input pipelines for labelled images: folders, TFDS, synthetic, digits.

Reuse: `source = make_source(cfg.data, split='train')` then
  it = make_pipeline(source, global_batch_size=256, image_size=256, train=True, seed=0)
  batch = next(it)   # {'image': (local_B, H, W, 3) uint8, 'label': int32}
  it.get_state() / it.set_state(s)   # JSON-able; the trainer saves it in checkpoints
  it.num_skipped                     # unreadable images skipped so far (this process)

Order: one global stream (seeded shuffle, reshuffled each epoch); global batch t
is stream[t*GB:(t+1)*GB] and process p takes its slice [p*LB:(p+1)*LB]. So the
examples of each step, and their augmentation (seeded by stream position), do not
depend on the number of processes or workers. Eval pipelines run one epoch in
order and pad the last global batch with mask=0 examples. data.kind='tokens' (token
maps made by `var-jax tokenize`) has the same plumbing in var_jax.data.tokens;
`make_train_pipeline`/`make_eval_pipeline` pick either from the config.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import sys
from typing import Any, Dict

import grain
import numpy as np
from PIL import Image

from var_jax import safe_io
from var_jax.data import augment

log = logging.getLogger('var_jax.data')

IMG_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.ppm', '.bmp', '.pgm', '.tif', '.tiff', '.webp')


# --- sources (random access, picklable) -----------------------------------------------

class FolderSource:
  """ImageNet layout: root/<class>/<image>; classes sorted, label = class index. Hidden
  files and folders (.ipynb_checkpoints, macOS's ._x.jpg) are neither classes nor images.
  `classes`: the label order to use (the training split's, for its eval split, which may
  lack some classes); a sub-folder not among them is an error."""

  def __init__(self, root: str, classes: list | None = None):
    if not os.path.isdir(root):
      raise ValueError(f'image folder {root!r} not found')
    present = class_names(root)
    self.classes = present if classes is None else list(classes)
    if not self.classes:
      raise ValueError(f'image folder {root!r} has no class sub-folders')
    unknown = sorted(set(present) - set(self.classes))
    if unknown:
      raise ValueError(f'image folder {root!r} has classes the training split lacks: '
                       f'{", ".join(unknown[:5])}{" ..." if len(unknown) > 5 else ""}')
    self.items, empty = [], []
    for label, c in enumerate(self.classes):
      files = image_files(os.path.join(root, c)) if c in present else []
      self.items += [(f, label) for f in files]
      if c in present and not files:
        empty.append(c)
    if empty and len(empty) < len(self.classes):   # kept: labels stay those of the layout
      log.warning(
          'image folder %r: %d class folder(s) hold no images (%s); their labels stay '
          'reserved', root, len(empty), ', '.join(empty[:5]) + (' ...' if len(empty) > 5 else ''))
    if not self.items:
      raise ValueError(f'image folder {root!r} holds no images ({", ".join(IMG_EXTENSIONS)})')

  @property
  def num_classes(self) -> int:
    return len(self.classes)

  def __len__(self) -> int:
    return len(self.items)

  def __getitem__(self, i: int) -> Dict[str, Any]:
    path, label = self.items[i]
    return {'path': path, 'label': label}


def _hidden(name: str) -> bool:
  return name.startswith('.')


def class_names(root: str) -> list:
  """The sorted class sub-folders of an image folder (hidden ones are not classes: a
  .ipynb_checkpoints would otherwise become class 0 and shift every label)."""
  return sorted(d.name for d in os.scandir(root) if d.is_dir() and not _hidden(d.name))


def image_files(folder: str) -> list:
  """The image files under `folder` and its sub-folders (symlinks followed, each real
  folder once, so a link to a parent is no endless copy; hidden files and folders left
  out), folder by folder in sorted order."""
  found, seen = [], set()
  for dirpath, dirs, files in os.walk(folder, followlinks=True):
    real = os.path.realpath(dirpath)
    if real in seen:
      dirs[:] = []
      continue
    seen.add(real)
    dirs[:] = [d for d in dirs if not _hidden(d)]
    found.append((dirpath, sorted(f for f in files
                                  if not _hidden(f) and f.lower().endswith(IMG_EXTENSIONS))))
  return [os.path.join(d, f) for d, files in sorted(found) for f in files]


class TfdsSource:
  """Any TFDS image data set through tfds.data_source (array_record, no TensorFlow)."""

  def __init__(self, name: str, split: str, data_dir: str | None = None,
               image_key: str = 'image', label_key: str = 'label'):
    try:
      import tensorflow_datasets as tfds
    except ImportError:
      raise ValueError("data.kind='tfds' needs tensorflow-datasets: pip install 'var-jax[tfds]' "
                       "(or use data.kind='folder' on an image folder)") from None
    self._ds = tfds.data_source(name, split=split, data_dir=data_dir)
    self.image_key, self.label_key = image_key, label_key
    try:
      self.num_classes = int(self._ds.dataset_info.features[label_key].num_classes)
    except Exception:  # not a ClassLabel
      self.num_classes = None

  def __len__(self) -> int:
    return len(self._ds)

  def __getitem__(self, i: int) -> Dict[str, Any]:
    r = self._ds[i]
    return {'image': np.asarray(r[self.image_key]), 'label': int(r[self.label_key])}


class SyntheticSource:
  """Deterministic smooth random images with class-dependent colour (no files)."""

  def __init__(self, num_examples: int, num_classes: int, size: int, seed: int = 0):
    self.n, self.num_classes, self.size, self.seed = num_examples, num_classes, size, seed

  def __len__(self) -> int:
    return self.n

  def __getitem__(self, i: int) -> Dict[str, Any]:
    rng = np.random.default_rng([self.seed, i])
    label = i % self.num_classes
    low = rng.uniform(0, 1, (4, 4, 3))
    img = np.kron(low, np.ones((self.size // 4 + 1, self.size // 4 + 1, 1)))[:self.size, :self.size]
    colour = np.random.default_rng([self.seed, 10**6 + label]).uniform(0, 1, 3)
    img = 255 * (0.5 * img + 0.5 * colour)
    return {'image': img.clip(0, 255).astype(np.uint8), 'label': label}


def make_source(data_cfg, split: str = 'train', image_size: int | None = None):
  """Source from a config section: kind in {'folder', 'tfds', 'synthetic', 'digits', 'tokens'}."""
  kind = data_cfg.kind
  if kind in ('tokens', 'folder'):
    safe_io.require_local(data_cfg.path, 'data.path')
  if kind == 'tokens':
    from var_jax.data import tokens
    return tokens.TokenSource(data_cfg.path, 'train' if split == 'train' else 'eval')
  if kind == 'folder':   # ImageNet's layout: path/train/<class>/..., path/val/<class>/...
    train = os.path.join(data_cfg.path, 'train')
    if split == 'train':
      return FolderSource(train)
    return FolderSource(os.path.join(data_cfg.path, 'val'),   # labels as in training
                        class_names(train) if os.path.isdir(train) else None)
  if kind == 'tfds':
    split_name = data_cfg.get('train_split', 'train') if split == 'train' else data_cfg.get('eval_split', 'validation')
    return TfdsSource(data_cfg.tfds_name, split_name, data_cfg.get('path') or None,
                      data_cfg.get('image_key', 'image'), data_cfg.get('label_key', 'label'))
  if kind == 'synthetic':
    size = augment.mid_size(image_size or data_cfg.image_size, data_cfg.get('mid_reso', 1.125))
    n = data_cfg.synthetic_examples if split == 'train' else max(data_cfg.synthetic_examples // 4, 1)
    return SyntheticSource(n, data_cfg.num_classes, size, seed=0 if split == 'train' else 1)
  if kind == 'digits':   # scikit-learn's digits at 32x32 (var_jax.data.digits), offline
    from var_jax.data.digits import DigitsSource
    return DigitsSource('train' if split == 'train' else 'test')
  raise ValueError(f"unknown data.kind {kind!r} (folder, tfds, synthetic, digits, tokens)")


# --- index plumbing ---------------------------------------------------------------------

class _ProcessSlice(grain.MapDataset):
  """Local element k of process p = global stream element (k//lb)*gb + p*lb + k%lb."""

  def __init__(self, parent: grain.MapDataset, global_batch: int, local_batch: int,
               process_index: int, length: int, total: int):
    super().__init__(parent)
    self._gb, self._lb, self._p = global_batch, local_batch, process_index
    self._len, self._total = length, total

  def __len__(self) -> int:
    return self._len

  def __str__(self) -> str:
    return f'_ProcessSlice(p={self._p}, gb={self._gb}, lb={self._lb})'

  def __getitem__(self, k):
    if isinstance(k, slice):
      return self.slice(k)
    g = (k // self._lb) * self._gb + self._p * self._lb + k % self._lb
    src = self._parent[g] if g < self._total else -1   # -1: eval padding
    return (int(g), int(src))


@dataclasses.dataclass
class _Load:
  """Stream position + source index -> example dict (runs in worker threads/processes)."""
  source: Any
  image_size: int
  train: bool
  seed: int
  mid_reso: float
  hflip: bool

  def __call__(self, g_src):
    g, src = g_src
    n = len(self.source)
    blank = np.zeros((self.image_size, self.image_size, 3), np.uint8)
    if src < 0:
      return {'image': blank, 'label': 0, 'mask': 0, 'ok': 1}
    try:
      rec = self.source[src % n]
      img = open_image(rec)
      rng = np.random.default_rng([self.seed, g]) if self.train else None
      arr = augment.augment(img, self.image_size, train=self.train, rng=rng,
                            mid_reso=self.mid_reso, hflip=self.hflip)
      return {'image': arr, 'label': int(rec['label']), 'mask': 1, 'ok': 1}
    except Exception as e:  # unreadable/corrupt image: skipped (train) or masked (eval), counted
      where = self.source.items[src % n][0] if isinstance(self.source, FolderSource) else f'#{src % n}'
      print(f'[data] skipping unreadable image {where}: {type(e).__name__}: {e}', file=sys.stderr)
      return {'image': blank, 'label': 0, 'mask': 0, 'ok': 0}


def open_image(record: Dict[str, Any]) -> Image.Image:
  """The PIL image of a source record ({'path': ...} or {'image': HWC or HW array})."""
  return Image.open(record['path']) if 'path' in record else Image.fromarray(_hwc3(record['image']))


def _hwc3(a: np.ndarray) -> np.ndarray:
  a = np.asarray(a)
  if a.ndim == 2:
    a = a[..., None]
  if a.shape[-1] == 1:
    a = np.repeat(a, 3, axis=-1)
  return a.astype(np.uint8)


class CountBad(grain.transforms.Filter):
  """Drops examples that failed to load and counts them (main process). `limit`
  failures in a row (twice the data set: every image is unreadable) raise OSError,
  where the endless training stream would otherwise be filtered forever."""

  def __init__(self, limit: int = 0):
    self.count, self.in_a_row, self.limit = 0, 0, limit

  def filter(self, x) -> bool:
    if x['ok']:
      self.in_a_row = 0
      return True
    self.count += 1
    self.in_a_row += 1
    if self.limit and self.in_a_row >= self.limit:
      raise OSError(f'none of the last {self.in_a_row} training examples could be read '
                    '(twice the data set): every image is unreadable')
    return False


def _finish(batch):
  out = {'image': batch['image'], 'label': batch['label'].astype(np.int32)}
  if 'mask' in batch:
    out['mask'] = batch['mask'].astype(np.int32)
  return out


# --- pipeline -------------------------------------------------------------------------

class ImagePipeline:
  """Iterator over local batches with checkpointable state."""

  def __init__(self, iter_ds, counter: CountBad | None):
    self._ds, self._counter = iter_ds, counter
    self._it = iter(iter_ds)
    self._eval_bad = 0

  def __iter__(self):
    return self

  def __next__(self) -> Dict[str, np.ndarray]:
    b = next(self._it)
    if 'ok' in b:
      self._eval_bad += int(np.sum(1 - b['ok']))
    return {k: v for k, v in b.items() if k != 'ok'}

  @property
  def num_skipped(self) -> int:
    return (self._counter.count if self._counter is not None else 0) + self._eval_bad

  def get_state(self) -> Dict[str, Any]:
    return self._it.get_state()

  def set_state(self, state: Dict[str, Any]) -> None:
    self._it.set_state(state)


def make_pipeline(source, *, global_batch_size: int, image_size: int, train: bool, seed: int = 0,
                  mid_reso: float = 1.125, hflip: bool = False, num_epochs: int | None = None,
                  shard: grain.sharding.ShardOptions | None = None, num_threads: int = 8,
                  prefetch: int = 2, worker_count: int = 0) -> ImagePipeline:
  """Batches of augmented uint8 images for this process.

  train=True: endless (or `num_epochs`) seeded shuffle, random crop/flip, corrupt images
  skipped. train=False: one ordered epoch, centre crop, last batch padded (mask=0),
  corrupt images masked. `shard` defaults to ShardByJaxProcess (one shard per host).
  """
  ds, lb = stream(len(source), global_batch_size, train=train, seed=seed,
                  num_epochs=num_epochs, shard=shard)
  ds = ds.map(_Load(source, image_size, train, seed, mid_reso, hflip))
  it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=max(lb * prefetch, num_threads)))
  it_ds = worker_processes(it_ds, worker_count)
  counter = None
  if train:
    counter = CountBad(2 * len(source))
    it_ds = it_ds.filter(counter)
  it_ds = it_ds.batch(lb, drop_remainder=train).map(lambda b: _finish(b) | (
      {} if train else {'ok': b['ok']}))
  return ImagePipeline(it_ds, counter)


def worker_processes(it_ds, worker_count: int):
  """`it_ds` read by `worker_count` grain worker processes (0: in this process's threads)."""
  if worker_count <= 0:
    return it_ds
  from absl import flags   # grain's workers read absl flags, which no absl app parsed here
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  return it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))


def stream(n: int, global_batch_size: int, *, train: bool, seed: int = 0,
           num_epochs: int | None = None, shard: grain.sharding.ShardOptions | None = None):
  """(MapDataset of (stream position g, source index or -1 for padding) for this process,
  local batch size). train: seeded shuffle, reshuffled each epoch, endless unless
  num_epochs; eval: one ordered epoch padded to whole global batches."""
  shard = shard or grain.sharding.ShardByJaxProcess(drop_remainder=True)
  p, n_proc = shard.shard_index, shard.shard_count
  if global_batch_size % n_proc:
    raise ValueError(f'global batch {global_batch_size} not divisible by {n_proc} processes')
  lb = global_batch_size // n_proc
  if n == 0:
    raise ValueError('empty data source')
  idx = grain.MapDataset.range(n)
  if train:
    idx = idx.seed(seed).shuffle().repeat(num_epochs)
    total = len(idx)
    length = sys.maxsize if num_epochs is None else (total // global_batch_size) * lb
  else:
    total = n
    length = -(-n // global_batch_size) * lb
  return _ProcessSlice(idx, global_batch_size, lb, p, length, total), lb


def make_train_pipeline(source, data_cfg, *, global_batch_size: int, image_size: int,
                        seed: int):
  """The training stream of `source` with the options of `data_cfg` (uint8 images, or
  token maps for data.kind='tokens')."""
  d = data_cfg
  if d.kind == 'tokens':
    from var_jax.data import tokens
    return tokens.make_pipeline(source, global_batch_size=global_batch_size, train=True,
                                seed=seed, num_threads=d.num_threads, prefetch=d.prefetch,
                                worker_count=d.worker_count)
  return make_pipeline(source, global_batch_size=global_batch_size, image_size=image_size,
                       train=True, seed=seed, mid_reso=d.mid_reso, hflip=d.hflip,
                       num_threads=d.num_threads, prefetch=d.prefetch, worker_count=d.worker_count)


def make_eval_pipeline(data_cfg, *, global_batch_size: int, image_size: int):
  """The eval split of `data_cfg` (centre crops, uint8, or token maps; padded batches
  with a 'mask')."""
  source = make_source(data_cfg, 'eval', image_size)
  if data_cfg.kind == 'tokens':
    from var_jax.data import tokens
    return tokens.make_pipeline(source, global_batch_size=global_batch_size, train=False,
                                num_threads=data_cfg.num_threads)
  return make_pipeline(source, global_batch_size=global_batch_size, image_size=image_size,
                       train=False, mid_reso=data_cfg.mid_reso, num_threads=data_cfg.num_threads)
