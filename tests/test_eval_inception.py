"""The FID InceptionV3 in JAX against pytorch-fid's outputs, and its weight loading.

The golden features (tests/data/inception_golden.npz) were computed once by pytorch-fid
0.3.0 (torch 2.14.1, CPU, float32) with the weights of var_jax.eval.weights_recipe
(seed 0) on small uint8 images of four sizes (32x32 and 64x48 upsampled, 299x299 as is,
331x400 downsampled); tests/data/inception_golden.py regenerates them in a throwaway
PyTorch environment. Measured agreement: max |diff| 2.6e-6 (pool3), 2.4e-6 (logits),
1.1e-5 (spatial) for features of magnitude ~1; between two different images pool3
differs by >= 0.15, and an antialiased resize (jax.image.resize) would be off by 0.03.
These tests also pass on an H100 (VAR_JAX_TEST_PLATFORM=cuda): Precision.HIGHEST keeps
TF32 out of the float32 convolutions.
"""
import json
import pathlib

import jax
import numpy as np
import pytest

from var_jax import parallel
from var_jax.convert.torch_io import load_pth, save_pth
from var_jax.errors import CheckpointError
from var_jax.eval import inception, weights_recipe

DATA = pathlib.Path(__file__).resolve().parent / 'data'
SIZES = ('32x32', '64x48', '299x299', '331x400')
ATOL = 1e-4  # float32, features of magnitude ~1 (relative ~3e-5 of the largest)


@pytest.fixture(scope='module')
def shapes():
  return {k: tuple(v) for k, v in json.loads((DATA / 'inception_keys.json').read_text()).items()}


@pytest.fixture(scope='module')
def weights_file(shapes, tmp_path_factory):
  path = tmp_path_factory.mktemp('inception') / 'pt_inception_random.pth'
  save_pth(weights_recipe.random_state_dict(shapes, seed=0), path)
  return path


@pytest.fixture(scope='module')
def golden():
  with np.load(DATA / 'inception_golden.npz') as z:
    return {k: z[k] for k in z.files}


@pytest.fixture(scope='module')
def net(weights_file):
  # two devices: each holds one image of a batch of two (the batch is sharded)
  return inception.load(weights_file, mesh=parallel.make_mesh(devices=jax.devices()[:2]))


def test_state_dict_keys_and_shapes_match_pytorch_fid(shapes):
  assert inception.expected_shapes() == shapes
  assert len(shapes) == 472 and shapes['fc.weight'] == (1008, 2048)


@pytest.mark.parametrize('size', SIZES)
@pytest.mark.slow
def test_features_match_pytorch_fid(net, golden, size):
  images = golden[f'images_{size}']
  assert images.dtype == np.uint8 and images.shape[0] == 2
  out = net(images)
  assert out['pool3'].shape == (2, 2048) and out['pool3'].dtype == np.float32
  assert out['logits'].shape == (2, 1008) and out['spatial'].shape == (2, 17, 17, 7)
  for key in ('pool3', 'logits', 'spatial'):
    np.testing.assert_allclose(out[key], golden[f'{key}_{size}'], rtol=0, atol=ATOL, err_msg=key)
  # the features tell the two images apart by far more than the tolerance
  assert np.abs(golden[f'pool3_{size}'][0] - golden[f'pool3_{size}'][1]).max() > 100 * ATOL


def test_unbiased_logits_leave_out_the_bias(net, golden, shapes):
  sd = weights_recipe.random_state_dict({k: shapes[k] for k in ('fc.weight', 'fc.bias')})
  out = net(golden['images_32x32'])
  np.testing.assert_allclose(out['logits_unbiased'], out['pool3'] @ sd['fc.weight'].T.astype(np.float64),
                             rtol=0, atol=1e-5)
  np.testing.assert_allclose(out['logits'] - out['logits_unbiased'],
                             np.broadcast_to(sd['fc.bias'], (2, 1008)), rtol=0, atol=1e-5)


def test_batch_padding_and_grey_images(net, golden):
  """Three images on two devices (one padded slot) and a 1-channel batch give the same
  per-image features as the reference batches."""
  a, b = golden['images_64x48'], golden['images_32x32']
  out = net(np.concatenate([a, a[:1]]))
  np.testing.assert_allclose(out['pool3'][:2], golden['pool3_64x48'], rtol=0, atol=ATOL)
  np.testing.assert_allclose(out['pool3'][2], golden['pool3_64x48'][0], rtol=0, atol=ATOL)
  grey = b[..., :1]
  np.testing.assert_allclose(net(grey)['pool3'], net(np.repeat(grey, 3, -1))['pool3'], atol=1e-6)


def test_bilinear_matrix_is_torch_formula():
  """Spot values of torch's bilinear (align_corners=False, no antialias) weights."""
  w = inception.bilinear_matrix(4, 8)  # upsample x2: src = i/2 - 0.25, clamped at 0
  np.testing.assert_allclose(w[0], [1, 0, 0, 0])
  np.testing.assert_allclose(w[1], [0.75, 0.25, 0, 0])
  np.testing.assert_allclose(w[7], [0, 0, 0, 1])
  d = inception.bilinear_matrix(8, 3)  # downsample: two taps only (no antialiasing)
  assert (np.count_nonzero(d, axis=1) <= 2).all()
  np.testing.assert_allclose(d.sum(1), 1, atol=1e-6)
  np.testing.assert_array_equal(inception.bilinear_matrix(299, 299), np.eye(299, dtype=np.float32))


def test_non_uint8_or_bad_shape_is_refused(net):
  with pytest.raises(ValueError, match='uint8'):
    net(np.zeros((1, 32, 32, 3), np.float32))
  with pytest.raises(ValueError, match='NHWC'):
    net(np.zeros((32, 32, 3), np.uint8))


def test_missing_file_says_where_to_get_it(tmp_path):
  with pytest.raises(FileNotFoundError, match='pytorch-fid/releases/download/fid_weights/'
                                                'pt_inception-2015-12-05-6726825d.pth'):
    inception.load(tmp_path / 'nope.pth')


def _rewrite(src, dst, edit):
  sd = load_pth(src)
  edit(sd)
  save_pth(sd, dst)
  return dst


def test_wrong_files_name_the_key_or_problem(weights_file, tmp_path):
  def drop(sd):
    del sd['Mixed_6d.branch1x1.conv.weight']

  def reshape(sd):
    sd['fc.weight'] = np.zeros((1000, 2048), np.float32)  # an ImageNet-1k head

  def extra(sd):
    sd['AuxLogits.fc.weight'] = np.zeros((1000, 768), np.float32)

  def nan(sd):
    sd['Conv2d_1a_3x3.bn.running_var'][0] = np.nan

  for edit, pattern in ((drop, "missing key 'Mixed_6d.branch1x1.conv.weight'"),
                        (reshape, r"'fc.weight' has shape \(1000, 2048\), expected \(1008, 2048\)"),
                        (extra, "unexpected key 'AuxLogits.fc.weight'"),
                        (nan, "'Conv2d_1a_3x3.bn.running_var' holds non-finite")):
    path = _rewrite(weights_file, tmp_path / f'{edit.__name__}.pth', edit)
    with pytest.raises(CheckpointError, match=pattern):
      inception.load(path)
  # num_batches_tracked buffers (torch adds them) are accepted and ignored
  path = _rewrite(weights_file, tmp_path / 'nbt.pth',
                  lambda sd: sd.update({'Conv2d_1a_3x3.bn.num_batches_tracked': np.zeros((), np.int64)}))
  inception.variables_from_state_dict(load_pth(path), str(path))


def test_truncated_file_is_an_error(weights_file, tmp_path):
  data = pathlib.Path(weights_file).read_bytes()
  path = tmp_path / 'truncated.pth'
  path.write_bytes(data[:len(data) // 2])
  with pytest.raises(CheckpointError):
    inception.load(path)


def test_fingerprint_tells_weights_and_dtype_apart(shapes):
  v0 = inception.variables_from_state_dict(weights_recipe.random_state_dict(shapes, 0))
  v1 = inception.variables_from_state_dict(weights_recipe.random_state_dict(shapes, 1))
  fp = inception._fingerprint
  assert fp(v0, np.float32) == fp(v0, np.float32)
  assert len({fp(v0, np.float32), fp(v1, np.float32), fp(v0, jax.numpy.bfloat16)}) == 3


@pytest.mark.slow
def test_bfloat16_features_are_close(weights_file, golden):
  """bfloat16 compute: measured max |diff| 0.015 on pool3 values up to 3.6 (float32: 3e-6)."""
  net = inception.load(weights_file, dtype=jax.numpy.bfloat16,
                       mesh=parallel.make_mesh(devices=jax.devices()[:2]))
  out = net(golden['images_299x299'])
  assert out['pool3'].dtype == np.float32
  err = np.abs(out['pool3'] - golden['pool3_299x299']).max()
  assert 1e-4 < err < 0.05, err  # really computed in bf16, and still close
