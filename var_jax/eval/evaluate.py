"""Scores ADM-format sample batches: FID, sFID, IS, precision and recall in one pass.

    net = inception.load('pt_inception-2015-12-05-6726825d.pth')
    metrics = evaluate(net, 'samples.npz', 'VIRTUAL_imagenet256_labeled.npz',
                       cache_dir='results/')

What `var-jax eval` runs. The reference batch's features and statistics are cached in
cache_dir as `<ref stem>.var_jax_ref_stats.npz`, marked with a fingerprint of the
reference file, the weights and the compute dtype (net.fingerprint): a stale cache of
ours is rewritten; a file of that name that var-jax did not write is neither read nor
replaced.

ADM's reference batches also hold `mu`/`sigma`/`mu_s`/`sigma_s`: statistics of the whole
data set (e.g. all ImageNet train images) computed by TensorFlow's Inception graph, while
arr_0 holds 10,000 of its images. By default (`ref_stats='recompute'`) the reference
statistics are recomputed from arr_0 with this network, so both sides come from one
network; `ref_stats='stored'` uses the stored ones (features of two networks). When
both exist, `stored_vs_recomputed` reports FID/sFID against each and the Frechet
distance between the two reference statistics. Precision and recall always use arr_0.
"""
from __future__ import annotations

import functools
import hashlib
import os
import pathlib
from typing import Any, Dict, Optional

import numpy as np

from var_jax.eval import metrics
from var_jax.eval.npz import NpzImages, extra_arrays

CACHE_MARK = 'var-jax reference statistics v1'
STAT_KEYS = ('mu', 'sigma', 'mu_s', 'sigma_s')


def compute_features(net, images: NpzImages, batch_size: int = 100, desc: str = 'inception',
                     progress: bool = True) -> Dict[str, np.ndarray]:
  """{'pool3' (N, 2048), 'spatial' (N, 2023) flattened HWC, 'logits_unbiased' (N, 1008)}.

  Batches are padded to batch_size (one compiled shape) and the next batch is dispatched
  before the previous one is fetched, so reading, transfer and compute overlap."""
  from tqdm import tqdm
  keys = ('pool3', 'spatial', 'logits_unbiased')
  out = {k: [] for k in keys}

  def collect(pending):
    dev, n = pending
    for k in keys:
      v = np.asarray(dev[k])[:n]
      out[k].append(v.reshape(n, -1))

  pending = None
  total = -(-len(images) // batch_size)
  for batch in tqdm(images.batches(batch_size), total=total, desc=desc, unit='batch',
                    disable=not progress):
    n = len(batch)
    if n < batch_size:
      batch = np.concatenate([batch, np.zeros((batch_size - n,) + batch.shape[1:], batch.dtype)])
    dev, _ = net.dispatch(batch)
    if pending is not None:
      collect(pending)
    pending = (dev, n)
  collect(pending)
  return {k: np.concatenate(v) for k, v in out.items()}


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    while block := f.read(chunk):
      h.update(block)
  return h.hexdigest()


def cache_path(cache_dir: str | os.PathLike, ref_path: str | os.PathLike) -> pathlib.Path:
  stem = pathlib.Path(ref_path).name
  stem = stem[:-4] if stem.endswith('.npz') else stem
  return pathlib.Path(cache_dir) / f'{stem}.var_jax_ref_stats.npz'


def _read_cache(path: pathlib.Path, fingerprint: str) -> Optional[Dict[str, np.ndarray]]:
  """The cached reference features if `path` is our cache for `fingerprint`; None if it is
  ours but stale or absent; raises FileExistsError if the file is not ours."""
  if not path.exists():
    return None
  try:
    with np.load(path) as z:
      mine = 'var_jax_cache' in z.files and str(z['var_jax_cache']) == CACHE_MARK
      if mine and str(z['fingerprint']) == fingerprint:
        return {k: z[k] for k in z.files}
  except (ValueError, OSError, KeyError, EOFError) as e:
    raise FileExistsError(f'{path} exists and is not a var-jax cache ({e})') from e
  if not mine:
    raise FileExistsError(f'{path} exists and was not written by var-jax eval')
  return None


def _write_cache(path: pathlib.Path, arrays: Dict[str, np.ndarray]) -> None:
  tmp = path.with_name(f'.{path.name}.tmp{os.getpid()}')
  try:
    with open(tmp, 'wb') as f:
      np.savez(f, **arrays)
    os.replace(tmp, path)
  finally:
    if tmp.exists():
      tmp.unlink()


def reference_features(net, ref_path: str | os.PathLike, *, cache_dir=None,
                       batch_size: int = 100, progress: bool = True,
                       log=print) -> Dict[str, np.ndarray]:
  """{'pool3', 'mu', 'sigma', 'mu_s', 'sigma_s'} of the reference batch, via the cache."""
  path = cache_path(cache_dir, ref_path) if cache_dir is not None else None
  fingerprint = '|'.join([CACHE_MARK, file_sha256(ref_path), net.fingerprint])
  cached, can_write = None, path is not None
  if path is not None:
    try:
      cached = _read_cache(path, fingerprint)
    except FileExistsError as e:
      log(f'note: not caching the reference statistics: {e}')
      can_write = False
  if cached is not None:
    log(f'reference statistics from the cache {path}')
    return {k: cached[k] for k in ('pool3',) + STAT_KEYS}
  with NpzImages(ref_path) as images:
    feats = compute_features(net, images, batch_size, 'inception (reference)', progress)
  mu, sigma = metrics.feature_statistics(feats['pool3'])
  mu_s, sigma_s = metrics.feature_statistics(feats['spatial'])
  out = {'pool3': feats['pool3'], 'mu': mu, 'sigma': sigma, 'mu_s': mu_s, 'sigma_s': sigma_s}
  if can_write:
    try:
      _write_cache(path, dict(out, var_jax_cache=np.array(CACHE_MARK),
                              fingerprint=np.array(fingerprint)))
      log(f'cached the reference statistics in {path}')
    except OSError as e:
      log(f'note: could not cache the reference statistics in {path}: {e}')
  return out


def _fd(a: Dict[str, np.ndarray], b: Dict[str, np.ndarray], suffix: str = '',
        sqrtm: str = 'scipy') -> float:
  return metrics.frechet_distance(a['mu' + suffix], a['sigma' + suffix],
                                  b['mu' + suffix], b['sigma' + suffix], sqrtm=sqrtm)


def _check_stored(stored: Dict[str, np.ndarray], ref: Dict[str, np.ndarray], ref_path) -> None:
  """Raises ValueError when the stored statistics do not have this network's dimensions."""
  for suffix in ('', '_s'):
    d = ref['mu' + suffix].shape[0]
    mu, sigma = stored['mu' + suffix], stored['sigma' + suffix]
    if mu.shape != (d,) or sigma.shape != (d, d):
      raise ValueError(f'{ref_path}: stored mu{suffix} {mu.shape} / sigma{suffix} {sigma.shape} '
                       f'do not fit these {d}-dimensional features')


def evaluate(net, samples_path, ref_path, *, cache_dir=None, ref_stats: str = 'recompute',
             batch_size: int = 100, progress: bool = True, k: int = 3, sqrtm: str = 'scipy',
             log=print) -> Dict[str, Any]:
  """fid, sfid, is, is_std, precision, recall, n_samples, n_ref (+ stored_vs_recomputed).

  sqrtm: how FID's matrix square root is taken (metrics.frechet_distance): 'scipy', the
  standard, or 'eigh', the same trace ~10x faster."""
  fd = functools.partial(_fd, sqrtm=sqrtm)
  if ref_stats not in ('recompute', 'stored'):
    raise ValueError(f"ref_stats must be 'recompute' or 'stored', got {ref_stats!r}")
  with NpzImages(samples_path) as s, NpzImages(ref_path) as r:  # validate both up front
    n_samples, n_ref = len(s), len(r)
  for name, n in (('samples', n_samples), ('reference', n_ref)):
    if n <= k:
      raise ValueError(f'the {name} batch has {n} images; FID and precision/recall need more '
                       f'than k={k}')
  stored = extra_arrays(ref_path, STAT_KEYS)
  stored = stored if len(stored) == len(STAT_KEYS) else {}
  if ref_stats == 'stored' and not stored:
    raise ValueError(f'{ref_path} holds no precomputed {"/".join(STAT_KEYS)}; '
                     'use the recomputed reference statistics')
  ref = reference_features(net, ref_path, cache_dir=cache_dir, batch_size=batch_size,
                           progress=progress, log=log)
  if stored:
    try:
      _check_stored(stored, ref, ref_path)
    except ValueError as e:
      if ref_stats == 'stored':
        raise
      log(f'note: stored statistics not compared: {e}')
      stored = {}
  with NpzImages(samples_path) as images:
    feats = compute_features(net, images, batch_size, 'inception (samples)', progress)
  if min(n_samples, n_ref) <= ref['mu'].shape[0]:
    log(f'note: with {min(n_samples, n_ref)} images the {ref["mu"].shape[0]}-dimensional '
        'covariances are singular; FID is then strongly biased (papers use 50,000 samples)')
  mu, sigma = metrics.feature_statistics(feats['pool3'])
  mu_s, sigma_s = metrics.feature_statistics(feats['spatial'])
  sample = {'mu': mu, 'sigma': sigma, 'mu_s': mu_s, 'sigma_s': sigma_s}
  both = {'recompute': ref, 'stored': stored} if stored else {'recompute': ref}
  fids = {name: (fd(sample, st), fd(sample, st, '_s')) for name, st in both.items()}
  is_mean, is_std = metrics.inception_score(feats['logits_unbiased'], min(10, n_samples))
  out = {'fid': fids[ref_stats][0], 'sfid': fids[ref_stats][1], 'is': is_mean, 'is_std': is_std,
         **metrics.precision_recall(ref['pool3'], feats['pool3'], k=k),
         'n_samples': n_samples, 'n_ref': n_ref, 'ref_stats': ref_stats}
  if stored:
    out['stored_vs_recomputed'] = {
        'fid_with_stored': fids['stored'][0], 'sfid_with_stored': fids['stored'][1],
        'fid_with_recomputed': fids['recompute'][0], 'sfid_with_recomputed': fids['recompute'][1],
        'fid_stored_to_recomputed': fd(stored, ref),
        'sfid_stored_to_recomputed': fd(stored, ref, '_s')}
  return out
