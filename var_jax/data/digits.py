"""scikit-learn's digits as a tiny, offline, class-conditional image data set.

1797 grey 8x8 digits (values 0..16, ten classes), upscaled 4x to 32x32 with torch's
bicubic kernel (`ops.resize.bicubic_matrix`, numpy only) and replicated to RGB
uint8. A fixed stratified split holds out 297 test digits (seed 0), so the
split, and everything trained on it, is the same on every machine.

Reuse:
  images, labels = digits_arrays('train')     # uint8 (N, 32, 32, 3), int32 (N,)
  source = DigitsSource('test')               # grain-style random-access source
  clf = fit_classifier()                      # logistic regression on real 8x8 train digits
  clf.predict(to_8x8_features(images))        # labels of generated 32x32 images

The image pipelines (`data.images.make_source`) take it as data.kind = 'digits'.
"""
from __future__ import annotations

import functools
from typing import Dict, Tuple

import numpy as np

from var_jax.ops.resize import bicubic_matrix

IMAGE_SIZE = 32
NUM_CLASSES = 10
NUM_TEST = 297          # 1797 = 1500 train + 297 test
SPLIT_SEED = 0
_SCALE = IMAGE_SIZE // 8


@functools.lru_cache(maxsize=None)
def _raw() -> Tuple[np.ndarray, np.ndarray]:
  from sklearn.datasets import load_digits   # ships with scikit-learn: no download
  d = load_digits()
  return d.images.astype(np.float32), d.target.astype(np.int32)


@functools.lru_cache(maxsize=None)
def split_indices(split: str) -> np.ndarray:
  """Indices into load_digits() of 'train' (1500) or 'test' (297), stratified, fixed."""
  if split not in ('train', 'test'):
    raise ValueError(f"digits split must be 'train' or 'test', got {split!r}")
  _, y = _raw()
  rng = np.random.default_rng(SPLIT_SEED)
  test = []
  # per class a share of NUM_TEST proportional to its size (largest remainders)
  counts = np.bincount(y, minlength=NUM_CLASSES)
  quota = counts * NUM_TEST / len(y)
  take = np.floor(quota).astype(int)
  for c in np.argsort(-(quota - take), kind='stable')[:NUM_TEST - take.sum()]:
    take[c] += 1
  for c in range(NUM_CLASSES):
    idx = np.flatnonzero(y == c)
    test.extend(rng.permutation(idx)[:take[c]].tolist())
  test = np.sort(np.asarray(test, np.int64))
  if split == 'test':
    return test
  return np.setdiff1d(np.arange(len(y)), test)


def upscale(images_N88: np.ndarray) -> np.ndarray:
  """8x8 digits (0..16) -> uint8 (N, 32, 32, 3): bicubic 4x, clipped, grey to RGB."""
  x = np.asarray(images_N88, np.float32)
  if x.ndim != 3 or x.shape[1:] != (8, 8):
    raise ValueError(f'digits must be (N, 8, 8), got {x.shape}')
  w = bicubic_matrix(8, IMAGE_SIZE)                       # (32, 8)
  big = np.einsum('Hh,Nhw,Ww->NHW', w, x, w)
  big = np.clip(np.rint(big * (255.0 / 16.0)), 0, 255).astype(np.uint8)
  return np.repeat(big[..., None], 3, axis=-1)


def downscale(images_NHWC: np.ndarray) -> np.ndarray:
  """32x32 images (uint8 0..255, or float in [0, 1]) -> (N, 8, 8) in 0..16: 4x4 means of the grey."""
  x = np.asarray(images_NHWC)
  if x.ndim != 4 or x.shape[1:3] != (IMAGE_SIZE, IMAGE_SIZE):
    raise ValueError(f'images must be (N, {IMAGE_SIZE}, {IMAGE_SIZE}, C), got {x.shape}')
  x = x.astype(np.float32) / (255.0 if x.dtype == np.uint8 else 1.0)
  grey = x.mean(axis=-1)
  n = grey.shape[0]
  small = grey.reshape(n, 8, _SCALE, 8, _SCALE).mean(axis=(2, 4))
  return small * 16.0


def to_8x8_features(images_NHWC: np.ndarray) -> np.ndarray:
  """Classifier features of 32x32 images: downscaled to 8x8, flattened, in [0, 1]."""
  return downscale(images_NHWC).reshape(len(images_NHWC), 64) / 16.0


@functools.lru_cache(maxsize=None)
def digits_arrays(split: str = 'train') -> Tuple[np.ndarray, np.ndarray]:
  """(uint8 images (N, 32, 32, 3), int32 labels (N,)) of a split; cached, read-only."""
  x, y = _raw()
  idx = split_indices(split)
  images, labels = upscale(x[idx]), y[idx].copy()
  images.setflags(write=False)
  labels.setflags(write=False)
  return images, labels


def raw_8x8(split: str = 'train') -> Tuple[np.ndarray, np.ndarray]:
  """The original 8x8 digits (0..16 float32) and labels of a split."""
  x, y = _raw()
  idx = split_indices(split)
  return x[idx], y[idx]


class DigitsSource:
  """Random-access source for data.images pipelines: {'image': uint8 HWC, 'label': int}."""

  num_classes = NUM_CLASSES

  def __init__(self, split: str = 'train'):
    self.split = split
    self.images, self.labels = digits_arrays(split)

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, i: int) -> Dict[str, object]:
    return {'image': self.images[i], 'label': int(self.labels[i])}


@functools.lru_cache(maxsize=None)
def fit_classifier():
  """Logistic regression on the real 8x8 train digits (features in [0, 1]); deterministic."""
  from sklearn.linear_model import LogisticRegression
  x, y = raw_8x8('train')
  clf = LogisticRegression(max_iter=2000, C=1.0)
  clf.fit(x.reshape(len(x), 64) / 16.0, y)
  return clf


def class_accuracy(images_NHWC: np.ndarray, labels_N: np.ndarray) -> float:
  """Share of 32x32 images the real-digit classifier labels as `labels_N`."""
  pred = fit_classifier().predict(to_8x8_features(images_NHWC))
  return float(np.mean(pred == np.asarray(labels_N)))


def mean_pairwise_distance(images_NHWC: np.ndarray) -> float:
  """Mean L2 distance between distinct pairs of 8x8 feature vectors (a diversity measure)."""
  f = to_8x8_features(images_NHWC).astype(np.float64)
  n = len(f)
  if n < 2:
    raise ValueError('need at least two images for a pairwise distance')
  sq = np.sum(f * f, axis=1)
  d2 = np.maximum(sq[:, None] + sq[None, :] - 2 * f @ f.T, 0.0)
  return float(np.sqrt(d2)[np.triu_indices(n, 1)].mean())


def diversity_report(images_NHWC: np.ndarray, labels_N: np.ndarray, split: str = 'test'
                     ) -> Dict[str, float]:
  """Per-class mean pairwise distance of samples vs. real digits of the same class, averaged."""
  real, real_y = digits_arrays(split)
  labels_N = np.asarray(labels_N)
  gen, ref = [], []
  for c in np.unique(labels_N):
    if np.sum(labels_N == c) < 2:
      continue
    gen.append(mean_pairwise_distance(images_NHWC[labels_N == c]))
    ref.append(mean_pairwise_distance(real[real_y == c]))
  if not gen:
    raise ValueError('need at least two samples of some class')
  g, r = float(np.mean(gen)), float(np.mean(ref))
  return {'samples': g, 'real': r, 'ratio': g / r}


def nearest_train_distance(images_NHWC: np.ndarray) -> float:
  """Mean L2 distance (8x8 features) from each image to its nearest TRAIN digit: a copy
  detector. Compare with the same figure for the real held-out digits."""
  train, _ = digits_arrays('train')
  f, t = to_8x8_features(images_NHWC).astype(np.float64), to_8x8_features(train).astype(np.float64)
  d2 = np.sum(f * f, 1)[:, None] + np.sum(t * t, 1)[None] - 2 * f @ t.T
  return float(np.sqrt(np.maximum(d2.min(axis=1), 0.0)).mean())
