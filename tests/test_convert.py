"""Reference state dicts <-> Flax params: bit-identical round trips, config inference,
the release files' key/shape coverage (shapes only), and every way a file can be wrong."""
import collections
import dataclasses
import json
import pickle
import zipfile

import jax
import numpy as np
import pytest
from conftest import FIXTURES, get_fixture

from var_jax.config import ModelConfig
from var_jax.convert import mapping, naming
from var_jax.convert.infer import infer_config
from var_jax.convert.torch_io import load_pth, save_pth
from var_jax.errors import CheckpointError

PARTS = (('vae', mapping.VQVAE), ('var', mapping.VAR))
_ABSTRACT = {}


def abstract(fx, what):
  key = (fx.name, what)
  if key not in _ABSTRACT:
    _ABSTRACT[key] = mapping.abstract_params(fx.config, what=what)
  return _ABSTRACT[key]


def part_config(cfg, what):
  return cfg.vae if what == mapping.VQVAE else cfg.var


def assert_same_state_dict(a, b):
  assert list(a) == list(b)
  for k in a:
    x, y = np.asarray(a[k]), np.asarray(b[k])
    assert x.dtype == y.dtype and x.shape == y.shape, k
    assert x.tobytes() == y.tobytes(), k


@pytest.mark.parametrize('part,what', PARTS)
def test_round_trip_is_bit_identical(fx, part, what, tmp_path):
  sd = getattr(fx, f'{part}_sd')
  params, buffers = mapping.state_dict_to_params(sd, abstract(fx, what), what=what,
                                                 config=part_config(fx.config, what))
  assert set(buffers) == {k for k in sd if k in mapping.expected_buffers(
      params, what=what, config=part_config(fx.config, what))}
  back = mapping.params_to_state_dict(params, buffers)
  assert_same_state_dict(sd, back)
  if what == mapping.VAR:
    assert back['lvl_1L'].dtype == np.int64
  # through our .pth writer and reader
  save_pth(back, tmp_path / f'{part}.pth')
  assert_same_state_dict(sd, load_pth(tmp_path / f'{part}.pth'))


@pytest.mark.parametrize('part,what', PARTS)
def test_regenerated_buffers(fx, part, what):
  """Without kept buffers, export regenerates them; the derived VAR ones equal the file's."""
  sd = getattr(fx, f'{part}_sd')
  params, _ = mapping.state_dict_to_params(sd, abstract(fx, what), what=what)
  back = mapping.params_to_state_dict(params, None, config=part_config(fx.config, what))
  assert list(back) == list(sd)
  for k, v in back.items():
    if what == mapping.VQVAE and k == 'quantize.ema_vocab_hit_SV':
      assert v.shape == sd[k].shape and not v.any()  # a training statistic: zeros
    else:
      assert v.dtype == sd[k].dtype and v.tobytes() == sd[k].tobytes(), k
  with pytest.raises(ValueError, match='no config'):
    mapping.params_to_state_dict(params, None)


def test_pth_writer_layout(tmp_path):
  """Our writer produces torch's archive layout and only the whitelisted globals."""
  fx = get_fixture('tiny4')
  save_pth(fx.var_sd, tmp_path / 'model.pth')
  with zipfile.ZipFile(tmp_path / 'model.pth') as zf:
    names = zf.namelist()
    assert names[0] == 'model/data.pkl' and 'model/version' in names
    assert zf.read('model/byteorder') == b'little' and zf.read('model/version') == b'3\n'
    assert all(i.compress_type == zipfile.ZIP_STORED for i in zf.infolist())
    import pickletools
    ops = pickletools.genops(zf.read('model/data.pkl'))
    globals_ = {arg for op, arg, _ in ops if op.name == 'GLOBAL'}
  assert globals_ == {'collections OrderedDict', 'torch._utils _rebuild_tensor_v2',
                      'torch FloatStorage', 'torch LongStorage'}
  data = (tmp_path / 'model.pth').read_bytes()
  with zipfile.ZipFile(tmp_path / 'model.pth') as zf:
    for info in zf.infolist():  # 64-byte aligned records, like torch.save
      n, e = int.from_bytes(data[info.header_offset + 26:info.header_offset + 28], 'little'), \
          int.from_bytes(data[info.header_offset + 28:info.header_offset + 30], 'little')
      assert (info.header_offset + 30 + n + e) % 64 == 0, info.filename


def test_pth_writer_dtypes_and_scalars(tmp_path):
  import ml_dtypes
  sd = collections.OrderedDict(
      a=np.arange(6, dtype=np.int64).reshape(2, 3), s=np.float32(3.5),
      h=np.linspace(0, 1, 5).astype(np.float16), b=np.ones((2, 2), ml_dtypes.bfloat16),
      t=np.arange(6, dtype='>f4').reshape(2, 3).T)  # big-endian, non-contiguous
  save_pth(sd, tmp_path / 'x.pth')
  back = load_pth(tmp_path / 'x.pth')
  assert list(back) == list(sd)
  for k in sd:
    assert back[k].shape == np.shape(sd[k]) and np.array_equal(back[k], sd[k]), k
  assert back['s'].shape == () and back['b'].dtype == ml_dtypes.bfloat16


# --- config inference --------------------------------------------------------------

def test_infer_config_matches_fixture(fx):
  cfg = fx.config
  got = infer_config(fx.vae_sd, fx.var_sd, patch_nums=cfg.patch_nums)
  assert got.vae == dataclasses.replace(cfg.vae, quant_resi=fx.raw_config['vae']['quant_resi'])
  determined = ('num_classes', 'depth', 'embed_dim', 'num_heads', 'mlp_ratio', 'shared_aln',
                'attn_l2_norm', 'patch_nums')
  for f in determined:
    assert getattr(got.var, f) == getattr(cfg.var, f), f


def test_infer_patch_nums():
  t10, t4 = get_fixture('tiny10'), get_fixture('tiny4')
  assert infer_config(t10.vae_sd, t10.var_sd).patch_nums == t10.config.patch_nums  # L = 680
  with pytest.raises(ValueError, match='pass a config'):
    infer_config(t4.vae_sd, t4.var_sd)  # L = 30: not a release schedule
  assert infer_config(t4.vae_sd, t4.var_sd, patch_nums=(1, 2, 3, 4)).var.L == 30
  with pytest.raises(ValueError, match='not a matching pair'):
    infer_config(t10.vae_sd, {**t10.var_sd, 'head.weight': np.zeros((7, 64), np.float32)})


def _release():
  return json.loads((FIXTURES / 'release_shapes.json').read_text())['models']


def _shape_sd(entry):
  return {k: jax.ShapeDtypeStruct(tuple(v['shape']), np.dtype(v['dtype']))
          for k, v in entry['state_dict'].items()}


@pytest.mark.parametrize('name', ['var_d16.pth', 'var_d20.pth', 'var_d24.pth', 'var_d30.pth',
                                  'var_d36.pth'])
@pytest.mark.slow
def test_release_files_map_completely(name):
  """Each released VAR (and the VQVAE with it): inferred config = its constructor, and the
  converter places every key with the right shape (eval_shape only, nothing allocated)."""
  models = _release()
  vae_entry, var_entry = models['vae_ch160v4096z32.pth'], models[name]
  vae_sd, var_sd = _shape_sd(vae_entry), _shape_sd(var_entry)
  cfg = infer_config(vae_sd, var_sd)
  ctor = var_entry['constructor']
  for k, v in ctor.items():
    if k in {f.name for f in dataclasses.fields(cfg.var)}:
      assert getattr(cfg.var, k) == (tuple(v) if isinstance(v, list) else v), k
  parts = [('var', mapping.VAR, var_sd, var_entry)]
  if name == 'var_d16.pth':  # one VQVAE check is enough
    parts.append(('vae', mapping.VQVAE, vae_sd, vae_entry))
  for part, what, sd, entry in parts:
    abstract_tree = mapping.abstract_params(cfg, what=what)
    params, buffers = mapping.state_dict_to_params(sd, abstract_tree, what=what,
                                                   config=part_config(cfg, what))
    flat = naming.flatten(params)
    assert jax.tree.map(lambda a: a.shape, params) == jax.tree.map(lambda a: a.shape, abstract_tree)
    assert sum(int(np.prod(a.shape)) for a in flat.values()) == entry['num_parameters']
    kinds = {k for k, v in entry['state_dict'].items() if v['kind'] == 'buffer'}
    assert set(buffers) == kinds
    # the export side names and orders keys like the reference
    keys = [naming.path_to_torch_key(p) for p in flat] + list(buffers)
    assert sorted(keys, key=mapping.reference_sort_key) == list(entry['state_dict'])


# --- errors ------------------------------------------------------------------------

def _convert(fx, sd, what=mapping.VQVAE):
  return mapping.state_dict_to_params(sd, abstract(fx, what), what=what,
                                      config=part_config(fx.config, what))


def test_missing_key_is_named():
  fx = get_fixture('tiny4')
  sd = dict(fx.vae_sd)
  del sd['decoder.conv_out.weight']
  with pytest.raises(ValueError, match=r'decoder\.conv_out\.weight: missing .*\(3, 32, 3, 3\)'):
    _convert(fx, sd)


def test_unexpected_key_is_named():
  fx = get_fixture('tiny4')
  sd = dict(fx.var_sd)
  sd['blocks.7.attn.proj.weight'] = np.zeros((64, 64), np.float32)
  with pytest.raises(ValueError, match=r'blocks\.7\.attn\.proj\.weight: unexpected'):
    _convert(fx, sd, mapping.VAR)


def test_wrong_shape_names_both_shapes():
  fx = get_fixture('tiny4')
  sd = dict(fx.var_sd)
  sd['head.weight'] = np.zeros((65, 64), np.float32)
  with pytest.raises(ValueError) as e:
    _convert(fx, sd, mapping.VAR)
  msg = str(e.value)
  assert 'head.weight' in msg and '(65, 64)' in msg and '(64, 64)' in msg
  sd = dict(fx.var_sd)
  sd['attn_bias_for_masking'] = np.zeros((1, 1, 29, 29), np.float32)
  with pytest.raises(ValueError, match=r'attn_bias_for_masking.*\(1, 1, 29, 29\).*\(1, 1, 30, 30\)'):
    _convert(fx, sd, mapping.VAR)


def test_wrong_config_is_reported():
  """A config that does not match the weights lists keys with both shapes."""
  fx = get_fixture('tiny4')
  raw = json.loads(json.dumps(fx.raw_config))
  raw['vae']['ch'] = 64
  with pytest.raises(ValueError) as e:
    mapping.state_dict_to_params(fx.vae_sd, mapping.abstract_params(ModelConfig.from_dict(raw),
                                                                     what=mapping.VQVAE))
  msg = str(e.value)
  assert 'encoder.conv_in.weight: checkpoint shape (32, 3, 3, 3), expected (64, 3, 3, 3)' in msg


def _zip_with_pickle(path, payload: bytes):
  with zipfile.ZipFile(path, 'w') as zf:
    zf.writestr('evil/data.pkl', payload)
    zf.writestr('evil/version', b'3\n')


def test_corrupt_and_unsafe_files_are_refused(tmp_path):
  src = (FIXTURES / 'tiny4' / 'var.pth').read_bytes()
  (tmp_path / 'trunc.pth').write_bytes(src[:len(src) // 2])
  (tmp_path / 'noise.pth').write_bytes(np.random.default_rng(0).bytes(4096))
  for name in ('trunc.pth', 'noise.pth'):
    with pytest.raises(CheckpointError):
      load_pth(tmp_path / name)

  class Evil:
    def __reduce__(self):
      import os
      return (os.system, ('echo pwned > ' + str(tmp_path / 'pwned'),))
  _zip_with_pickle(tmp_path / 'evil.pth', pickle.dumps(collections.OrderedDict(x=Evil()), protocol=2))
  with pytest.raises(CheckpointError, match='refusing to unpickle'):
    load_pth(tmp_path / 'evil.pth')
  assert not (tmp_path / 'pwned').exists()
  _zip_with_pickle(tmp_path / 'bad.pth', b'\x80\x02garbage')
  with pytest.raises(CheckpointError):
    load_pth(tmp_path / 'bad.pth')
  with pytest.raises(FileNotFoundError):
    load_pth(tmp_path / 'absent.pth')
  assert issubclass(CheckpointError, ValueError)
