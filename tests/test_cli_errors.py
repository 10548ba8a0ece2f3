"""Every user mistake on the command line is one line (two with a hint), exit status 2
for bad arguments and 1 for bad or protected files, no traceback, no file touched, and
(for the table below) no model loaded: the commands check everything first.

Table-driven through var_jax.cli.main in this process; a subprocess only where stray
stderr (orbax, absl) or a real signal matters. Also the safe_io rules themselves:
atomic writes, the sweep of killed runs' temporaries, --force and its limits.
"""
import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, get_fixture
from PIL import Image

from var_jax import cli, demo, io_utils, safe_io
from var_jax.commands import _common

DIGITS = str(demo.asset_dir())
MINE = b'my own file'


@pytest.fixture
def files(tmp_path):
  """A user's folder: files and folders the commands must never replace."""
  (tmp_path / 'mine.png').write_bytes(MINE)
  (tmp_path / 'mine.npz').write_bytes(MINE)
  (tmp_path / 'mine.json').write_bytes(MINE)
  (tmp_path / 'folder').mkdir()
  (tmp_path / 'folder' / 'keep.txt').write_bytes(MINE)
  (tmp_path / 'garbage.pth').write_bytes(b'not a zip')
  (tmp_path / 'garbage.png').write_bytes(b'not an image')
  (tmp_path / 'garbage.npz').write_bytes(b'not a zip')
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / 'image.png')
  np.savez(tmp_path / 'ok.npz', arr_0=np.zeros((2, 8, 8, 3), np.uint8))
  novar = tmp_path / 'vae_only'   # a checkpoint whose config has no VAR
  novar.mkdir()
  shutil.copy(os.path.join(DIGITS, 'var_jax_format.json'), novar)
  config = json.loads(open(os.path.join(DIGITS, 'config.json')).read())
  config.pop('var')
  (novar / 'config.json').write_text(json.dumps(config))
  bad = tmp_path / 'bad_config'
  bad.mkdir()
  shutil.copy(os.path.join(DIGITS, 'var_jax_format.json'), bad)
  (bad / 'config.json').write_text('{"vae": ')
  (tmp_path / 'olddemo').mkdir()
  (tmp_path / 'olddemo' / 'samples.npz').write_bytes(MINE)
  (tmp_path / 'foreign.npz.parts').mkdir()
  (tmp_path / 'foreign.npz.parts' / 'notes.txt').write_bytes(MINE)
  return tmp_path


def _snapshot(d):
  return {str(p.relative_to(d)): (p.read_bytes() if p.is_file() else None)
          for p in sorted(d.rglob('*'))}


@pytest.fixture
def no_model(monkeypatch):
  """Loading any model (or sampling the demo) fails the test: errors must come first."""
  def loaded(*a, **k):
    raise AssertionError('a model was loaded before the error')
  import var_jax.demo
  import var_jax.eval.inception
  import var_jax.pipeline
  monkeypatch.setattr(var_jax.pipeline, 'load', loaded)
  monkeypatch.setattr(var_jax.demo, 'run', loaded)
  monkeypatch.setattr(var_jax.eval.inception, 'load', loaded)


def run(argv, capsys):
  """(exit status, stdout, stderr) of `var-jax argv`."""
  try:
    code = cli.main([str(a) for a in argv])
  except SystemExit as e:   # argparse
    code = e.code
  out = capsys.readouterr()
  return code, out.out, out.err


def assert_one_error(code, err, want_code, pattern, cmd):
  lines = [l for l in err.splitlines()   # without info lines (`var-jax: message`)
           if not l.startswith('var-jax: ') or l.startswith('var-jax: error:')]
  assert code == want_code, err
  assert 'Traceback' not in err, err
  assert lines and lines[0].startswith(f'var-jax {cmd}: error:' if cmd else 'var-jax: error:'), err
  assert len(lines) == 1 or (len(lines) == 2 and '--help' in lines[1]), err
  assert pattern in lines[0], err


S = ['sample', '--checkpoint', DIGITS, '--no-progress']
LAB = ['--labels', '1,2']
R = ['reconstruct', '--checkpoint', DIGITS]
E = ['eval', '--samples', '{d}/ok.npz', '--ref', '{d}/ok.npz', '--inception', '{d}/garbage.pth']
CASES = [
    # sample: values of every option
    (S + LAB + ['--cfg', '-1', '--out', '{d}/g.png'], 2, '--cfg must be >= 0'),
    (S + LAB + ['--cfg', 'nan', '--out', '{d}/g.png'], 2, '--cfg must be >= 0'),
    (S + LAB + ['--cfg', 'inf', '--out', '{d}/g.png'], 2, '--cfg must be >= 0'),
    (S + LAB + ['--cfg', 'abc', '--out', '{d}/g.png'], 2, "invalid float value: 'abc'"),
    (S + LAB + ['--top-k', '-1', '--out', '{d}/g.png'], 2, '--top-k must be >= 0'),
    (S + LAB + ['--top-k', '1.5', '--out', '{d}/g.png'], 2, "invalid int value: '1.5'"),
    (S + LAB + ['--top-p', '1', '--out', '{d}/g.png'], 2, '--top-p must be in [0, 1)'),
    (S + LAB + ['--top-p', '-0.1', '--out', '{d}/g.png'], 2, '--top-p must be in [0, 1)'),
    (S + LAB + ['--top-p', 'nan', '--out', '{d}/g.png'], 2, '--top-p must be in [0, 1)'),
    (S + LAB + ['--batch-size', '0', '--out', '{d}/g.png'], 2, '--batch-size must be >= 1'),
    (S + LAB + ['--batch-size', '-4', '--out', '{d}/g.png'], 2, '--batch-size must be >= 1'),
    (S + LAB + ['--batch-size', 'many', '--out', '{d}/g.png'], 2, "invalid int value: 'many'"),
    (S + ['--num-per-class', '0', '--out', '{d}/g.png'], 2, '--num-per-class must be >= 1'),
    (S + ['--num-per-class', '-2', '--out', '{d}/g.png'], 2, '--num-per-class must be >= 1'),
    (S + LAB + ['--grid-max', '-1', '--out', '{d}/g.png'], 2, '--grid-max must be >= 0'),
    (S + LAB + ['--seed', '-1', '--out', '{d}/g.png'], 2, '--seed must be in [0, 2147483647]'),
    (S + LAB + ['--seed', str(2**40), '--out', '{d}/g.png'], 2, '--seed must be in'),
    (S + LAB + ['--seed', 'x', '--out', '{d}/g.png'], 2, "invalid int value: 'x'"),
    (S + LAB + ['--dtype', 'float16', '--out', '{d}/g.png'], 2, "invalid choice: 'float16'"),
    (S + ['--labels', '1,10', '--out', '{d}/g.png'], 2, '--labels must be in [0, 10)'),
    (S + ['--labels', '-1', '--out', '{d}/g.png'], 2, '--labels must be in [0, 10)'),
    (S + ['--labels', 'a,b', '--out', '{d}/g.png'], 2, 'comma-separated integers'),
    (S + ['--labels', '1' + '0' * 30, '--out', '{d}/g.png'], 2, 'comma-separated integers'),
    (S + ['--labels', ',', '--out', '{d}/g.png'], 2, '--labels is empty'),
    (S + LAB + ['--num-per-class', '1', '--out', '{d}/g.png'], 2, 'not allowed with'),
    (S + ['--out', '{d}/g.png'], 2, 'one of the arguments --labels --num-per-class is required'),
    (S + LAB, 2, 'the following arguments are required: --out'),
    (S + LAB + ['--stop-after-chunks', '1', '--out', '{d}/g.png'], 2, 'needs --npz-out'),
    (S + LAB + ['--out', '{d}/g.png', '--frobnicate'], 2, 'unrecognized arguments: --frobnicate'),
    (S + LAB + ['--out', '{d}/g.png', '--npz-out', '{d}/g.png'], 2, 'name the same file'),
    # sample: files
    (['sample', '--checkpoint', '{d}/absent'] + LAB + ['--out', '{d}/g.png'], 1,
     'checkpoint directory not found'),
    (['sample', '--checkpoint', '{d}/garbage.pth'] + LAB + ['--out', '{d}/g.png'], 1,
     'is a file; a var-jax checkpoint is a folder'),
    (['sample', '--checkpoint', '{d}/folder'] + LAB + ['--out', '{d}/g.png'], 1,
     'is not a var-jax checkpoint'),
    (['sample', '--checkpoint', '{d}/vae_only'] + LAB + ['--out', '{d}/g.png'], 1,
     'has no VAR transformer'),
    (['sample', '--checkpoint', '{d}/bad_config'] + LAB + ['--out', '{d}/g.png'], 1,
     'is not valid JSON'),
    (S + LAB + ['--out', '{d}/mine.png'], 1, 'exists; refusing to overwrite it'),
    (S + LAB + ['--out', '{d}/g.png', '--npz-out', '{d}/mine.npz'], 1,
     '--npz-out {d}/mine.npz exists; refusing'),
    (S + LAB + ['--out', '{d}/g.png', '--tokens-out', '{d}/mine.npz'], 1,
     '--tokens-out {d}/mine.npz exists'),
    (S + LAB + ['--out', '{d}/folder'], 1, '--out {d}/folder is a folder'),
    (S + LAB + ['--out', '{d}/g.png', '--npz-out', '{d}/folder'], 1, 'is a folder'),
    (S + LAB + ['--out', '{d}/mine.png/g.png'], 1, '{d}/mine.png is not a folder'),
    (S + LAB + ['--out', '/proc/var-jax-test/g.png'], 1, 'cannot write in /proc'),
    (S + LAB + ['--out', '{d}/g.png', '--npz-out', '{d}/foreign.npz'], 1,
     'is not a folder of chunks'),
    # reconstruct
    (R + ['--images', '{d}/image.png', '--out', '{d}/r.png', '--batch-size', '0'], 2,
     '--batch-size must be >= 1'),
    (R + ['--images', '{d}/image.png', '--out', '{d}/r.png', '--batch-size', 'x'], 2,
     "invalid int value: 'x'"),
    (R + ['--out', '{d}/r.png'], 2, 'the following arguments are required: --images'),
    (R + ['--images', '{d}/image.png', '--out', '{d}/r.png', '--tokens-out', '{d}/r.png'], 2,
     'name the same file'),
    (['reconstruct', '--checkpoint', '{d}/absent', '--images', '{d}/image.png', '--out',
      '{d}/r.png'], 1, 'checkpoint directory not found'),
    (R + ['--images', '{d}/absent.png', '--out', '{d}/r.png'], 1, 'image not found'),
    (R + ['--images', '{d}/folder', '--out', '{d}/r.png'], 1, 'is a folder; give image files'),
    (R + ['--images', '{d}/garbage.png', '--out', '{d}/r.png'], 1, 'cannot read image'),
    (R + ['--images', '{d}/image.png', '--out', '{d}/mine.png'], 1, 'refusing to overwrite'),
    (R + ['--images', '{d}/image.png', '--out', '{d}/folder'], 1, 'is a folder'),
    (R + ['--images', '{d}/image.png', '--out', '{d}/r.png', '--tokens-out', '{d}/mine.npz'], 1,
     '--tokens-out {d}/mine.npz exists'),
    # convert (inputs that are not there, or not files; outputs never replaced)
    (['convert', '--vae', '{d}/absent.pth', '--out', '{d}/ck'], 1, '--vae file not found'),
    (['convert', '--vae', '{d}/folder', '--out', '{d}/ck'], 1, '--vae {d}/folder is a folder'),
    (['convert', '--vae', '{d}/garbage.pth', '--var', '{d}/absent.pth', '--out', '{d}/ck'], 1,
     '--var file not found'),
    (['convert', '--vae', '{d}/garbage.pth', '--config', '{d}/absent.json', '--out', '{d}/ck'], 1,
     '--config file not found'),
    (['convert', '--vae', '{d}/garbage.pth', '--out', '{d}/mine.png'], 1,
     '--out {d}/mine.png exists and is not a folder'),
    (['convert', '--vae', '{d}/garbage.pth', '--out', '{d}/folder'], 1,
     'is not empty; choose a new folder or pass --force'),
    (['convert', '--vae', '{d}/garbage.pth', '--out', '{d}/folder', '--force'], 1,
     'was not written by var-jax; refusing to replace it, even with --force'),
    (['convert', '--vae', '{d}/garbage.pth', '--out', '{d}/mine.png/ck'], 1, 'is not a folder'),
    (['convert', '--out', '{d}/ck'], 2, 'the following arguments are required: --vae'),
    # demo
    (['demo', '--out', '{d}/demo', '--per-class', '0'], 2, '--per-class must be >= 1'),
    (['demo', '--out', '{d}/demo', '--per-class', 'ten'], 2, "invalid int value: 'ten'"),
    (['demo', '--out', '{d}/demo', '--cfg', '-1'], 2, '--cfg must be >= 0'),
    (['demo', '--out', '{d}/demo', '--top-k', '-1'], 2, '--top-k must be >= 0'),
    (['demo', '--out', '{d}/demo', '--top-p', '2'], 2, '--top-p must be in [0, 1)'),
    (['demo', '--out', '{d}/demo', '--seed', '-5'], 2, '--seed must be in'),
    (['demo', '--out', '{d}/mine.png'], 1, '--out {d}/mine.png exists and is not a folder'),
    (['demo', '--out', '{d}/mine.png/demo'], 1, 'is not a folder'),
    (['demo', '--out', '{d}/olddemo'], 1, '--out {d}/olddemo/samples.npz exists; refusing'),
    # eval
    ([a.replace('ok.npz', 'absent.npz', 1) for a in E], 1, '--samples file not found'),
    ([a.replace('{d}/ok.npz', '{d}/folder', 1) for a in E], 1, '--samples {d}/folder is a folder'),
    ([a.replace('ok.npz', 'garbage.npz', 1) for a in E], 1, 'is not an .npz file'),
    (E + ['--batch-size', '0'], 2, '--batch-size must be >= 1'),
    (E + ['--batch-size', '-1'], 2, '--batch-size must be >= 1'),
    (E + ['--ref-stats', 'both'], 2, "invalid choice: 'both'"),
    (E + ['--out', '{d}/mine.json'], 1, 'exists; refusing to overwrite it'),
    (E + ['--out', '{d}/folder'], 1, '--out {d}/folder is a folder'),
    # the command itself
    ([], 2, 'the following arguments are required: COMMAND'),
    (['smaple'], 2, "invalid choice: 'smaple'"),
]


@pytest.mark.parametrize('argv,code,pattern', CASES,
                         ids=[f'{i}:{" ".join(c[0][:1] + c[0][-2:])[:60]}' for i, c in enumerate(CASES)])
def test_user_mistakes_are_one_line_errors(files, no_model, capsys, argv, code, pattern):
  before = _snapshot(files)
  argv = [a.replace('{d}', str(files)) for a in argv]
  got, _, err = run(argv, capsys)
  cmd = argv[0] if argv and argv[0] != 'smaple' else ''
  assert_one_error(got, err, code, pattern.replace('{d}', str(files)), cmd)
  assert _snapshot(files) == before   # nothing written, replaced or left behind


@pytest.mark.parametrize('argv,pattern', [
    (['convert', '--vae', '{d}/garbage.pth', '--out', '{d}/ck'], 'not a readable torch zip'),
    (['convert', '--vae', '{fx}/var.pth', '--out', '{d}/ck'], 'var.pth'),   # the VAR as --vae
    (['convert', '--vae', '{fx}/vae.pth', '--var', '{fx}/vae.pth', '--out', '{d}/ck'], 'vae.pth'),
    (['convert', '--vae', '{fx}/vae.pth', '--config', '{d}/garbage.pth', '--out', '{d}/ck'],
     'garbage.pth'),
])
def test_convert_bad_weight_files(files, capsys, argv, pattern):
  fx = get_fixture('tiny4').dir
  before = _snapshot(files)
  argv = [a.replace('{d}', str(files)).replace('{fx}', str(fx)) for a in argv]
  code, _, err = run(argv, capsys)
  assert_one_error(code, err, 1, pattern, 'convert')
  assert _snapshot(files) == before


def test_debug_shows_the_traceback(files, capsys, monkeypatch):
  argv = ['sample', '--checkpoint', str(files / 'absent'), '--labels', '1', '--out',
          str(files / 'g.png')]
  with pytest.raises(_common.CommandError, match='checkpoint directory not found'):
    cli.main(argv + ['--debug'])
  monkeypatch.setenv('VAR_JAX_DEBUG', '1')
  with pytest.raises(_common.CommandError):
    cli.main(argv)
  monkeypatch.setenv('VAR_JAX_DEBUG', '0')
  assert cli.main(argv) == 1


def test_unexpected_failures_interrupts_and_sigterm(files, capsys, monkeypatch):
  """A bug or runtime failure: one line and a hint; Ctrl-C 130; SIGTERM 143; the
  temporary file of a write in progress is gone each time, the user's file untouched."""
  import var_jax.checkpoint
  argv = ['sample', '--checkpoint', DIGITS, '--labels', '1', '--out', str(files / 'g.png')]
  monkeypatch.setattr(var_jax.checkpoint, 'read_config',
                      lambda d: (_ for _ in ()).throw(RuntimeError('boom\nsecond line')))
  code, _, err = run(argv, capsys)
  assert code == 1 and err.splitlines() == ['var-jax sample: error: RuntimeError: boom',
                                            _common.DEBUG_HINT]
  target = files / 'mine.npz'

  def writes_then(signal_or_exc):
    def fn(args):
      with safe_io.atomic_write(target) as f:
        f.write(b'half')
        assert safe_io.temp_path(target).exists()
        if isinstance(signal_or_exc, int):
          os.kill(os.getpid(), signal_or_exc)
        raise signal_or_exc
    return fn
  before = _snapshot(files)
  assert _common.guarded('x', writes_then(KeyboardInterrupt), None) == 130
  old = signal.getsignal(signal.SIGTERM)
  assert _common.guarded('x', writes_then(signal.SIGTERM), None, signals=True) == 143
  assert signal.getsignal(signal.SIGTERM) is old
  assert _common.guarded('x', writes_then(OSError(28, 'No space left on device', 'disk')),
                         None) == 1
  err = capsys.readouterr().err.splitlines()
  assert err == ['var-jax x: error: interrupted', 'var-jax x: error: terminated (SIGTERM)',
                 'var-jax x: error: disk: No space left on device']
  assert _snapshot(files) == before


def test_sigterm_waits_for_a_checkpoint_save_then_cleans_up(tmp_path, monkeypatch):
  """SIGTERM while orbax writes: the save finishes inside safe_io.uninterruptible (its
  background writers must not outlive the cleanup), then the run stops with 143 and
  neither the checkpoint nor its temporary folder is left."""
  import gc

  import orbax.checkpoint as ocp

  import var_jax
  from var_jax import checkpoint
  pipe = var_jax.load(DIGITS)
  real_save = ocp.StandardCheckpointer.save

  def save_with_sigterm(self, *a, **k):
    os.kill(os.getpid(), signal.SIGTERM)
    return real_save(self, *a, **k)
  monkeypatch.setattr(ocp.StandardCheckpointer, 'save', save_with_sigterm)
  target = tmp_path / 'ck'
  reached = []

  def fn(args):
    checkpoint.save(target, pipe.config, pipe.vae_params, pipe.var_params)
    reached.append(1)
  assert _common.guarded('convert', fn, None, signals=True) == 143
  assert not reached and list(tmp_path.iterdir()) == []

  # a SIGTERM that lands inside a gc callback (where exceptions are swallowed) still stops
  fired = []

  def callback(phase, info):
    if phase == 'start' and not fired:
      fired.append(1)
      os.kill(os.getpid(), signal.SIGTERM)
      fired.append(2)

  def work(args):
    gc.callbacks.append(callback)
    try:
      gc.collect()
      for _ in range(10**7):
        pass
    finally:
      gc.callbacks.remove(callback)
    return 0
  assert _common.guarded('x', work, None, signals=True) == 143 and fired


def _dead_pid():
  p = subprocess.Popen([sys.executable, '-c', 'pass'])
  p.wait()
  return p.pid


def test_sweep_removes_only_stale_temporaries_of_that_name(tmp_path):
  dead, alive = _dead_pid(), os.getppid()
  made = {
      f'.out.npz.tmp{dead}': True,          # a killed run's file: swept
      f'.out.npz.tmp-{dead}': True,         # ... and folder
      f'.out.npz.tmp{alive}': False,        # a run still going
      f'.other.npz.tmp{dead}': False,       # another output's
      f'out.npz.tmp{dead}': False,          # not our pattern
      '.out.npz.tmpx': False, 'out.npz': False, '.out.npz': False,
  }
  for name, _ in made.items():
    if name.endswith(f'tmp-{dead}'):
      (tmp_path / name).mkdir()
      (tmp_path / name / 'x').write_bytes(b'1')
    else:
      (tmp_path / name).write_bytes(b'1')
  removed = safe_io.sweep_stale(tmp_path / 'out.npz')
  assert sorted(p.name for p in removed) == sorted(n for n, gone in made.items() if gone)
  assert sorted(p.name for p in tmp_path.iterdir()) == sorted(n for n, g in made.items() if not g)
  # a run's own folder: every stale temporary inside goes, nothing else
  parts = tmp_path / 'run'
  parts.mkdir()
  for name in (f'.chunk_000001.npz.tmp{dead}', 'chunk_000000.npz', 'manifest.json'):
    (parts / name).write_bytes(b'1')
  safe_io.sweep_stale(parts, inside=True)
  assert sorted(p.name for p in parts.iterdir()) == ['chunk_000000.npz', 'manifest.json']


def test_commands_sweep_what_killed_runs_left(files, no_model, capsys):
  """The output checks (before any model loads) remove a killed run's temporaries of
  those very outputs, and nothing else."""
  dead = _dead_pid()
  stale = [files / f'.g.png.tmp{dead}', files / f'.s.npz.tmp{dead}', files / f'.ck.tmp-{dead}']
  for p in stale[:2]:
    p.write_bytes(b'partial')
  stale[2].mkdir()
  kept = files / f'.unrelated.npz.tmp{dead}'
  kept.write_bytes(b'1')
  code, _, err = run(S + LAB + ['--out', files / 'g.png', '--npz-out', files / 's.npz'], capsys)
  assert code == 1 and 'a model was loaded' in err   # all checks passed, then the load
  code, _, err = run(['convert', '--vae', files / 'garbage.pth', '--out', files / 'ck'], capsys)
  assert code == 1 and 'not a readable torch zip' in err
  assert not any(p.exists() for p in stale) and kept.exists()


def test_sweep_puts_back_a_checkpoint_caught_mid_replacement(tmp_path):
  """Killed between the two renames of checkpoint.save(force=True): the old checkpoint
  is in .NAME.old-<pid>, the target is missing; the next run puts the old one back."""
  dead = _dead_pid()
  old = tmp_path / f'.ck.old-{dead}'
  old.mkdir()
  (old / 'config.json').write_bytes(b'old')
  (tmp_path / f'.ck.tmp-{dead}').mkdir()
  safe_io.check_output(tmp_path / 'ck', kind='dir', flag='--out', force=True)
  assert sorted(p.name for p in tmp_path.iterdir()) == ['ck']
  assert (tmp_path / 'ck' / 'config.json').read_bytes() == b'old'


def test_atomic_write_and_check_output(tmp_path):
  f = tmp_path / 'a' / 'b.bin'
  with pytest.raises(ValueError):
    with safe_io.atomic_write(f) as fh:
      fh.write(b'partial')
      raise ValueError('fail mid-write')
  assert not (tmp_path / 'a' / 'b.bin').exists() and list((tmp_path / 'a').iterdir()) == []
  with safe_io.atomic_write(f) as fh:
    fh.write(b'done')
  assert f.read_bytes() == b'done'
  with pytest.raises(FileExistsError, match='refusing to overwrite'):
    safe_io.check_output(f)
  assert safe_io.check_output(f, force=True) == f
  assert safe_io.check_output(f, owned=True) == f
  assert safe_io.check_output(None) is None
  ck = tmp_path / 'ck'
  ck.mkdir()
  (ck / 'var_jax_format.json').write_text('{}')
  is_ck = lambda p: (p / 'var_jax_format.json').is_file()
  with pytest.raises(FileExistsError, match='not empty'):
    safe_io.check_output(ck, kind='dir', is_ours=is_ck)
  assert safe_io.check_output(ck, kind='dir', force=True, is_ours=is_ck) == ck
  with pytest.raises(ValueError, match='name the same file'):
    safe_io.check_distinct({'--out': str(f), '--npz-out': str(tmp_path / 'a' / '..' / 'a' / 'b.bin')})


URL_CASES = [
    (S + LAB + ['--out', 'gs://bucket/g.png'], '--out gs://bucket/g.png'),
    (S + LAB + ['--out', '{d}/g.png', '--npz-out', 'gs://bucket/s.npz'], '--npz-out gs://'),
    (R + ['--images', '{d}/image.png', '--out', 's3://bucket/r.png'], '--out s3://'),
    (['edit', '--checkpoint', DIGITS, '--image', '{d}/image.png', '--box', '0,0,0.5,0.5',
      '--out', 'gs://bucket/e.png'], '--out gs://'),
    (['convert', '--vae', '{d}/garbage.pth', '--out', 'gs://bucket/ck'], '--out gs://'),
    (['demo', '--out', 'gs://bucket/demo'], '--out gs://'),
    (E + ['--out', 'gs://bucket/m.json'], '--out gs://'),
    (['train', '--config', str(ROOT / 'configs' / 'var_tiny.py'), '--workdir', 'gs://bucket/run'],
     '--workdir gs://bucket/run'),
    (['tokenize', '--config', str(ROOT / 'configs' / 'var_tiny.py'), '--out', 'gs://bucket/tok'],
     '--out gs://'),
]


@pytest.mark.parametrize('argv,pattern', URL_CASES, ids=[c[0][0] for c in URL_CASES])
def test_urls_are_refused_not_written_to_a_local_folder(files, no_model, capsys, monkeypatch,
                                                        argv, pattern):
  """os/pathlib take 'gs://bucket/x' for the relative folder 'gs:': every output path and
  the training workdir are checked before anything is loaded or written."""
  monkeypatch.chdir(files)   # where a 'gs:' folder would appear
  before = _snapshot(files)
  argv = [a.replace('{d}', str(files)) for a in argv]
  code, _, err = run(argv, capsys)
  assert_one_error(code, err, 2, pattern, argv[0])
  assert 'mounted file systems' in err
  assert _snapshot(files) == before


def test_require_local_and_the_library_entry_points(tmp_path, monkeypatch):
  """The same check where the library writes (a training workdir, a checkpoint, a tokens
  folder) or reads a data folder; a local name with a colon is still a path."""
  from var_jax import checkpoint
  from var_jax.config_loader import load_config
  from var_jax.data import images
  from var_jax.train import loop, tokenize
  monkeypatch.chdir(tmp_path)
  for url in ('gs://b/x', 's3://b/x', 'file:///tmp/x', 'HTTPS://h/x'):
    with pytest.raises(ValueError, match='not .*:// URLs'):
      safe_io.require_local(url, 'out')
  for path in ('a:b/c', 'gs:', 'run/gs://x', tmp_path / 'x', None):
    safe_io.require_local(path, 'out')
  cfg = load_config(str(ROOT / 'configs' / 'var_tiny.py'))
  with pytest.raises(ValueError, match='workdir gs://b/run'):
    loop.train_and_evaluate(cfg, 'gs://b/run')
  with pytest.raises(ValueError, match='out gs://b/tok'):
    tokenize.tokenize(cfg, 'gs://b/tok')
  with pytest.raises(ValueError, match='checkpoint directory gs://b/ck'):
    checkpoint.save('gs://b/ck', None, {})
  for kind in ('folder', 'tokens'):
    data = cfg.data.copy_and_resolve_references()
    data.kind, data.path = kind, 'gs://b/imagenet'
    with pytest.raises(ValueError, match='data.path gs://b/imagenet'):
      images.make_source(data, 'train', 32)
  assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason='root may write into a read-only folder')
def test_unwritable_output_folder(tmp_path, capsys):
  ro = tmp_path / 'ro'
  ro.mkdir()
  ro.chmod(0o500)
  try:
    code, _, err = run(['sample', '--checkpoint', DIGITS, '--labels', '1', '--out',
                        ro / 'g.png'], capsys)
  finally:
    ro.chmod(0o700)
  assert_one_error(code, err, 1, 'cannot write in', 'sample')


def test_chunked_run_refuses_folders_it_did_not_make(tmp_path):
  out = tmp_path / 'x.npz'
  (tmp_path / 'x.npz.parts').write_bytes(MINE)
  with pytest.raises(FileExistsError, match='is not a folder'):
    io_utils.ChunkedRun(out, {'a': 1})
  (tmp_path / 'x.npz.parts').unlink()
  run1 = io_utils.ChunkedRun(out, {'a': 1})
  assert not run1.resuming and not run1.claims(out)
  run2 = io_utils.ChunkedRun(out, {'a': 1})
  assert run2.resuming and not run2.claims(out)
  run2.claim([out, None])
  assert io_utils.ChunkedRun(out, {'a': 1}).claims(out)
  with pytest.raises(ValueError, match='other settings'):
    io_utils.ChunkedRun(out, {'a': 2})


def _subprocess(argv, **kw):
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS='cpu',
             VAR_JAX_COMPILATION_CACHE='off')
  env.pop('VAR_JAX_DEBUG', None)
  return subprocess.run([sys.executable, '-m', 'var_jax.cli', *map(str, argv)], env=env,
                        capture_output=True, text=True, timeout=120, **kw)


def test_damaged_checkpoint_is_one_line_and_nothing_else(tmp_path):
  """A data file truncated behind the checkpoint's back (no file table to catch it
  first): orbax fails inside; stderr holds our one line and no third-party noise."""
  ck = tmp_path / 'ck'
  shutil.copytree(DIGITS, ck)
  marker = json.loads((ck / 'var_jax_format.json').read_text())
  marker.pop('files', None)
  (ck / 'var_jax_format.json').write_text(json.dumps(marker))
  data = max((p for p in (ck / 'params').rglob('*') if p.is_file() and p.parent.name == 'd'),
             key=lambda p: p.stat().st_size)
  data.write_bytes(data.read_bytes()[:data.stat().st_size // 2])
  r = _subprocess(['sample', '--checkpoint', ck, '--labels', '1', '--out', tmp_path / 'g.png'])
  lines = [l for l in r.stderr.splitlines() if not l.startswith('var-jax: ')]
  assert r.returncode == 1, r.stderr
  assert len(lines) == 1 and lines[0].startswith('var-jax sample: error: '), r.stderr
  assert 'corrupt' in lines[0] and 'Traceback' not in r.stderr and 'Event loop' not in r.stderr
  assert not (tmp_path / 'g.png').exists()
