"""`var-jax eval` end to end on the embedded digits model's samples, its cache and errors.

The Inception weights are random (var_jax.eval.weights_recipe) so nothing is downloaded;
the metrics are checked against the same features computed directly with
var_jax.eval.inception and the formulas of tests/test_eval_metrics.py.
"""
import json
import pathlib

import numpy as np
import pytest

from var_jax import cli
from var_jax.convert.torch_io import save_pth
from var_jax.eval import evaluate as ev
from var_jax.eval import inception, metrics, weights_recipe
from var_jax.eval.npz import NpzImages

DATA = pathlib.Path(__file__).resolve().parent / 'data'


@pytest.fixture(scope='module')
def files(tmp_path_factory):
  """samples.npz (8 digits from the embedded model, ADM format), ref.npz (12 held-out
  digits: one full batch of 8 and one padded), and a random-weight Inception file."""
  import var_jax.demo
  from var_jax.data import digits
  d = tmp_path_factory.mktemp('eval')
  shapes = json.loads((DATA / 'inception_keys.json').read_text())
  save_pth(weights_recipe.random_state_dict(shapes, seed=0), d / 'inception.pth')
  images, _ = var_jax.demo.sample_digits(labels=np.arange(8))
  np.savez(d / 'samples.npz', arr_0=images)
  real, _ = digits.digits_arrays('test')
  np.savez(d / 'ref.npz', arr_0=real[:12])
  return d


def _low_rank_fid(a, b):
  """FID of few points, independently of sqrtm: with centred features A, B the covariances
  are A'A/(n-1), B'B/(m-1), and Tr sqrt(S1 S2) = ||A B'||_* / sqrt((n-1)(m-1)) (the nonzero
  eigenvalues of S1 S2 are the squared singular values of A B' over (n-1)(m-1))."""
  a, b = a.astype(np.float64), b.astype(np.float64)
  ca, cb = a - a.mean(0), b - b.mean(0)
  n, m = len(a) - 1, len(b) - 1
  nuclear = np.linalg.svd(ca @ cb.T, compute_uv=False).sum()
  return (np.sum((a.mean(0) - b.mean(0)) ** 2) + np.sum(ca ** 2) / n + np.sum(cb ** 2) / m
          - 2 * nuclear / np.sqrt(n * m))


def _eval(d, out, *extra):
  return cli.main(['eval', '--samples', str(d / 'samples.npz'), '--ref', str(d / 'ref.npz'),
                   '--inception', str(d / 'inception.pth'), '--batch-size', '8',
                   '--out', str(out), '--no-progress', '--sqrtm', 'eigh', *extra])


@pytest.mark.slow  # ~60-80 s here: 2048-dimensional eigendecompositions on 2 shared cores
def test_eval_end_to_end_matches_direct_computation(files, capsys):
  out = files / 'run1' / 'metrics.json'
  assert _eval(files, out) == 0
  printed = capsys.readouterr().out
  assert 'fid:' in printed and 'cached the reference statistics' in printed
  m = json.loads(out.read_text())
  assert set(m) >= {'fid', 'sfid', 'is', 'is_std', 'precision', 'recall', 'n_samples', 'n_ref'}
  assert (m['n_samples'], m['n_ref']) == (8, 12)

  net = inception.load(files / 'inception.pth')
  with np.load(files / 'samples.npz') as z:
    fake = net(z['arr_0'])
  with np.load(files / 'ref.npz') as z:
    real = net(z['arr_0'])
  flat = lambda f: f['spatial'].reshape(len(f['spatial']), -1)
  assert m['fid'] == pytest.approx(_low_rank_fid(fake['pool3'], real['pool3']), rel=1e-5)
  assert m['sfid'] == pytest.approx(_low_rank_fid(flat(fake), flat(real)), rel=1e-5)
  assert m['fid'] > 0.01 and m['sfid'] > 0.01  # digits samples are not the held-out digits
  p = np.exp(fake['logits_unbiased'] - fake['logits_unbiased'].max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  parts = [p[i * 8 // 8:(i + 1) * 8 // 8] for i in range(8)]
  scores = [np.exp(np.sum(q * (np.log(q) - np.log(q.mean(0))), 1).mean()) for q in parts]
  assert m['is'] == pytest.approx(np.mean(scores), rel=1e-5)
  assert m['precision'] == metrics.precision_recall(real['pool3'], fake['pool3'])['precision']
  assert m['recall'] == metrics.precision_recall(real['pool3'], fake['pool3'])['recall']

  # a second run reads the reference statistics from the cache beside its --out
  assert _eval(files, files / 'run1' / 'again.json') == 0
  assert 'reference statistics from the cache' in capsys.readouterr().out
  again = json.loads((files / 'run1' / 'again.json').read_text())
  assert again == pytest.approx(m)


@pytest.fixture
def light(tmp_path):
  """Small valid inputs for the error paths (the weights file is never read there)."""
  np.savez(tmp_path / 'samples.npz', arr_0=np.zeros((5, 8, 8, 3), np.uint8))
  np.savez(tmp_path / 'ref.npz', arr_0=np.zeros((5, 8, 8, 3), np.uint8))
  (tmp_path / 'inception.pth').write_bytes(b'')
  return tmp_path


def test_existing_out_is_refused_unless_forced(light, capsys):
  files = light
  out = files / 'mine.json'
  out.write_text('my notes')
  assert _eval(files, out) == 1
  err = capsys.readouterr().err
  assert err.startswith('var-jax eval: error:') and 'refusing to overwrite' in err
  assert err.count('\n') == 1 and out.read_text() == 'my notes'


def _one_line_error(capsys, code, rc, pattern):
  err = capsys.readouterr().err
  assert rc == code, err
  assert err.startswith('var-jax eval: error:') and err.count('\n') == 1, err
  assert pattern in err, err


@pytest.mark.parametrize('arrays,pattern', [
    ({'x': np.zeros((2, 8, 8, 3), np.uint8)}, 'has no arr_0'),
    ({'arr_0': np.zeros((2, 8, 8, 3), np.float32)}, 'must be uint8'),
    ({'arr_0': np.zeros((2, 8, 8), np.uint8)}, 'must be non-empty (N, H, W, 3)'),
    ({'arr_0': np.zeros((0, 8, 8, 3), np.uint8)}, 'must be non-empty (N, H, W, 3)'),
])
def test_bad_sample_files_are_one_line_errors(light, tmp_path, capsys, arrays, pattern):
  files = light
  bad = tmp_path / 'bad.npz'
  np.savez(bad, **arrays)
  rc = cli.main(['eval', '--samples', str(bad), '--ref', str(files / 'ref.npz'),
                 '--inception', str(files / 'inception.pth'), '--out', str(tmp_path / 'm.json')])
  _one_line_error(capsys, 1, rc, pattern)
  assert not (tmp_path / 'm.json').exists()


def test_missing_inputs_are_one_line_errors(light, tmp_path, capsys, monkeypatch):
  files = light
  base = ['eval', '--ref', str(files / 'ref.npz'), '--inception', str(files / 'inception.pth')]
  _one_line_error(capsys, 1, cli.main(base + ['--samples', str(tmp_path / 'none.npz')]),
                  'file not found')
  (tmp_path / 'text.npz').write_text('not a zip')
  _one_line_error(capsys, 1, cli.main(base + ['--samples', str(tmp_path / 'text.npz')]),
                  'is not an .npz file')
  rc = cli.main(['eval', '--samples', str(files / 'samples.npz'), '--ref', str(files / 'ref.npz'),
                 '--inception', str(tmp_path / 'pt_inception.pth')])
  _one_line_error(capsys, 1, rc, 'https://github.com/mseitzer/pytorch-fid/releases/download/')
  rc = cli.main(['eval', '--samples', str(files / 'samples.npz'), '--ref', str(files / 'ref.npz'),
                 '--inception', str(files / 'inception.pth'), '--batch-size', '0'])
  _one_line_error(capsys, 2, rc, '--batch-size must be >= 1')
  monkeypatch.setattr(inception, 'load', lambda path, dtype=None: _FakeNet())
  rc = cli.main(['eval', '--samples', str(files / 'samples.npz'), '--ref', str(files / 'ref.npz'),
                 '--inception', str(files / 'inception.pth'), '--ref-stats', 'stored'])
  _one_line_error(capsys, 1, rc, 'holds no precomputed mu/sigma/mu_s/sigma_s')


def test_truncated_npz_is_refused_before_any_work(tmp_path):
  path = tmp_path / 'cut.npz'
  np.savez(path, arr_0=np.zeros((10, 8, 8, 3), np.uint8))
  import zipfile
  with zipfile.ZipFile(path) as z:
    raw = z.read('arr_0.npy')
  with zipfile.ZipFile(path, 'w') as z:
    z.writestr('arr_0.npy', raw[:-8 * 8 * 3 * 3])  # header says 10 images, 7 are there
  with pytest.raises(ValueError, match='truncated: it holds 7 of 10 images'):
    NpzImages(path)


def test_demo_samples_npz_is_read_in_batches(tmp_path):
  x = np.arange(5 * 4 * 4 * 3, dtype=np.uint8).reshape(5, 4, 4, 3)
  np.savez_compressed(tmp_path / 's.npz', images=x, labels=np.arange(5))  # `var-jax demo` keys
  with NpzImages(tmp_path / 's.npz') as imgs:
    assert imgs.key == 'images' and len(imgs) == 5
    parts = list(imgs.batches(2))
  assert [len(p) for p in parts] == [2, 2, 1]
  np.testing.assert_array_equal(np.concatenate(parts), x)


class _FakeNet:
  """Stands in for the Inception: features are fixed functions of the pixels."""
  dtype = np.float32
  fingerprint = 'fake-weights'

  def __init__(self):
    self.images_seen = 0

  def dispatch(self, x):
    self.images_seen += len(x)
    px = x.reshape(len(x), -1).astype(np.float32) / 255.0
    f, sp = px[:, :8], px[:, 8:15].reshape(len(x), 1, 1, 7)
    return {'pool3': f, 'spatial': sp, 'logits_unbiased': 5 * f}, len(x)


def test_reference_cache_is_reused_refreshed_and_never_clobbers_user_files(tmp_path):
  rng = np.random.default_rng(0)
  ref = tmp_path / 'ref.npz'
  np.savez(ref, arr_0=rng.integers(0, 256, (9, 4, 4, 3), dtype=np.uint8))  # noqa
  cache = ev.cache_path(tmp_path, ref)
  assert cache.name == 'ref.var_jax_ref_stats.npz'
  logs, net = [], _FakeNet()
  first = ev.reference_features(net, ref, cache_dir=tmp_path, batch_size=4, progress=False,
                                log=logs.append)
  assert cache.exists() and net.images_seen == 12  # 9 images in batches of 4 (last padded)
  np.testing.assert_allclose(first['mu'], first['pool3'].astype(np.float64).mean(0), rtol=1e-12)
  again = ev.reference_features(net, ref, cache_dir=tmp_path, batch_size=4, progress=False,
                                log=logs.append)
  assert net.images_seen == 12 and 'from the cache' in logs[-1]
  np.testing.assert_array_equal(again['sigma'], first['sigma'])
  # other weights: our own cache is stale and is recomputed and rewritten
  net.fingerprint = 'other-weights'
  ev.reference_features(net, ref, cache_dir=tmp_path, batch_size=4, progress=False, log=logs.append)
  assert net.images_seen == 24 and 'cached' in logs[-1]
  # a user's file of that name is neither read nor replaced
  np.savez(cache, mu=np.zeros(3))
  before = cache.read_bytes()
  ev.reference_features(net, ref, cache_dir=tmp_path, batch_size=4, progress=False, log=logs.append)
  assert net.images_seen == 36 and cache.read_bytes() == before
  assert 'not written by var-jax' in logs[-1]


def _write(path, n, seed, **extra):
  rng = np.random.default_rng(seed)
  np.savez(path, arr_0=rng.integers(0, 256, (n, 4, 4, 3), dtype=np.uint8), **extra)
  return path


def test_stored_statistics_are_compared_with_recomputed_ones(tmp_path):
  """A reference batch with precomputed mu/sigma (ADM's, from TensorFlow): by default the
  statistics are recomputed and both FIDs are reported; ref_stats='stored' scores against
  the stored ones; stored statistics of other dimensions are refused or left out."""
  samples = _write(tmp_path / 's.npz', 30, 1)
  plain_ref = _write(tmp_path / 'r0.npz', 27, 2)
  with np.load(plain_ref) as z:
    ref_imgs = z['arr_0']
  stored = {'mu': np.full(8, 2.0), 'sigma': np.eye(8), 'mu_s': np.zeros(7),
            'sigma_s': np.eye(7) * 0.5}
  np.savez(tmp_path / 'r.npz', arr_0=ref_imgs, **stored)
  kw = dict(batch_size=4, progress=False, sqrtm='scipy', log=lambda s: None)
  plain = ev.evaluate(_FakeNet(), samples, plain_ref, **kw)
  assert 'stored_vs_recomputed' not in plain
  m = ev.evaluate(_FakeNet(), samples, tmp_path / 'r.npz', **kw)
  cmp = m['stored_vs_recomputed']
  assert m['fid'] == pytest.approx(plain['fid']) == pytest.approx(cmp['fid_with_recomputed'])
  fake = _FakeNet().dispatch(np.load(samples)['arr_0'])[0]
  assert cmp['fid_with_stored'] == pytest.approx(metrics.frechet_distance(
      *metrics.feature_statistics(fake['pool3']), stored['mu'], stored['sigma']), rel=1e-9)
  real = _FakeNet().dispatch(ref_imgs)[0]
  assert cmp['fid_stored_to_recomputed'] == pytest.approx(metrics.frechet_distance(
      stored['mu'], stored['sigma'], *metrics.feature_statistics(real['pool3'])), rel=1e-9)
  s = ev.evaluate(_FakeNet(), samples, tmp_path / 'r.npz', ref_stats='stored', **kw)
  assert s['fid'] == pytest.approx(cmp['fid_with_stored']) and s['ref_stats'] == 'stored'
  assert s['sfid'] == pytest.approx(cmp['sfid_with_stored'])
  # statistics of another network (2048-d) do not fit these 8-d features
  np.savez(tmp_path / 'r2.npz', arr_0=ref_imgs, mu=np.zeros(2048), sigma=np.eye(2048),
           mu_s=np.zeros(3), sigma_s=np.eye(3))
  assert 'stored_vs_recomputed' not in ev.evaluate(_FakeNet(), samples, tmp_path / 'r2.npz', **kw)
  with pytest.raises(ValueError, match='do not fit these 8-dimensional features'):
    ev.evaluate(_FakeNet(), samples, tmp_path / 'r2.npz', ref_stats='stored', **kw)


def test_cli_prints_and_writes_metrics(tmp_path, monkeypatch, capsys):
  """The command's plumbing with a stand-in network (the real one: the slow test above)."""
  monkeypatch.setattr(inception, 'load', lambda path, dtype=None: _FakeNet())
  samples, ref = _write(tmp_path / 's.npz', 21, 3), _write(tmp_path / 'r.npz', 23, 4)
  (tmp_path / 'w.pth').write_bytes(b'')
  out = tmp_path / 'new' / 'dir' / 'm.json'
  argv = ['eval', '--samples', str(samples), '--ref', str(ref), '--inception',
          str(tmp_path / 'w.pth'), '--batch-size', '4', '--out', str(out), '--no-progress']
  assert cli.main(argv) == 0
  printed = capsys.readouterr().out
  m = json.loads(out.read_text())
  assert set(m) == {'fid', 'sfid', 'is', 'is_std', 'precision', 'recall', 'n_samples', 'n_ref',
                    'ref_stats'}
  assert (m['n_samples'], m['n_ref'], m['ref_stats']) == (21, 23, 'recompute')
  fake = _FakeNet().dispatch(np.load(samples)['arr_0'])[0]
  real = _FakeNet().dispatch(np.load(ref)['arr_0'])[0]
  assert m['fid'] == pytest.approx(metrics.fid_from_features(fake['pool3'], real['pool3']))
  assert m['is'] == pytest.approx(metrics.inception_score(fake['logits_unbiased'], 10)[0])
  assert {k: m[k] for k in ('precision', 'recall')} == metrics.precision_recall(
      real['pool3'], fake['pool3'])
  assert f"fid: {m['fid']:.4f}" in printed and 'metrics -> ' in printed
  assert (out.parent / 'r.var_jax_ref_stats.npz').exists()  # the cache beside --out
  assert cli.main(argv) == 1  # the metrics file is not overwritten without --force
  assert cli.main(argv + ['--force', '--no-cache']) == 0


def test_out_never_replaces_an_input_even_with_force(tmp_path, monkeypatch, capsys):
  """`--out` naming the samples (or reference, or weights) is refused before any work,
  --force or not: the metrics JSON would replace the images it scored."""
  monkeypatch.setattr(inception, 'load', lambda path, dtype=None: _FakeNet())
  samples, ref = _write(tmp_path / 's.npz', 21, 3), _write(tmp_path / 'r.npz', 23, 4)
  (tmp_path / 'w.pth').write_bytes(b'weights')
  before = samples.read_bytes()
  for out, flag in ((samples, '--samples'), (ref, '--ref'), (tmp_path / 'w.pth', '--inception')):
    rc = cli.main(['eval', '--samples', str(samples), '--ref', str(ref), '--inception',
                   str(tmp_path / 'w.pth'), '--batch-size', '4', '--out', str(out), '--force',
                   '--no-progress', '--no-cache'])
    _one_line_error(capsys, 2, rc, f'is the {flag} file this command reads')
  assert samples.read_bytes() == before and (tmp_path / 'w.pth').read_bytes() == b'weights'
