"""The notebooks run top to bottom on a CPU (nbclient, one fresh kernel each, in a temporary
folder), are stored without outputs, and open on Colab (the first cell installs var-jax
unless it is importable). 02 runs without the released weights (its weight cells say
'skipped'); a slow test runs all of 02 on the tiny4 fixture's .pth files instead.

The three notebooks execute at the same time, each in its own process (most of their time
is single-threaded XLA compilation), so the module takes about as long as the slowest.
"""
import json
import os
import subprocess
import sys

import nbformat
import pytest

from conftest import FIXTURES, ROOT

NOTEBOOKS = ROOT / 'notebooks'
NAMES = ('01_quickstart_digits.ipynb', '02_imagenet_weights.ipynb', '03_train_digits.ipynb')


def kernel_env():
  """This checkout first on the path, one CPU device (not the tests' eight fake ones)."""
  env = dict(os.environ)
  env['PYTHONPATH'] = os.pathsep.join([str(ROOT)] + [p for p in [env.get('PYTHONPATH')] if p])
  env['JAX_PLATFORMS'] = 'cpu'
  env['XLA_FLAGS'] = ' '.join(f for f in env.get('XLA_FLAGS', '').split()
                              if not f.startswith('--xla_force_host_platform_device_count'))
  env.pop('VAR_WEIGHTS_DIR', None)
  return env


RUNNER = """
import sys, nbformat
from nbclient import NotebookClient
src, out, cwd, extra = sys.argv[1:5]
nb = nbformat.read(src, as_version=4)
if extra:   # overrides after the 'Parameters' cell, as papermill would
    i = next(i for i, c in enumerate(nb.cells) if c.source.startswith('# Parameters'))
    nb.cells.insert(i + 1, nbformat.v4.new_code_cell(extra))
try:
    NotebookClient(nb, timeout=600, kernel_name='python3', resources={'metadata': {'path': cwd}}).execute()
finally:
    nbformat.write(nb, out)
"""


def start(name, cwd, after_parameters=''):
  """Starts executing a notebook in a subprocess; `finish` waits for it."""
  cwd.mkdir(parents=True, exist_ok=True)
  out = cwd / f'executed_{name}'
  proc = subprocess.Popen([sys.executable, '-c', RUNNER, str(NOTEBOOKS / name), str(out), str(cwd),
                           after_parameters], env=kernel_env(), cwd=cwd,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  return proc, out


def finish(handle):
  """The executed notebook; a failing cell fails the test with nbclient's message."""
  proc, out = handle
  log, _ = proc.communicate(timeout=900)
  if proc.returncode != 0:
    pytest.fail(f'notebook failed:\n{log[-6000:]}')
  return nbformat.read(out, as_version=4)


@pytest.fixture(scope='module')
def executed(tmp_path_factory):
  """The three notebooks started at once (02 without weights); name -> (handle, folder)."""
  runs = {}
  for name in NAMES:
    cwd = tmp_path_factory.mktemp(name.split('_')[0])
    runs[name] = (start(name, cwd), cwd)
  yield runs
  for (proc, _), _ in runs.values():
    if proc.poll() is None:
      proc.kill()


def text_of(nb):
  out = []
  for cell in nb.cells:
    for o in cell.get('outputs', []):
      out.append(o.get('text', '') if o.get('output_type') == 'stream' else
                 o.get('data', {}).get('text/plain', ''))
  return '\n'.join(out)


def images_of(nb):
  return sum('image/png' in o.get('data', {}) for c in nb.cells for o in c.get('outputs', []))


@pytest.mark.parametrize('name', NAMES)
def test_stored_without_outputs_and_ready_for_colab(name):
  raw = json.loads((NOTEBOOKS / name).read_text())
  nb = nbformat.reads(json.dumps(raw), as_version=4)
  nbformat.validate(nb)
  code = [c for c in nb.cells if c.cell_type == 'code']
  assert all(c.outputs == [] and c.execution_count is None for c in code)
  setup = code[0].source
  assert "find_spec('var_jax') is None" in setup and 'pip' in setup and 'git' in setup
  assert nb.metadata.kernelspec.name == 'python3'
  assert not (NOTEBOOKS / 'demo.ipynb').exists()


@pytest.mark.slow
def test_quickstart_runs(executed):
  handle, _ = executed['01_quickstart_digits.ipynb']
  nb = finish(handle)
  text = text_of(nb)
  assert 'classifier agrees with the label: 1.0' in text or 'classifier agrees with the label: 0.9' in text
  assert 'as requested)' in text
  assert images_of(nb) == 4                     # samples, reconstructions, edits, in-painting


@pytest.mark.slow
def test_weights_notebook_skips_cleanly_without_the_files(executed):
  handle, tmp_path = executed['02_imagenet_weights.ipynb']
  nb = finish(handle)
  text = text_of(nb)
  assert 'missing var_weights/vae_ch160v4096z32.pth, var_weights/var_d16.pth' in text
  assert text.count('skipped (no weights)') == 4
  assert 'parameters identical after the round trip: True' in text
  assert not (tmp_path / 'ckpt_native').exists()


@pytest.mark.slow
def test_weights_notebook_runs_on_converted_files(tmp_path):
  """Every cell of 02 with real .pth files: the tiny4 fixture's (64 px, 10 classes; ~1 min)."""
  fx = FIXTURES / 'tiny4'
  nb = finish(start('02_imagenet_weights.ipynb', tmp_path, after_parameters=(
      f"WEIGHTS_DIR = {str(fx)!r}; VAE_FILE = 'vae.pth'; VAR_FILE = 'var.pth'\n"
      f"CONFIG = {str(fx / 'config.json')!r}; CLASSES = [3, 9]")))
  text = text_of(nb)
  assert 'weights found' in text and 'skipped' not in text and 'reconstruction PSNR' in text
  assert (tmp_path / 'ckpt_native' / 'config.json').is_file()
  assert images_of(nb) == 3


@pytest.mark.slow
def test_training_notebook_runs(executed):
  handle, tmp_path = executed['03_train_digits.ipynb']
  nb = finish(handle)
  text = text_of(nb)
  assert 'held-out PSNR' in text and 'token accuracy' in text
  for stage in ('vqvae', 'var'):
    assert (tmp_path / 'digits_run' / stage / 'export' / 'config.json').is_file()
  assert images_of(nb) == 2
