"""A restricted pickle interpreter: the opcodes of a torch state dict and nothing more.

`pickle.Unpickler` trusts its input: with `find_class` narrowed it still runs every
opcode (BUILD, NEWOBJ, EXT*, INST, ...), hands REDUCE whatever the bytes build and
nests containers as deep as they say. This interpreter knows only the opcodes that
`torch.save` emits (protocols 2 to 5) and builds only plain values: None, bool, int,
float, str, bytes, tuple, list, dict (OrderedDict kept). A GLOBAL is whatever the
caller's `globals_` maps `(module, name)` to; REDUCE calls only `Callable`s from
there; a persistent id goes to the caller's `persistent_load`. Every length is
checked against the bytes left before anything is read, dict keys are flat scalars
(hashing never recurses) and text fields are short, so a crafted pickle cannot run
code, allocate more than a few times its own size or overflow the stack. Every
refusal is a `CheckpointError` whose message says what and at which byte.
"""
from __future__ import annotations

import collections
import struct
from typing import Any, Callable as _Fn, Mapping, Tuple

from var_jax.errors import CheckpointError

_MAX_LINE = 256  # text opcodes: GLOBAL, INT, LONG, FLOAT, PUT, GET, PERSID
_MAX_LONG_BYTES = 64  # LONG4; any int a state dict holds fits in 8 bytes
_SCALARS = (str, int, float, bool, type(None), bytes)


class Callable:
  """A global that REDUCE may call: fn(*args) with min_args <= len(args) <= max_args."""

  def __init__(self, name: str, fn: _Fn[..., Any], min_args: int, max_args: int):
    self.name, self.fn, self.min_args, self.max_args = name, fn, min_args, max_args


class _Machine:
  """One pickle, read from `data[pos:end]` (bytes or mmap)."""

  def __init__(self, data, pos: int, end: int, globals_: Mapping[Tuple[str, str], Any],
               persistent_load: _Fn[[Any], Any]):
    self.data, self.pos, self.end = data, pos, end
    self.globals, self.persistent_load = globals_, persistent_load
    self.stack: list = []
    self.marks: list = []
    self.memo: dict = {}

  # --- reading -----------------------------------------------------------------
  def read(self, n: int) -> bytes:
    if n < 0 or n > self.end - self.pos:
      raise CheckpointError(f'pickle truncated: {n} bytes wanted at byte {self.pos}, '
                            f'{self.end - self.pos} left')
    out = bytes(self.data[self.pos:self.pos + n])
    self.pos += n
    return out

  def unpack(self, fmt: str) -> int:
    return struct.unpack(fmt, self.read(struct.calcsize(fmt)))[0]

  def readline(self) -> str:
    stop = min(self.end, self.pos + _MAX_LINE)
    i = self.data.find(b'\n', self.pos, stop)
    if i < 0:
      raise CheckpointError(f'pickle text field at byte {self.pos} is unterminated or longer than '
                            f'{_MAX_LINE} bytes')
    line = bytes(self.data[self.pos:i])
    self.pos = i + 1
    return line.decode('utf-8')

  # --- stack -------------------------------------------------------------------
  def pop(self):
    if not self.stack:
      raise CheckpointError(f'pickle stack underflow at byte {self.pos}')
    return self.stack.pop()

  def top(self):
    if not self.stack:
      raise CheckpointError(f'pickle stack underflow at byte {self.pos}')
    return self.stack[-1]

  def pop_mark(self) -> list:
    if not self.marks:
      raise CheckpointError(f'pickle MARK missing at byte {self.pos}')
    items, self.stack = self.stack, self.marks.pop()
    return items

  def top_of(self, kind, op: str):
    target = self.top()
    if type(target) not in kind:  # exact types: nothing built here subclasses them
      raise CheckpointError(f'pickle {op} on a {type(target).__name__} at byte {self.pos}')
    return target

  @staticmethod
  def check_key(key) -> None:
    if type(key) is tuple and all(type(k) in _SCALARS for k in key):
      return
    if type(key) not in _SCALARS:
      raise CheckpointError(f'pickle dict key of type {type(key).__name__} refused')

  def set_items(self, target: dict, items: list) -> None:
    if len(items) % 2:
      raise CheckpointError(f'pickle SETITEMS with an odd number of items at byte {self.pos}')
    for k, v in zip(items[::2], items[1::2]):
      self.check_key(k)
      target[k] = v

  # --- the interpreter -----------------------------------------------------------
  def run(self):
    ops = _OPS
    while True:
      at = self.pos
      code = self.read(1)
      handler = ops.get(code)
      if handler is None:
        raise CheckpointError(f'pickle opcode {code!r} at byte {at} is not one a state dict uses')
      if handler is _stop:
        if len(self.stack) != 1 or self.marks:
          raise CheckpointError(f'pickle ends at byte {at} with {len(self.stack)} values and '
                                f'{len(self.marks)} open marks')
        return self.stack.pop()
      handler(self)


def load(data, pos: int = 0, end: int | None = None, *,
         globals_: Mapping[Tuple[str, str], Any],
         persistent_load: _Fn[[Any], Any]) -> Tuple[Any, int]:
  """Interprets the pickle at data[pos:]; returns (value, the byte after its STOP)."""
  m = _Machine(data, pos, len(data) if end is None else end, globals_, persistent_load)
  try:
    return m.run(), m.pos
  except CheckpointError:
    raise
  except (UnicodeDecodeError, ValueError, OverflowError) as e:  # int(), float(), utf-8
    raise CheckpointError(f'pickle value at byte {m.pos} is malformed '
                          f'({type(e).__name__})') from None


# --- opcodes -------------------------------------------------------------------------

def _stop(m):  # handled in run()
  del m


def _proto(m):
  if m.unpack('<B') > 5:
    raise CheckpointError('pickle protocol above 5')


def _frame(m):
  if m.unpack('<Q') > m.end - m.pos:
    raise CheckpointError(f'pickle frame at byte {m.pos} is longer than the data')


def _push(value):
  return lambda m: m.stack.append(value)


def _push_read(fn):
  def op(m):
    value = fn(m)  # first: fn may pop a mark, which replaces m.stack
    m.stack.append(value)
  return op


def _int_line(m):
  s = m.readline()  # protocol 0 spells booleans I00 / I01
  m.stack.append(False if s == '00' else True if s == '01' else int(s))


def _long_line(m):
  m.stack.append(int(m.readline().rstrip('L')))


def _long_n(m, n):
  if n > _MAX_LONG_BYTES:
    raise CheckpointError(f'pickle integer of {n} bytes refused')
  m.stack.append(int.from_bytes(m.read(n), 'little', signed=True))


def _sized(fmt, decode=None):
  def op(m):
    n = m.unpack(fmt)
    raw = m.read(n)
    m.stack.append(raw if decode is None else raw.decode('utf-8', decode))
  return op


def _tuple_n(n):
  def op(m):
    items = [m.pop() for _ in range(n)][::-1]
    m.stack.append(tuple(items))
  return op


def _mark(m):
  m.marks.append(m.stack)
  m.stack = []


def _pop(m):
  if m.stack:
    m.stack.pop()
  else:
    m.pop_mark()


def _append(m):
  value = m.pop()
  m.top_of((list,), 'APPEND').append(value)


def _appends(m):
  items = m.pop_mark()
  m.top_of((list,), 'APPENDS').extend(items)


def _dict(m):
  d = {}
  m.set_items(d, m.pop_mark())
  m.stack.append(d)


def _setitem(m):
  value, key = m.pop(), m.pop()
  m.set_items(m.top_of((dict, collections.OrderedDict), 'SETITEM'), [key, value])


def _setitems(m):
  items = m.pop_mark()
  m.set_items(m.top_of((dict, collections.OrderedDict), 'SETITEMS'), items)


def _find(m, module, name):
  if not (isinstance(module, str) and isinstance(name, str)):
    raise CheckpointError('pickle global with a non-string name')
  found = m.globals.get((module, name))
  if found is None:
    raise CheckpointError(f'refusing to unpickle {module[:80]}.{name[:80]}: a state dict holds '
                          'only tensors (this file is not a plain torch.save(state_dict) or is '
                          'unsafe)')
  m.stack.append(found)


def _global(m):
  module = m.readline()
  _find(m, module, m.readline())


def _stack_global(m):
  name = m.pop()
  _find(m, m.pop(), name)


def _reduce(m):
  args, fn = m.pop(), m.pop()
  if not isinstance(fn, Callable):
    raise CheckpointError(f'pickle REDUCE calls a {type(fn).__name__} at byte {m.pos}')
  if type(args) is not tuple or not fn.min_args <= len(args) <= fn.max_args:
    raise CheckpointError(f'{fn.name}: wrong arguments at byte {m.pos}')
  value = fn.fn(*args)
  m.stack.append(value)


def _build(m):
  """torch's OrderedDict carries `_metadata` (module versions) as BUILD state: dropped."""
  state = m.pop()
  m.top_of((dict, collections.OrderedDict), 'BUILD')
  parts = state if type(state) is tuple and len(state) == 2 else (state,)
  if not all(p is None or type(p) in (dict, collections.OrderedDict) for p in parts):
    raise CheckpointError(f'pickle BUILD with {type(state).__name__} state refused')


def _persid_line(m):
  value = m.persistent_load(m.readline())
  m.stack.append(value)


def _binpersid(m):
  value = m.persistent_load(m.pop())
  m.stack.append(value)


def _put(index_of):
  def op(m):
    m.memo[index_of(m)] = m.top()
  return op


def _get(index_of):
  def op(m):
    i = index_of(m)
    if i not in m.memo:
      raise CheckpointError(f'pickle memo entry {i} missing at byte {m.pos}')
    m.stack.append(m.memo[i])
  return op


def _dup(m):
  m.stack.append(m.top())


def _memoize(m):
  m.memo[len(m.memo)] = m.top()


_OPS = {
    b'\x80': _proto, b'\x95': _frame, b'.': _stop,
    b'(': _mark, b'0': _pop, b'1': lambda m: m.pop_mark(), b'2': _dup,
    b'N': _push(None), b'\x88': _push(True), b'\x89': _push(False),
    b'I': _int_line, b'L': _long_line,
    b'J': _push_read(lambda m: m.unpack('<i')), b'K': _push_read(lambda m: m.unpack('<B')),
    b'M': _push_read(lambda m: m.unpack('<H')),
    b'\x8a': lambda m: _long_n(m, m.unpack('<B')), b'\x8b': lambda m: _long_n(m, m.unpack('<i')),
    b'F': _push_read(lambda m: float(m.readline())),
    b'G': _push_read(lambda m: m.unpack('>d')),
    b'T': _sized('<i', 'strict'), b'U': _sized('<B', 'strict'),  # py2 str, as torch: utf-8
    b'X': _sized('<I', 'surrogatepass'), b'\x8c': _sized('<B', 'surrogatepass'),
    b'\x8d': _sized('<Q', 'surrogatepass'),
    b'B': _sized('<I'), b'C': _sized('<B'), b'\x8e': _sized('<Q'),
    b')': _push_read(lambda m: ()), b't': _push_read(lambda m: tuple(m.pop_mark())),
    b'\x85': _tuple_n(1), b'\x86': _tuple_n(2), b'\x87': _tuple_n(3),
    b']': _push_read(lambda m: []), b'l': _push_read(lambda m: m.pop_mark()),
    b'a': _append, b'e': _appends,
    b'}': _push_read(lambda m: {}), b'd': _dict, b's': _setitem, b'u': _setitems,
    b'c': _global, b'\x93': _stack_global, b'R': _reduce, b'b': _build,
    b'P': _persid_line, b'Q': _binpersid,
    b'p': _put(lambda m: int(m.readline())), b'q': _put(lambda m: m.unpack('<B')),
    b'r': _put(lambda m: m.unpack('<I')), b'\x94': _memoize,
    b'g': _get(lambda m: int(m.readline())), b'h': _get(lambda m: m.unpack('<B')),
    b'j': _get(lambda m: m.unpack('<I')),
}
