"""Fuzzes var_jax's `.pth` reader; run by tests/test_pth_fuzz.py in a subprocess.

    python tests/pth_fuzz.py --seed 0 --cases 2500 --seconds 20 --tmp /tmp/x --progress p.txt
    python tests/pth_fuzz.py --seed 0 --case 1234 --tmp /tmp/x   # replay one case

First loads every crafted file of pth_files.CRAFTED (each must be refused with its
message), then mutates real files (the tiny4 fixtures written by torch, and
tests/data's legacy and zip files): random byte flips and truncation of the file;
flips, inserted/deleted/replaced opcodes, re-encoded integers (sizes, strides,
offsets, numels, memo indices) and swapped globals (storage types = dtypes) inside
the pickle, re-zipped with valid CRCs so the damage reaches the reader's own checks;
deleted, truncated, extended, swapped, compressed storage entries; overwritten zip
header fields; legacy record counts. Case i draws from Random(f'{seed}:{i}'), so any
failure replays alone. The address space is capped (RLIMIT_AS), so a large
allocation is a MemoryError, and each case has an alarm, so a hang is reported.
Every outcome must be a load (a dict of arrays) or a one-line CheckpointError naming
the file. Prints a JSON summary; writes 'case <i> <source> <kind>' to --progress
before each case, so a crash names its case.
"""
import argparse
import io
import json
import os
import pathlib
import pickletools
import random
import re
import resource
import signal
import sys
import time
import zipfile

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import pth_files  # noqa: E402
from var_jax.convert.torch_io import load_pth  # noqa: E402
from var_jax.errors import CheckpointError  # noqa: E402

FIXTURES = pathlib.Path(os.environ.get('VAR_JAX_FIXTURES', HERE.parents[0].parent / 'shared' /
                                       'fixtures'))
SOURCES = {  # name: (path, weight)
    'vae.pth': (FIXTURES / 'tiny4' / 'vae.pth', 1),
    'var.pth': (FIXTURES / 'tiny4' / 'var.pth', 3),
    'torch_legacy.pth': (HERE / 'data' / 'torch_legacy.pth', 3),
    'torch_zip.pth': (HERE / 'data' / 'torch_zip.pth', 3),
}
INTERESTING = [0, 1, -1, 2, 3, 7, 255, 256, 65535, 65536, 2**31 - 1, -2**31, 2**32, 10**8,
               2**40, 2**62, 2**63 - 1, -2**63, 2**64, 2**100]
GLOBALS = ['torch FloatStorage', 'torch HalfStorage', 'torch DoubleStorage', 'torch ByteStorage',
           'torch BoolStorage', 'torch LongStorage', 'torch BFloat16Storage',
           'torch ComplexFloatStorage', 'torch.storage UntypedStorage', 'torch QInt8Storage',
           'torch._utils _rebuild_tensor', 'torch._utils _rebuild_tensor_v2',
           'torch._utils _rebuild_tensor_v3', 'torch._utils _rebuild_parameter',
           'collections OrderedDict', 'torch Size', 'torch float16', 'torch uint16',
           'os system', 'builtins eval', 'builtins getattr', 'numpy.core.multiarray _reconstruct']


class Hang(Exception):
  pass


# --- file models -------------------------------------------------------------------

def zip_entries(data: bytes):
  with zipfile.ZipFile(io.BytesIO(data)) as zf:
    return [(i.filename, zf.read(i)) for i in zf.infolist()]


def make_zip(entries, compress=()):
  buf = io.BytesIO()
  with zipfile.ZipFile(buf, 'w') as zf:
    for name, data in entries:
      zf.writestr(name, data, zipfile.ZIP_DEFLATED if name in compress else zipfile.ZIP_STORED)
  return buf.getvalue()


def legacy_parts(data: bytes):
  """(prefix, object pickle, keys pickle, records) of a legacy file."""
  f = io.BytesIO(data)
  starts = [0]
  for _ in range(5):
    for _op in pickletools.genops(f):
      pass
    starts.append(f.tell())
  return data[:starts[3]], data[starts[3]:starts[4]], data[starts[4]:starts[5]], data[starts[5]:]


def ops(pkl: bytes):
  """[(opcode name, arg, start, end)] of a pickle."""
  out, items = [], list(pickletools.genops(pkl))
  for (op, arg, pos), nxt in zip(items, items[1:] + [(None, None, len(pkl))]):
    out.append((op.name, arg, pos, nxt[2]))
  return out


# --- mutations of a pickle ---------------------------------------------------------------

def encode_int(v: int) -> bytes:
  if 0 <= v < 256:
    return b'K' + bytes([v])
  if 0 <= v < 65536:
    return b'M' + v.to_bytes(2, 'little')
  if -2**31 <= v < 2**31:
    return b'J' + v.to_bytes(4, 'little', signed=True)
  n = (v.bit_length() + 8) // 8
  return b'\x8a' + bytes([n]) + v.to_bytes(n, 'little', signed=True)


def mutate_pickle(rng: random.Random, pkl: bytes):
  kind = rng.choice(['flip', 'int', 'int', 'int', 'global', 'opcode', 'delete_op', 'cut'])
  listed = ops(pkl)
  if kind == 'flip':
    b = bytearray(pkl)
    for _ in range(rng.randint(1, 4)):
      b[rng.randrange(len(b))] = rng.randrange(256)
    return kind, bytes(b)
  ints = [o for o in listed if o[0] in ('BININT', 'BININT1', 'BININT2', 'LONG1')]
  globs = [o for o in listed if o[0] == 'GLOBAL']
  if (kind == 'int' and not ints) or (kind == 'global' and not globs):
    kind = 'opcode'
  if kind == 'int':
    _, _, s, e = rng.choice(ints)
    v = rng.choice(INTERESTING + [rng.randint(-10, 5000)])
    return kind, pkl[:s] + encode_int(v) + pkl[e:]
  if kind == 'global':
    _, _, s, e = rng.choice(globs)
    module, name = rng.choice(GLOBALS).split()
    return kind, pkl[:s] + f'c{module}\n{name}\n'.encode() + pkl[e:]
  if kind == 'opcode':
    _, _, s, _ = rng.choice(listed)
    return kind, pkl[:s] + bytes([rng.randrange(256)]) + pkl[s:]
  if kind == 'delete_op':
    _, _, s, e = rng.choice(listed)
    return kind, pkl[:s] + pkl[e:]
  return kind, pkl[:rng.randrange(len(pkl))]


# --- mutations of a file -----------------------------------------------------------------

def mutate_zip(rng: random.Random, data: bytes):
  entries = zip_entries(data)
  pkl_i = next(i for i, (n, _) in enumerate(entries) if n.endswith('data.pkl'))
  storages = [i for i, (n, _) in enumerate(entries) if '/data/' in n]
  kind = rng.choice(['pickle'] * 4 + ['entry', 'header'])
  if kind == 'pickle':
    sub, pkl = mutate_pickle(rng, entries[pkl_i][1])
    entries[pkl_i] = (entries[pkl_i][0], pkl)
    return f'pickle-{sub}', make_zip(entries)
  if kind == 'entry':
    sub = rng.choice(['delete', 'shorten', 'extend', 'swap', 'compress', 'duplicate_pkl'])
    i = rng.choice(storages)
    name, blob = entries[i]
    if sub == 'delete':
      del entries[i]
    elif sub == 'shorten':
      entries[i] = (name, blob[:rng.randrange(len(blob))] if blob else b'')
    elif sub == 'extend':
      entries[i] = (name, blob + bytes(rng.choice([1, 2, 3, 4, 8, 1000])))
    elif sub == 'swap':
      j = rng.choice(storages)
      entries[i], entries[j] = (name, entries[j][1]), (entries[j][0], blob)
    elif sub == 'duplicate_pkl':
      entries.append((entries[pkl_i][0].replace('data.pkl', 'x/data.pkl'), entries[pkl_i][1]))
    return f'entry-{sub}', make_zip(entries, compress=(name,) if sub == 'compress' else ())
  # header: overwrite a size/offset/method/flag field of a local or central header
  b = bytearray(data)
  marks = [m.start() for m in re.finditer(b'PK\x01\x02|PK\x03\x04|PK\x05\x06', data)]
  at = rng.choice(marks)
  fields = {b'PK\x01\x02': [(8, 2), (10, 2), (20, 4), (24, 4), (28, 2), (30, 2), (42, 4)],
            b'PK\x03\x04': [(6, 2), (8, 2), (18, 4), (22, 4), (26, 2), (28, 2)],
            b'PK\x05\x06': [(8, 2), (10, 2), (12, 4), (16, 4)]}[bytes(b[at:at + 4])]
  off, width = rng.choice(fields)
  v = rng.choice(INTERESTING + [rng.randrange(2**(8 * width))]) % 2**(8 * width)
  b[at + off:at + off + width] = v.to_bytes(width, 'little')
  return 'header', bytes(b)


def mutate_legacy(rng: random.Random, data: bytes):
  prefix, obj, keys, records = legacy_parts(data)
  kind = rng.choice(['pickle'] * 4 + ['keys', 'count', 'records'])
  if kind == 'pickle':
    sub, obj = mutate_pickle(rng, obj)
    return f'pickle-{sub}', prefix + obj + keys + records
  if kind == 'keys':
    sub, keys = mutate_pickle(rng, keys)
    return f'keys-{sub}', prefix + obj + keys + records
  if kind == 'count':  # overwrite the element count of the first record
    v = rng.choice(INTERESTING + [rng.randint(-5, 100)]) % 2**64
    return kind, prefix + obj + keys + v.to_bytes(8, 'little') + records[8:]
  cut = rng.randrange(len(records))
  return kind, prefix + obj + keys + records[:cut]


def mutate(rng: random.Random, data: bytes, legacy: bool):
  r = rng.random()
  if r < 0.15:
    b = bytearray(data)
    for _ in range(rng.randint(1, 8)):
      b[rng.randrange(len(b))] = rng.randrange(256)
    return 'flip', bytes(b)
  if r < 0.25:
    return 'truncate', data[:rng.randrange(len(data))]
  return (mutate_legacy if legacy else mutate_zip)(rng, data)


# --- running -------------------------------------------------------------------------

def check(path: pathlib.Path):
  """'loaded' or 'refused'; raises AssertionError on any other outcome."""
  try:
    sd = load_pth(path)
  except CheckpointError as e:
    msg = str(e)
    assert msg.startswith(f'{path}: ') and len(msg) > len(f'{path}: ') + 5, repr(msg)
    assert '\n' not in msg and len(msg) < 600, repr(msg)
    return 'refused'
  assert isinstance(sd, dict) and all(isinstance(v, np.ndarray) for v in sd.values())
  return 'loaded'


def run_crafted(tmp: pathlib.Path, failures: list, progress) -> int:
  for name, build, pattern in pth_files.CRAFTED:
    if progress:
      progress.write(f'crafted {name}\n')
      progress.flush()
    path = tmp / f'crafted_{name}.pth'
    build(path)
    try:
      load_pth(path)
      failures.append({'case': f'crafted {name}', 'error': 'loaded'})
    except CheckpointError as e:
      if not re.search(pattern, str(e)):
        failures.append({'case': f'crafted {name}', 'error': str(e)})
    path.unlink()
  return len(pth_files.CRAFTED)


def one_case(seed: int, i: int, blobs, tmp: pathlib.Path, progress):
  rng = random.Random(f'{seed}:{i}')
  names = list(SOURCES)
  source = rng.choices(names, weights=[SOURCES[n][1] for n in names])[0]
  kind, data = mutate(rng, blobs[source], legacy='legacy' in source)
  if progress:
    progress.write(f'case {i} {source} {kind}\n')
    progress.flush()
  path = tmp / f'case{i}.pth'
  path.write_bytes(data)
  try:
    return source, kind, check(path)
  finally:
    path.unlink()


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument('--seed', type=int, default=0)
  ap.add_argument('--cases', type=int, default=2500)
  ap.add_argument('--case', type=int, default=None, help='replay this one case')
  ap.add_argument('--seconds', type=float, default=20.0)
  ap.add_argument('--tmp', required=True)
  ap.add_argument('--progress', default=None)
  ap.add_argument('--address-space-mb', type=int, default=1024)
  args = ap.parse_args()
  tmp = pathlib.Path(args.tmp)
  tmp.mkdir(parents=True, exist_ok=True)
  blobs = {n: p.read_bytes() for n, (p, _) in SOURCES.items()}
  limit = args.address_space_mb << 20
  resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

  def on_alarm(*_):
    raise Hang('case took over 10 s')
  signal.signal(signal.SIGALRM, on_alarm)
  progress = open(args.progress, 'w') if args.progress else None
  failures, counts = [], {'loaded': 0, 'refused': 0}
  kinds = {}
  start = time.monotonic()
  n_crafted = run_crafted(tmp, failures, progress) if args.case is None else 0
  todo = [args.case] if args.case is not None else range(args.cases)
  done = 0
  for i in todo:
    if time.monotonic() - start > args.seconds:
      break
    signal.alarm(10)
    try:
      source, kind, outcome = one_case(args.seed, i, blobs, tmp, progress)
      counts[outcome] += 1
      kinds.setdefault(kind, {'loaded': 0, 'refused': 0})[outcome] += 1
    except BaseException as e:  # anything but a load or a CheckpointError is a finding
      if isinstance(e, KeyboardInterrupt):
        raise
      if args.case is not None:
        raise
      failures.append({'case': i, 'error': f'{type(e).__name__}: {str(e)[:300]}'})
    finally:
      signal.alarm(0)
    done += 1
  print(json.dumps({'seed': args.seed, 'crafted': n_crafted, 'cases': done, **counts,
                    'seconds': round(time.monotonic() - start, 1), 'kinds': kinds,
                    'failures': failures[:20], 'n_failures': len(failures)}))


if __name__ == '__main__':
  main()
