"""VAR training tests on CPU with 8 fake devices (tests/conftest.py) and the tiny config."""
import json
import math
import os
import pathlib
import shutil
import signal
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from var_jax.config_loader import load_config
from var_jax.data import images
from var_jax.train import checkpoint_manager, loop, optim, tokenize, var_step

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
  c = load_config(TINY, ['--config.batch_size=32', '--config.optim.base_lr=3e-4',
                         '--config.data.hflip=true', '--config.mesh.fsdp=2'])
  assert (c.batch_size, c.optim.base_lr, c.data.hflip, c.mesh.fsdp) == (32, 3e-4, True, 2)
  with pytest.raises(ValueError, match='did you mean'):
    load_config(TINY, ['--config.optim.base_lrr=1'])
  with pytest.raises(ValueError, match='expects int'):
    load_config(TINY, ['--config.batch_size=big'])


@pytest.mark.parametrize('name', ['var_d16', 'var_d20', 'var_d24', 'var_d30', 'var_d36_512'])
def test_release_configs_load(name):
  c = load_config(str(ROOT / 'configs' / f'{name}.py'))
  assert c.model.embed_dim == 64 * c.model.depth and c.optim.b2 == 0.95 and c.optim.grad_clip == 2.0
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
  spec = optim.OptimSpec(peak_lr=3e-4, weight_decay=0.05, weight_decay_end=0.08, schedule=sche,
                         warmup_steps=20.4, warmup_start=0.005, final_lr=0.01)
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
          '--config.optim.warmup_epochs=0.5', '--config.run.save_every=2']


@pytest.fixture(scope='module')
def t8():
  """One (data=2, fsdp=4) task shared by the tests below (compiled once)."""
  return loop.make_task(tiny_config(*SHARED, '--config.mesh.data=2', '--config.mesh.fsdp=4'),
                        devices=jax.devices()[:8])


def first_batch(task):
  c = task.ctx
  it = loop.data_lib.make_train_pipeline(c.source, c.config.data, seed=c.config.seed,
                                         global_batch_size=c.global_batch,
                                         image_size=task.image_size(c.config))
  return next(it)


def _one_step(task, local_batch):
  state = task.init_state()
  batch = loop.global_batch(local_batch, task.batch_shardings)
  with task.ctx.activate():
    new_state, metrics = task.train_step(state, batch, 0)
  return new_state, jax.device_get(metrics)


@pytest.mark.slow
def test_sharded_step_equals_single_device(t8):
  t1 = loop.make_task(tiny_config(*SHARED, '--config.mesh.data=1'), devices=jax.devices()[:1])
  local = first_batch(t1)
  s1, m1 = _one_step(t1, local)
  s8, m8 = _one_step(t8, local)
  assert len(s8.params['head']['kernel'].sharding.device_set) == 8
  assert t8.state_shardings.params['head']['kernel'].spec[0] == 'fsdp'
  assert abs(float(m1['loss']) - float(m8['loss'])) < 1e-5
  assert tree_max_diff(s1.params, s8.params) < 1e-5
  assert tree_max_diff(s1.opt_state, s8.opt_state) < 1e-5


@pytest.mark.slow
def test_grad_accumulation_matches_full_batch(t8):
  """grad_accum=2 micro-batches give the full-batch update (no dropout in the shared config)."""
  t2 = loop.make_task(tiny_config(*SHARED, '--config.mesh.data=2', '--config.mesh.fsdp=4',
                                  '--config.optim.grad_accum=2'), devices=jax.devices()[:8])
  local = first_batch(t8)
  s1, m1 = _one_step(t8, local)
  s2, m2 = _one_step(t2, local)
  assert abs(float(m1['loss']) - float(m2['loss'])) < 1e-5
  assert tree_max_diff(s1.params, s2.params) < 1e-5


@pytest.mark.slow
def test_unrolled_blocks_step_equals_scanned():
  """model.scan_blocks=false (the training step without stacked parameters/activations)
  takes the same step as the scanned default, drop path and class dropout on."""
  extra = ('--config.model.drop_path_rate=0.2', '--config.model.cond_drop_rate=0.5',
           '--config.model.remat=dots_saveable', '--config.mesh.data=1')
  ts = loop.make_task(tiny_config(*SHARED, *extra), devices=jax.devices()[:1])
  tu = loop.make_task(tiny_config(*SHARED, *extra, '--config.model.scan_blocks=false'),
                      devices=jax.devices()[:1])
  assert 'blocks scanned' in ts.describe() and 'blocks unrolled' in tu.describe()
  local = first_batch(ts)
  ss, ms = _one_step(ts, local)
  su, mu = _one_step(tu, local)
  assert abs(float(ms['loss']) - float(mu['loss'])) < 1e-6
  assert tree_max_diff(ss.params, su.params) < 1e-6

  def stacked_writes(task, state):   # saved activations / weight gradients put into (depth, ...) buffers
    batch = loop.global_batch(local, task.batch_shardings)
    hlo = task._train_step.lower(state, task.vae_params, batch, jnp.asarray(task.loss_weights(0)))
    return hlo.compile().as_text().count(' dynamic-update-slice(')
  assert stacked_writes(ts, ss) > 0 and stacked_writes(tu, su) == 0


def test_progressive_loss_weights():
  """progressive.until=0.5 from stage 1 over 100 steps (2 warm-up steps), 4 scales."""
  from var_jax.config import VARConfig
  var_cfg = VARConfig(patch_nums=(1, 2, 3, 4))
  stage = lambda step: var_step.progressive_stage(
      step, num_scales=4, until=0.5, start_stage=1, warmup_steps=2, total_steps=100,
      stage_warmup_steps=100 / 300 * 4)
  assert stage(0) == (1, 1.0)
  si, wp = stage(30)
  assert si == 2 and 0.01 <= wp <= 1
  lw = var_step.loss_weights(var_cfg.L, var_cfg.begin_ends, si, wp)
  assert np.all(lw[14:] == 0) and np.all(lw[:5] == np.float32(1 / 30))
  assert stage(60) == (-1, 1.0)


# --- training behaviour ------------------------------------------------------------------------
@pytest.mark.slow
def test_tiny_model_overfits(t8, tmp_path):
  """Two batches of 8 images, 100 steps: the loss falls by more than half."""
  t8.ctx.config.run.save_every = 1000
  try:
    first = loop.run(t8, str(tmp_path), stop_after=1)[1]['loss']
    _, out = loop.run(t8, str(tmp_path))
  finally:
    t8.ctx.config.run.save_every = 2
  assert out['status'] == 'done' and out['step'] == 100
  assert out['loss'] < first / 2, (first, out['loss'])


def test_resume_is_bit_identical_and_sigterm_saves(t8, tmp_path):
  t = t8
  state, full = loop.run(t, str(tmp_path / 'straight'), stop_after=6)
  assert full['step'] == 6
  params_full = jax.device_get(state.params)

  # interrupted by SIGTERM during the 3rd step: saves step 3 and stops cleanly
  orig = t.train_step
  calls = []

  def step_then_sigterm(*args):
    calls.append(1)
    if len(calls) == 3:
      os.kill(os.getpid(), signal.SIGTERM)
    return orig(*args)

  t.train_step = step_then_sigterm
  try:
    _, part = loop.run(t, str(tmp_path / 'resumed'))
  finally:
    del t.train_step
  assert part['status'] == 'preempted' and part['step'] == 3
  assert checkpoint_manager.CheckpointManager(str(tmp_path / 'resumed' / 'checkpoints')).latest_step() == 3
  state, rest = loop.run(t, str(tmp_path / 'resumed'), stop_after=6)
  assert rest['status'] == 'done' and rest['step'] == 6
  assert tree_equal(params_full, jax.device_get(state.params))


def test_sigterm_before_the_first_step_saves_and_reports_preempted(t8, tmp_path):
  """A preemption notice while the run starts (restoring, initialising, compiling: minutes
  for a large model) still ends in a checkpoint and status 'preempted' (exit 75, which
  the launchers requeue), not in the default SIGTERM death (143: the job was lost)."""
  class Killed(Exception):
    pass

  def killed(signum, frame):   # stands in for the default action: the process dies
    raise Killed()

  orig = t8.init_state

  def init_then_sigterm():
    os.kill(os.getpid(), signal.SIGTERM)
    return orig()

  old = signal.signal(signal.SIGTERM, killed)
  t8.init_state = init_then_sigterm
  try:
    state, out = loop.run(t8, str(tmp_path), stop_after=4)
  finally:
    del t8.init_state
    signal.signal(signal.SIGTERM, old)
  assert out['status'] == 'preempted' and out['step'] == 0
  assert checkpoint_manager.CheckpointManager(str(tmp_path / 'checkpoints')).latest_step() == 0
  _, rest = loop.run(t8, str(tmp_path), stop_after=4)
  assert rest['status'] == 'done' and rest['step'] == 4


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


def _two_checkpoints(tmp_path):
  """(folder, open manager, abstract state) of a small state saved at steps 2 and 4."""
  d = tmp_path / 'ckpt'
  m = checkpoint_manager.CheckpointManager(str(d), keep=2, async_save=False)
  state = {'w': jnp.arange(4.0)}
  for step in (2, 4):
    m.save(step, state, data_state={'next_index': 8 * step}, force=True)
  return d, m, jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)


def _assert_nothing_moved(m, d):
  m.close()
  assert sorted(p.name for p in d.iterdir()) == ['2', '4']
  assert not (d.parent / 'damaged_checkpoints').exists()


def test_a_checkpoint_of_another_process_count_is_an_error_not_damage(tmp_path):
  """A run resumed with another number of processes finds no data-iterator position of
  its own: a one-line error, and the (readable) checkpoints stay where they are."""
  d, m, target = _two_checkpoints(tmp_path)
  m.close()
  for step in (2, 4):   # as written by process 0 of 2 (its partner's file beside it)
    data = d / str(step) / 'data'
    (data / 'process_0-of-1.json').rename(data / 'process_0-of-2.json')
    (data / 'process_1-of-2.json').write_text('{"next_index": 0}')
  m = checkpoint_manager.CheckpointManager(str(d), keep=2, async_save=False)
  with pytest.raises(ValueError, match=r'written by 2 process\(es\); this run has 1'):
    m.restore_latest(target)
  _assert_nothing_moved(m, d)


@pytest.mark.parametrize('error', [MemoryError(), RuntimeError(
    'RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.00GiB.')])
def test_out_of_memory_while_restoring_is_an_error_not_damage(tmp_path, monkeypatch, error):
  """Running out of memory while restoring is the machine's failure: moving the good
  checkpoints aside as damaged would start the run over from step 0."""
  d, m, target = _two_checkpoints(tmp_path)

  def fail(*args):
    raise error
  monkeypatch.setattr(m, 'restore', fail)
  with pytest.raises(MemoryError, match=r'checkpoint 4 .* lack of memory.*nothing was moved'):
    m.restore_latest(target)
  _assert_nothing_moved(m, d)


@pytest.mark.parametrize('policy', ['stop', 'skip'])
def test_non_finite_loss(tmp_path, t8, policy):
  t1 = t8
  t1.ctx.config.run.nan_policy = policy
  good = t1.vae_params
  t1.vae_params = jax.tree_util.tree_map(lambda x: x * jnp.nan, good)   # NaN tokenizer -> NaN loss
  try:
    if policy == 'stop':
      with pytest.raises(FloatingPointError, match='non-finite'):
        loop.run(t1, str(tmp_path), stop_after=3)
      assert checkpoint_manager.CheckpointManager(str(tmp_path / 'checkpoints')).latest_step() is None
    else:
      state, out = loop.run(t1, str(tmp_path), stop_after=3)
      assert out['skipped_updates'] == 3
      assert tree_equal(t1.init_state().params, jax.device_get(state.params))
  finally:
    t1.vae_params = good
    t1.ctx.config.run.nan_policy = 'stop'


# --- configs: one place, readable names, the former ones still accepted ----------------------
def test_renamed_keys_are_accepted_with_a_message(tmp_path, capsys):
  c = load_config(TINY, ['--config.optim.tblr=3e-4', '--config.model.aln=0.1', '--config.pg=0.5',
                         '--config.optim.twde=0', '--config.optim.ac=2'])
  assert (c.optim.base_lr, c.init.adaln, c.progressive.until, c.optim.grad_accum) == (3e-4, 0.1, 0.5, 2)
  assert c.optim.weight_decay_end == -1.0   # the reference's twde=0: constant weight decay
  err = capsys.readouterr().err.splitlines()
  assert "var-jax: config key 'optim.tblr' is deprecated, use 'optim.base_lr'" in err
  assert "var-jax: config key 'pg' is deprecated, use 'progressive.until'" in err and len(err) == 5
  # a config file written with the former names (and the VQVAE configs' former names)
  old = tmp_path / 'old_names.py'
  old.write_text(
      'from var_jax.config_loader import import_sibling\n'
      f'common = import_sibling({TINY!r}, "common")\n'
      'def get_config():\n'
      '  c = common.var_config(depth=2, **{"optim.sche": "cos"})\n'
      '  c.optim.tclip = 1.5\n'
      '  c.model.update(dict(hd=0.5))\n'
      '  return c\n')
  c = load_config(str(old))
  assert (c.optim.schedule, c.optim.grad_clip, c.init.head) == ('cos', 1.5, 0.5)
  assert 'tclip' not in c.optim and 'hd' not in c.model
  assert len(capsys.readouterr().err.splitlines()) == 3
  v = load_config(str(ROOT / 'configs' / 'vqvae_small.py'), ['--config.optim.clip=0.5',
                                                              '--config.model.codebook_init=-1'])
  assert (v.optim.grad_clip, v.init.codebook) == (0.5, -1.0)


@pytest.mark.parametrize('name', ['var_tiny', 'var_d16', 'var_d36_512', 'digits_var', 'vqvae_small',
                                  'digits_vqvae', 'vqvae_f16_release'])
def test_model_sections_map_onto_the_dataclasses(name):
  from var_jax.config import PATCH_NUMS_256, PATCH_NUMS_512, VARConfig, VQVAEConfig
  from var_jax.train import frozen_tokenizer, var_task
  c = load_config(str(ROOT / 'configs' / f'{name}.py'))
  assert loop.task_class(c).__name__ == ('VARTask' if c.task == 'var' else 'VQVAETask')
  if c.task == 'vqvae':
    vc = VQVAEConfig.from_section(c.model)
    assert vc.v_patch_nums == tuple(c.model.patch_nums)
    return
  vae = frozen_tokenizer.section_config(c.vae)
  var = VARConfig.from_section(c.model, ignore=var_task.MODEL_RUN_KEYS, patch_nums=vae.v_patch_nums)
  assert (var.depth, var.embed_dim, var.num_classes) == (c.model.depth, c.model.embed_dim, c.model.num_classes)
  if name.startswith('var_d'):
    assert vae.v_patch_nums == (PATCH_NUMS_512 if name.endswith('512') else PATCH_NUMS_256)
  with pytest.raises(ValueError, match='no field'):
    VARConfig.from_section(c.model, patch_nums=vae.v_patch_nums)   # attention/remat are not fields


# --- pre-tokenised data (var-jax tokenize, data.kind=tokens) ---------------------------------
def _tokenize(config, out, crops=1, flip=False):
  return tokenize.tokenize(config, str(out), crops=crops, flip=flip, shard_size=6, batch_size=4,
                           log=lambda msg: None)


@pytest.fixture(scope='module')
def tokens_dir(t8, tmp_path_factory):
  """t8's 16 training images (one crop each) and 4 eval images, encoded by its tokenizer."""
  out = tmp_path_factory.mktemp('tok') / 'tokens'
  _tokenize(t8.ctx.config, out)
  return out


def token_config(path, *extra):
  return tiny_config(*SHARED, '--config.mesh.data=2', '--config.mesh.fsdp=4',
                     '--config.data.kind=tokens', f'--config.data.path={path}', *extra)


@pytest.mark.slow
def test_first_loss_from_tokens_equals_loss_from_images(t8, tokens_dir):
  tt = loop.make_task(token_config(tokens_dir), devices=jax.devices()[:8])
  local = first_batch(tt)
  assert local['tokens'].shape == (8, 14) and 'image' not in local
  # the same crops as images, in the image pipelines' stream order
  src, c = t8.ctx.source, t8.ctx.config
  stream, _ = images.stream(len(src), 8, train=True, seed=c.seed)
  idx = [stream[k][1] for k in range(8)]
  imgs = np.stack([tokenize.variants(src[i], 6, mid_reso=c.data.mid_reso, crops=1, flip=False,
                                     seed=c.seed, index=i)[0] for i in idx])
  labels = np.asarray([src[i]['label'] for i in idx], np.int32)
  np.testing.assert_array_equal(labels, local['label'])
  gt, _ = var_step.make_targets(t8.vae_model, False)(t8.vae_params, {'image': jnp.asarray(imgs)})
  np.testing.assert_array_equal(np.asarray(gt), local['tokens'])
  s_img, m_img = _one_step(t8, {'image': imgs, 'label': labels})
  s_tok, m_tok = _one_step(tt, local)
  assert abs(float(m_img['loss']) - float(m_tok['loss'])) < 1e-6
  assert tree_max_diff(s_img.params, s_tok.params) < 1e-6


def test_tokens_made_otherwise_or_truncated_are_refused(tokens_dir, tmp_path):
  eight = jax.devices()[:8]
  with pytest.raises(ValueError, match='patch_nums'):
    loop.make_task(token_config(tokens_dir, '--config.vae.patch_nums=(1, 2, 4)'), devices=eight)
  with pytest.raises(ValueError, match='another tokenizer'):
    loop.make_task(token_config(tokens_dir, '--config.vae.quant_resi=0.25'), devices=eight)
  broken = tmp_path / 'broken'
  shutil.copytree(tokens_dir, broken)
  shard = broken / 'train-00001-of-00003.array_record'
  shard.write_bytes(shard.read_bytes()[:1000])
  with pytest.raises(ValueError, match='truncated'):
    loop.make_task(token_config(broken), devices=eight)


def test_tokenize_resumes_and_refuses_other_folders(t8, tokens_dir, tmp_path):
  c = t8.ctx.config
  out = tmp_path / 'killed'
  shutil.copytree(tokens_dir, out)
  # as a killed run leaves it: manifest not complete, a shard missing, a temporary file
  manifest = json.loads((out / 'manifest.json').read_text())
  (out / 'manifest.json').write_text(json.dumps(dict(manifest, complete=False)))
  lost, kept = out / 'train-00001-of-00003.array_record', out / 'train-00000-of-00003.array_record'
  want, mtime = lost.read_bytes(), kept.stat().st_mtime_ns
  lost.unlink()
  (out / '.train-00001-of-00003.array_record.tmp-123').write_bytes(b'partial')
  assert _tokenize(c, out)['complete']
  assert lost.read_bytes() == want and kept.stat().st_mtime_ns == mtime
  assert not [f for f in os.listdir(out) if 'tmp' in f]
  assert json.loads((out / 'manifest.json').read_text()) == manifest
  # other settings, or a folder it did not make: refused, nothing touched
  with pytest.raises(FileExistsError, match='other settings'):
    _tokenize(c, out, crops=2)
  mine = tmp_path / 'mine'
  mine.mkdir()
  (mine / 'notes.txt').write_text('mine')
  with pytest.raises(FileExistsError, match='not made by var-jax tokenize'):
    _tokenize(c, mine)
  assert os.listdir(mine) == ['notes.txt']


def test_sigterm_stops_tokenize_after_a_whole_shard(tmp_path, capsys, monkeypatch):
  """SIGTERM during a shard's write: the shard is finished and renamed, then the command
  stops with its one-line message and 143; no temporary file is left. (Without the
  commands' signal handling SIGTERM killed the process wherever it was: the handler
  installed here stands in for that and turns it into another error.)"""
  from array_record.python import array_record_module
  from var_jax import cli
  real = array_record_module.ArrayRecordWriter
  sent = []

  class Writer:
    def __init__(self, *a):
      self.w = real(*a)

    def write(self, r):
      if not sent:
        sent.append(1)
        os.kill(os.getpid(), signal.SIGTERM)
      self.w.write(r)

    def close(self):
      self.w.close()

  def unhandled(*a):
    raise RuntimeError('SIGTERM reached the default handler')
  monkeypatch.setattr(array_record_module, 'ArrayRecordWriter', Writer)
  old = signal.signal(signal.SIGTERM, unhandled)
  try:
    code = cli.main(['tokenize', '--config', TINY, '--out', str(tmp_path / 'tok'),
                     '--shard-size', '64', '--config.data.synthetic_examples=128'])
  finally:
    signal.signal(signal.SIGTERM, old)
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 143 and err[-1] == 'var-jax tokenize: error: terminated (SIGTERM)', err[-3:]
  files = sorted(p.name for p in (tmp_path / 'tok').iterdir())
  assert [f for f in files if f.endswith('.array_record')] == ['train-00000-of-00002.array_record']
  assert not [f for f in files if f.startswith('.')], files


def test_tokenize_refuses_to_resume_on_changed_images(tmp_path):
  """A killed tokenize, rerun after its image folder changed, would encode the remaining
  shards from another listing (images duplicated or dropped): refused, nothing touched."""
  from PIL import Image
  data = tmp_path / 'data'
  for split, n in (('train', 12), ('val', 2)):
    (data / split / 'cat').mkdir(parents=True)
    for i in range(n):
      Image.fromarray(np.full((8, 8, 3), 20 * i, np.uint8)).save(data / split / 'cat' / f'{i}.png')
  c = tiny_config('--config.data.kind=folder', f'--config.data.path={data}')
  out = tmp_path / 'tokens'
  manifest = _tokenize(c, out)
  want = {f: (out / f).read_bytes() for f in os.listdir(out)}
  (out / 'manifest.json').write_text(json.dumps(dict(manifest, complete=False)))
  (out / 'train-00001-of-00002.array_record').unlink()   # as a killed run leaves it
  killed = {f: (out / f).read_bytes() for f in os.listdir(out)}
  cat = data / 'train' / 'cat'
  (cat / '0.png').rename(cat / 'z.png')
  with pytest.raises(FileExistsError, match='other train images .as many, other files'):
    _tokenize(c, out)
  (cat / 'z.png').rename(cat / '0.png')
  shutil.copy(cat / '0.png', cat / '00.png')
  with pytest.raises(FileExistsError, match='other train images .12 then, 13 now'):
    _tokenize(c, out)
  assert {f: (out / f).read_bytes() for f in os.listdir(out)} == killed
  (cat / '00.png').unlink()
  assert _tokenize(c, out)['complete']   # the same images again: resumed
  assert {f: (out / f).read_bytes() for f in os.listdir(out)} == want


def test_tokenize_names_an_unreadable_image_by_its_path(tmp_path):
  from PIL import Image
  cat = tmp_path / 'data' / 'train' / 'cat'
  cat.mkdir(parents=True)
  (tmp_path / 'data' / 'val' / 'cat').mkdir(parents=True)
  for i in range(3):
    Image.fromarray(np.full((8, 8, 3), 20 * i, np.uint8)).save(cat / f'{i}.png')
  shutil.copy(cat / '0.png', tmp_path / 'data' / 'val' / 'cat')
  (cat / '1.png').write_bytes((cat / '1.png').read_bytes()[:45])   # truncated: PIL's error names no file
  said = []
  c = tiny_config('--config.data.kind=folder', f'--config.data.path={tmp_path / "data"}')
  tokenize.tokenize(c, str(tmp_path / 'tokens'), shard_size=6, batch_size=4, log=said.append)
  skipped = [m for m in said if 'unreadable' in m]
  assert len(skipped) == 1 and skipped[0].startswith(
      f'[tokenize] skipping unreadable image {cat / "1.png"}: OSError')


# --- hardening: damaged checkpoints, one metrics row per step, errors, faults -----------------
def _rows(workdir):
  return [json.loads(line)['step'] for line in (pathlib.Path(workdir) / 'metrics.jsonl').open()]


def _tb_events(path):
  """(step, what) of every event in a TensorBoard event file."""
  import struct
  from tensorboardX.proto import event_pb2
  data, i, out = path.read_bytes(), 0, []
  while i < len(data):
    n = struct.unpack('<Q', data[i:i + 8])[0]
    e = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
    what = e.WhichOneof('what')
    out.append((e.step, e.session_log.status if what == 'session_log' else what))
    i += 12 + n + 4
  return out


def test_resumed_tensorboard_log_hides_the_steps_it_rewrites(tmp_path):
  """A run killed after step 5 and resumed from its step-3 checkpoint logs steps 4 and 5
  again: the new event file starts with a session START at step 4, which makes
  TensorBoard drop the earlier points at steps >= 4 (as metrics.jsonl drops its rows)."""
  from tensorboardX.proto import event_pb2
  from var_jax.train import writer as writer_lib
  w = writer_lib.Writer(str(tmp_path), resume_step=0, stdout=False)
  for step in range(1, 6):
    w.scalars(step, {'train/loss': float(step)})
  w.close()
  (tmp_path / 'tb').rename(tmp_path / 'tb_first')   # the files of one second share a name
  w = writer_lib.Writer(str(tmp_path), resume_step=3, stdout=False)
  w.scalars(4, {'train/loss': 0.5})
  w.close()
  new, = (tmp_path / 'tb').iterdir()
  events = _tb_events(new)
  start = event_pb2.SessionLog.START
  assert (4, start) in events and events.index((4, start)) < events.index((4, 'summary'))
  assert _rows(tmp_path) == [1, 2, 3, 4]


@pytest.mark.slow
def test_damaged_latest_checkpoint_is_set_aside_and_the_run_continues(t8, tmp_path, capsys):
  t8.ctx.config.run.log_every = 1
  try:
    straight, _ = loop.run(t8, str(tmp_path / 'straight'), stop_after=6)
    work = tmp_path / 'damaged'
    loop.run(t8, str(work), stop_after=4)                  # checkpoints 2 and 4 (keep=2)
    for f in (work / 'checkpoints' / '4' / 'state').rglob('d/*'):   # truncate the array data
      f.write_bytes(f.read_bytes()[:8])
    capsys.readouterr()
    state, out = loop.run(t8, str(work), stop_after=6)
  finally:
    t8.ctx.config.run.log_every = 1000
  err = capsys.readouterr().err
  assert 'checkpoint 4 cannot be restored' in err and 'Traceback' not in err
  assert (work / 'damaged_checkpoints' / '4' / 'state').is_dir()    # kept, never deleted
  assert out['status'] == 'done' and out['step'] == 6
  assert tree_equal(jax.device_get(straight.params), jax.device_get(state.params))
  assert _rows(work) == list(range(1, 7))                  # steps 3, 4 logged once after the resume


def test_a_checkpoint_of_another_model_is_an_error_not_damage(t8, tmp_path):
  work = tmp_path / 'run'
  loop.run(t8, str(work), stop_after=2)
  other = loop.make_task(tiny_config(*SHARED, '--config.model.embed_dim=32', '--config.mesh.data=1'),
                         devices=jax.devices()[:1])
  with pytest.raises(ValueError, match='another model'):
    loop.run(other, str(work))
  assert (work / 'checkpoints' / '2').is_dir() and not (work / 'damaged_checkpoints').exists()


def test_resuming_with_another_config_names_the_changes(t8, tmp_path, capsys):
  """Same shapes restore under any other values (a rerun may mean to extend a run), so
  the resume warns with every key that differs from the config the run started with."""
  work = tmp_path / 'run'
  loop.run(t8, str(work), stop_after=2)
  capsys.readouterr()
  t8.ctx.config.run.log_every, t8.ctx.config.seed = 7, 3
  try:
    _, out = loop.run(t8, str(work), stop_after=3)
  finally:
    t8.ctx.config.run.log_every, t8.ctx.config.seed = 1000, 0
  err = capsys.readouterr().err
  assert out['step'] == 3
  assert 'resuming with a config that differs' in err and 'run.log_every: 1000 -> 7; seed: 0 -> 3' in err
  assert json.loads((work / 'config.json').read_text())['seed'] == 0   # the record of the start


@pytest.mark.parametrize('argv, code, message', [
    (['--config', 'configs/missing.py'], 1, "config file 'configs/missing.py' not found"),
    (['--config', TINY, '--config.batchsize=8'], 2, "did you mean 'batch_size'?"),
    (['--config', TINY, '--config.batch_size=eight'], 2, "config key 'batch_size' expects int"),
    (['--config', TINY, '--config.vae.checkpoint=/nonexistent/vae.pth'], 1, 'not found'),
    (['--config', TINY, '--config.model.attention=flash'], 2, 'attention must be one of'),
    (['--config', TINY, '--config.run.keep=0'], 2, 'config.run.keep must be >= 1'),
    (['--config', TINY, '--config.run.save_every=0'], 2, 'config.run.save_every must be >= 1'),
    (['--config', TINY, '--config.run.log_every=0'], 2, 'config.run.log_every must be >= 1'),
    (['--config', TINY, '--stop_after=-1'], 2, '--stop_after must be >= 1'),
    (['--config', TINY, '--config.run.eval_batches=0'], 2, 'config.run.eval_batches must be >= 1'),
    (['--config', TINY, '--config.run.nan_policy=stopp'], 2, "nan_policy must be 'stop' or 'skip'"),
])
def test_train_errors_are_one_line(tmp_path, capsys, argv, code, message):
  from var_jax import cli
  assert cli.main(['train', '--workdir', str(tmp_path / 'w'), *argv]) == code
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith('var-jax train: error: ') and message in err[0], err
  assert not (tmp_path / 'w' / 'checkpoints').exists()   # refused before any work


@pytest.mark.slow
def test_ctrl_c_swallowed_by_a_gc_callback_still_stops_training(tmp_path, capsys, monkeypatch):
  """Ctrl-C that lands in a gc callback (jax registers one) is swallowed there as an
  'Exception ignored' message; training must still stop with 130, not run to the end."""
  import gc
  import time
  from var_jax import cli
  calls, orig = [], loop.global_batch

  def ctrl_c_in_gc(phase, info):
    if phase == 'start' and len(calls) == 2:
      calls.append('sent')
      os.kill(os.getpid(), signal.SIGINT)   # raised inside this callback, then swallowed

  def batch(*args):
    calls.append(1)
    if len(calls) == 2:
      gc.collect()
    elif len(calls) > 3:
      time.sleep(0.05)   # steps slow enough for a re-sent signal to land mid-run
    return orig(*args)

  monkeypatch.setattr(loop, 'global_batch', batch)
  gc.callbacks.append(ctrl_c_in_gc)
  try:
    code = cli.main(['train', '--workdir', str(tmp_path / 'w'), '--config', TINY, *FAST,
                     '--config.total_steps=200'])
  finally:
    gc.callbacks.remove(ctrl_c_in_gc)
  assert 'sent' in calls
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 130 and err[-1] == 'var-jax train: error: interrupted', err[-3:]
  assert len(calls) < 200


def test_tokens_folder_errors_exit_1(t8, tokens_dir, tmp_path, capsys):
  from var_jax import cli
  args = ['train', '--workdir', str(tmp_path / 'w'), '--config', TINY, *FAST, *SHARED,
          '--config.data.kind=tokens', f'--config.data.path={tokens_dir}',
          '--config.vae.quant_resi=0.25']
  assert cli.main(args) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and 'another tokenizer' in err[0]


def _train_cmd(workdir, *extra):
  return [sys.executable, '-m', 'var_jax.cli', 'train', '--config', TINY, '--workdir', str(workdir),
          *FAST, '--config.data.synthetic_examples=16', '--config.total_steps=10',
          '--config.run.save_every=2', '--config.run.log_every=1', '--config.run.export=true',
          '--config.run.async_checkpoint=true', *extra]


def _env(cache):
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=str(ROOT), PYTHONUNBUFFERED='1',
             VAR_JAX_COMPILATION_CACHE=str(cache))   # the runs share their compiled programs
  env['XLA_FLAGS'] = ' '.join(f for f in env.get('XLA_FLAGS', '').split()
                              if 'device_count' not in f)   # one CPU device: fast start-up
  return env


def _run_until(workdir, trigger, delay, sig=signal.SIGKILL):
  """Runs the tiny training in a subprocess and sends `sig` `delay` s after the step line
  that `trigger(step, n)` accepts (n: lines so far in this run); returns the exit code."""
  import subprocess
  import time
  p = subprocess.Popen(_train_cmd(workdir), env=_env(workdir.parent / 'jax_cache'),
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  try:
    n = 0
    for line in p.stdout:
      if line.startswith('[var] step '):
        n += 1
        if trigger(int(line.split()[2].rstrip(':')), n):
          time.sleep(delay)
          p.send_signal(sig)
          break
    p.stdout.read()
    return p.wait(timeout=300)
  finally:
    if p.poll() is None:
      p.kill()


@pytest.mark.slow
def test_sigkill_at_random_moments_then_rerun_is_bit_identical(tmp_path):
  """SIGTERM once (saves, exit 75), then SIGKILL at seeded random moments, one of them
  mid-save (an even step's line is printed right after its asynchronous save starts),
  then a rerun: the final parameters equal an uninterrupted run's, and metrics.jsonl
  has each step once."""
  import subprocess
  from var_jax import checkpoint
  env = _env(tmp_path / 'jax_cache')
  ref = tmp_path / 'straight'
  assert subprocess.run(_train_cmd(ref), env=env, capture_output=True).returncode == 0
  work = tmp_path / 'killed'
  assert _run_until(work, lambda step, n: n == 2, 0.0, signal.SIGTERM) == loop.PREEMPTED_EXIT_CODE
  rng = np.random.default_rng(0)
  for kill in range(3):
    if kill == 1:   # during the save of the first even step of this run
      assert _run_until(work, lambda step, n: step % 2 == 0, 0.0) == -signal.SIGKILL
    else:
      nth, delay = int(rng.integers(1, 3)), float(rng.uniform(0, 0.3))
      assert _run_until(work, lambda step, n: n == nth, delay) == -signal.SIGKILL
  done = subprocess.run(_train_cmd(work), env=env, capture_output=True, text=True)
  assert done.returncode == 0, done.stdout[-2000:]
  want, got = checkpoint.restore(ref / 'export'), checkpoint.restore(work / 'export')
  assert tree_equal(want[2], got[2]) and tree_equal(want[1], got[1])
  assert _rows(work) == list(range(1, 11))
  assert not [p for p in work.rglob('*') if 'tmp' in p.name]
