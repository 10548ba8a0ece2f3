"""Torch-exact bicubic / area resizing against the reference fixtures."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from var_jax.ops.resize import area_matrix, area_resize, bicubic_matrix, bicubic_resize

TOL = 1e-5


def _scales(fx):
  return fx.config.patch_nums[:-1]


def test_bicubic_matches_reference(fx):
  h = fx.config.patch_nums[-1]
  for pn in _scales(fx):
    src = jnp.asarray(fx.nhwc(f'interp_src_{pn}'))
    out = np.asarray(bicubic_resize(src, (h, h)))
    want = fx.nhwc(f'interp_bicubic_{pn}')
    assert out.shape == want.shape
    np.testing.assert_allclose(out, want, atol=TOL, rtol=0, err_msg=f'pn={pn}')


def test_area_matches_reference(fx):
  big = jnp.asarray(fx.nhwc('interp_big'))
  for pn in _scales(fx):
    out = np.asarray(area_resize(big, (pn, pn)))
    want = fx.nhwc(f'interp_area_{pn}')
    assert out.shape == want.shape
    np.testing.assert_allclose(out, want, atol=TOL, rtol=0, err_msg=f'pn={pn}')


def test_weight_rows_sum_to_one():
  for n_in, n_out in [(1, 16), (3, 16), (13, 16), (16, 16), (16, 5), (16, 13), (7, 3)]:
    np.testing.assert_allclose(bicubic_matrix(n_in, n_out).sum(1), 1.0, atol=1e-6)
    np.testing.assert_allclose(area_matrix(n_in, n_out).sum(1), 1.0, atol=1e-6)


def test_same_size_is_identity_and_rectangular_sizes_work():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 7, 3))
  np.testing.assert_array_equal(np.asarray(bicubic_resize(x, (5, 7))), np.asarray(x))
  np.testing.assert_array_equal(np.asarray(area_resize(x, (5, 7))), np.asarray(x))
  assert bicubic_resize(x, (9, 4)).shape == (2, 9, 4, 3)
  # area of a box-aligned grid is a plain block mean
  y = jax.random.normal(jax.random.PRNGKey(1), (1, 8, 8, 2))
  want = y.reshape(1, 4, 2, 4, 2, 2).mean((2, 4))
  np.testing.assert_allclose(np.asarray(area_resize(y, (4, 4))), np.asarray(want), atol=1e-6)


def test_bf16_keeps_dtype():
  x = jnp.ones((1, 3, 3, 2), jnp.bfloat16)
  assert bicubic_resize(x, (6, 6)).dtype == jnp.bfloat16
  assert area_resize(x, (1, 1)).dtype == jnp.bfloat16


def test_bad_input_raises():
  with pytest.raises(ValueError, match='B, H, W, C'):
    bicubic_resize(jnp.zeros((3, 3, 2)), (4, 4))
  with pytest.raises(ValueError, match='positive'):
    area_resize(jnp.zeros((1, 3, 3, 2)), (0, 4))
