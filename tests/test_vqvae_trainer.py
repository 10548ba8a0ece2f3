"""VQVAE training: metrics, losses (LPIPS loader, discriminator, hinge, adaptive weight),
the train/restart steps, the trainer loop (resume, export), and the configs."""
import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from conftest import FIXTURES, ROOT
from var_jax.config_loader import load_config, set_value
from var_jax.eval import metrics as M
from var_jax.train import loop, loss_networks as N, losses as Ls


# --- metrics --------------------------------------------------------------------------

def test_psnr_known_value():
  x = jnp.zeros((2, 8, 8, 3))
  y = x.at[1].add(0.1)
  p = np.asarray(M.psnr(x, y))
  assert p[0] == pytest.approx(10 * np.log10(4 / 1e-10), rel=1e-5)   # mse floored at 1e-10
  assert p[1] == pytest.approx(10 * np.log10(4 / 0.01), abs=1e-3)


def _ssim_numpy(x, y, data_range=2.0):
  """Independent SSIM: scipy Gaussian filter (sigma 1.5, radius 5) and border crop."""
  from scipy.ndimage import gaussian_filter
  c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
  out = []
  for b in range(x.shape[0]):
    vals = []
    for c in range(x.shape[-1]):
      a, d = x[b, ..., c].astype(np.float64), y[b, ..., c].astype(np.float64)
      f = lambda z: gaussian_filter(z, 1.5, truncate=3.5, mode='reflect')
      mx, my = f(a), f(d)
      sxx, syy, sxy = f(a * a) - mx * mx, f(d * d) - my * my, f(a * d) - mx * my
      s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
      vals.append(s[5:-5, 5:-5].mean())
    out.append(np.mean(vals))
  return np.asarray(out)


def test_ssim_matches_independent_implementation():
  rng = np.random.default_rng(0)
  x = rng.uniform(-1, 1, (2, 20, 24, 3)).astype(np.float32)
  y = np.clip(x + 0.3 * rng.standard_normal(x.shape), -1, 1).astype(np.float32)
  np.testing.assert_allclose(np.asarray(M.ssim(x, y)), _ssim_numpy(x, y), atol=1e-5)
  np.testing.assert_allclose(np.asarray(M.ssim(x, x)), 1.0, atol=1e-6)
  with pytest.raises(ValueError, match='window'):
    M.ssim(x[:, :8, :8], y[:, :8, :8])


def test_code_hits_usage_perplexity():
  idx = [jnp.array([[0], [0]]), jnp.array([[1, 2, 2, 3], [0, 1, 2, 3]])]
  hits = np.asarray(M.code_hits(idx, 4, mask_B=jnp.array([1, 0])))
  np.testing.assert_array_equal(hits, [[1, 0, 0, 0], [0, 1, 2, 1]])
  np.testing.assert_allclose(M.codebook_usage(hits), [25.0, 75.0])
  np.testing.assert_allclose(M.codebook_perplexity(hits)[0], 1.0)
  np.testing.assert_allclose(M.codebook_perplexity(np.ones((1, 8)))[0], 8.0)


# --- losses -------------------------------------------------------------------------

def test_recon_loss():
  x, y = jnp.zeros((1, 2, 2, 1)), jnp.full((1, 2, 2, 1), 0.5)
  assert float(Ls.recon_loss(x, y, 1.0, 0.0)) == pytest.approx(0.5)
  assert float(Ls.recon_loss(x, y, 0.0, 2.0)) == pytest.approx(0.5)
  assert float(Ls.recon_loss(x, y, 1.0, 1.0)) == pytest.approx(0.75)


def _fake_vgg_state_dict(rng, with_lin=True):
  sd, cin = {}, 3
  convs = iter(N.vgg16_conv_indices())
  for v in N.VGG16_LAYOUT:
    if v == 'M':
      continue
    i = next(convs)
    sd[f'features.{i}.weight'] = (rng.standard_normal((v, cin, 3, 3)) / np.sqrt(9 * cin)).astype(np.float32)
    sd[f'features.{i}.bias'] = (0.01 * rng.standard_normal(v)).astype(np.float32)
    cin = v
  if with_lin:
    for k, c in enumerate(N.LPIPS_CHANNELS):
      sd[f'lin{k}.model.1.weight'] = rng.uniform(0, 1, (1, c, 1, 1)).astype(np.float32)
  return sd


@pytest.mark.slow
def test_lpips_loader_layout_and_values(tmp_path, caplog):
  rng = np.random.default_rng(0)
  sd = _fake_vgg_state_dict(rng)
  path = tmp_path / 'lpips.npz'
  np.savez(path, **sd)
  params = N.load_lpips_params(str(path))
  # torch OIHW -> flax HWIO: the first conv agrees with a direct cross-correlation
  x = rng.uniform(-1, 1, (1, 5, 5, 3)).astype(np.float32)
  conv = nn.Conv(64, (3, 3), padding=((1, 1), (1, 1)))
  got = conv.apply({'params': params['net']['features_0']}, x)
  w, b = sd['features.0.weight'], sd['features.0.bias']
  xp = np.pad(x[0], ((1, 1), (1, 1), (0, 0)))
  want = np.stack([np.stack([np.einsum('ijc,ocij->o', xp[r:r + 3, s:s + 3], w) for s in range(5)])
                   for r in range(5)]) + b
  np.testing.assert_allclose(np.asarray(got[0]), want, atol=1e-4)
  np.testing.assert_allclose(params['lin2'], sd['lin2.model.1.weight'].reshape(-1))
  lp = N.LPIPS()
  a = jnp.asarray(rng.uniform(-1, 1, (2, 16, 16, 3)), jnp.float32)
  d_same = np.asarray(lp.apply({'params': params}, a, a))
  d_diff = np.asarray(lp.apply({'params': params}, a, a[::-1]))
  np.testing.assert_allclose(d_same, 0.0, atol=1e-6)
  assert np.all(d_diff > 1e-3)
  # equal channel weights when the lin heads are absent, with a warning
  no_lin = tmp_path / 'vgg.npz'
  np.savez(no_lin, **_fake_vgg_state_dict(rng, with_lin=False))
  with caplog.at_level(logging.WARNING, logger='var_jax.train'):
    p2 = N.load_lpips_params(str(no_lin))
  assert 'linear heads' in caplog.text
  np.testing.assert_array_equal(p2['lin4'], np.ones(512, np.float32))


def test_lpips_off_when_absent_and_error_when_wrong(tmp_path, caplog):
  with caplog.at_level(logging.WARNING, logger='var_jax.train'):
    assert N.load_lpips_params('') is None
    assert N.load_lpips_params(str(tmp_path / 'missing.pth')) is None
  assert 'perceptual loss OFF' in caplog.text
  bad = tmp_path / 'bad.npz'
  np.savez(bad, **{'features.0.weight': np.zeros((64, 3, 3, 3), np.float32)})
  with pytest.raises(ValueError, match='VGG16'):
    N.load_lpips_params(str(bad))


@pytest.mark.slow
def test_patch_discriminator_and_hinge():
  d = N.PatchDiscriminator(ndf=16, n_layers=2)
  x = jnp.zeros((2, 32, 32, 3))
  params = nn.meta.unbox(d.init(jax.random.PRNGKey(0), x)['params'])
  logits = d.apply({'params': params}, x)
  assert logits.shape == (2, 6, 6) and logits.dtype == jnp.float32   # 32 -> 16 -> 8 -> 7 -> 6
  real, fake = jnp.array([2.0, 0.0]), jnp.array([-2.0, 0.5])
  assert float(Ls.hinge_d_loss(real, fake)) == pytest.approx(0.5 * (0.5 + 0.75))
  assert float(Ls.hinge_g_loss(fake)) == pytest.approx(0.75)


def test_adaptive_weight():
  a, b = jnp.full((3, 4), 2.0), jnp.full((3, 4), 0.5)
  want = np.sqrt(12 * 4.0) / (np.sqrt(12 * 0.25) + 1e-4)   # ||a|| / (||b|| + 1e-4)
  assert float(Ls.adaptive_weight(a, b)) == pytest.approx(want, rel=1e-5)
  assert float(Ls.adaptive_weight(a, jnp.zeros((3, 4)), max_weight=10.0)) == 10.0
  g = jax.grad(lambda s: Ls.adaptive_weight(s * a, b))(1.0)
  assert float(g) == 0.0   # no gradient through the weight


# --- trainer -----------------------------------------------------------------------

def _tiny_config(**kw):
  cfg = load_config(str(ROOT / 'configs' / 'vqvae_small.py'))
  over = {'model.vocab_size': 16, 'model.z_channels': 4, 'model.ch': 32, 'model.ch_mult': (1, 2),
          'model.num_res_blocks': 1, 'model.using_sa': False, 'model.using_mid_sa': False,
          'model.patch_nums': (1, 2, 4), 'init.codebook': -1.0,
          'data.synthetic_examples': 32, 'data.mid_reso': 1.0, 'batch_size': 8, 'total_steps': 4,
          'loss.disc': 0.5, 'loss.disc_start': 0, 'loss.disc_ndf': 16, 'loss.disc_layers': 1,
          'ema': 0.5, 'codebook.restart_every': 0, 'run.log_every': 1, 'run.save_every': 2,
          'run.eval_every': 4, 'run.eval_batches': 1, 'run.async_checkpoint': False}
  over.update(kw)
  for k, v in over.items():
    set_value(cfg, k, v, ignore_type=True)
  return cfg


@pytest.fixture(scope='module')
def trainer():
  return loop.make_task(_tiny_config(), devices=jax.devices()[:8])


@pytest.mark.slow
def test_trainer_resume_is_exact_and_exports(trainer, tmp_path):
  import var_jax
  # 4 steps straight (discriminator from the start: one compiled step; EMA on) vs. 2 + resume 2
  state, s1 = loop.run(trainer, str(tmp_path / 'straight'))
  p_straight = jax.device_get(state)
  assert s1['status'] == 'done' and s1['step'] == 4 and s1['skipped_updates'] == 0
  assert np.isfinite(s1['loss']) and 'd_loss' in s1 and 'g_loss' in s1 and s1['d_weight'] >= 0
  assert 0 < s1['eval_psnr'] < 100 and 'eval_ssim' not in s1     # 8 px: smaller than the SSIM window
  assert {'eval_usage_1', 'eval_usage_4', 'usage_4'} <= set(s1)
  assert loop.run(trainer, str(tmp_path / 'resumed'), stop_after=2)[1]['step'] == 2
  state, s2 = loop.run(trainer, str(tmp_path / 'resumed'))
  assert s2['step'] == 4
  p_resumed = jax.device_get(state)
  for a, b in zip(jax.tree_util.tree_leaves(p_straight), jax.tree_util.tree_leaves(p_resumed)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
  # the export is a native checkpoint of the EMA weights, with the hit statistics
  pipe = var_jax.load(s1['export'])
  assert pipe.config.var is None and pipe.config.vae.vocab_size == 16
  ema_cb = p_straight.ema['quantize']['embedding']['embedding']
  np.testing.assert_array_equal(np.asarray(pipe.vae_params['quantize']['embedding']['embedding']), ema_cb)
  assert pipe.buffers['vae']['quantize.ema_vocab_hit_SV'].shape == (3, 16)
  # straight-through: the encoder learned from the reconstruction loss
  first = trainer.init_state()
  moved = jax.tree_util.tree_map(lambda a, b: float(jnp.max(jnp.abs(a - b))),
                                 first.gen.params['encoder'], p_straight.gen.params['encoder'])
  assert max(jax.tree_util.tree_leaves(moved)) > 0


@pytest.mark.slow
def test_restart_dead_codes(trainer):
  state = trainer.init_state()
  state = state.replace(hits_SV=state.hits_SV.at[:, 3].set(5.0))   # only code 3 alive
  images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (8, 8, 8, 3)), jnp.uint8)
  before = np.asarray(state.gen.params['quantize']['embedding']['embedding'])
  f = np.asarray(trainer.vae.apply({'params': state.gen.params}, images.astype(jnp.float32) / 127.5 - 1,
                                   method='encode_f')).reshape(-1, 4)
  with jax.set_mesh(trainer.ctx.mesh):
    new, n = trainer._restart(state, images, jax.random.PRNGKey(1))   # donates `state`
  assert int(n) == 15
  after = np.asarray(new.gen.params['quantize']['embedding']['embedding'])
  dead = np.arange(16) != 3
  np.testing.assert_array_equal(after[3], before[3])
  # restarted codes sit next to encoder latents (noise 0.01 x their std)
  dist = np.min(np.linalg.norm(after[:, None] - f[None], axis=-1), axis=1)
  assert np.all(dist[dead] < 0.1 * f.std()) and np.all(np.abs(after[dead] - before[dead]).max(1) > 0)
  # their Adam moments are zeroed, the EMA follows, their hit EMA is lifted to the threshold
  is_adam = lambda x: hasattr(x, 'mu')
  adam = next(x for x in jax.tree_util.tree_leaves(new.gen.opt_state, is_leaf=is_adam) if is_adam(x))
  mu = adam.mu['quantize']['embedding']['embedding']
  assert float(jnp.abs(mu[dead]).max()) == 0.0
  np.testing.assert_array_equal(np.asarray(new.ema['quantize']['embedding']['embedding']), after)
  assert float(np.min(np.asarray(new.hits_SV)[:, dead])) >= trainer.ctx.config.codebook.restart_threshold


def test_lpips_missing_file_turns_it_off(capsys, tmp_path):
  cfg = _tiny_config(**{'loss.lpips': 1.0, 'loss.lpips_weights': str(tmp_path / 'vgg.pth'),
                        'loss.disc': 0.0})
  t = loop.make_task(cfg, devices=jax.devices()[:1])
  assert not t.use_lpips
  assert 'perceptual loss OFF' in capsys.readouterr().out


# --- configs --------------------------------------------------------------------------

def test_release_config_is_the_released_structure():
  from var_jax.config import VQVAEConfig
  from var_jax.tokenizer.vqvae import VQVAE
  cfg = load_config(str(ROOT / 'configs' / 'vqvae_f16_release.py'))
  vc = VQVAEConfig.from_section(cfg.model)
  assert vc == VQVAEConfig() and vc.downsample == 16 and vc.image_size == 256
  shapes = jax.eval_shape(VQVAE(vc).init, jax.random.PRNGKey(0), jnp.zeros((1, 256, 256, 3)))
  n = sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(nn.meta.unbox(shapes)))
  release = json.loads((FIXTURES / 'release_shapes.json').read_text())
  assert n == release['models']['vae_ch160v4096z32.pth']['num_parameters']


@pytest.mark.parametrize('name', ['vqvae_small', 'vqvae_f16_release', 'digits_vqvae'])
def test_configs_load_and_override(name):
  cfg = load_config(str(ROOT / 'configs' / f'{name}.py'), ['--config.total_steps=7'])
  assert cfg.total_steps == 7
  with pytest.raises(ValueError, match='unknown config key'):
    load_config(str(ROOT / 'configs' / f'{name}.py'), ['--config.loss.lpip=1'])
