"""Trainer tests on CPU with 8 fake devices and the tiny config (configs/var_tiny.py)."""
import math
import os
import pathlib
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from var_jax.train import checkpoint_manager, optim
from var_jax.config_loader import load_config
from var_jax.train.var_trainer import VARTrainer

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = str(ROOT / 'configs' / 'var_tiny.py')

# Smaller than var_tiny (3 scales, a 2x-downsampling tokenizer, 6 px) so that tests compile fast.
FAST = ['--config.vae.patch_nums=(1, 2, 3)', '--config.vae.ch_mult=(1, 1)', '--config.vae.using_sa=false',
        '--config.vae.using_mid_sa=false', '--config.batch_size=8', '--config.data.synthetic_examples=32',
        '--config.data.num_threads=1', '--config.run.eval_every=0', '--config.run.log_every=1000',
        '--config.run.export=false', '--config.run.async_checkpoint=false']


def tiny_config(*extra):
  return load_config(TINY, FAST + list(extra))


def tree_max_diff(a, b):
  a, b = jax.device_get((a, b))
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in
             zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def tree_equal(a, b):
  return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in
             zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


# --- config and schedules ---------------------------------------------------------------------
def test_config_overrides_are_typed_and_locked():
  c = load_config(TINY, ['--config.batch_size=32', '--config.optim.tblr=3e-4',
                         '--config.data.hflip=true', '--config.mesh.fsdp=2'])
  assert (c.batch_size, c.optim.tblr, c.data.hflip, c.mesh.fsdp) == (32, 3e-4, True, 2)
  with pytest.raises(ValueError, match='did you mean'):
    load_config(TINY, ['--config.optim.tblrr=1'])
  with pytest.raises(ValueError, match='expects int'):
    load_config(TINY, ['--config.batch_size=big'])


@pytest.mark.parametrize('name', ['var_d16', 'var_d20', 'var_d24', 'var_d30', 'var_d36_512'])
def test_release_configs_load(name):
  c = load_config(str(ROOT / 'configs' / f'{name}.py'))
  assert c.model.embed_dim == 64 * c.model.depth and c.optim.b2 == 0.95 and c.optim.tclip == 2.0
  assert math.isclose(c.model.drop_path_rate, 0.1 * c.model.depth / 24)


def _reference_lr_wd(sche, peak, wd, wd_end, it, wp_it, max_it, wp0, wpe):
  """The reference's lr_wd_annealing arithmetic (utils/lr_control.py), written out as the oracle."""
  wp_it = round(wp_it)
  if it < wp_it:
    lr = wp0 + (1 - wp0) * it / wp_it
  else:
    pasd = (it - wp_it) / (max_it - 1 - wp_it)
    rest = 1 - pasd
    if sche == 'lin0':
      lr = 1 if pasd < 0.05 else wpe + (1 - wpe) * rest / 0.95
    elif sche == 'cos':
      lr = wpe + (1 - wpe) * (0.5 + 0.5 * math.cos(math.pi * pasd))
    else:  # lin<T>
      t = float(sche[3:])
      mid = (1 + wpe + (1 - wpe) * (1 - t)) / 2
      lr = 1 + (mid - 1) * pasd / t if pasd < t else wpe + (mid - wpe) * rest / (1 - t)
  cur_wd = wd_end + (wd - wd_end) * (0.5 + 0.5 * math.cos(math.pi * it / (max_it - 1)))
  return lr * peak, cur_wd


@pytest.mark.parametrize('sche', ['lin0', 'cos', 'lin0.3'])
def test_lr_wd_schedule_matches_reference(sche):
  spec = optim.OptimSpec(peak_lr=3e-4, wd=0.05, wd_end=0.08, sche=sche, warmup_steps=20.4,
                         wp0=0.005, wpe=0.01)
  lr, wd = optim.lr_schedule(spec, 500), optim.wd_schedule(spec, 500)
  for it in [0, 1, 19, 20, 21, 40, 250, 498, 499]:
    ref_lr, ref_wd = _reference_lr_wd(sche, 3e-4, 0.05, 0.08, it, 20.4, 500, 0.005, 0.01)
    assert float(lr(it)) == pytest.approx(ref_lr, rel=1e-5)
    assert float(wd(it)) == pytest.approx(ref_wd, rel=1e-5)


def test_no_weight_decay_mask():
  params = {'pos_1LC': jnp.zeros((1, 4, 8)), 'head': {'kernel': jnp.zeros((8, 4)), 'bias': jnp.zeros(4)},
            'blocks_0': {'attn': {'scale_mul_1H11': jnp.zeros((1, 2, 1, 1)), 'q_bias': jnp.zeros(8)}},
            'lvl_embed': {'embedding': jnp.zeros((3, 8))}, 'class_emb': {'embedding': jnp.zeros((3, 8))}}
  m = optim.no_decay_mask(params)
  assert m['head']['kernel'] and m['class_emb']['embedding']
  assert not any([m['pos_1LC'], m['head']['bias'], m['blocks_0']['attn']['scale_mul_1H11'],
                  m['blocks_0']['attn']['q_bias'], m['lvl_embed']['embedding']])


# --- the step -----------------------------------------------------------------------------------
SHARED = ['--config.data.synthetic_examples=16', '--config.model.cond_drop_rate=0.0', '--config.data.hflip=true', '--config.total_steps=100', '--config.optim.lr=4e-3',
          '--config.optim.wp=0.5', '--config.run.save_every=2']


@pytest.fixture(scope='module')
def t8(tmp_path_factory):
  """One (data=2, fsdp=4) trainer shared by the tests below (compiled once)."""
  cfg = tiny_config(*SHARED, '--config.mesh.data=2', '--config.mesh.fsdp=4')
  return VARTrainer(cfg, str(tmp_path_factory.mktemp('eight')))


def _one_step(trainer, local_batch):
  state = trainer.init_state()
  batch = trainer.global_batch_arrays(local_batch)
  lw = jnp.asarray(trainer.loss_weights(0))
  with jax.set_mesh(trainer.mesh):
    new_state, metrics = trainer._train_step(state, trainer.vae_params, batch, lw)
  return new_state, jax.device_get(metrics)


@pytest.mark.slow
def test_sharded_step_equals_single_device(t8, tmp_path):
  t1 = VARTrainer(tiny_config(*SHARED, '--config.mesh.data=1'), str(tmp_path), devices=jax.devices()[:1])
  local = next(t1.make_train_iter())
  s1, m1 = _one_step(t1, local)
  s8, m8 = _one_step(t8, local)
  assert len(s8.params['head']['kernel'].sharding.device_set) == 8
  assert t8.state_shardings.params['head']['kernel'].spec[0] == 'fsdp'
  assert abs(float(m1['loss']) - float(m8['loss'])) < 1e-5
  assert tree_max_diff(s1.params, s8.params) < 1e-5
  assert tree_max_diff(s1.opt_state, s8.opt_state) < 1e-5


def test_grad_accumulation_matches_full_batch(t8, tmp_path):
  """ac=2 micro-batches give the full-batch update (no dropout in the shared config)."""
  t2 = VARTrainer(tiny_config(*SHARED, '--config.mesh.data=2', '--config.mesh.fsdp=4',
                              '--config.optim.ac=2'), str(tmp_path))
  local = next(t8.make_train_iter())
  s1, m1 = _one_step(t8, local)
  s2, m2 = _one_step(t2, local)
  assert abs(float(m1['loss']) - float(m2['loss'])) < 1e-5
  assert tree_max_diff(s1.params, s2.params) < 1e-5


def test_progressive_loss_weights():
  cfg = tiny_config('--config.vae.patch_nums=(1, 2, 3, 4)', '--config.pg=0.5', '--config.pg0=1',
                    '--config.total_steps=100', '--config.pgwp=0.0')
  t = VARTrainer.__new__(VARTrainer)  # schedule only: no models needed
  from var_jax.config import VARConfig
  t.cfg, t.var_cfg, t.total_steps = cfg, VARConfig(patch_nums=(1, 2, 3, 4)), 100
  t.optim_spec, t.pg_warmup_steps = optim.OptimSpec(warmup_steps=2), 100 / 300 * 4
  assert t.prog_stage(0) == (1, 1.0)
  si, wp = t.prog_stage(30)
  assert si == 2 and 0.01 <= wp <= 1
  lw = t.loss_weights(30)
  assert np.all(lw[14:] == 0) and np.all(lw[:5] == np.float32(1 / 30))
  assert t.prog_stage(60) == (-1, 1.0)


# --- training behaviour ------------------------------------------------------------------------
def test_tiny_model_overfits(t8, tmp_path):
  """Two batches of 8 images, 100 steps: the loss falls by more than half."""
  t8.cfg.run.save_every = 1000
  try:
    first = t8.train(stop_after=1, workdir=str(tmp_path))['loss']
    out = t8.train(workdir=str(tmp_path))
  finally:
    t8.cfg.run.save_every = 2
  assert out['status'] == 'done' and out['step'] == 100
  assert out['loss'] < first / 2, (first, out['loss'])


def test_resume_is_bit_identical_and_sigterm_saves(t8, tmp_path):
  t = t8
  full = t.train(stop_after=6, workdir=str(tmp_path / 'straight'))
  assert full['step'] == 6
  params_full = jax.device_get(t.state.params)

  # interrupted by SIGTERM after the 3rd batch: saves step 3 and stops cleanly
  orig = t.global_batch_arrays
  calls = []

  def batch_then_sigterm(local):
    calls.append(1)
    if len(calls) == 3:
      os.kill(os.getpid(), signal.SIGTERM)
    return orig(local)

  t.global_batch_arrays = batch_then_sigterm
  part = t.train(workdir=str(tmp_path / 'resumed'))
  t.global_batch_arrays = orig
  assert part['status'] == 'preempted' and part['step'] == 3
  assert checkpoint_manager.CheckpointManager(str(tmp_path / 'resumed' / 'checkpoints')).latest_step() == 3
  rest = t.train(stop_after=6, workdir=str(tmp_path / 'resumed'))
  assert rest['status'] == 'done' and rest['step'] == 6
  assert tree_equal(params_full, jax.device_get(t.state.params))


def test_unfinished_checkpoint_is_ignored(tmp_path):
  """A save killed midway leaves an orbax tmp dir: resume uses the last complete step."""
  d = str(tmp_path / 'ckpt')
  m = checkpoint_manager.CheckpointManager(d, keep=2, async_save=False)
  state = {'w': jnp.arange(4.0), 'step': jnp.int32(2)}
  m.save(2, state, data_state={'next_index': 16}, force=True)
  m.close()
  partial = pathlib.Path(d) / '4.orbax-checkpoint-tmp-1700000000000000'
  (partial / 'state').mkdir(parents=True)
  (partial / 'state' / 'garbage').write_bytes(b'\0' * 10)
  m = checkpoint_manager.CheckpointManager(d, keep=2, async_save=False)
  assert m.latest_step() == 2
  target = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
  got, data = m.restore(2, target)
  assert np.array_equal(got['w'], state['w']) and data == {'next_index': 16}
  m.close()


@pytest.mark.parametrize('policy', ['stop', 'skip'])
def test_non_finite_loss(tmp_path, t8, policy):
  t1 = t8
  t1.cfg.run.nan_policy = policy
  good = t1.vae_params
  t1.vae_params = jax.tree_util.tree_map(lambda x: x * jnp.nan, good)   # NaN tokenizer -> NaN loss
  try:
    if policy == 'stop':
      with pytest.raises(FloatingPointError, match='non-finite'):
        t1.train(stop_after=3, workdir=str(tmp_path))
      assert checkpoint_manager.CheckpointManager(str(tmp_path / 'checkpoints')).latest_step() is None
    else:
      out = t1.train(stop_after=3, workdir=str(tmp_path))
      assert out['skipped_updates'] == 3
      assert tree_equal(t1.init_state().params, jax.device_get(t1.state.params))
  finally:
    t1.vae_params = good
    t1.cfg.run.nan_policy = 'stop'
