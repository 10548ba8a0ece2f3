"""Pipeline on the reference fixtures: tokens exact, images/logits within 1e-4; native
checkpoints round-trip exactly; bad inputs and bad checkpoints fail with clear messages."""
import json
import re
import shutil

import numpy as np
import pytest
from conftest import ROOT, get_fixture

import var_jax
from var_jax.errors import CheckpointError
from var_jax.convert.torch_io import load_pth

TOL = 1e-4
_PIPES = {}


def pipeline(name):
  if name not in _PIPES:
    fx = get_fixture(name)
    _PIPES[name] = var_jax.from_torch(fx.dir / 'vae.pth', fx.dir / 'var.pth',
                                      config=fx.dir / 'config.json')
  return _PIPES[name]


def tokens_of(fx):
  return [fx.io[f'idx_{k}'] for k in range(len(fx.config.patch_nums))]


def test_matches_reference(fx):
  pipe = pipeline(fx.name)
  assert pipe.config == fx.config
  idx = pipe.encode(fx.nhwc('img'))
  assert len(idx) == len(fx.config.patch_nums)
  for k, t in enumerate(idx):
    assert t.dtype == np.int32
    np.testing.assert_array_equal(np.asarray(t), fx.io[f'idx_{k}'], err_msg=f'scale {k}')
  img = np.asarray(pipe.decode(idx))
  np.testing.assert_allclose(img, fx.nhwc('recon'), atol=TOL, rtol=0)
  logits = np.asarray(pipe.logits(fx.io['label'], tokens_of(fx)))
  assert logits.dtype == np.float32 and logits.shape == fx.io['logits'].shape
  np.testing.assert_allclose(logits, fx.io['logits'], atol=TOL, rtol=0)


def test_config_forms_and_inference():
  fx = get_fixture('tiny10')
  inferred = var_jax.from_torch(fx.dir / 'vae.pth', fx.dir / 'var.pth')  # L=680: release schedule
  for f in ('num_classes', 'depth', 'embed_dim', 'num_heads', 'patch_nums'):
    assert getattr(inferred.config.var, f) == getattr(fx.config.var, f)
  assert inferred.config.vae == fx.config.vae
  as_dict = var_jax.from_torch(fx.dir / 'vae.pth', config=fx.raw_config)  # VQVAE only
  assert as_dict.config.var is None and as_dict.config.vae == fx.config.vae
  with pytest.raises(ValueError, match='no VAR'):
    as_dict.logits([0], tokens_of(fx))


def test_mismatched_config_is_a_clear_error():
  fx = get_fixture('tiny4')
  raw = json.loads(json.dumps(fx.raw_config))
  raw['var']['num_heads'] = 4
  with pytest.raises(ValueError, match=r'(?s)var\.pth.*scale_mul_1H11.*\(1, 2, 1, 1\).*\(1, 4, 1, 1\)'):
    var_jax.from_torch(fx.dir / 'vae.pth', fx.dir / 'var.pth', config=raw)
  raw = json.loads(json.dumps(fx.raw_config))
  raw['vae']['vocab_size'] = 32
  with pytest.raises(ValueError, match=r'(?s)quantize\.embedding\.weight.*\(64, 8\).*\(32, 8\)'):
    var_jax.from_torch(fx.dir / 'vae.pth', config=raw)


@pytest.mark.slow
def test_save_load_round_trip_and_export(tmp_path):
  fx = get_fixture('tiny4')
  pipe = pipeline('tiny4')
  pipe.save(tmp_path / 'ckpt')
  assert (tmp_path / 'ckpt' / 'config.json').is_file()
  loaded = var_jax.load(tmp_path / 'ckpt')
  assert loaded.config == pipe.config
  np.testing.assert_array_equal(np.asarray(loaded.logits(fx.io['label'], tokens_of(fx))),
                                np.asarray(pipe.logits(fx.io['label'], tokens_of(fx))))
  for a, b in zip(loaded.encode(fx.nhwc('img')), pipe.encode(fx.nhwc('img'))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # export after the native round trip: the original files, bit for bit
  loaded.to_torch(tmp_path / 'vae.pth', tmp_path / 'var.pth')
  for part in ('vae', 'var'):
    a, b = load_pth(fx.dir / f'{part}.pth'), load_pth(tmp_path / f'{part}.pth')
    assert list(a) == list(b)
    assert all(a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes() for k in a)


def test_save_never_overwrites_without_force(tmp_path):
  pipe = pipeline('tiny4')
  target = tmp_path / 'ckpt'
  target.mkdir()
  (target / 'keep.txt').write_text('precious')
  with pytest.raises(FileExistsError, match='not empty'):
    pipe.save(target)
  with pytest.raises(FileExistsError, match='not a var-jax checkpoint'):   # force or not
    pipe.save(target, force=True)
  assert (target / 'keep.txt').read_text() == 'precious'
  (target / 'keep.txt').unlink()
  pipe.save(target)
  (target / 'extra.txt').write_text('left by the user')
  pipe.save(target, force=True)   # force replaces a checkpoint (and what lies in it)
  assert not (target / 'extra.txt').exists() and var_jax.load(target).config == pipe.config
  assert sorted(p.name for p in tmp_path.iterdir()) == ['ckpt']  # no temporary leftovers


def test_load_errors(tmp_path):
  pipe = pipeline('tiny4')
  with pytest.raises(FileNotFoundError, match='not found'):
    var_jax.load(tmp_path / 'absent')
  (tmp_path / 'empty').mkdir()
  with pytest.raises(CheckpointError, match='not a var-jax checkpoint'):
    var_jax.load(tmp_path / 'empty')
  good = tmp_path / 'good'
  pipe.save(good)

  def variant(name):
    d = tmp_path / name
    shutil.copytree(good, d)
    return d
  d = variant('noconfig')
  (d / 'config.json').unlink()
  with pytest.raises(CheckpointError, match='config.json is missing'):
    var_jax.load(d)
  d = variant('mismatch')  # the config says 4 heads, the params have 2
  cfg = json.loads((d / 'config.json').read_text())
  cfg['var']['num_heads'] = 4
  (d / 'config.json').write_text(json.dumps(cfg))
  with pytest.raises(CheckpointError, match=r'(?s)scale_mul_1H11: stored \(1, 2, 1, 1\).*expected \(1, 4, 1, 1\)'):
    var_jax.load(d)
  d = variant('corrupt')
  for f in (d / 'params').rglob('*'):
    if f.is_file() and f.stat().st_size > 1000:
      f.write_bytes(b'\0' * 100)
  with pytest.raises(CheckpointError, match='corrupt'):
    var_jax.load(d)


def test_bad_inputs_are_named():
  fx = get_fixture('tiny4')
  pipe = pipeline('tiny4')
  img = fx.nhwc('img')
  with pytest.raises(ValueError, match='64x64'):
    pipe.encode(np.zeros((1, 32, 32, 3), np.float32))
  with pytest.raises(ValueError, match='NCHW'):
    pipe.encode(fx.io['img'])
  with pytest.raises(ValueError, match=r'\[-1, 1\]'):
    pipe.encode(img * 3)
  with pytest.raises(ValueError, match='4-D'):
    pipe.encode(img[0])
  with pytest.raises(ValueError, match='dtype uint8'):
    pipe.encode(np.zeros((1, 64, 64, 3), np.uint8))
  toks = tokens_of(fx)
  with pytest.raises(ValueError, match=r'token map 2 \(scale 3x3\) must have shape \(B, 9\)'):
    pipe.decode(toks[:2] + [toks[2][:, :4]] + toks[3:])
  with pytest.raises(ValueError, match='expected 4 token maps'):
    pipe.decode(toks[:3])
  with pytest.raises(ValueError, match=r'outside \[0, 64\)'):
    pipe.decode(toks[:3] + [toks[3] + 64])
  with pytest.raises(ValueError, match=r'labels must be in \[0, 10\)'):
    pipe.logits([3, 10], toks)
  with pytest.raises(ValueError, match='2 token maps'):
    pipe.logits([3, 4, 5], toks)
  np.testing.assert_array_equal(  # (B, pn, pn) maps are accepted too
      np.asarray(pipe.decode([t.reshape(2, pn, pn) for t, pn in zip(toks, fx.config.patch_nums)])),
      np.asarray(pipe.decode(toks)))


def test_load_reference_and_its_inverse(tmp_path):
  """convert.load_reference -> (config, params, buffers); save_reference writes the same
  tensors back; a VQVAE alone gives var=None."""
  from var_jax import convert
  fx = get_fixture('tiny4')
  config, params, buffers = convert.load_reference(fx.dir / 'vae.pth', fx.dir / 'var.pth',
                                                   fx.dir / 'config.json')
  assert config == fx.config and set(params) == {'vae', 'var'}
  assert set(buffers['vae']) == {'quantize.ema_vocab_hit_SV'} and buffers['var'] == {}
  convert.save_reference(tmp_path / 'vae.pth', tmp_path / 'var.pth', config, params, buffers)
  for part in ('vae', 'var'):
    a, b = load_pth(fx.dir / f'{part}.pth'), load_pth(tmp_path / f'{part}.pth')
    assert list(a) == list(b) and all(a[k].tobytes() == b[k].tobytes() for k in a)
  lone = convert.load_reference(fx.dir / 'vae.pth', config=fx.raw_config)
  assert lone.config.var is None and lone.params['var'] is None
  with pytest.raises(ValueError, match='no VAR'):
    convert.save_reference(tmp_path / 'v.pth', tmp_path / 'w.pth', *lone)


def test_bfloat16_pipeline_prepares_blocks_once():
  """Pipeline(dtype=bf16) holds the VAR blocks ready (bf16, stacked) beside the params as
  stored (float32, for logits/save/export); test_sampler checks that ready params sample
  the same bits as params cast in the program."""
  import jax.numpy as jnp
  from var_jax import sampler
  fx = get_fixture('tiny4')
  pipe = var_jax.from_torch(fx.dir / 'vae.pth', fx.dir / 'var.pth', config=fx.dir / 'config.json',
                            dtype=jnp.bfloat16)
  ready = pipe._ready
  assert isinstance(ready, sampler.ReadyVAR) and ready.dtype == 'bfloat16'
  assert ready.stacked['ffn']['fc1']['kernel'].shape[0] == fx.config.var.depth
  assert ready.stacked['ffn']['fc1']['kernel'].dtype == jnp.bfloat16
  assert pipe.var_params['blocks_0']['ffn']['fc1']['kernel'].dtype == np.float32
  assert set(ready.params['blocks_0']) == {'ada_lin_1'}       # read once per call, unstacked
  assert pipe._sampler().prepare(ready) is ready               # already ready: nothing to do


def test_default_sampling_works_on_the_embedded_model():
  """pipe.sample([3, 7]) with the defaults (top_k 900 > the 256 codes: no top-k cut)."""
  from var_jax import demo
  pipe = var_jax.load(demo.asset_dir())
  images, tokens = pipe.sample([3, 7])
  assert images.shape == (2, 32, 32, 3) and len(tokens) == len(pipe.config.patch_nums)
  again = pipe.sample([3, 7], top_k=0)
  for a, b in zip(tokens, again[1]):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def readme_python_blocks(section: str):
  text = (ROOT / 'README.md').read_text()
  body = text.split(f'\n## {section}\n', 1)[1].split('\n## ', 1)[0]
  return re.findall(r'```python\n(.*?)```', body, re.S)


@pytest.mark.slow
def test_readme_python_api_runs_as_written(tmp_path, monkeypatch):
  """The README's 'Python API' code blocks, executed in order on the embedded model."""
  blocks = readme_python_blocks('Python API')
  assert len(blocks) >= 2
  monkeypatch.chdir(tmp_path)
  scope = {}
  for code in blocks:
    exec(compile(code, 'README.md', 'exec'), scope)
  assert scope['images'].shape == (2, 32, 32, 3)
  assert (tmp_path / 'ckpt' / 'digits' / 'config.json').is_file()
  assert (tmp_path / 'vae.pth').is_file() and (tmp_path / 'var.pth').is_file()
  assert scope['config'] == scope['pipe'].config


def test_seed_must_be_an_integer_or_one_key():
  """A float, None, an out-of-range int or a batch of keys is a ValueError naming `seed`
  (a float was truncated silently, the rest failed deep inside jax); numpy and 0-d jax
  integers and legacy PRNGKeys are accepted and mean the same as the plain int."""
  import jax
  import jax.numpy as jnp
  pipe = pipeline('tiny4')
  images = get_fixture('tiny4').nhwc('img')
  for bad in (1.7, None, '3', True, 2**70, jax.random.split(jax.random.key(0), 2)):
    with pytest.raises(ValueError, match='seed must be'):
      pipe.sample([3, 4], seed=bad)
    with pytest.raises(ValueError, match='seed must be'):
      pipe.edit(images, np.ones((4, 4)), 10, seed=bad)
  from var_jax.sampler import seed_key
  want = jax.random.key_data(jax.random.key(3))
  for good in (3, np.int64(3), jnp.int32(3), np.array(3, np.uint8)):
    np.testing.assert_array_equal(jax.random.key_data(seed_key(good)), want)
  legacy = jax.random.PRNGKey(3)
  for good in (legacy, np.asarray(legacy)):
    np.testing.assert_array_equal(np.asarray(seed_key(good)), np.asarray(legacy))


def test_missing_labels_a_non_float_dtype_and_a_float32_infinite_cfg_are_named():
  """labels=None, an integer compute dtype and a cfg beyond float32 (NaN logits) failed
  deep inside jax or sampled garbage; each is a ValueError naming the argument."""
  import jax.numpy as jnp
  from var_jax import sampler
  pipe = pipeline('tiny4')
  with pytest.raises(ValueError, match='labels must be given'):
    pipe.sample(None)
  with pytest.raises(ValueError, match='labels must be given'):
    sampler.sample(pipe.config, pipe.vae_params, pipe.var_params, None)
  with pytest.raises(ValueError, match='dtype must be a floating-point type'):
    pipe.sample([3, 4], dtype=jnp.int32)
  with pytest.raises(ValueError, match='dtype must be a floating-point type'):
    var_jax.Pipeline(pipe.config, pipe.vae_params, pipe.var_params, dtype='int8')
  with pytest.raises(ValueError, match='cfg must be >= 0 and finite in float32'):
    pipe.sample([3, 4], cfg=3.5e38)


def test_bfloat16_images_are_accepted_and_an_empty_batch_is_named():
  """bfloat16 images (a bfloat16 pipeline's natural input) were refused as 'not floats';
  an empty batch failed in numpy's min(). float16/bfloat16 give float32's tokens here."""
  import jax.numpy as jnp
  pipe = pipeline('tiny4')
  img = get_fixture('tiny4').nhwc('img')
  want = pipe.encode(jnp.asarray(jnp.asarray(img, jnp.bfloat16), jnp.float32))
  for got in (pipe.encode(jnp.asarray(img, jnp.bfloat16)),
              pipe.encode(np.asarray(jnp.asarray(img, jnp.bfloat16)))):
    for a, b in zip(got, want):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with pytest.raises(ValueError, match='at least one image'):
    pipe.encode(np.zeros((0,) + img.shape[1:], np.float32))
  with pytest.raises(ValueError, match='dtype int32'):
    pipe.encode(np.zeros(img.shape, np.int32))


def test_to_torch_refuses_one_path_for_both_files(tmp_path):
  """to_torch(p, p) wrote the VQVAE, then the VAR over it: the VQVAE was lost silently."""
  with pytest.raises(ValueError, match='same file'):
    pipeline('tiny4').to_torch(tmp_path / 'x.pth', tmp_path / '.' / 'x.pth')
  assert not (tmp_path / 'x.pth').exists()
