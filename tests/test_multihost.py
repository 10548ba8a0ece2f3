"""Two local processes with jax.distributed (CPU) train to the same params as one process."""
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

WORKER = pathlib.Path(__file__).resolve().parent / 'multihost_worker.py'


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _start(nproc, tmp_path, tag):
  port = _free_port()
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  return [subprocess.Popen([sys.executable, str(WORKER), str(port), str(nproc), str(i),
                            str(tmp_path / tag), str(tmp_path / f'{tag}.npz')], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
          for i in range(nproc)]


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
  procs = _start(1, tmp_path, 'one') + _start(2, tmp_path, 'two')   # all three at once
  logs = []
  try:
    for p in procs:
      logs.append(p.communicate(timeout=300)[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]
  one, two = dict(np.load(tmp_path / 'one.npz')), dict(np.load(tmp_path / 'two.npz'))
  logs = logs[1:]
  assert 'summary' in logs[1] and "'step': 3" in logs[1]
  assert one.keys() == two.keys()
  for k in one:
    np.testing.assert_allclose(one[k], two[k], atol=1e-5, rtol=0, err_msg=k)
  print('max |one - two| =', max(float(np.max(np.abs(one[k] - two[k]))) for k in one))
  # both processes wrote their data-iterator state into the final checkpoint
  data_dir = tmp_path / 'two' / 'checkpoints' / '3' / 'data'
  assert sorted(p.name for p in data_dir.glob('*.json')) == ['process_0-of-2.json', 'process_1-of-2.json']
