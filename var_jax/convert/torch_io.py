"""Read and write PyTorch `.pth` files without torch and without running pickled code.

Two layouts are read, under the same rules:
- zip (torch >= 1.6): `<stem>/data.pkl` (the pickle), `<stem>/data/<key>` (one raw
  storage per key), `<stem>/byteorder`, `<stem>/version`.
- legacy (torch < 1.6, or `_use_new_zipfile_serialization=False`; pytorch-fid's
  Inception weights are one): pickles back to back (the magic number, protocol 1001,
  system info, the object, the list of storage keys), then per key an int64 element
  count and the raw bytes.

The pickles go through `pth_pickle`, which builds plain values and lets REDUCE call
only the tensor rebuild functions, OrderedDict and torch.Size. Before any array is
made, every storage is checked against the bytes the file holds for it (exact
length, inside the file, uncompressed) and every tensor's dtype, size, stride and
offset against its storage, so a crafted file can neither read out of bounds nor
make a large allocation: all arrays together hold at most twice the bytes of the
storages read, plus 64 MiB for small broadcast views. Identical views of one storage
come back as one array (tied weights stay tied, as with torch.load). Every failure is
a one-line `CheckpointError` naming the file and, where known, the key.

`save_pth` writes the zip layout (protocol-2 pickle naming those globals through
stand-ins, one 64-byte aligned storage record per tensor), which
`torch.load(path, weights_only=True)` accepts.
"""
from __future__ import annotations

import collections
import io
import mmap
import os
import pickle
import zipfile
from typing import Any, Dict, Mapping

import numpy as np

from var_jax.convert import pth_pickle, pth_tensors
from var_jax.convert.pth_tensors import short
from var_jax.errors import CheckpointError

__all__ = ['CheckpointError', 'load_pth', 'load_pth_object', 'save_pth']

_LEGACY_MAGIC, _LEGACY_PROTOCOL = 0x1950a86a20f9469cfc6c, 1001

# --- the two layouts -----------------------------------------------------------------

def _zip_guard(fn, what: str):
  """Runs a zipfile call; the many ways a damaged archive fails become CheckpointError."""
  try:
    return fn()
  except MemoryError:
    raise
  except Exception as e:  # zipfile raises BadZipFile, struct.error, OSError, zlib.error, ...
    msg = ' '.join(str(e).split())[:200]
    raise CheckpointError(f'damaged zip archive ({what}: {type(e).__name__}: {msg})') from None


def _zip_read(zf: zipfile.ZipFile, name: str, limit: int, expect: int | None = None) -> bytes:
  """The bytes of one entry, checked against the archive's size first (no large read)."""
  info = zf.NameToInfo.get(name)
  if info is None:
    raise CheckpointError(f'{name} is missing from the archive')
  if info.compress_type != zipfile.ZIP_STORED:  # torch.save never compresses
    raise CheckpointError(f'{name} is compressed; torch archives store entries uncompressed')
  if info.file_size != info.compress_size or info.file_size > limit:
    raise CheckpointError(f'{name} claims {info.file_size} bytes, more than the archive holds')
  if expect is not None and info.file_size != expect:
    raise CheckpointError(f'{name} holds {info.file_size} bytes, its declaration says {expect}')

  def read():
    with zf.open(info) as f:
      return f.read(info.file_size)
  data = _zip_guard(read, name)
  if len(data) != info.file_size:
    raise CheckpointError(f'{name} is truncated')
  return data


def _load_zip(path: str):
  size = os.path.getsize(path)
  zf = _zip_guard(lambda: zipfile.ZipFile(path), 'central directory')
  with zf:
    pkls = [n for n in zf.NameToInfo if n.endswith('/data.pkl') or n == 'data.pkl']
    if len(pkls) != 1:
      raise CheckpointError(f'expected one data.pkl in the archive, found {len(pkls)}')
    prefix = pkls[0][:-len('data.pkl')]
    order = b'little'
    if f'{prefix}byteorder' in zf.NameToInfo:
      order = _zip_read(zf, f'{prefix}byteorder', size).strip()
      if order not in (b'little', b'big'):
        raise CheckpointError(f'{prefix}byteorder is neither little nor big')
    declared = pth_tensors.Declared(legacy=False)
    obj, _ = pth_pickle.load(_zip_read(zf, pkls[0], size), globals_=pth_tensors.GLOBALS,
                             persistent_load=declared)
    read = lambda s: _zip_read(zf, f'{prefix}data/{s.key}', size, s.numel * s.dtype.itemsize)
    return pth_tensors.materialize(obj, read, order == b'big')


def _no_persistent_ids(pid):
  raise CheckpointError(f'unexpected persistent id (a {type(pid).__name__})')


def _load_legacy(path: str):
  no_globals = dict(globals_={}, persistent_load=_no_persistent_ids)
  with open(path, 'rb') as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
    magic, pos = pth_pickle.load(mm, 0, **no_globals)
    if magic != _LEGACY_MAGIC:
      raise CheckpointError('not a torch file (no zip archive, wrong legacy magic number)')
    protocol, pos = pth_pickle.load(mm, pos, **no_globals)
    info, pos = pth_pickle.load(mm, pos, **no_globals)
    if type(protocol) is not int or protocol != _LEGACY_PROTOCOL or \
        not isinstance(info, dict) or type(info.get('little_endian')) is not bool:
      raise CheckpointError('unsupported legacy torch format (protocol '
                            f'{short(protocol) if type(protocol) is int else "?"})')
    order = 'little' if info['little_endian'] else 'big'
    declared = pth_tensors.Declared(legacy=True)
    obj, pos = pth_pickle.load(mm, pos, globals_=pth_tensors.GLOBALS, persistent_load=declared)
    keys, pos = pth_pickle.load(mm, pos, **no_globals)
    if type(keys) is not list or not all(type(k) is str for k in keys) or \
        len(set(keys)) != len(keys):
      raise CheckpointError('the legacy storage key list is malformed')
    records = {}
    for key in keys:
      st = declared.roots.get(key)
      if st is None:
        raise CheckpointError(f'storage {short(key)!r} has data but was never '
                              'declared')
      if len(mm) - pos < 8:
        raise CheckpointError(f'truncated before storage {short(key)!r}')
      count = int.from_bytes(mm[pos:pos + 8], order, signed=True)
      nbytes = count * st.dtype.itemsize
      if count != st.numel or nbytes > len(mm) - pos - 8:
        raise CheckpointError(f'storage {short(key)!r} holds {count} elements in '
                              f'{len(mm) - pos - 8} bytes left, declared {st.numel}')
      records[key] = pos + 8
      pos += 8 + nbytes

    def read(st):
      if st.key not in records:
        raise CheckpointError(f'storage {short(st.key)!r} has no data in the file')
      return mm[records[st.key]:records[st.key] + st.numel * st.dtype.itemsize]
    return pth_tensors.materialize(obj, read, order == 'big')


def load_pth_object(path: str | os.PathLike) -> Any:
  """Returns what `torch.save` stored in `path`, tensors as numpy arrays (containers:
  dict/OrderedDict, list, tuple; leaves: arrays, str, numbers, None)."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'checkpoint not found: {path}')
  with open(path, 'rb') as f:
    head = f.read(512)
  try:
    if head[:4] == b'PK\x03\x04':
      return _load_zip(path)
    if head[:1] == b'\x80':
      return _load_legacy(path)
    if head[257:262] == b'ustar':
      raise CheckpointError("torch's pre-2018 tar format is not supported; re-save the "
                            'weights with a current torch')
    raise CheckpointError('not a readable torch zip or legacy checkpoint (it starts with '
                          'neither a zip header nor a pickle)')
  except CheckpointError as e:
    raise CheckpointError(f'{path}: {e}') from None


def _flatten(obj: Mapping, prefix: str, out: Dict[str, np.ndarray]) -> None:
  for k, v in obj.items():
    name = f'{prefix}{k}'
    if type(k) is not str:
      raise CheckpointError(f'key {short(name, 200)!r} is not a string')
    if isinstance(v, dict):
      _flatten(v, name + '.', out)
    elif not isinstance(v, np.ndarray):
      raise CheckpointError(f'{short(name, 200)!r} holds a {type(v).__name__}: not a state '
                            'dict of tensors')
    elif name in out:
      raise CheckpointError(f'key {short(name, 200)!r} appears twice once nested dicts '
                            'are flattened')
    else:
      out[name] = v


def load_pth(path: str | os.PathLike) -> Dict[str, np.ndarray]:
  """Returns the state dict in `path` as an ordered {key: numpy array}. A trainer
  checkpoint {'model': state_dict, ...} gives its state dict; nested dicts of
  tensors are flattened with dotted keys, as torch names submodules."""
  obj = load_pth_object(path)
  if isinstance(obj, dict) and isinstance(obj.get('model'), dict):
    obj = obj['model']  # a trainer checkpoint wrapping the state dict
  out: Dict[str, np.ndarray] = collections.OrderedDict()
  try:
    if not isinstance(obj, dict):
      raise CheckpointError(f'holds a {type(obj).__name__}, not a state dict of tensors')
    _flatten(obj, '', out)
  except CheckpointError as e:
    raise CheckpointError(f'{os.fspath(path)}: {e}') from None
  return out


# --- writer ------------------------------------------------------------------

_NP_TO_STORAGE = {np.dtype(v).str: k for k, v in pth_tensors.STORAGE_DTYPES.items()
                  if v != 'bfloat16'}
_ALIGN = 64  # torch aligns every storage record to 64 bytes (mmap-friendly)


class _Global:
  """Stand-in for a torch global (`module.name`), pickled as a GLOBAL opcode."""

  def __init__(self, module: str, name: str):
    self.module, self.name = module, name

  def __call__(self, *a, **k):  # pickle requires reduce functions to be callable
    raise TypeError(f'{self.module}.{self.name} is a pickling stand-in')


_REBUILD_V2 = _Global('torch._utils', '_rebuild_tensor_v2')
_STORAGE_GLOBALS = {name: _Global('torch', name) for name in pth_tensors.STORAGE_DTYPES}


class _OutStorage:
  def __init__(self, key: str, type_name: str, numel: int):
    self.key, self.type_name, self.numel = key, type_name, numel


class _OutTensor:
  """A tensor as torch pickles it: _rebuild_tensor_v2(storage, 0, size, stride, False, {})."""

  def __init__(self, storage: _OutStorage, shape):
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
    if isinstance(obj, _OutStorage):
      return ('storage', _STORAGE_GLOBALS[obj.type_name], obj.key, 'cpu', obj.numel)
    return None


def _storage_name(arr: np.ndarray) -> str:
  if arr.dtype == pth_tensors.np_dtype('bfloat16'):
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
    items[str(key)] = _OutTensor(_OutStorage(str(i), name, arr.size), arr.shape)
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
