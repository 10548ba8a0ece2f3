"""The safe `.pth` reader: files written by real torch in both layouts, and crafted
files that must be refused with a one-line CheckpointError naming the file and key.

tests/data/torch_legacy.pth, torch_zip.pth and torch_expected.npz were made once with
torch 2.14.1 (CPU, Python 3.11) in a throwaway venv, torch never being a dependency,
by running this with `python make.py tests/data`:

  import collections, sys
  import numpy as np
  import torch
  torch.manual_seed(0)
  net = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 1), torch.nn.BatchNorm2d(3))
  net[1].num_batches_tracked += 7
  sd = net.state_dict()                                  # OrderedDict with _metadata; 0-d int64
  base = torch.arange(12, dtype=torch.float32)
  sd['shared.full'] = base.view(3, 4)                    # these three share one storage
  sd['shared.cols'] = base.view(3, 4)[:, 1::2]           # non-contiguous, offset 1
  sd['shared.t'] = base.view(3, 4).t()                   # transposed
  sd['tied.a'] = sd['tied.b'] = torch.randn(2, 2)        # one tensor under two keys
  for name, dt in [('f16', torch.float16), ('bf16', torch.bfloat16), ('f64', torch.float64),
                   ('i32', torch.int32), ('i16', torch.int16), ('i8', torch.int8),
                   ('u8', torch.uint8)]:
    sd[f'dtype.{name}'] = (torch.randn(5) * 50).to(dt)
  sd['dtype.bool'] = torch.tensor([True, False, True])
  sd['dtype.c64'] = torch.randn(2, dtype=torch.complex64)
  sd['empty'] = torch.zeros(0, 3)
  sd['param'] = torch.nn.Parameter(torch.ones(2))        # _rebuild_parameter
  sd['nested'] = collections.OrderedDict(x=torch.tensor([1.5, -2.0]))
  zip_only = collections.OrderedDict(sd)                 # dtypes the legacy format cannot hold
  zip_only['dtype.u16'] = torch.tensor([0, 1, 300, 65535], dtype=torch.int32).to(torch.uint16)
  zip_only['dtype.f8'] = torch.tensor([0.5, -1.0, 448.0]).to(torch.float8_e4m3fn)
  torch.save(sd, sys.argv[1] + '/torch_legacy.pth', _use_new_zipfile_serialization=False)
  torch.save(zip_only, sys.argv[1] + '/torch_zip.pth')

  def flat(d, prefix=''):
    for k, v in d.items():
      if isinstance(v, dict):
        yield from flat(v, f'{prefix}{k}.')
      elif v.dtype in (torch.bfloat16, torch.float8_e4m3fn):  # npz has no such dtypes: raw bits
        bits = torch.uint8 if v.element_size() == 1 else torch.int16
        yield f'{prefix}{k}', v.detach().view(bits).numpy()
      else:
        yield f'{prefix}{k}', v.detach().numpy()
  np.savez(sys.argv[1] + '/torch_expected.npz', **dict(flat(zip_only)))
"""
import collections
import pathlib
import pickle
import re

import ml_dtypes
import numpy as np
import pytest

import pth_files
from var_jax.convert.torch_io import load_pth, load_pth_object, save_pth
from var_jax.errors import CheckpointError

DATA = pathlib.Path(__file__).parent / 'data'
LEGACY_ONLY_MISSING = {'dtype.u16', 'dtype.f8'}  # dtypes without a typed storage


def expected():
  with np.load(DATA / 'torch_expected.npz') as z:
    return {k: z[k] for k in z.files}


def as_stored(v: np.ndarray) -> np.ndarray:
  """bf16/fp8 arrays as the raw bits the npz keeps."""
  if v.dtype == ml_dtypes.bfloat16:
    return v.view(np.int16)
  if v.dtype == ml_dtypes.float8_e4m3fn:
    return v.view(np.uint8)
  return v


@pytest.mark.parametrize('name', ['torch_legacy.pth', 'torch_zip.pth'])
def test_real_torch_files(name):
  """Every tensor torch wrote, bit for bit: views, offsets, shared storages, all dtypes."""
  sd, want = load_pth(DATA / name), expected()
  missing = LEGACY_ONLY_MISSING if 'legacy' in name else set()
  assert list(sd) == [k for k in want if k not in missing]
  for k, v in sd.items():
    got = as_stored(v)
    assert got.dtype == want[k].dtype and got.shape == want[k].shape, k
    assert got.tobytes() == want[k].tobytes(), k
    assert v.flags.c_contiguous and v.flags.writeable, k
  assert sd['dtype.bf16'].dtype == ml_dtypes.bfloat16
  assert sd['tied.a'] is sd['tied.b']  # one tensor under two keys stays one array
  np.testing.assert_array_equal(sd['shared.cols'], [[1, 3], [5, 7], [9, 11]])
  assert sd['1.num_batches_tracked'].shape == () and sd['1.num_batches_tracked'] == 7
  assert sd['nested.x'].tolist() == [1.5, -2.0]


def test_object_keeps_nesting():
  obj = load_pth_object(DATA / 'torch_legacy.pth')
  assert type(obj) is collections.OrderedDict and type(obj['nested']) is collections.OrderedDict
  assert obj['nested']['x'].dtype == np.float32


def test_round_trip_of_real_file(tmp_path):
  sd = load_pth(DATA / 'torch_zip.pth')
  sd = {k: v for k, v in sd.items() if k not in LEGACY_ONLY_MISSING}  # no typed storage
  save_pth(sd, tmp_path / 'again.pth')
  back = load_pth(tmp_path / 'again.pth')
  assert list(back) == list(sd)
  for k in sd:
    assert back[k].dtype == sd[k].dtype and back[k].tobytes() == sd[k].tobytes(), k


@pytest.mark.parametrize('name,build,pattern', pth_files.CRAFTED,
                         ids=[c[0] for c in pth_files.CRAFTED])
def test_crafted_file_is_refused(tmp_path, name, build, pattern):
  path = tmp_path / f'{name}.pth'
  build(path)
  with pytest.raises(CheckpointError) as e:
    load_pth(path)
  msg = str(e.value)
  assert msg.startswith(f'{path}: ') and '\n' not in msg and len(msg) < 400, msg
  assert re.search(pattern, msg), msg


def test_legacy_storage_view_and_big_endian(tmp_path):
  """Pre-1.0 storage views, and a file saved on a big-endian machine."""
  view = pth_files.Storage('0', numel=4, view=('v', 1, 2))
  pkl = pth_files.state_pickle({'w': pth_files.View(view, 0, (2,), (1,))}, legacy=True)
  data = np.arange(4, dtype='<f4').tobytes()
  pth_files.write_legacy(tmp_path / 'le.pth', pkl, {'0': (4, data)})
  assert load_pth(tmp_path / 'le.pth')['w'].tolist() == [1.0, 2.0]
  info = dict(pth_files.SYS_INFO, little_endian=False)
  with open(tmp_path / 'be.pth', 'wb') as f:
    for header in (pth_files.LEGACY_MAGIC, pth_files.LEGACY_PROTOCOL, info):
      f.write(pickle.dumps(header, protocol=2))
    f.write(pkl + pickle.dumps(['0'], protocol=2))
    f.write((4).to_bytes(8, 'big') + np.arange(4, dtype='>f4').tobytes())
  got = load_pth(tmp_path / 'be.pth')['w']
  assert got.dtype == np.float32 and got.dtype.isnative and got.tolist() == [1.0, 2.0]


def test_trainer_checkpoint_and_nested_dicts(tmp_path):
  w = pth_files.View(pth_files.Storage('0', numel=2), 0, (2,), (1,))
  pth_files.write_zip(tmp_path / 'ckpt.pth', pth_files.state_pickle(
      {'model': collections.OrderedDict(enc={'w': w}), 'epoch': 3}),
      {'0': np.array([1, 2], '<f4').tobytes()})
  assert load_pth(tmp_path / 'ckpt.pth')['enc.w'].tolist() == [1.0, 2.0]
  pth_files.write_zip(tmp_path / 'extra.pth', pth_files.state_pickle({'w': w, 'epoch': 3}),
                      {'0': np.array([1, 2], '<f4').tobytes()})
  with pytest.raises(CheckpointError, match="'epoch' holds a int: not a state dict of tensors"):
    load_pth(tmp_path / 'extra.pth')
  assert load_pth_object(tmp_path / 'extra.pth')['epoch'] == 3
