"""The embedded default: a digits VAR that samples every class offline in seconds.

    import var_jax.demo
    out = var_jax.demo.run('demo_out')        # writes grid.png and samples.npz
    out = var_jax.demo.run_edit('demo_out')   # held-out digits, lower half as each class
    pipe = var_jax.demo.load()                # the Pipeline behind it (var_jax.load)

The checkpoint in var_jax/assets/digits is a native var-jax checkpoint (tokenizer
and transformer) trained by this package's own trainers on scikit-learn's digits
(configs/digits_vqvae.py, configs/digits_var.py, launch/train_digits.sh). Its
sampling defaults (guidance, top-k, top-p) and the figures measured with them are in
assets/digits/demo.json; README.md ("The embedded digits model") explains them.
"""
from __future__ import annotations

import json
import os
import pathlib
from typing import Any, Dict, Optional

import numpy as np

ASSET_DIR = pathlib.Path(__file__).resolve().parent / 'assets' / 'digits'
DEMO_JSON = 'demo.json'
FALLBACK = {'cfg': 2.0, 'top_k': 0, 'top_p': 0.0, 'per_class': 10, 'seed': 0}


def asset_dir() -> pathlib.Path:
  if not (ASSET_DIR / 'config.json').is_file():
    raise FileNotFoundError(f'the embedded digits checkpoint is missing from {ASSET_DIR} '
                            '(reinstall var-jax, or rebuild it with launch/train_digits.sh)')
  return ASSET_DIR


def defaults() -> Dict[str, Any]:
  """Sampling defaults shipped with the checkpoint (cfg, top_k, top_p, per_class, seed)."""
  path = ASSET_DIR / DEMO_JSON
  out = dict(FALLBACK)
  if path.is_file():
    out.update(json.loads(path.read_text()).get('sampling', {}))
  return out


def load():
  """The embedded digits Pipeline (32x32 RGB, 10 classes)."""
  import var_jax
  return var_jax.load(asset_dir())


def sample_digits(pipe=None, *, per_class: Optional[int] = None, labels=None,
                  cfg: Optional[float] = None, top_k: Optional[int] = None,
                  top_p: Optional[float] = None, seed: Optional[int] = None):
  """(uint8 images (B, 32, 32, 3), int32 labels (B,)): `per_class` samples of every digit,
  class by class (or the given labels), with the shipped defaults unless overridden."""
  d = defaults()
  pipe = pipe if pipe is not None else load()
  if labels is None:
    n = d['per_class'] if per_class is None else int(per_class)
    if n < 1:
      raise ValueError(f'per_class must be >= 1, got {n}')
    labels = np.repeat(np.arange(pipe.config.var.num_classes), n)
  labels = np.asarray(labels, np.int32)
  images, _ = pipe.sample(labels, cfg=d['cfg'] if cfg is None else cfg,
                          top_k=d['top_k'] if top_k is None else top_k,
                          top_p=d['top_p'] if top_p is None else top_p,
                          seed=d['seed'] if seed is None else seed)
  from var_jax.io_utils import to_uint8
  return to_uint8(np.asarray(images)), labels


def run(out_dir: str | os.PathLike = 'var_jax_demo', *, per_class: Optional[int] = None,
        cfg: Optional[float] = None, top_k: Optional[int] = None, top_p: Optional[float] = None,
        seed: Optional[int] = None, scale: int = 2) -> Dict[str, pathlib.Path]:
  """Samples every class and writes out_dir/grid.png (one row per class, upscaled `scale`x)
  and out_dir/samples.npz (images: uint8 NHWC, labels: int32). Returns both paths."""
  from var_jax.io_utils import make_grid, save_npz, save_png
  images, labels = sample_digits(per_class=per_class, cfg=cfg, top_k=top_k, top_p=top_p, seed=seed)
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  n_cls = int(labels.max()) + 1
  big = np.repeat(np.repeat(images, scale, axis=1), scale, axis=2) if scale > 1 else images
  grid_path, npz_path = out / 'grid.png', out / 'samples.npz'
  save_png(grid_path, make_grid(big, nrow=len(labels) // n_cls, padding=2, pad_value=96))
  save_npz(npz_path, {'images': images, 'labels': labels})
  return {'grid': grid_path, 'samples': npz_path}


def measure(pipe=None, *, per_class: int = 50, cfg: Optional[float] = None,
            top_k: Optional[int] = None, top_p: Optional[float] = None,
            seed: Optional[int] = None, batch: int = 100) -> Dict[str, Any]:
  """The figures of README.md ("The embedded digits model") for a digits Pipeline:

  accuracy     share of class-conditional samples that a logistic regression trained on
               the real 8x8 train digits labels as the requested class (samples resized
               back to 8x8); also per class, and the classifier's own accuracy on the
               real held-out digits for comparison;
  diversity    mean pairwise distance (8x8 features in [0, 1]) of the samples of each
               class vs. the real held-out digits of that class, averaged over classes;
  nearest_train_distance  mean distance of each sample (and of each real held-out digit)
               to its nearest training digit: near 0 would mean copies;
  recon_psnr   the tokenizer's reconstruction PSNR / SSIM on the 297 held-out digits.
  """
  from var_jax.data import digits
  from var_jax.eval import metrics
  pipe = pipe if pipe is not None else load()
  d = defaults()
  kw = dict(cfg=d['cfg'] if cfg is None else cfg, top_k=d['top_k'] if top_k is None else top_k,
            top_p=d['top_p'] if top_p is None else top_p)
  seed = d['seed'] if seed is None else seed
  labels = np.repeat(np.arange(digits.NUM_CLASSES), per_class).astype(np.int32)
  images = []
  for i in range(0, len(labels), batch):
    imgs, _ = sample_digits(pipe, labels=labels[i:i + batch], seed=seed + i // batch, **kw)
    images.append(imgs)
  images = np.concatenate(images)
  pred = digits.fit_classifier().predict(digits.to_8x8_features(images))
  real, real_y = digits.raw_8x8('test')
  test_imgs, _ = digits.digits_arrays('test')
  x = test_imgs.astype(np.float32) / 127.5 - 1
  rec = np.asarray(pipe.reconstruct(x))
  return {
      'sampling': dict(kw, seed=seed, per_class=per_class),
      'accuracy': float(np.mean(pred == labels)),
      'accuracy_per_class': [float(np.mean(pred[labels == c] == c)) for c in range(digits.NUM_CLASSES)],
      'classifier_accuracy_on_real_test': float(
          digits.fit_classifier().score(real.reshape(len(real), 64) / 16.0, real_y)),
      'diversity': digits.diversity_report(images, labels),
      'nearest_train_distance': {'samples': digits.nearest_train_distance(images),
                                 'real_test': digits.nearest_train_distance(test_imgs)},
      'recon_psnr': float(np.mean(np.asarray(metrics.psnr(rec, x)))),
      'recon_ssim': float(np.mean(np.asarray(metrics.ssim(rec, x)))),
  }


# --- zero-shot editing: the lower half of held-out digits regenerated as another class ---
def lower_half_mask(pipe) -> np.ndarray:
  """(h, w) float32 keep mask at token resolution: the upper half kept, the lower regenerated."""
  h = pipe.config.patch_nums[-1]
  mask = np.ones((h, h), np.float32)
  mask[h // 2:] = 0
  return mask


def edit_digits(pipe, images_u8: np.ndarray, targets: np.ndarray, *, cfg: Optional[float] = None,
                top_k: Optional[int] = None, top_p: Optional[float] = None, seed: int = 0,
                batch: int = 100) -> np.ndarray:
  """uint8 (N, 32, 32, 3): the lower half of each digit regenerated as class targets[i]
  (Pipeline.edit, the shipped sampling defaults unless overridden; batch b uses seed + b)."""
  from var_jax.io_utils import to_uint8
  d = defaults()
  kw = dict(cfg=d['cfg'] if cfg is None else cfg, top_k=d['top_k'] if top_k is None else top_k,
            top_p=d['top_p'] if top_p is None else top_p)
  x = np.asarray(images_u8, np.float32) / 127.5 - 1
  mask, out = lower_half_mask(pipe), []
  for i in range(0, len(x), batch):
    edited, _ = pipe.edit(x[i:i + batch], mask, np.asarray(targets[i:i + batch], np.int32),
                          seed=seed + i // batch, **kw)
    out.append(to_uint8(np.asarray(edited)))
  return np.concatenate(out)


def edit_table(pipe=None, **kw) -> Dict[str, np.ndarray]:
  """The first held-out digit of every class, its lower half regenerated as every class:
  {'originals': (10, 32, 32, 3), 'sources': (10,), 'edits': (10, 10, 32, 32, 3) indexed
  [source digit, target class], 'predicted': (10, 10) the classifier's reading of each edit}."""
  from var_jax.data import digits
  pipe = pipe if pipe is not None else load()
  images, labels = digits.digits_arrays('test')
  first = np.asarray([np.flatnonzero(labels == c)[0] for c in range(digits.NUM_CLASSES)])
  n = digits.NUM_CLASSES
  targets = np.tile(np.arange(n, dtype=np.int32), n)
  edits = edit_digits(pipe, np.repeat(images[first], n, axis=0), targets, **kw)
  pred = digits.fit_classifier().predict(digits.to_8x8_features(edits))
  return {'originals': images[first], 'sources': labels[first].astype(np.int32),
          'edits': edits.reshape(n, n, *edits.shape[1:]), 'predicted': pred.reshape(n, n)}


def run_edit(out_dir: str | os.PathLike = 'var_jax_demo', *, scale: int = 2,
             **kw) -> Dict[str, Any]:
  """Writes out_dir/edit_grid.png (a row per held-out digit 0-9: the digit, its kept upper
  half, then its lower half regenerated as class 0 .. 9) and out_dir/edits.npz; returns
  the paths and the share of off-diagonal edits the classifier reads as the requested class."""
  from var_jax.io_utils import make_grid, save_npz, save_png
  t = edit_table(**kw)
  n = len(t['sources'])
  shown = t['originals'].copy()
  shown[:, shown.shape[1] // 2:] = 128
  rows = np.concatenate([t['originals'][:, None], shown[:, None], t['edits']], axis=1)
  tiles = rows.reshape(-1, *rows.shape[2:])
  big = np.repeat(np.repeat(tiles, scale, axis=1), scale, axis=2) if scale > 1 else tiles
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  grid_path, npz_path = out / 'edit_grid.png', out / 'edits.npz'
  save_png(grid_path, make_grid(big, nrow=n + 2, padding=2, pad_value=96))
  save_npz(npz_path, {'originals': t['originals'], 'sources': t['sources'], 'edits': t['edits'],
                      'predicted': t['predicted']})
  off = ~np.eye(n, dtype=bool)
  hit = t['predicted'] == np.arange(n)[None, :]
  return {'grid': grid_path, 'edits': npz_path, 'accuracy': float(hit[off].mean()),
          'count': int(off.sum())}


def measure_edit(pipe=None, *, cfg: Optional[float] = None, top_k: Optional[int] = None,
                 top_p: Optional[float] = None, seed: int = 0, limit: Optional[int] = None,
                 batch: int = 100) -> Dict[str, Any]:
  """How often the classifier reads an edited held-out digit as the requested class: every
  held-out digit (the first `limit`) with its lower half regenerated as each of the 9 other
  classes. Also: how often the edit still reads as the source digit, and the same reading
  of the unedited digits (the chance that the target was already there)."""
  from var_jax.data import digits
  pipe = pipe if pipe is not None else load()
  images, labels = digits.digits_arrays('test')
  if limit is not None:
    images, labels = images[:limit], labels[:limit]
  n = digits.NUM_CLASSES
  src = np.repeat(labels, n - 1)
  tgt = np.concatenate([[c for c in range(n) if c != y] for y in labels]).astype(np.int32)
  d = defaults()
  kw = dict(cfg=d['cfg'] if cfg is None else cfg, top_k=d['top_k'] if top_k is None else top_k,
            top_p=d['top_p'] if top_p is None else top_p)
  edits = edit_digits(pipe, np.repeat(images, n - 1, axis=0), tgt, seed=seed, batch=batch, **kw)
  clf = digits.fit_classifier()
  pred = clf.predict(digits.to_8x8_features(edits))
  before = np.repeat(clf.predict(digits.to_8x8_features(images)), n - 1)
  return {
      'sampling': dict(kw, seed=seed), 'edits': int(len(tgt)),
      'accuracy': float(np.mean(pred == tgt)),
      'accuracy_per_target': [float(np.mean(pred[tgt == c] == c)) for c in range(n)],
      'still_source': float(np.mean(pred == src)),
      'target_before_edit': float(np.mean(before == tgt)),
  }
