"""`var-jax edit` end to end on tiny4 (64x64 images, 4x4 tokens), through var_jax.cli.main:
the edit equals Pipeline.edit, box and mask forms agree, and every bad input is one line."""
import numpy as np
import pytest
from PIL import Image

import var_jax
from conftest import get_fixture
from var_jax import cli, edit, io_utils

GREEDY = ['--cfg', '2.0', '--top-k', '1', '--top-p', '0', '--num', '2']


@pytest.fixture(scope='module')
def ckpt(tmp_path_factory):
  fx = get_fixture('tiny4')
  out = tmp_path_factory.mktemp('edit_cli') / 'ckpt'
  assert cli.main(['convert', '--vae', str(fx.dir / 'vae.pth'), '--var', str(fx.dir / 'var.pth'),
                   '--config', str(fx.dir / 'config.json'), '--out', str(out)]) == 0
  return out


@pytest.fixture(scope='module')
def photo(tmp_path_factory):
  """The fixture's first image as a 64x64 PNG."""
  path = tmp_path_factory.mktemp('edit_cli_img') / 'photo.png'
  Image.fromarray(io_utils.to_uint8(get_fixture('tiny4').nhwc('img')[0], low=-1.0)).save(path)
  return path


def run_edit(ckpt, image, *extra):
  return cli.main(['edit', '--checkpoint', str(ckpt), '--image', str(image), *map(str, extra)])


def save_mask(path, white):
  Image.fromarray(np.asarray(white, np.uint8) * 255).save(path)
  return path


@pytest.mark.slow
def test_box_inpainting_equals_the_api(ckpt, photo, tmp_path, capsys):
  rc = run_edit(ckpt, photo, '--box', '0.1,0.1,0.8,0.8', *GREEDY, '--out', tmp_path / 'g.png',
                '--tokens-out', tmp_path / 't.npz')
  assert rc == 0
  assert 'unconditional, 9 of 16 tokens regenerated' in capsys.readouterr().out
  pipe = var_jax.load(ckpt)
  x = io_utils.read_image(photo).astype(np.float32) / 127.5 - 1
  _, want = pipe.edit(np.stack([x, x]), var_jax.box_mask(4, .1, .1, .8, .8), 10, cfg=2.0,
                      top_k=1, top_p=0.0)
  with np.load(tmp_path / 't.npz') as z:
    for k in range(4):
      np.testing.assert_array_equal(z[f'idx_{k}'], np.asarray(want[k]))
  grid = np.asarray(Image.open(tmp_path / 'g.png'))
  assert grid.shape == (64 + 4, 4 * 66 + 2, 3)                 # input, mask, 2 edits
  np.testing.assert_array_equal(grid[2:66, 2:66], io_utils.read_image(photo))
  mask_tile = grid[2:66, 68:132]
  assert (mask_tile[:48, :48] == 128).all()          # rows/columns round(0.4)=0 .. round(3.2)-1
  np.testing.assert_array_equal(mask_tile[48:], io_utils.read_image(photo)[48:])


@pytest.mark.slow
def test_mask_png_at_pixel_and_token_size_equals_the_box(ckpt, photo, tmp_path):
  """--outpaint with a box = a mask PNG white outside the box (64x64 or 4x4)."""
  common = [*GREEDY, '--label', 3]
  assert run_edit(ckpt, photo, '--box', '0.1,0.1,0.8,0.8', '--outpaint', *common,
                  '--out', tmp_path / 'a.png', '--tokens-out', tmp_path / 'a.npz') == 0
  white_tok = 1 - edit.box_mask(4, .1, .1, .8, .8, inpainting=False)
  small = save_mask(tmp_path / 'm4.png', white_tok)
  big = save_mask(tmp_path / 'm64.png', np.kron(white_tok, np.ones((16, 16))))
  for name, mask in (('b', small), ('c', big)):
    assert run_edit(ckpt, photo, '--mask', mask, *common, '--out', tmp_path / f'{name}.png',
                    '--tokens-out', tmp_path / f'{name}.npz') == 0
  with np.load(tmp_path / 'a.npz') as a, np.load(tmp_path / 'b.npz') as b, \
       np.load(tmp_path / 'c.npz') as c:
    for k in range(4):
      np.testing.assert_array_equal(a[f'idx_{k}'], b[f'idx_{k}'])
      np.testing.assert_array_equal(a[f'idx_{k}'], c[f'idx_{k}'])


def test_out_is_never_overwritten_without_force(ckpt, photo, tmp_path, capsys):
  out = tmp_path / 'g.png'
  out.write_bytes(b'mine')
  assert run_edit(ckpt, photo, '--box', '0.1,0.1,0.8,0.8', *GREEDY, '--out', out) == 1
  assert 'exists' in capsys.readouterr().err and out.read_bytes() == b'mine'
  assert run_edit(ckpt, photo, '--box', '0.1,0.1,0.8,0.8', *GREEDY, '--out', out, '--force') == 0
  assert np.asarray(Image.open(out)).shape == (68, 266, 3)


def _write_inputs(tmp_path):
  wrong = tmp_path / 'wrong.png'
  Image.fromarray(np.zeros((48, 64, 3), np.uint8)).save(wrong)
  return {
      'wrong_image': wrong,
      'mask_8': save_mask(tmp_path / 'm8.png', np.ones((8, 8))),
      'mask_black': save_mask(tmp_path / 'black.png', np.zeros((64, 64))),
      'mask_white': save_mask(tmp_path / 'white.png', np.ones((4, 4))),
      'mask_speck': save_mask(tmp_path / 'speck.png', np.pad(np.ones((7, 7)), ((0, 57), (0, 57)))),
      'garbage': _write(tmp_path / 'garbage.png', b'not an image'),
      'cutout': _cutout(tmp_path / 'cutout.png'),
  }


def _write(path, data):
  path.write_bytes(data)
  return path


def _cutout(path):
  rgba = np.zeros((64, 64, 4), np.uint8)
  rgba[:32] = 255                                  # white, opaque top half; transparent below
  Image.fromarray(rgba, 'RGBA').save(path)
  return path


@pytest.mark.parametrize('args,code,message', [
    (['--mask', 'mask_8'], 2, '--mask is 8x8; it must be 64x64 (the image) or 4x4 (the token grid)'),
    (['--mask', 'mask_black'], 2, '--mask regenerates nothing: every token of the 4x4 grid is kept'),
    (['--mask', 'mask_speck'], 2, '--mask regenerates nothing'),
    (['--mask', 'mask_white'], 2, '--mask keeps nothing: every token is regenerated, which is sampling'),
    (['--box', '0.1,0.1,0.12,0.9'], 2, '--box regenerates nothing'),
    (['--box', '0,0,1,1'], 2, '--box keeps nothing'),
    (['--box', '0.1,0.1,0.8'], 2, '--box must be four comma-separated fractions'),
    (['--box', '0.1,0.1,1.8,0.9'], 2, 'box y1 must be a fraction of the image in [0, 1]'),
    (['--box', '0.5,0.1,0.2,0.9'], 2, 'box needs y0 < y1'),
    (['--mask', 'mask_8', '--outpaint'], 2, '--outpaint goes with --box'),
    (['--box', '0.1,0.1,0.8,0.8', '--label', '11'], 2, '--label must be a class in [0, 10) or 10'),
    (['--box', '0.1,0.1,0.8,0.8', '--label', '-1'], 2, '--label must be a class in [0, 10) or 10'),
    (['--box', '0.1,0.1,0.8,0.8', '--image', 'wrong_image'], 2,
     '--image is 64x48; this model edits 64x64 images'),
    (['--box', '0.1,0.1,0.8,0.8', '--num', '0'], 2, '--num must be >= 1'),
    (['--box', '0.1,0.1,0.8,0.8', '--top-p', '1'], 2, '--top-p must be in [0, 1)'),
    (['--box', '0.1,0.1,0.8,0.8', '--image', 'absent.png'], 1, 'image not found'),
    (['--mask', 'absent.png'], 1, 'mask not found'),
    (['--box', '0.1,0.1,0.8,0.8', '--image', 'garbage'], 1, 'cannot read image'),
    (['--mask', 'garbage'], 1, 'cannot read image'),
    (['--box', '0.1,0.1,0.8,0.8', '--image', 'cutout'], 1, 'cutout.png has transparent pixels'),
    (['--mask', 'cutout'], 1, 'cutout.png has transparent pixels'),
])
def test_bad_inputs_are_one_line(ckpt, photo, tmp_path, capsys, args, code, message):
  files = _write_inputs(tmp_path)
  args = [str(files.get(a, tmp_path / a if a.endswith('.png') else a)) for a in args]
  image = photo
  if '--image' in args:
    i = args.index('--image')
    image = args[i + 1]
    del args[i:i + 2]
  assert run_edit(ckpt, image, *args, '--out', tmp_path / 'g.png') == code
  err = capsys.readouterr().err
  assert message in err and 'Traceback' not in err and err.count('\n') == 1, err
  assert not (tmp_path / 'g.png').exists()


def test_missing_checkpoint(photo, tmp_path, capsys):
  assert run_edit(tmp_path / 'nope', photo, '--box', '0.1,0.1,0.8,0.8', '--out',
                  tmp_path / 'g.png') == 1
  assert 'checkpoint directory not found' in capsys.readouterr().err


def test_16_bit_images_are_scaled_not_clipped(tmp_path):
  """A 16-bit grey PNG (a mask or a photo) reads as its 8-bit values, not as white
  wherever it exceeds 255 (PIL's own conversion clips)."""
  v8 = np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) % 256
  path = tmp_path / 'grey16.png'
  Image.fromarray((v8 * 257).astype(np.uint16)).save(path)
  assert Image.open(path).mode.startswith('I')
  np.testing.assert_array_equal(io_utils.read_image(path, 'L'), v8)
  np.testing.assert_array_equal(io_utils.read_image(path), np.repeat(v8[..., None], 3, -1))
  np.testing.assert_allclose(io_utils.load_image(path, 64)[..., 0], v8 / 127.5 - 1, atol=1e-6)


@pytest.mark.parametrize('suffix', ['png', 'jpg'])
def test_exif_orientation_is_applied(tmp_path, suffix):
  """A camera's photo stored sideways with an EXIF orientation is read as viewers show
  it (where a --mask or --box drawn on it lines up), and so is a wide one resized."""
  stored = np.zeros((64, 48, 3), np.uint8)
  stored[:16] = 255                                   # a white band at the stored top
  im = Image.fromarray(stored)
  exif = im.getexif()
  exif[0x0112] = 6                                    # display rotated 90 degrees clockwise
  path = tmp_path / f'photo.{suffix}'
  im.save(path, exif=exif, quality=95)
  seen = io_utils.read_image(path)
  assert seen.shape == (48, 64, 3)                    # as shown: wider than tall
  assert seen[:, -16:].mean() > 240 and seen[:, :-16].mean() < 15   # the band on the right
  grey = io_utils.read_image(path, 'L')
  assert grey.shape == (48, 64) and grey[:, -16:].mean() > 240
  x = io_utils.load_image(path, 48)                  # shorter side 48: a centre crop
  assert x[:, -8:].mean() > 0.9 and x[:, :16].mean() < -0.9


def test_transparent_images_are_refused(tmp_path):
  """The colours under transparent pixels are not what a viewer shows: an image (or
  mask) with any is refused in one line instead of having its alpha dropped; fully
  opaque RGBA and palette images read as their colours."""
  rgba = np.zeros((64, 64, 4), np.uint8)
  rgba[16:48, 16:48] = 255                          # a white square on transparent black
  Image.fromarray(rgba, 'RGBA').save(tmp_path / 'cutout.png')
  pal = Image.fromarray(rgba[..., :3]).convert('P')
  pal.save(tmp_path / 'pal.png', transparency=int(np.asarray(pal)[0, 0]))
  for name in ('cutout.png', 'pal.png'):
    for mode in ('RGB', 'L'):
      with pytest.raises(ValueError, match='has transparent pixels'):
        io_utils.read_image(tmp_path / name, mode)
    with pytest.raises(ValueError, match='has transparent pixels'):
      io_utils.load_image(tmp_path / name, 64)
  rgba[..., 3] = 255
  Image.fromarray(rgba, 'RGBA').save(tmp_path / 'opaque.png')
  np.testing.assert_array_equal(io_utils.read_image(tmp_path / 'opaque.png'), rgba[..., :3])
  pal.save(tmp_path / 'opaque_pal.png')
  np.testing.assert_array_equal(io_utils.read_image(tmp_path / 'opaque_pal.png'), rgba[..., :3])


def test_out_never_replaces_the_input_even_with_force(ckpt, photo, tmp_path, capsys):
  """--out / --tokens-out naming --image or --mask is refused, --force or not (the grid
  would replace the photo being edited); reconstruct likewise for its --images."""
  import shutil
  image = shutil.copy(photo, tmp_path / 'photo.png')
  mask = save_mask(tmp_path / 'm.png', 1 - edit.box_mask(4, .1, .1, .8, .8))
  before = (image.read_bytes(), mask.read_bytes())
  for out in ('--out', '--tokens-out'):
    for victim in (image, mask):
      other = tmp_path / ('t.npz' if out == '--out' else 'g.png')
      rc = run_edit(ckpt, image, '--mask', mask, *GREEDY, out, victim,
                    '--tokens-out' if out == '--out' else '--out', other, '--force')
      err = capsys.readouterr().err
      assert rc == 2 and 'file this command reads' in err and err.count('\n') == 1, err
  rc = cli.main(['reconstruct', '--checkpoint', str(ckpt), '--images', str(photo), str(image),
                 '--out', str(image), '--force'])
  assert rc == 2 and 'is the --images file this command reads' in capsys.readouterr().err
  assert (image.read_bytes(), mask.read_bytes()) == before
