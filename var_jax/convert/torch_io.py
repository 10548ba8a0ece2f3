"""Read PyTorch `.pth` state dicts without torch and without running pickled code.

A `torch.save(state_dict)` file is a zip archive: `<stem>/data.pkl` (a pickle of an
OrderedDict of tensors), `<stem>/data/<key>` (raw little-endian storages) and
`<stem>/version`. The unpickler below resolves only the handful of globals such a
file needs (OrderedDict, _rebuild_tensor_v2, the typed storages) and refuses every
other one, so a malicious checkpoint cannot execute code.
"""
from __future__ import annotations

import collections
import io
import os
import pickle
import zipfile
from typing import Dict

import numpy as np

_STORAGE_DTYPES = {
    'FloatStorage': np.float32,
    'DoubleStorage': np.float64,
    'HalfStorage': np.float16,
    'LongStorage': np.int64,
    'IntStorage': np.int32,
    'ShortStorage': np.int16,
    'CharStorage': np.int8,
    'ByteStorage': np.uint8,
    'BoolStorage': np.bool_,
}


class CheckpointError(ValueError):
  """A checkpoint file that cannot be read (corrupt, truncated, unsafe or unsupported)."""


class _StorageType:
  def __init__(self, name: str):
    self.name = name


def _bf16_dtype():
  import ml_dtypes  # shipped with jax
  return np.dtype(ml_dtypes.bfloat16)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
  del requires_grad, backward_hooks, metadata
  size, stride = tuple(size), tuple(stride)
  itemsize = storage.dtype.itemsize
  if not size:
    return storage[storage_offset:storage_offset + 1].reshape(()).copy()
  return np.lib.stride_tricks.as_strided(
      storage[storage_offset:], shape=size,
      strides=tuple(s * itemsize for s in stride)).copy()


class _SafeUnpickler(pickle.Unpickler):
  """Resolves the few globals of a state-dict pickle; anything else is refused."""

  def __init__(self, fp, read_storage):
    super().__init__(fp)
    self._read_storage = read_storage

  def find_class(self, module, name):
    if (module, name) == ('collections', 'OrderedDict'):
      return collections.OrderedDict
    if (module, name) in (('torch._utils', '_rebuild_tensor_v2'), ('torch._utils', '_rebuild_tensor')):
      return _rebuild_tensor_v2
    if module == 'torch' and (name in _STORAGE_DTYPES or name == 'BFloat16Storage'):
      return _StorageType(name)
    raise CheckpointError(
        f'refusing to unpickle {module}.{name}: a state dict holds only tensors '
        '(this file is not a plain torch.save(state_dict) or is unsafe)')

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and pid and pid[0] == 'storage'):
      raise CheckpointError(f'unsupported persistent id {pid!r}')
    _, storage_type, key, _location, numel = pid
    name = storage_type.name if isinstance(storage_type, _StorageType) else str(storage_type)
    dtype = _bf16_dtype() if name == 'BFloat16Storage' else np.dtype(_STORAGE_DTYPES[name])
    return self._read_storage(str(key), dtype, int(numel))


def load_pth(path: str | os.PathLike) -> Dict[str, np.ndarray]:
  """Returns the state dict in `path` as an ordered {key: numpy array}."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'checkpoint not found: {path}')
  try:
    zf = zipfile.ZipFile(path)
  except (zipfile.BadZipFile, OSError) as e:
    raise CheckpointError(
        f'{path} is not a readable torch zip checkpoint ({e}); legacy non-zip '
        'torch files are not supported') from e
  with zf:
    names = zf.namelist()
    pkls = [n for n in names if n.endswith('/data.pkl') or n == 'data.pkl']
    if len(pkls) != 1:
      raise CheckpointError(f'{path}: expected one data.pkl in the archive, found {len(pkls)}')
    prefix = pkls[0][:-len('data.pkl')]

    def read_storage(key, dtype, numel):
      try:
        raw = zf.read(f'{prefix}data/{key}')
      except KeyError as e:
        raise CheckpointError(f'{path}: storage {key} is missing from the archive') from e
      if len(raw) < numel * dtype.itemsize:
        raise CheckpointError(
            f'{path}: storage {key} is truncated ({len(raw)} bytes < {numel}x{dtype.itemsize})')
      return np.frombuffer(raw, dtype=dtype, count=numel)

    try:
      obj = _SafeUnpickler(io.BytesIO(zf.read(pkls[0])), read_storage).load()
    except CheckpointError:
      raise
    except (zipfile.BadZipFile, pickle.UnpicklingError, EOFError, ValueError, TypeError,
            KeyError, OSError) as e:
      raise CheckpointError(f'{path}: corrupt checkpoint ({type(e).__name__}: {e})') from e
  if isinstance(obj, dict) and 'model' in obj and isinstance(obj['model'], dict):
    obj = obj['model']  # a trainer checkpoint wrapping the state dict
  if not isinstance(obj, dict) or not all(isinstance(v, np.ndarray) for v in obj.values()):
    raise CheckpointError(f'{path}: does not hold a state dict of tensors')
  return collections.OrderedDict(obj)
