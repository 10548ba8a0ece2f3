"""FID, Inception Score and precision/recall against direct numpy/scipy computations."""
import numpy as np
import pytest
from scipy import linalg

from var_jax.eval import metrics


def _features(n, d, seed, shift=0.0, scale=1.0):
  rng = np.random.default_rng(seed)
  mix = rng.standard_normal((d, d)) / np.sqrt(d)  # correlated dimensions
  return ((rng.standard_normal((n, d)) @ mix) * scale + shift).astype(np.float32)


def _direct_fid(a, b):
  """The textbook formula with numpy's mean/cov and scipy's sqrtm, in float64."""
  a, b = a.astype(np.float64), b.astype(np.float64)
  m1, m2 = a.mean(0), b.mean(0)
  s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
  covmean = linalg.sqrtm(s1 @ s2)
  return float(np.sum((m1 - m2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean.real))


def test_feature_statistics_are_numpys_mean_and_cov():
  x = _features(1000, 24, 0, shift=3.0)
  mu, sigma = metrics.feature_statistics(x, block=128)  # several row blocks
  np.testing.assert_allclose(mu, x.astype(np.float64).mean(0), rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(sigma, np.cov(x.astype(np.float64), rowvar=False), rtol=1e-10, atol=1e-12)
  assert mu.dtype == sigma.dtype == np.float64


# full-rank, and singular (N < D) covariances, where sqrt of ~0 eigenvalues amplifies the
# round-off of the covariance (blocked sums vs np.cov) to ~1e-8 relative
@pytest.mark.parametrize('n,rel', [(500, 1e-10), (20, 1e-7)])
def test_fid_matches_direct_computation(n, rel):
  a, b = _features(n, 32, 1), _features(n + 7, 32, 2, shift=0.3, scale=1.2)
  want = _direct_fid(a, b)
  assert want > 1
  assert metrics.fid_from_features(a, b) == pytest.approx(want, rel=rel)
  assert metrics.fid_from_features(a, b, sqrtm='eigh') == pytest.approx(want, rel=1e-6)


def test_fid_of_a_set_with_itself_is_zero_and_symmetric():
  a, b = _features(400, 16, 3), _features(300, 16, 4, shift=1.0)
  assert abs(metrics.fid_from_features(a, a)) < 1e-8
  assert metrics.fid_from_features(a, b) == pytest.approx(metrics.fid_from_features(b, a), rel=1e-8)
  # a pure mean shift of s in every one of D dimensions costs D s^2
  assert metrics.fid_from_features(a, a + 0.5) == pytest.approx(16 * 0.25, rel=1e-9)


def test_fid_rejects_large_imaginary_parts_and_mismatched_statistics():
  d = 4
  with pytest.raises(ValueError, match='imaginary component'):  # not covariances: S1 S2 = -I
    metrics.frechet_distance(np.zeros(d), np.eye(d), np.zeros(d), -np.eye(d))
  with pytest.raises(ValueError, match='do not match'):
    metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_fid_retries_a_non_finite_sqrtm_with_eps_on_the_diagonal(monkeypatch):
  calls = []
  real_sqrtm = linalg.sqrtm

  def flaky(m):
    calls.append(m.copy())
    return np.full_like(m, np.nan) if len(calls) == 1 else real_sqrtm(m)

  monkeypatch.setattr(linalg, 'sqrtm', flaky)
  s1, s2 = np.diag([1.0, 2.0, 0.0]), np.diag([3.0, 0.0, 1.0])
  got = metrics.frechet_distance(np.zeros(3), s1, np.ones(3), s2, eps=1e-6)
  off = 1e-6 * np.eye(3)
  np.testing.assert_allclose(calls[1], (s1 + off) @ (s2 + off))
  want = 3 + np.trace(s1) + np.trace(s2) - 2 * np.trace(real_sqrtm((s1 + off) @ (s2 + off)))
  assert got == pytest.approx(want, rel=1e-12)


def _direct_is(logits, splits):
  """improved-gan's formula on the softmax, parts [i N/splits, (i+1) N/splits)."""
  p = np.exp(logits - logits.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  scores = []
  for i in range(splits):
    part = p[i * len(p) // splits:(i + 1) * len(p) // splits]
    kl = part * (np.log(part) - np.log(part.mean(0, keepdims=True)))
    scores.append(np.exp(kl.sum(1).mean()))
  return np.mean(scores), np.std(scores)


def test_inception_score_matches_direct_computation():
  rng = np.random.default_rng(5)
  logits = rng.standard_normal((1003, 50)) * 3  # 1003: parts of unequal size
  mean, std = metrics.inception_score(logits, splits=10)
  want = _direct_is(logits, 10)
  assert mean == pytest.approx(want[0], rel=1e-12) and std == pytest.approx(want[1], rel=1e-9)
  assert 1 < mean < 50 and std > 0


def test_inception_score_bounds():
  k = 20
  confident = np.eye(k)[np.arange(200) % k] * 60.0  # one sure class per image, all classes
  assert metrics.inception_score(confident, splits=2)[0] == pytest.approx(k, rel=1e-6)
  assert metrics.inception_score(np.zeros((100, k)), splits=5) == pytest.approx((1.0, 0.0))
  with pytest.raises(ValueError):
    metrics.inception_score(np.zeros((5, k)), splits=10)


def _direct_pr(real, fake, k):
  """ADM's definition, brute force in float64: radius = k-th smallest squared distance to
  the own set (self included at 0); a point is covered when d^2 <= some radius."""
  def d2(x, y):
    x, y = x.astype(np.float64), y.astype(np.float64)
    return ((x[:, None] - y[None]) ** 2).sum(-1)
  r_real = np.sort(d2(real, real), 1)[:, k]
  r_fake = np.sort(d2(fake, fake), 1)[:, k]
  return (np.mean((d2(fake, real) <= r_real[None]).any(1)),
          np.mean((d2(real, fake) <= r_fake[None]).any(1)), r_real)


@pytest.mark.parametrize('block', [64, 1000])  # tiles that do not divide N, and one tile
def test_precision_recall_matches_brute_force(block):
  real = _features(300, 20, 6)
  fake = _features(260, 20, 7, shift=0.4, scale=1.3)
  prec, rec, r_real = _direct_pr(real, fake, 3)
  assert 0.05 < prec < 0.95 and 0.05 < rec < 0.95  # a discriminating case
  got = metrics.precision_recall(real, fake, k=3, block=block)
  assert got == {'precision': prec, 'recall': rec}
  np.testing.assert_allclose(metrics.manifold_radii(real, 3, block=block), r_real, rtol=1e-4)


def test_precision_recall_of_identical_sets_is_one_and_k_matters():
  x = _features(200, 8, 8)
  assert metrics.precision_recall(x, x.copy(), k=3) == {'precision': 1.0, 'recall': 1.0}
  far = x + 100.0
  assert metrics.precision_recall(x, far, k=3) == {'precision': 0.0, 'recall': 0.0}
  fake = _features(200, 8, 9, shift=0.5)
  p1, p5 = (metrics.precision_recall(x, fake, k=k)['precision'] for k in (1, 5))
  assert p1 < p5  # larger neighbourhoods, larger manifold


def test_digits_fid_tells_real_digits_from_noise():
  from var_jax.data import digits
  from var_jax.eval import digits_fid
  train, _ = digits.digits_arrays('train')
  real = digits_fid.digits_fid(train[np.random.default_rng(1).permutation(len(train))[:300]])
  noise = np.random.default_rng(0).integers(0, 256, (300, 32, 32, 3), dtype=np.uint8)
  bad = digits_fid.digits_fid(noise)
  assert real['feature_net_test_accuracy'] > 0.9 and real['n_ref'] == 297
  assert real['fid'] < 5 < 50 < bad['fid'], (real, bad)
  assert real['precision'] > 0.8 and bad['precision'] < 0.1
  assert real['fid_train_vs_test'] == pytest.approx(bad['fid_train_vs_test'])  # 300 real each
