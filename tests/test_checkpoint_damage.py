"""The native checkpoint reader on damaged directories: `var_jax.load` raises one
CheckpointError line naming the damaged file, and nothing else reaches stdout/stderr
(orbax's absl log lines and its reader threads' "Event loop is closed" tracebacks,
which arrive after the error, are checked in a subprocess that lingers before exit).
"""
import gc
import json
import logging
import os
import pathlib
import re
import shutil
import subprocess
import sys
import textwrap

import pytest

from var_jax import checkpoint
from var_jax.errors import CheckpointError

ROOT = pathlib.Path(__file__).resolve().parents[1]
DIGITS = ROOT / 'var_jax' / 'assets' / 'digits'


def _largest(params: pathlib.Path) -> pathlib.Path:
  return max((f for f in params.rglob('*') if f.is_file() and '/d/' in f.as_posix()),
             key=lambda f: f.stat().st_size)


def _truncate(d):
  f = _largest(d / 'params')
  f.write_bytes(f.read_bytes()[:100])
  return f


def _overwrite(d):  # same size, different bytes in the middle
  f = _largest(d / 'params')
  b = bytearray(f.read_bytes())
  b[len(b) // 2:len(b) // 2 + 64] = bytes(64)
  b[len(b) // 2] ^= 0xFF
  f.write_bytes(bytes(b))
  return f


def _garbage(rel):
  def damage(d):
    (d / rel).write_bytes(b'garbage')
    return d / rel
  return damage


def _delete_data(d):
  f = _largest(d / 'params')
  f.unlink()
  return f


def _no_config(d):
  (d / 'config.json').unlink()
  return d


# (name, damage(dir) -> the path the message must name, pattern after it)
DAMAGE = [
    ('truncated', _truncate, r': corrupt, 100 bytes where \d+ were written'),
    ('overwritten', _overwrite, r': corrupt, its contents changed'),
    ('deleted', _delete_data, r': missing'),
    ('metadata', _garbage('params/_METADATA'), r': corrupt'),
    ('manifest', _garbage('params/manifest.ocdbt'), r': corrupt'),
    ('no_config', _no_config, r': config\.json is missing'),
    ('config_not_json', _garbage('config.json'), r' is not valid JSON'),
    ('marker_not_json', _garbage('var_jax_format.json'), r' is not valid JSON'),
]
# the embedded digits checkpoint predates the file list: orbax finds the damage
DAMAGE_UNLISTED = [
    ('truncated', _truncate, 'params', r': corrupt checkpoint data \(ValueError: OUT_OF_RANGE'),
    ('metadata', _garbage('params/_METADATA'), 'params/_METADATA', r' is not valid JSON'),
    ('manifest', _garbage('params/manifest.ocdbt'), 'params',
     r': unreadable checkpoint metadata'),
]


@pytest.fixture(scope='module')
def saved(tmp_path_factory):
  """A checkpoint written by checkpoint.save (so with its file list)."""
  out = tmp_path_factory.mktemp('ckpt') / 'digits'
  config, vae, var, buffers = checkpoint.restore(DIGITS)
  checkpoint.save(out, config, vae, var, buffers=buffers)
  return out


def test_save_lists_every_file(saved):
  files = json.loads((saved / 'var_jax_format.json').read_text())['files']
  on_disk = {f.relative_to(saved / 'params').as_posix()
             for f in (saved / 'params').rglob('*') if f.is_file()}
  assert set(files) == on_disk and '_METADATA' in files and 'manifest.ocdbt' in files
  assert all(size == (saved / 'params' / rel).stat().st_size for rel, (size, _) in files.items())
  checkpoint.restore(saved)  # and it restores


def _damaged(src, tmp_path, name, damage, unlisted=False):
  d = tmp_path / name
  shutil.copytree(src, d)
  if unlisted:   # a checkpoint written before the file table existed: orbax's own errors
    marker = d / checkpoint.MARKER
    meta = json.loads(marker.read_text())
    meta.pop('files', None)
    marker.write_text(json.dumps(meta))
  return d, damage(d)


def test_damage_is_one_line_naming_the_file(saved, tmp_path):
  for name, damage, pattern in DAMAGE:
    d, named = _damaged(saved, tmp_path, name, damage)
    with pytest.raises(CheckpointError) as e:
      checkpoint.restore(d)
    msg = str(e.value)
    assert msg.startswith(str(named)) and '\n' not in msg, (name, msg)
    assert re.search(pattern, msg[len(str(named)):]), (name, msg)


@pytest.mark.slow
def test_nothing_else_is_printed(saved, tmp_path):
  """In a fresh process, as the CLI runs it: every damaged checkpoint, listed or not,
  gives one error line and no other output, even a second after the error."""
  cases = []
  for name, damage, pattern in DAMAGE:
    d, named = _damaged(saved, tmp_path / 'listed', name, damage)
    cases.append((str(d), str(named), pattern))
  for name, damage, rel, pattern in DAMAGE_UNLISTED:
    d, _ = _damaged(DIGITS, tmp_path / 'unlisted', name, damage, unlisted=True)
    cases.append((str(d), str(d / rel), pattern))
  script = textwrap.dedent('''
      import json, sys, time
      import var_jax
      from var_jax.errors import CheckpointError
      for d, _, _ in json.loads(sys.argv[1]):
        try:
          var_jax.load(d)
          print('LOADED', d)
        except CheckpointError as e:
          print(str(e))
      time.sleep(1.5)  # orbax's reader threads report after the error, if at all
  ''')
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT)] + sys.path))
  proc = subprocess.run([sys.executable, '-c', script, json.dumps(cases)], capture_output=True,
                        text=True, env=env, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stderr == '', proc.stderr[-3000:]
  lines = proc.stdout.splitlines()
  assert len(lines) == len(cases), proc.stdout
  for line, (_, named, pattern) in zip(lines, cases):
    assert line.startswith(named) and re.search(pattern, line[len(named):]), (line, named)


def test_orphaned_tensorstore_reads_of_a_failed_restore_are_not_logged(caplog):
  """After quiet_orbax, asyncio's 'Task exception was never retrieved' for a tensorstore
  read (what the other reads of a failed restore report when collected) is dropped;
  any other task's error is still logged."""
  import asyncio

  async def fail(msg):
    raise ValueError(msg)

  def orphan(msg):   # a task whose exception nobody retrieves, then collected
    loop = asyncio.new_event_loop()
    task = loop.create_task(fail(msg))
    loop.run_until_complete(asyncio.sleep(0))
    loop.close()
    del task
    gc.collect()

  with checkpoint.quiet_orbax():
    pass
  with caplog.at_level(logging.ERROR, logger='asyncio'):
    orphan('OUT_OF_RANGE: Error reading "x/.zarray" [tensorstore_spec=\'{}\']')
    orphan('something else failed')
  logged = [r.getMessage() for r in caplog.records if r.name == 'asyncio']
  assert len(logged) == 1 and 'never retrieved' in logged[0]
  assert 'something else failed' in str(caplog.records[-1].exc_info[1])
