"""Evaluation metrics: reconstruction (PSNR, SSIM, codebook usage) and generation (FID, IS,
precision/recall of Inception features; var_jax/eval/inception.py computes the features).

Reconstruction metrics take NHWC images in [-1, 1] (the VQVAE's range) unless
`data_range` says otherwise and return one value per image so a caller can mask padded eval examples
and average over the whole split. SSIM is the standard one (Wang et al. 2004):
11x11 Gaussian window with sigma 1.5, K1 = 0.01, K2 = 0.03, 'valid' filtering,
computed per channel and averaged, like skimage's `gaussian_weights=True` variant.
"""
from __future__ import annotations

import functools
import warnings
from typing import Dict, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np


def psnr(x_BHWC: jax.Array, y_BHWC: jax.Array, data_range: float = 2.0) -> jax.Array:
  """Peak signal-to-noise ratio per image (B,), in dB; inf-free (mse floored at 1e-10)."""
  x, y = jnp.asarray(x_BHWC, jnp.float32), jnp.asarray(y_BHWC, jnp.float32)
  mse = jnp.mean((x - y) ** 2, axis=(1, 2, 3))
  return 10.0 * jnp.log10(data_range ** 2 / jnp.maximum(mse, 1e-10))


def _gaussian_1d(size: int, sigma: float) -> np.ndarray:
  t = np.arange(size, dtype=np.float64) - (size - 1) / 2
  g = np.exp(-(t * t) / (2 * sigma * sigma))
  return (g / g.sum()).astype(np.float32)


def _filter(x_BHWC: jax.Array, g: np.ndarray) -> jax.Array:
  """Separable 'valid' Gaussian filtering of every channel."""
  k = len(g)
  H, W = x_BHWC.shape[1:3]
  rows = jnp.stack([x_BHWC[:, i:H - k + 1 + i] for i in range(k)], 0)
  x = jnp.tensordot(jnp.asarray(g), rows, axes=(0, 0))
  cols = jnp.stack([x[:, :, j:W - k + 1 + j] for j in range(k)], 0)
  return jnp.tensordot(jnp.asarray(g), cols, axes=(0, 0))


def ssim(x_BHWC: jax.Array, y_BHWC: jax.Array, data_range: float = 2.0, win_size: int = 11,
         sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03) -> jax.Array:
  """Structural similarity per image (B,), mean over pixels and channels."""
  x, y = jnp.asarray(x_BHWC, jnp.float32), jnp.asarray(y_BHWC, jnp.float32)
  if x.shape != y.shape or x.ndim != 4:
    raise ValueError(f'ssim needs two NHWC arrays of one shape, got {x.shape} and {y.shape}')
  if min(x.shape[1:3]) < win_size:
    raise ValueError(f'images {x.shape[1:3]} are smaller than the SSIM window {win_size}')
  g = _gaussian_1d(win_size, sigma)
  mu_x, mu_y = _filter(x, g), _filter(y, g)
  sxx = _filter(x * x, g) - mu_x ** 2
  syy = _filter(y * y, g) - mu_y ** 2
  sxy = _filter(x * y, g) - mu_x * mu_y
  c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
  s = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (sxx + syy + c2))
  return jnp.mean(s, axis=(1, 2, 3))


def code_hits(idx_list: Sequence[jax.Array], vocab_size: int,
              mask_B: jax.Array | None = None) -> jax.Array:
  """(S, V) float32 counts of each code at each scale (masked examples do not count)."""
  rows = []
  for idx_Bl in idx_list:
    w = jnp.ones(idx_Bl.shape, jnp.float32)
    if mask_B is not None:
      w = w * jnp.asarray(mask_B, jnp.float32)[:, None]
    rows.append(jnp.zeros((vocab_size,), jnp.float32).at[idx_Bl.reshape(-1)].add(w.reshape(-1)))
  return jnp.stack(rows)


def codebook_usage(hits_SV: np.ndarray) -> np.ndarray:
  """Per scale: percentage of the codebook used at least once (S,), plus nothing else."""
  hits = np.asarray(hits_SV)
  return 100.0 * np.mean(hits > 0, axis=-1)


def codebook_perplexity(hits_SV: np.ndarray) -> np.ndarray:
  """Per scale: exp(entropy) of the code distribution, the effective number of codes used."""
  p = np.asarray(hits_SV, np.float64)
  p = p / np.maximum(p.sum(-1, keepdims=True), 1e-12)
  ent = -np.sum(np.where(p > 0, p * np.log(np.maximum(p, 1e-30)), 0.0), axis=-1)
  return np.exp(ent)


# --- generation metrics on Inception features ------------------------------------------
# The semantics are those of pytorch-fid and of ADM's evaluator (guided-diffusion's
# evaluations/evaluator.py), the numbers papers report: statistics in float64, scipy's
# matrix square root, IS over `splits` equal parts, k-NN manifolds of squared distances.


def feature_statistics(feats_ND: np.ndarray, block: int = 4096) -> Tuple[np.ndarray, np.ndarray]:
  """(mean (D,), covariance (D, D)) in float64, as np.cov(rowvar=False) (ddof 1), computed
  over row blocks so 50,000 x 2048 float32 features are never copied whole to float64."""
  x = np.asarray(feats_ND)
  if x.ndim != 2 or x.shape[0] < 2:
    raise ValueError(f'features must be (N >= 2, D), got shape {x.shape}')
  n = x.shape[0]
  mu = np.zeros(x.shape[1], np.float64)
  for i in range(0, n, block):
    mu += x[i:i + block].sum(0, dtype=np.float64)
  mu /= n
  cov = np.zeros((x.shape[1], x.shape[1]), np.float64)
  for i in range(0, n, block):
    c = x[i:i + block].astype(np.float64) - mu
    cov += c.T @ c
  return mu, cov / (n - 1)


def _trace_sqrt_product(s1: np.ndarray, s2: np.ndarray, method: str, eps: float) -> float:
  """Tr(sqrt(S1 S2)) for covariances S1, S2 (see frechet_distance)."""
  from scipy import linalg
  if method == 'eigh':  # S1 S2 ~ sqrt(S1) S2 sqrt(S1), symmetric PSD: sum sqrt(eigenvalues)
    w, v = np.linalg.eigh(s1)
    r = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = r @ s2 @ r
    return float(np.sum(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None))))
  if method != 'scipy':
    raise ValueError(f"sqrtm method must be 'scipy' or 'eigh', got {method!r}")
  with warnings.catch_warnings():  # singular products (N < D) are handled below, as in ADM
    warnings.simplefilter('ignore', linalg.LinAlgWarning)
    covmean = linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
      offset = np.eye(s1.shape[0]) * eps
      covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
  if np.iscomplexobj(covmean):
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
      raise ValueError(f'imaginary component {np.max(np.abs(covmean.imag)):.3g} in sqrtm(S1 S2)')
    covmean = covmean.real
  return float(np.trace(covmean))


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6, sqrtm: str = 'scipy') -> float:
  """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrt(S1 S2)), as pytorch-fid and ADM compute it.

  sqrtm='scipy' (the standard): scipy.linalg.sqrtm(S1 S2); when it is not finite (a
  near-singular product) both covariances get eps on the diagonal; an imaginary part from
  round-off is dropped unless the diagonal's exceeds 1e-3, which raises ValueError.
  sqrtm='eigh': the trace from the eigenvalues of sqrt(S1) S2 sqrt(S1) (similar to S1 S2,
  symmetric), ~10x faster at D = 2048 and equal to scipy's up to round-off when the
  product is well conditioned (both clip round-off negatives of singular products to 0)."""
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
  if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != mu1.shape * 2:
    raise ValueError(f'statistics do not match: means {mu1.shape} vs {mu2.shape}, '
                     f'covariances {s1.shape} vs {s2.shape}')
  diff = mu1 - mu2
  tr_covmean = _trace_sqrt_product(s1, s2, sqrtm, eps)
  return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def fid_from_features(feats_a: np.ndarray, feats_b: np.ndarray, sqrtm: str = 'scipy') -> float:
  """Frechet distance between two feature sets (N, D) and (M, D): FID on pool3 features,
  sFID on the flattened spatial ones."""
  return frechet_distance(*feature_statistics(feats_a), *feature_statistics(feats_b),
                          sqrtm=sqrtm)


def inception_score(logits_NK: np.ndarray, splits: int = 10) -> Tuple[float, float]:
  """(mean, std) over `splits` equal parts of exp(E_x KL(p(y|x) || p(y))), p = softmax(logits).

  Part i is rows [i N // splits, (i + 1) N // splits). For the standard IS pass the
  unbiased logits (pool3 @ W: the original code and ADM's evaluator leave out fc's bias)."""
  z = np.asarray(logits_NK, np.float64)
  if z.ndim != 2 or not 1 <= splits <= z.shape[0]:
    raise ValueError(f'need (N, K) logits with N >= splits >= 1, got {z.shape} and {splits}')
  logp = z - z.max(1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(1, keepdims=True))
  n, scores = z.shape[0], []
  for i in range(splits):
    part = logp[i * n // splits:(i + 1) * n // splits]
    p = np.exp(part)
    log_py = np.log(p.mean(0))
    scores.append(np.exp(np.mean(np.sum(p * (part - log_py), 1))))
  return float(np.mean(scores)), float(np.std(scores))


def _sq_dists(a_RD: jax.Array, b_CD: jax.Array) -> jax.Array:
  """Squared Euclidean distances (R, C), float32, clamped at 0 (|a|^2 - 2ab + |b|^2)."""
  ab = jnp.dot(a_RD, b_CD.T, precision=jax.lax.Precision.HIGHEST)
  d = jnp.sum(a_RD * a_RD, 1)[:, None] - 2 * ab + jnp.sum(b_CD * b_CD, 1)[None, :]
  return jnp.maximum(d, 0.0)


@functools.partial(jax.jit, static_argnames=('k',))
def _kth_block(rows_RD, cols_bCD, valid_bC, k):
  """Per row: the (k+1)-th smallest squared distance to the (valid) columns, scanning blocks."""
  def step(best_Rk, blk):
    cols_CD, valid_C = blk
    d = jnp.where(valid_C[None], _sq_dists(rows_RD, cols_CD), jnp.inf)
    best = -jax.lax.top_k(-jnp.concatenate([best_Rk, d], 1), k + 1)[0]
    return best, None
  init = jnp.full((rows_RD.shape[0], k + 1), jnp.inf, jnp.float32)
  best, _ = jax.lax.scan(step, init, (cols_bCD, valid_bC))
  return best[:, k]


@jax.jit
def _covered_block(rows_RD, cols_bCD, radii_bC):
  """Per row: within the radius of any column (d <= r; padded columns have r = -1)."""
  def step(hit_R, blk):
    cols_CD, radii_C = blk
    return hit_R | jnp.any(_sq_dists(rows_RD, cols_CD) <= radii_C[None], 1), None
  hit, _ = jax.lax.scan(step, jnp.zeros(rows_RD.shape[0], bool), (cols_bCD, radii_bC))
  return hit


def _blocks(x_ND: np.ndarray, block: int, fill: float) -> Tuple[jax.Array, jax.Array]:
  n = x_ND.shape[0]
  nb = -(-n // block)
  pad = np.full((nb * block - n,) + x_ND.shape[1:], fill, np.float32)
  return jnp.asarray(np.concatenate([np.asarray(x_ND, np.float32), pad])).reshape(
      (nb, block) + x_ND.shape[1:]), nb


def _over_rows(x_ND: np.ndarray, block: int, fn) -> np.ndarray:
  """fn(row block) for every padded row block of x, concatenated and cut back to N rows."""
  rows, nb = _blocks(x_ND, block, 0.0)
  return np.concatenate([np.asarray(fn(rows[i])) for i in range(nb)])[:x_ND.shape[0]]


def manifold_radii(feats_ND: np.ndarray, k: int = 3, block: int = 4096) -> np.ndarray:
  """(N,) squared distance of each point to its k-th nearest other point: the (k+1)-th
  smallest distance to the set, its own 0 included (as ADM). On the device, in tiles."""
  x = np.asarray(feats_ND, np.float32)
  if x.ndim != 2 or not 1 <= k < x.shape[0]:
    raise ValueError(f'need (N, D) features with N > k >= 1, got {x.shape} and k={k}')
  block = min(block, x.shape[0])
  cols, _ = _blocks(x, block, 0.0)
  valid, _ = _blocks(np.ones(x.shape[0], np.float32), block, 0.0)
  return _over_rows(x, block, lambda r: _kth_block(r, cols, valid > 0, k))


def coverage(feats_ND: np.ndarray, manifold_MD: np.ndarray, radii_M: np.ndarray,
             block: int = 4096) -> np.ndarray:
  """(N,) bool: each point lies within the radius of some manifold point (d^2 <= r^2)."""
  x, m = np.asarray(feats_ND, np.float32), np.asarray(manifold_MD, np.float32)
  block = min(block, max(x.shape[0], m.shape[0]))
  cols, _ = _blocks(m, block, 0.0)
  radii, _ = _blocks(np.asarray(radii_M, np.float32), block, -1.0)
  return _over_rows(x, block, lambda r: _covered_block(r, cols, radii))


def precision_recall(real_feats: np.ndarray, fake_feats: np.ndarray, k: int = 3,
                     block: int = 4096) -> Dict[str, float]:
  """Improved precision and recall (Kynkaanniemi et al. 2019) as ADM's evaluator computes them.

  Each set's manifold is the union of balls around its points, the radius being the
  distance to the k-th nearest other point of the set. precision = share of fake points
  inside the real manifold; recall = share of real points inside the fake manifold.
  Squared distances in float32 on the device, in tiles, so 50,000 x 50,000 fits
  (ADM tries float16 first; that only moves points within float16 rounding of a radius)."""
  real, fake = np.asarray(real_feats, np.float32), np.asarray(fake_feats, np.float32)
  if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
    raise ValueError(f'features must be (N, D) and (M, D), got {real.shape} and {fake.shape}')
  r_real, r_fake = manifold_radii(real, k, block), manifold_radii(fake, k, block)
  return {'precision': float(np.mean(coverage(fake, real, r_real, block))),
          'recall': float(np.mean(coverage(real, fake, r_fake, block)))}
