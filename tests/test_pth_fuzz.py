"""Fuzzes the `.pth` reader in a subprocess (tests/pth_fuzz.py): a crash, a hang or a
large allocation fails this test with the seed and the case instead of killing pytest.

VAR_JAX_FUZZ_SEED / _CASES / _SECONDS change the campaign (defaults: seed 0, 2500
cases, at most 20 s); replay one case with
`python tests/pth_fuzz.py --seed S --case N --tmp /tmp/fuzz`.
"""
import json
import os
import pathlib
import subprocess
import sys

import pytest

HERE = pathlib.Path(__file__).resolve().parent


@pytest.mark.slow
def test_reader_survives_fuzzing(tmp_path):
  seed = int(os.environ.get('VAR_JAX_FUZZ_SEED', 0))
  cases = int(os.environ.get('VAR_JAX_FUZZ_CASES', 2500))
  seconds = float(os.environ.get('VAR_JAX_FUZZ_SECONDS', 20))
  progress = tmp_path / 'progress.txt'
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent)] + sys.path),
             OPENBLAS_NUM_THREADS='1', OMP_NUM_THREADS='1')
  try:
    proc = subprocess.run(
        [sys.executable, str(HERE / 'pth_fuzz.py'), '--seed', str(seed), '--cases', str(cases),
         '--seconds', str(seconds), '--tmp', str(tmp_path / 'work'), '--progress', str(progress)],
        capture_output=True, text=True, env=env, timeout=seconds + 120)
  except subprocess.TimeoutExpired:
    last = progress.read_text().splitlines()[-1:] if progress.exists() else ['before any case']
    pytest.fail(f'fuzz worker hung (seed {seed}, last started: {last})')
  if proc.returncode:
    last = progress.read_text().splitlines()[-1:] if progress.exists() else ['before any case']
    pytest.fail(f'fuzz worker died with exit code {proc.returncode} (seed {seed}, last started: '
                f'{last}); replay: python tests/pth_fuzz.py --seed {seed} --case N --tmp DIR\n'
                f'{proc.stderr[-3000:]}')
  summary = json.loads(proc.stdout)
  print(json.dumps({k: summary[k] for k in ('seed', 'crafted', 'cases', 'loaded', 'refused',
                                            'seconds')}))
  assert summary['n_failures'] == 0, summary['failures']
  assert summary['crafted'] > 30
  assert summary['cases'] >= min(cases, 200)  # it really ran (the time cap is generous)
  assert summary['loaded'] > 0 and summary['refused'] > 0
