"""`var-jax convert / sample / reconstruct` end to end on tiny4, through var_jax.cli.main."""
import pathlib

import numpy as np
import pytest
from conftest import get_fixture
from PIL import Image

from var_jax import cli, io_utils

FX = 'tiny4'


@pytest.fixture(scope='module')
def ckpt(tmp_path_factory):
  fx = get_fixture(FX)
  out = tmp_path_factory.mktemp('cli') / 'ckpt'
  assert cli.main(['convert', '--vae', str(fx.dir / 'vae.pth'), '--var', str(fx.dir / 'var.pth'),
                   '--config', str(fx.dir / 'config.json'), '--out', str(out)]) == 0
  return out


def sample(ckpt, *extra):
  return cli.main(['sample', '--checkpoint', str(ckpt), '--no-progress', *map(str, extra)])


@pytest.mark.parametrize('blocks', [[], ['--unrolled']], ids=['scan', 'unrolled'])
@pytest.mark.slow
def test_sample_greedy_matches_reference(ckpt, tmp_path, blocks):
  fx = get_fixture(FX)
  labels = ','.join(str(int(v)) for v in fx.raw_config['sampling']['label'])
  rc = sample(ckpt, '--labels', labels, '--cfg', 2.0, '--top-k', 1, '--top-p', 0, '--seed', 0,
              '--out', tmp_path / 'grid.png', '--tokens-out', tmp_path / 'tokens.npz', *blocks)
  assert rc == 0
  with np.load(tmp_path / 'tokens.npz') as z:
    assert sorted(z.files) == [f'idx_{k}' for k in range(4)]
    for k in range(4):
      assert z[f'idx_{k}'].dtype == np.int32
      np.testing.assert_array_equal(z[f'idx_{k}'], fx.io[f'sample_idx_{k}'])
  grid = np.asarray(Image.open(tmp_path / 'grid.png'))
  assert grid.shape == (64 + 4, 2 * 66 + 2, 3)
  want = io_utils.to_uint8(fx.nhwc('sample_img')[0])
  assert np.abs(grid[2:66, 2:66].astype(int) - want).max() <= 1  # rounding at .5 only


@pytest.mark.slow
def test_npz_is_resumable(ckpt, tmp_path):
  """An interrupted --npz-out run, rerun, gives exactly the one-shot result."""
  common = ['--num-per-class', 1, '--batch-size', 4, '--cfg', 1.5, '--top-k', 5, '--top-p', 0,
            '--seed', 7]  # 10 labels: chunks of 4, 4, 2 (padded)
  assert sample(ckpt, *common, '--out', tmp_path / 'a.png', '--npz-out', tmp_path / 'a.npz',
                '--tokens-out', tmp_path / 'a_tok.npz') == 0
  b = tmp_path / 'b.npz'
  parts = tmp_path / 'b.npz.parts'
  assert sample(ckpt, *common, '--out', tmp_path / 'b.png', '--npz-out', b,
                '--stop-after-chunks', 1) == 0
  assert not b.exists() and len(list(parts.glob('chunk_*.npz'))) == 1
  assert sample(ckpt, *common, '--seed', 8, '--out', tmp_path / 'b.png', '--npz-out', b) == 2
  assert sample(ckpt, *common, '--out', tmp_path / 'b.png', '--npz-out', b,
                '--tokens-out', tmp_path / 'b_tok.npz') == 0
  assert not parts.exists()
  with np.load(tmp_path / 'a.npz') as za, np.load(b) as zb:
    assert za.files == ['arr_0'] and za['arr_0'].dtype == np.uint8
    assert za['arr_0'].shape == (10, 64, 64, 3)
    np.testing.assert_array_equal(za['arr_0'], zb['arr_0'])
    assert len({za['arr_0'][i].tobytes() for i in range(10)}) == 10
  with np.load(tmp_path / 'a_tok.npz') as ta, np.load(tmp_path / 'b_tok.npz') as tb:
    for k in range(4):
      np.testing.assert_array_equal(ta[f'idx_{k}'], tb[f'idx_{k}'])
    assert ta['idx_3'].shape == (10, 16)


@pytest.mark.slow
def test_npz_out_keeps_user_files_and_replaces_only_its_own(ckpt, tmp_path, monkeypatch):
  """An existing --npz-out is the user's: refused before sampling. A run killed while
  writing its final outputs (after the .npz, before its parts folder went) is resumed by
  the same command, which replaces those outputs of its own; once finished, they are
  the user's again (--force replaces them)."""
  common = ['--labels', '1,2,3', '--batch-size', 2, '--top-k', 5, '--top-p', 0, '--seed', 1]
  npz, grid, tok = tmp_path / 's.npz', tmp_path / 's.png', tmp_path / 't.npz'
  parts = tmp_path / 's.npz.parts'
  outs = ['--out', grid, '--npz-out', npz, '--tokens-out', tok]
  npz.write_bytes(b'mine')
  assert sample(ckpt, *common, *outs) == 1
  assert npz.read_bytes() == b'mine' and not parts.exists() and not grid.exists()
  npz.unlink()

  def killed(self):
    raise KeyboardInterrupt
  monkeypatch.setattr(io_utils.ChunkedRun, 'cleanup', killed)
  assert sample(ckpt, *common, *outs) == 130
  assert npz.is_file() and grid.is_file() and tok.is_file() and parts.is_dir()
  with np.load(npz) as z:
    first = z['arr_0']
  monkeypatch.undo()
  assert sample(ckpt, *common, *outs) == 0
  assert not parts.exists()
  assert sorted(p.name for p in tmp_path.iterdir()) == ['s.npz', 's.png', 't.npz']  # no temporaries
  with np.load(npz) as z:
    np.testing.assert_array_equal(z['arr_0'], first)
  assert sample(ckpt, *common, *outs) == 1
  assert sample(ckpt, *common, *outs, '--force') == 0 and not parts.exists()


@pytest.mark.slow
def test_npz_resume_refuses_a_replaced_checkpoint(ckpt, tmp_path, capsys):
  """A partial --npz-out run is not continued with other weights saved at the same path
  (it would mix two models' images in one file)."""
  import shutil

  import jax

  from var_jax.pipeline import load
  mine = tmp_path / 'ckpt'
  shutil.copytree(ckpt, mine)
  common = ['--labels', '1,2,3', '--batch-size', 2, '--top-k', 5, '--top-p', 0,
            '--out', tmp_path / 'g.png', '--npz-out', tmp_path / 's.npz']
  assert sample(mine, *common, '--stop-after-chunks', 1) == 0
  pipe = load(mine)
  pipe.var_params = jax.tree_util.tree_map(lambda a: a * 1.5, pipe.var_params)
  pipe.save(mine, force=True)
  capsys.readouterr()
  assert sample(mine, *common) == 2
  assert 'checkpoint_sha256' in capsys.readouterr().err
  assert not (tmp_path / 's.npz').exists()


@pytest.mark.slow
def test_npz_out_with_grid_max_0(ckpt, tmp_path, capsys):
  """--grid-max 0 writes no grid; the .npz run still completes and cleans up."""
  assert sample(ckpt, '--labels', '1,2,3', '--batch-size', 2, '--top-k', 5, '--top-p', 0,
                '--grid-max', 0, '--out', tmp_path / 'g.png', '--npz-out', tmp_path / 's.npz') == 0
  assert 'no grid' in capsys.readouterr().out
  assert sorted(p.name for p in tmp_path.iterdir()) == ['s.npz']
  with np.load(tmp_path / 's.npz') as z:
    assert z['arr_0'].shape == (3, 64, 64, 3)


@pytest.mark.slow
def test_reconstruct(ckpt, tmp_path):
  fx = get_fixture(FX)
  paths = []
  for i, img in enumerate(fx.nhwc('img')):
    paths.append(tmp_path / f'in{i}.png')
    Image.fromarray(io_utils.to_uint8(img, low=-1.0)).save(paths[-1])
  wide = tmp_path / 'wide.png'  # resized and centre-cropped to 64x64
  Image.fromarray(np.random.default_rng(0).integers(0, 255, (90, 150, 3), np.uint8)).save(wide)
  rc = cli.main(['reconstruct', '--checkpoint', str(ckpt), '--images', *map(str, paths), str(wide),
                 '--out', str(tmp_path / 'rec.png'), '--tokens-out', str(tmp_path / 'rec.npz')])
  assert rc == 0
  assert np.asarray(Image.open(tmp_path / 'rec.png')).shape == (2 * 66 + 2, 3 * 66 + 2, 3)
  with np.load(tmp_path / 'rec.npz') as z:
    assert [z[f'idx_{k}'].shape for k in range(4)] == [(3, 1), (3, 4), (3, 9), (3, 16)]
    # uint8 rounding of the input moves few codes: the coarse scales still agree
    np.testing.assert_array_equal(z['idx_0'][:2], fx.io['idx_0'])


@pytest.mark.parametrize('args,code,message', [
    (['--labels', '1', '--cfg', '-1'], 2, '--cfg must be >= 0'),
    (['--labels', '1', '--cfg', 'nan'], 2, '--cfg must be >= 0'),
    (['--labels', '1', '--top-k', '-1'], 2, '--top-k must be >= 0'),
    (['--labels', '1', '--top-k', '5', '--top-p', '1'], 2, '--top-p must be in [0, 1)'),
    (['--labels', '1,10', '--top-k', '5'], 2, 'labels must be in [0, 10)'),
    (['--labels', 'a,b', '--top-k', '5'], 2, 'comma-separated integers'),
])
def test_sample_argument_errors(ckpt, tmp_path, capsys, args, code, message):
  assert sample(ckpt, *args, '--out', tmp_path / 'g.png') == code
  err = capsys.readouterr().err
  assert message in err and 'Traceback' not in err
  assert not (tmp_path / 'g.png').exists()


def test_missing_inputs_fail_cleanly(ckpt, tmp_path, capsys):
  assert sample(tmp_path / 'absent', '--labels', '1', '--out', tmp_path / 'g.png') == 1
  assert 'checkpoint directory not found' in capsys.readouterr().err
  assert cli.main(['reconstruct', '--checkpoint', str(ckpt), '--images', str(tmp_path / 'x.png'),
                   '--out', str(tmp_path / 'r.png')]) == 1
  assert 'image not found' in capsys.readouterr().err
  fx = get_fixture(FX)
  # converting onto an existing checkpoint is refused (no data loss) ...
  assert cli.main(['convert', '--vae', str(fx.dir / 'vae.pth'), '--out', str(ckpt)]) == 1
  assert 'not empty' in capsys.readouterr().err
  # ... and a corrupt .pth is reported, not raised
  bad = tmp_path / 'bad.pth'
  bad.write_bytes(b'not a zip')
  assert cli.main(['convert', '--vae', str(bad), '--out', str(tmp_path / 'o')]) == 1
  assert 'not a readable torch zip' in capsys.readouterr().err
  with pytest.raises(SystemExit) as e:  # argparse: --labels or --num-per-class is required
    sample(ckpt, '--out', tmp_path / 'g.png')
  assert e.value.code == 2


@pytest.mark.slow
def test_top_k_beyond_the_vocabulary_and_the_embedded_model(ckpt, tmp_path, capsys):
  """--top-k above the vocabulary samples without a top-k cut (said on stderr), exactly
  like --top-k 0; the embedded digits model samples with the default options."""
  from var_jax import demo
  common = ['--labels', '1,2', '--top-p', '0.5', '--seed', '3']
  assert sample(ckpt, *common, '--top-k', 65, '--out', tmp_path / 'a.png',
                '--tokens-out', tmp_path / 'a.npz') == 0
  err = capsys.readouterr().err
  assert '--top-k=65 >= the vocabulary (64 codes): no top-k cut' in err
  assert 'images/s' in err or '2 images in' in err
  assert sample(ckpt, *common, '--top-k', 0, '--out', tmp_path / 'b.png',
                '--tokens-out', tmp_path / 'b.npz') == 0
  with np.load(tmp_path / 'a.npz') as a, np.load(tmp_path / 'b.npz') as b:
    for k in range(4):
      np.testing.assert_array_equal(a[f'idx_{k}'], b[f'idx_{k}'])
  assert sample(demo.asset_dir(), '--labels', '3,7', '--out', tmp_path / 'digits.png') == 0
  assert np.asarray(Image.open(tmp_path / 'digits.png')).shape == (32 + 4, 2 * 34 + 2, 3)


def test_console_command_turns_on_the_compilation_cache(tmp_path, monkeypatch):
  """Where the persistent cache goes, and the opt-out; library calls of main() leave jax alone."""
  from var_jax.commands import _common
  env = {'XDG_CACHE_HOME': str(tmp_path)}
  assert _common.compilation_cache_dir(env) == str(tmp_path / 'var_jax' / 'jax_cache')
  assert _common.compilation_cache_dir({**env, 'VAR_JAX_COMPILATION_CACHE': 'off'}) is None
  assert _common.compilation_cache_dir({'VAR_JAX_COMPILATION_CACHE': str(tmp_path / 'c')}) == str(tmp_path / 'c')
  import jax
  before = jax.config.jax_compilation_cache_dir
  calls = []
  monkeypatch.setattr(_common, 'enable_compilation_cache', lambda: calls.append(1))
  monkeypatch.setattr('sys.argv', ['var-jax', 'demo', '--per-class', '0'])
  assert cli.main() == 2 and calls == [1]          # the console path (argv from sys.argv)
  assert cli.main(['demo', '--per-class', '0']) == 2 and calls == [1]
  assert jax.config.jax_compilation_cache_dir == before


@pytest.mark.slow
def test_npz_run_stopped_while_removing_its_parts(ckpt, tmp_path, monkeypatch, capsys):
  """Ctrl-C while the finished run deletes its parts folder (thousands of chunks in a real
  run) leaves the outputs complete and nothing that blocks the next command: a rerun
  says the .npz exists, --force starts over, and no leftover remains."""
  import shutil
  common = ['--labels', '1,2,3', '--batch-size', 2, '--top-k', 5, '--top-p', 0,
            '--out', tmp_path / 'g.png', '--npz-out', tmp_path / 's.npz']
  rmtree = shutil.rmtree

  def stopped(path, *a, **kw):   # the manifest goes first, then Ctrl-C
    for p in sorted(pathlib.Path(path).iterdir(), key=lambda p: p.name != 'manifest.json')[:2]:
      p.unlink()
    raise KeyboardInterrupt
  monkeypatch.setattr(io_utils.shutil, 'rmtree', stopped)
  assert sample(ckpt, *common) == 130
  monkeypatch.setattr(io_utils.shutil, 'rmtree', rmtree)
  with np.load(tmp_path / 's.npz') as z:
    first = z['arr_0']
  capsys.readouterr()
  assert sample(ckpt, *common) == 1
  assert 'exists; refusing to overwrite' in capsys.readouterr().err
  assert sample(ckpt, *common, '--force') == 0
  assert sorted(p.name for p in tmp_path.iterdir()) == ['g.png', 's.npz']
  with np.load(tmp_path / 's.npz') as z:
    np.testing.assert_array_equal(z['arr_0'], first)
