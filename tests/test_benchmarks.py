"""The benchmark scripts' own logic (what they count, how they refuse bad input); their
figures live in benchmarks/RESULTS.md, not here."""
import os
import subprocess

import jax
import jax.numpy as jnp
import pytest
from conftest import ROOT, load_benchmark

SCRIPT = ROOT / 'benchmarks' / 'gpu_side_by_side.sh'


def test_dus_write_counter_multiplies_by_trip_count():
  """train_bench's dus_write_GiB: a 5-step scan stacking a (4, 8) float32 carry writes
  5 x 128 bytes through dynamic-update-slice; the same loop unrolled writes none."""
  bench = load_benchmark('train_bench')
  w = jnp.eye(8) * 0.5
  step = lambda c: jnp.tanh(c @ w)

  def scanned(c):
    return jax.lax.scan(lambda c, _: (step(c), step(c)), c, None, length=5)[1]

  def unrolled(c):
    out = []
    for _ in range(5):
      c = step(c)
      out.append(c)
    return jnp.stack(out)
  hlo = lambda f: jax.jit(f).lower(jnp.ones((4, 8))).compile().as_text()
  assert bench.dus_write_bytes(hlo(scanned)) == 5 * 4 * 8 * 4
  assert bench.dus_write_bytes(hlo(unrolled)) == 0


def _side_by_side(out, cwd=None, **env):
  """The script without a reference checkout (VAR_DIR unset), as in CI."""
  base = {k: v for k, v in os.environ.items() if k != 'VAR_DIR'}
  return subprocess.run(['bash', str(SCRIPT), str(out)], capture_output=True, text=True,
                        env=dict(base, **env), cwd=cwd, timeout=120)


@pytest.mark.parametrize('parts', ['ref trian', 'sample,ref'])
def test_gpu_side_by_side_rejects_unknown_parts(tmp_path, parts):
  r = _side_by_side(tmp_path / 'out', PARTS=parts)
  assert r.returncode == 2 and 'unknown part' in r.stderr
  assert not (tmp_path / 'out').exists()


def test_gpu_side_by_side_never_reuses_a_folder(tmp_path):
  out = tmp_path / 'out'
  r = _side_by_side(out, PARTS='ref')
  assert r.returncode == 0, r.stderr
  assert sorted(p.name for p in out.iterdir()) == ['environment.txt', 'ref_skipped.txt']
  r = _side_by_side(out, PARTS='ref')
  assert r.returncode == 2 and 'exists' in r.stderr
  assert sorted(p.name for p in out.iterdir()) == ['environment.txt', 'ref_skipped.txt']


def test_gpu_side_by_side_writes_a_relative_folder_where_it_was_asked(tmp_path):
  """OUT_DIR relative to the caller's directory, not to the checkout the script cd's into."""
  r = _side_by_side('rel_out', cwd=tmp_path, PARTS='ref')
  assert r.returncode == 0, r.stderr
  assert (tmp_path / 'rel_out' / 'ref_skipped.txt').exists()
  assert not (ROOT / 'rel_out').exists()


@pytest.mark.parametrize('variants, message', [('scan=maybe', "scan must be 'true' or 'false'"),
                                               ('speed=max', 'unknown variant option')])
def test_train_bench_bad_variant_is_one_line(capsys, variants, message):
  with pytest.raises(SystemExit) as e:
    load_benchmark('train_bench').main(['--batch', '8', '--sweep', '--variants', variants])
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert message in err and 'Traceback' not in err
