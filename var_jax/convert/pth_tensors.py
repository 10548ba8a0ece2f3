"""The tensors of a torch pickle: which globals it may name, the storages its
persistent ids declare, and the checks that turn (storage bytes, offset, size,
stride, dtype) into numpy arrays without ever reading outside the bytes present.

`GLOBALS` is everything `pth_pickle` may resolve: OrderedDict, torch.Size, the
tensor/parameter rebuild functions (which only record their arguments) and the
storage-type and dtype names. `Declared` is the persistent_load that registers
storages by key. `materialize` builds the arrays once the caller can read each
storage's bytes: it checks the storage length against the element size and every
tensor's reach (offset + sum((size - 1) * stride)) against the storage, refuses
negative values, and caps the arrays' total at twice the storages read plus 64 MiB,
so broadcast or overlapping views cannot blow up memory.
"""
from __future__ import annotations

import collections
import math
from typing import Callable, Dict, List, Tuple

import numpy as np

from var_jax.convert import pth_pickle
from var_jax.errors import CheckpointError

STORAGE_DTYPES = {  # the typed storages torch pickles, by the dtype they hold
    'FloatStorage': 'float32', 'DoubleStorage': 'float64', 'HalfStorage': 'float16',
    'BFloat16Storage': 'bfloat16', 'LongStorage': 'int64', 'IntStorage': 'int32',
    'ShortStorage': 'int16', 'CharStorage': 'int8', 'ByteStorage': 'uint8',
    'BoolStorage': 'bool', 'ComplexFloatStorage': 'complex64',
    'ComplexDoubleStorage': 'complex128'}
_TORCH_DTYPES = (  # dtypes _rebuild_tensor_v3 names (over an UntypedStorage)
    'float64', 'float32', 'float16', 'bfloat16', 'int64', 'int32', 'int16', 'int8', 'uint8',
    'bool', 'complex64', 'complex128', 'uint16', 'uint32', 'uint64', 'float8_e4m3fn',
    'float8_e5m2', 'float8_e4m3fnuz', 'float8_e5m2fnuz')
MAX_DEPTH = 32  # nesting of the saved object; a state dict needs 1 to 3
_MAX_NDIM = 32
_SLACK_BYTES = 64 << 20  # what broadcast (zero-stride) views may add beyond 2x the storages


def np_dtype(name: str) -> np.dtype:
  if name == 'bfloat16' or name.startswith('float8'):
    import ml_dtypes  # shipped with jax
    return np.dtype(getattr(ml_dtypes, name))
  return np.dtype(name)


class _Marker:
  """What a storage-type or dtype global unpickles to: only a name."""

  def __init__(self, kind: str, dtype: str):
    self.kind, self.dtype = kind, dtype


class _Storage:
  """A storage a persistent id declares: `numel` elements of `dtype` under `key`; a
  legacy storage view is the window [offset, offset + numel) of `base`."""

  def __init__(self, key: str, dtype: np.dtype, numel: int, base=None, offset: int = 0):
    self.key, self.dtype, self.numel, self.base, self.offset = key, dtype, numel, base, offset

  @property
  def root(self) -> '_Storage':
    return self.base or self


class _Tensor:
  """A tensor as pickled: a strided view of a storage, checked only when built."""

  def __init__(self, storage, offset, size, stride, dtype=None):
    if not isinstance(storage, _Storage):
      raise CheckpointError(f'a tensor is rebuilt from a {type(storage).__name__}, not a storage')
    self.storage, self.dtype = storage, storage.dtype if dtype is None else dtype
    self.offset = _int(offset, 'storage offset')
    self.size, self.stride = _ints(size, 'size'), _ints(stride, 'stride')


def _int(x, what: str) -> int:
  if type(x) is not int:
    raise CheckpointError(f'a tensor {what} is a {type(x).__name__}, not an integer')
  return x


def _ints(x, what: str) -> Tuple[int, ...]:
  if type(x) not in (tuple, list) or len(x) > _MAX_NDIM:
    raise CheckpointError(f'a tensor {what} is not a tuple of at most {_MAX_NDIM} integers')
  return tuple(_int(i, what) for i in x)


def _check_flags(requires_grad, hooks, metadata=None) -> None:
  if type(requires_grad) is not bool or not (hooks is None or isinstance(hooks, dict)):
    raise CheckpointError('a tensor rebuild has malformed requires_grad/hooks arguments')
  if metadata:  # conj/neg bits and the like change values: not supported
    raise CheckpointError('a tensor carries metadata flags this reader does not support')


def _rebuild_v1(storage, offset, size, stride):
  return _Tensor(storage, offset, size, stride)


def _rebuild_v2(storage, offset, size, stride, requires_grad, hooks, metadata=None):
  _check_flags(requires_grad, hooks, metadata)
  return _Tensor(storage, offset, size, stride)


def _rebuild_v3(storage, offset, size, stride, requires_grad, hooks, dtype, metadata=None):
  _check_flags(requires_grad, hooks, metadata)
  if not (isinstance(dtype, _Marker) and dtype.kind == 'dtype'):
    raise CheckpointError('_rebuild_tensor_v3 without a dtype')
  return _Tensor(storage, offset, size, stride, np_dtype(dtype.dtype))


def _rebuild_parameter(data, requires_grad, hooks, state=None):
  if not isinstance(data, _Tensor) or not (state is None or isinstance(state, dict)):
    raise CheckpointError('a parameter rebuilt from something that is not a tensor')
  _check_flags(requires_grad, hooks)
  return data


_C = pth_pickle.Callable
GLOBALS = {
    ('collections', 'OrderedDict'): _C('OrderedDict', collections.OrderedDict, 0, 0),
    ('torch._utils', '_rebuild_tensor'): _C('_rebuild_tensor', _rebuild_v1, 4, 4),
    ('torch._utils', '_rebuild_tensor_v2'): _C('_rebuild_tensor_v2', _rebuild_v2, 6, 7),
    ('torch._utils', '_rebuild_tensor_v3'): _C('_rebuild_tensor_v3', _rebuild_v3, 7, 8),
    ('torch._utils', '_rebuild_parameter'): _C('_rebuild_parameter', _rebuild_parameter, 3, 3),
    ('torch._utils', '_rebuild_parameter_with_state'):
        _C('_rebuild_parameter_with_state', _rebuild_parameter, 4, 4),
    ('torch', 'Size'): _C('torch.Size', lambda dims=(): _ints(dims, 'size'), 0, 1),
    ('torch.storage', 'UntypedStorage'): _Marker('storage', 'uint8'),
    **{('torch', n): _Marker('storage', d) for n, d in STORAGE_DTYPES.items()},
    **{('torch', n): _Marker('dtype', n) for n in _TORCH_DTYPES},
}


class Declared:
  """persistent_load: the storages the pickle declares, one _Storage per key."""

  def __init__(self, legacy: bool):
    self.legacy, self.roots, self.views = legacy, {}, {}

  def __call__(self, pid) -> _Storage:
    if type(pid) is not tuple or not pid or pid[0] not in ('storage', b'storage'):
      raise CheckpointError(f'unsupported persistent id (a {type(pid).__name__}, not a storage)')
    want = 6 if self.legacy else 5
    if len(pid) != want:
      raise CheckpointError(f'a storage persistent id has {len(pid)} fields, not {want}')
    _, stype, key, location, numel = pid[:5]
    if not (isinstance(stype, _Marker) and stype.kind == 'storage'):
      raise CheckpointError(f'a storage persistent id names a {type(stype).__name__}, '
                            'not a storage type')
    if type(key) is not str or type(location) not in (str, bytes) or type(numel) is not int \
        or numel < 0:
      raise CheckpointError('a storage persistent id is malformed')
    dtype = np_dtype(stype.dtype)
    root = self.roots.setdefault(key, _Storage(key, dtype, numel))
    if (root.dtype, root.numel) != (dtype, numel):
      raise CheckpointError(f'storage {short(key)!r} is declared twice with different '
                            'types or sizes')
    view = pid[5] if self.legacy else None
    if view is None:
      return root
    if type(view) is not tuple or len(view) != 3 or type(view[0]) is not str or \
        not all(type(v) is int and v >= 0 for v in view[1:]) or view[1] + view[2] > numel:
      raise CheckpointError(f'storage {short(key)!r} has a malformed or out-of-range view')
    got = self.views.setdefault(view[0], _Storage(view[0], dtype, view[2], root, view[1]))
    if (got.base, got.offset, got.numel) != (root, view[1], view[2]):
      raise CheckpointError(f'storage view {short(view[0])!r} is declared twice differently')
    return got


def _name(where: Tuple) -> str:
  return repr(short('.'.join(str(k) for k in where) or '<top level>', 200))


def short(x, n: int = 80) -> str:
  """str(x), cut to n characters: messages stay one short line whatever a file holds."""
  s = str(x)
  return s if len(s) <= n else s[:n - 3] + '...'


def _collect(obj, where: Tuple, out: List, seen: set, active: set, depth: int = 0) -> None:
  """Appends (key path, _Tensor) for every tensor in obj, visiting each container once
  (memo references make DAGs); refuses cycles, deep nesting and foreign objects."""
  if isinstance(obj, _Tensor):
    out.append((where, obj))
    return
  if isinstance(obj, pth_pickle._SCALARS):
    return
  if not isinstance(obj, (dict, list, tuple)):
    what = 'storage' if isinstance(obj, _Storage) else type(obj).__name__
    raise CheckpointError(f'{_name(where)} holds a {what} outside a tensor')
  if id(obj) in active:
    raise CheckpointError(f'{_name(where)} contains itself')
  if id(obj) in seen:
    return
  if depth >= MAX_DEPTH:
    raise CheckpointError(f'{_name(where)} is nested deeper than {MAX_DEPTH} levels')
  seen.add(id(obj))
  active.add(id(obj))
  items = obj.items() if isinstance(obj, dict) else enumerate(obj)
  for k, v in items:
    _collect(v, where + (k,), out, seen, active, depth + 1)
  active.discard(id(obj))


def _replace(obj, arrays: Dict[int, np.ndarray], done: Dict[int, object]):
  """obj with its tensors replaced by arrays; a container shared in obj stays shared."""
  if isinstance(obj, _Tensor):
    return arrays[id(obj)]
  if not isinstance(obj, (dict, list, tuple)):
    return obj
  if id(obj) not in done:
    if isinstance(obj, dict):
      done[id(obj)] = type(obj)((k, _replace(v, arrays, done)) for k, v in obj.items())
    else:
      done[id(obj)] = type(obj)(_replace(v, arrays, done) for v in obj)
  return done[id(obj)]


def _check_view(t: _Tensor, n_el: int) -> int:
  """Returns t's element count after checking that it stays inside n_el elements."""
  if len(t.size) != len(t.stride):
    raise CheckpointError(f'size {short(t.size)} and stride {short(t.stride)} differ in '
                          'length')
  if min(t.size, default=0) < 0 or min(t.stride, default=0) < 0 or t.offset < 0:
    raise CheckpointError(f'negative size, stride or offset (size {short(t.size)}, stride '
                          f'{short(t.stride)}, offset {short(t.offset)})')
  numel = math.prod(t.size)
  if numel == 0:
    if math.prod(d for d in t.size if d) > 1 << 40:  # numpy refuses such empty shapes
      raise CheckpointError(f'size {short(t.size)} is out of range')
    return 0
  last = t.offset + sum((d - 1) * s for d, s in zip(t.size, t.stride))
  if last >= n_el:
    raise CheckpointError(f'size {short(t.size)}, stride {short(t.stride)} and offset '
                          f'{short(t.offset)} reach element {short(last)}, past the {n_el} '
                          'elements its storage holds')
  return numel


def _build(refs: List, read: Callable[[_Storage], bytes],
           big_endian: bool) -> Dict[int, np.ndarray]:
  """Arrays for the tensors in refs; read(root storage) gives exactly its bytes."""
  uses = collections.Counter(id(t.storage.root) for t in {id(t): t for _, t in refs}.values())
  cache, shared, arrays = {}, {}, {}
  read_bytes = out_bytes = 0
  for where, t in refs:
    if id(t) in arrays:
      continue
    try:
      root = t.storage.root
      if id(root) not in cache:
        cache[id(root)] = read(root)
        read_bytes += len(cache[id(root)])
      raw, item = cache[id(root)], t.dtype.itemsize
      start, nbytes = t.storage.offset * root.dtype.itemsize, t.storage.numel * root.dtype.itemsize
      if nbytes % item or start % item:
        raise CheckpointError(f'storage {short(t.storage.key)!r} ({nbytes} bytes) is not '
                              f'a whole number of {t.dtype} elements')
      numel = _check_view(t, nbytes // item)
      sig = (id(root), start, t.offset, t.size, t.stride, t.dtype.str)
      if sig not in shared:
        out_bytes += numel * item
        if out_bytes > 2 * read_bytes + _SLACK_BYTES:
          raise CheckpointError(f'tensors overlap: {out_bytes} bytes of arrays from '
                                f'{read_bytes} bytes of storage')
        if numel == 0:
          arr = np.zeros(t.size, t.dtype)
        else:
          base = np.frombuffer(raw, t.dtype, count=nbytes // item - t.offset,
                               offset=start + t.offset * item)
          strides = tuple(s * item if d > 1 else 0 for d, s in zip(t.size, t.stride))
          arr = np.lib.stride_tricks.as_strided(base, shape=t.size, strides=strides).copy()
          if big_endian:
            arr.byteswap(inplace=True)
        shared[sig] = arr
      arrays[id(t)] = shared[sig]
    except CheckpointError as e:
      raise CheckpointError(f'tensor {_name(where)}: {e}') from None
    uses[id(root)] -= 1
    if not uses[id(root)]:
      del cache[id(root)]
  return arrays


def materialize(obj, read: Callable[[_Storage], bytes], big_endian: bool):
  """obj with every tensor replaced by a checked numpy array (see _build)."""
  refs: List = []
  _collect(obj, (), refs, set(), set())
  return _replace(obj, _build(refs, read, big_endian), {})
