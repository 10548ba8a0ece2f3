"""Read and write PyTorch `.pth` state dicts without torch and without running pickled code.

A `torch.save(state_dict)` file is a zip archive: `<stem>/data.pkl` (a pickle of an
OrderedDict of tensors), `<stem>/data/<key>` (raw little-endian storages) and
`<stem>/version`. The unpickler below resolves only the handful of globals such a
file needs (OrderedDict, _rebuild_tensor_v2, the typed storages) and refuses every
other one, so a malicious checkpoint cannot execute code.

`save_pth` writes the same format (protocol-2 pickle naming those globals through
stand-ins, one 64-byte aligned storage record per tensor), which
`torch.load(path, weights_only=True)` accepts.
"""
from __future__ import annotations

import collections
import io
import os
import pickle
import zipfile
from typing import Dict, Mapping

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


# --- writer ------------------------------------------------------------------

_NP_TO_STORAGE = {np.dtype(v).str: k for k, v in _STORAGE_DTYPES.items()}
_ALIGN = 64  # torch aligns every storage record to 64 bytes (mmap-friendly)


class _Global:
  """Stand-in for a torch global (`module.name`), pickled as a GLOBAL opcode."""

  def __init__(self, module: str, name: str):
    self.module, self.name = module, name

  def __call__(self, *a, **k):  # pickle requires reduce functions to be callable
    raise TypeError(f'{self.module}.{self.name} is a pickling stand-in')


_REBUILD_V2 = _Global('torch._utils', '_rebuild_tensor_v2')
_STORAGE_GLOBALS = {name: _Global('torch', name) for name in list(_STORAGE_DTYPES) + ['BFloat16Storage']}


class _Storage:
  def __init__(self, key: str, type_name: str, numel: int):
    self.key, self.type_name, self.numel = key, type_name, numel


class _Tensor:
  """A tensor as torch pickles it: _rebuild_tensor_v2(storage, 0, size, stride, False, {})."""

  def __init__(self, storage: _Storage, shape):
    self.storage, self.shape = storage, tuple(int(d) for d in shape)

  def __reduce_ex__(self, protocol):
    stride, acc = [], 1
    for d in reversed(self.shape):
      stride.append(acc)
      acc *= d
    return (_REBUILD_V2, (self.storage, 0, self.shape, tuple(reversed(stride)), False,
                          collections.OrderedDict()))


class _TorchPickler(pickle._Pickler):  # the pure-Python pickler lets us emit stand-in globals
  dispatch = dict(pickle._Pickler.dispatch)

  def _save_stand_in(self, obj):
    self.write(pickle.GLOBAL + f'{obj.module}\n{obj.name}\n'.encode('ascii'))
    self.memoize(obj)

  dispatch[_Global] = _save_stand_in

  def persistent_id(self, obj):
    if isinstance(obj, _Storage):
      return ('storage', _STORAGE_GLOBALS[obj.type_name], obj.key, 'cpu', obj.numel)
    return None


def _storage_name(arr: np.ndarray) -> str:
  if arr.dtype == _bf16_dtype():
    return 'BFloat16Storage'
  name = _NP_TO_STORAGE.get(arr.dtype.newbyteorder('<').str)
  if name is None:
    raise ValueError(f'cannot save dtype {arr.dtype} in a torch checkpoint')
  return name


def _write_aligned(zf: zipfile.ZipFile, name: str, data) -> None:
  """Writes one stored record whose data starts on a 64-byte boundary (like torch)."""
  info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
  info.compress_type = zipfile.ZIP_STORED
  size = len(data)
  zip64 = size * 1.05 > zipfile.ZIP64_LIMIT  # zipfile then adds a 20-byte zip64 extra
  start = zf.fp.tell() + 30 + len(name.encode('utf-8')) + (20 if zip64 else 0) + 4
  pad = -start % _ALIGN
  info.extra = b'FB' + pad.to_bytes(2, 'little') + b'Z' * pad
  zf.writestr(info, data)


def save_pth(state_dict: Mapping[str, np.ndarray], path: str | os.PathLike) -> None:
  """Writes `state_dict` ({key: array}) as a torch.save zip; readable by `load_pth`
  and by `torch.load(path, weights_only=True)`. Written to a temporary file first."""
  path = os.fspath(path)
  stem = os.path.splitext(os.path.basename(path))[0] or 'archive'
  arrays, items = [], collections.OrderedDict()
  for i, (key, value) in enumerate(state_dict.items()):
    arr = np.asarray(value)
    name = _storage_name(arr)
    arr = np.require(arr, dtype=arr.dtype.newbyteorder('<'), requirements='C')  # keeps 0-d
    items[str(key)] = _Tensor(_Storage(str(i), name, arr.size), arr.shape)
    arrays.append(arr)
  buf = io.BytesIO()
  _TorchPickler(buf, protocol=2).dump(items)
  tmp = f'{path}.tmp{os.getpid()}'
  try:
    with zipfile.ZipFile(tmp, 'w', compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
      _write_aligned(zf, f'{stem}/data.pkl', buf.getvalue())
      _write_aligned(zf, f'{stem}/.format_version', b'1')
      _write_aligned(zf, f'{stem}/.storage_alignment', str(_ALIGN).encode())
      _write_aligned(zf, f'{stem}/byteorder', b'little')
      for i, arr in enumerate(arrays):
        _write_aligned(zf, f'{stem}/data/{i}', memoryview(arr.reshape(-1).view(np.uint8)))
      _write_aligned(zf, f'{stem}/version', b'3\n')
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
