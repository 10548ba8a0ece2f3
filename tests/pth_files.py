"""Builds `.pth` files with chosen, possibly invalid, contents for the reader's tests.

`state_pickle` writes the pickle torch would write for tensors given as explicit
(storage, offset, size, stride) views, so a test can claim any geometry; `write_zip`
and `write_legacy` wrap it in torch's two layouts with whatever storage bytes and
element counts the test wants.
"""
import collections
import io
import pickle
import zipfile

from var_jax.convert import torch_io

LEGACY_MAGIC, LEGACY_PROTOCOL = 0x1950a86a20f9469cfc6c, 1001
SYS_INFO = {'protocol_version': 1001, 'little_endian': True,
            'type_sizes': {'short': 2, 'int': 4, 'long': 4}}


class Storage:
  def __init__(self, key, type_name='FloatStorage', numel=1, view=None):
    self.key, self.type_name, self.numel, self.view = key, type_name, numel, view


class View:
  """A tensor pickled as _rebuild_tensor_v2(storage, offset, size, stride, False, {})
  (or _rebuild_tensor_v3(..., torch.<dtype>) when dtype is given)."""

  def __init__(self, storage, offset=0, size=(1,), stride=(1,), dtype=None):
    self.storage, self.offset, self.size, self.stride, self.dtype = (
        storage, offset, size, stride, dtype)

  def __reduce_ex__(self, protocol):
    args = (self.storage, self.offset, tuple(self.size), tuple(self.stride), False,
            collections.OrderedDict())
    if self.dtype is None:
      return torch_io._Global('torch._utils', '_rebuild_tensor_v2'), args
    return (torch_io._Global('torch._utils', '_rebuild_tensor_v3'),
            args + (torch_io._Global('torch', self.dtype),))


class _Pickler(torch_io._TorchPickler):
  legacy = False

  def persistent_id(self, obj):
    if isinstance(obj, Storage):
      module = 'torch.storage' if obj.type_name == 'UntypedStorage' else 'torch'
      pid = ('storage', torch_io._Global(module, obj.type_name), obj.key, 'cpu', obj.numel)
      return pid + (obj.view,) if self.legacy else pid
    return None


def state_pickle(obj, legacy=False) -> bytes:
  """The protocol-2 pickle of obj, with Storage/View stand-ins as torch writes them."""
  buf = io.BytesIO()
  pickler = _Pickler(buf, protocol=2)
  pickler.legacy = legacy
  pickler.dump(obj)
  return buf.getvalue()


def write_zip(path, pkl: bytes, storages, stem='archive', compress=None):
  """A torch zip archive: stem/data.pkl = pkl, stem/data/<key> = bytes per storage."""
  with zipfile.ZipFile(path, 'w') as zf:
    for name, data in [('data.pkl', pkl), ('byteorder', b'little'),
                       *((f'data/{k}', v) for k, v in storages.items()), ('version', b'3\n')]:
      zf.writestr(f'{stem}/{name}', data,
                  compress_type=zipfile.ZIP_DEFLATED if name == compress else zipfile.ZIP_STORED)


def write_legacy(path, pkl: bytes, records, keys=None, sys_info=SYS_INFO):
  """A legacy torch file: header pickles, pkl, the key list, then per key
  (element count, bytes) from records = {key: (count, data)}."""
  keys = sorted(records) if keys is None else keys
  with open(path, 'wb') as f:
    for header in (LEGACY_MAGIC, LEGACY_PROTOCOL, sys_info):
      f.write(pickle.dumps(header, protocol=2))
    f.write(pkl)
    f.write(pickle.dumps(list(keys), protocol=2))
    for k in keys:
      count, data = records[k]
      f.write(int(count).to_bytes(8, 'little', signed=True) + data)


# --- crafted files: (name, build(path), what the error must say) ----------------------

def _one(view, data=b'\0' * 4, storage_key='0'):
  return lambda path: write_zip(path, state_pickle(collections.OrderedDict(w=view)),
                                {storage_key: data})


def _raw_pickle(pkl):
  return lambda path: write_zip(path, pkl, {})


def _legacy(views, records, keys=None, sys_info=SYS_INFO):
  return lambda path: write_legacy(path, state_pickle(collections.OrderedDict(views), True),
                                   records, keys, sys_info)


def _nested(depth):
  obj = collections.OrderedDict(w=View(Storage('0')))
  for _ in range(depth):
    obj = collections.OrderedDict(x=obj)
  return obj


def _cycle():
  loop = []
  loop.append(loop)
  return collections.OrderedDict(w=loop)


def _dag(depth):
  node = [View(Storage('0'))]
  for _ in range(depth):
    node = [node, node]
  return collections.OrderedDict(w=node)


S1 = Storage('0', numel=1)
CRAFTED = [
    # the case: size 1e8 over a 1-element storage
    ('size_1e8', _one(View(S1, size=(10**8,))),
     r"tensor 'w': .*reach element 99999999, past the 1 "),
    ('broadcast_1e8', _one(View(S1, size=(10**8,), stride=(0,))), r"tensor 'w': tensors overlap"),
    ('negative_stride', _one(View(Storage('0', numel=2), 1, (2,), (-1,)), b'\0' * 8),
     r"tensor 'w': negative size, stride or offset"),
    ('negative_size', _one(View(S1, size=(-1,))), r"tensor 'w': negative"),
    ('negative_offset', _one(View(S1, offset=-1)), r"tensor 'w': negative"),
    ('offset_past_end', _one(View(Storage('0', numel=4), 5, (1,)), b'\0' * 16),
     r"tensor 'w': .*offset 5 reach element 5, past the 4 "),
    ('stride_past_end', _one(View(Storage('0', numel=4), 0, (2, 2), (3, 1)), b'\0' * 16),
     r"tensor 'w': .*reach element 4, past the 4 "),
    ('rank_mismatch', _one(View(S1, size=(1, 1), stride=(1,))), r"tensor 'w': size .* differ"),
    ('storage_shorter', _one(View(Storage('0', numel=100)), b'\0' * 8),
     r"tensor 'w': archive/data/0 holds 8 bytes, its declaration says 400"),
    ('storage_longer', _one(View(S1), b'\0' * 6), r"holds 6 bytes, its declaration says 4"),
    ('numel_2e62', _one(View(Storage('0', numel=2**62)), b'\0' * 4), r"declaration says 18446"),
    ('not_whole_elements', _one(View(Storage('0', 'UntypedStorage', 3), size=(1,), dtype='uint16'),
                                b'\0' * 3), r"\(3 bytes\) is not a whole number of uint16"),
    ('missing_storage', _one(View(S1), storage_key='1'), r"archive/data/0 is missing"),
    ('compressed', lambda p: write_zip(p, state_pickle({'w': View(S1)}), {'0': b'\0' * 4},
                                       compress='data/0'), r"is compressed"),
    ('unknown_global', _raw_pickle(b'\x80\x02cos\nsystem\nq\x00.'),
     r"refusing to unpickle os\.system"),
    ('unknown_storage', _raw_pickle(b'\x80\x02ctorch\nQInt8Storage\n.'),
     r"refusing to unpickle torch\.QInt8Storage"),
    ('ext_opcode', _raw_pickle(b'\x80\x02\x82\x01.'), r"opcode b'\\x82' at byte 2"),
    ('newobj_opcode', _raw_pickle(b'\x80\x02ccollections\nOrderedDict\n)\x81.'),
     r"opcode b'\\x81'"),
    ('build_on_list', _raw_pickle(b'\x80\x02]}b.'), r"BUILD on a list"),
    ('list_key', _raw_pickle(b'\x80\x02}(]Nu.'), r"dict key of type list"),
    ('persistent_module', _raw_pickle(b'\x80\x02(X\x06\x00\x00\x00moduleNNtQ.'),
     r"unsupported persistent id"),
    ('huge_long4', _raw_pickle(b'\x80\x02\x8b\xff\xff\xff\x7f.'), r"integer of 2147483647 bytes"),
    ('huge_binunicode', _raw_pickle(b'\x80\x02X\xff\xff\xff\xff.'), r"pickle truncated"),
    ('deep', lambda p: write_zip(p, state_pickle(_nested(40)), {'0': b'\0' * 4}), r"deeper than"),
    ('cycle', lambda p: write_zip(p, state_pickle(_cycle()), {}), r"contains itself"),
    ('dag', lambda p: write_zip(p, state_pickle(_dag(30)), {'0': b'\0' * 4}),
     r"'w' holds a list: not a state dict"),
    ('declared_twice', lambda p: write_zip(p, state_pickle(
        {'a': View(Storage('0', numel=1)), 'b': View(Storage('0', 'LongStorage', 1))}),
        {'0': b'\0' * 8}), r"storage '0' is declared twice"),
    ('bare_storage', lambda p: write_zip(p, state_pickle({'w': S1}), {'0': b'\0' * 4}),
     r"'w' holds a storage outside a tensor"),
    ('legacy_count_mismatch', _legacy({'w': View(Storage('0', numel=2))}, {'0': (3, b'\0' * 12)}),
     r"storage '0' holds 3 elements .* declared 2"),
    ('legacy_truncated', _legacy({'w': View(Storage('0', numel=2))}, {'0': (2, b'\0' * 5)}),
     r"storage '0' holds 2 elements in 5 bytes left"),
    ('legacy_huge_count', _legacy({'w': View(Storage('0', numel=2**60))}, {'0': (2**60, b'')}),
     r"storage '0' holds 1152921504606846976 elements in 0 bytes"),
    ('legacy_undeclared', _legacy({'w': View(Storage('0'))}, {'0': (1, b'\0' * 4),
                                                             '9': (1, b'\0' * 4)}),
     r"storage '9' has data but was never declared"),
    ('legacy_no_record', _legacy({'w': View(Storage('0'))}, {}), r"storage '0' has no data"),
    ('legacy_view_out_of_range', _legacy({'w': View(Storage('0', numel=4, view=('v', 3, 2)))},
                                         {'0': (4, b'\0' * 16)}), r"out-of-range view"),
    ('legacy_size_1e8', _legacy({'w': View(S1, size=(10**8,))}, {'0': (1, b'\0' * 4)}),
     r"tensor 'w': .*past the 1 "),
    ('legacy_sys_info', _legacy({'w': View(S1)}, {'0': (1, b'\0' * 4)}, sys_info=[1]),
     r"unsupported legacy torch format"),
    ('legacy_magic', lambda p: open(p, 'wb').write(pickle.dumps(12345, protocol=2)),
     r"wrong legacy magic number"),
]
