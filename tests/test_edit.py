"""Zero-shot editing against the reference's demo_zero_shot_edit.ipynb outputs
(fixtures edit.npz): per-scale keep masks, tokens, images; the bilinear rule, the
pixel -> token rule, an all-zero mask, kept tokens under stochastic sampling, the
device count, and argument checks."""
import functools
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import var_jax
from conftest import get_fixture
from var_jax import edit, parallel, sampler
from var_jax.ops.resize import bilinear_matrix, bilinear_resize

TASKS = ('inpaint', 'outpaint', 'classedit')


@functools.lru_cache(maxsize=None)
def pipe_of(name):
  fx = get_fixture(name)
  return var_jax.from_torch(fx.dir / 'vae.pth', fx.dir / 'var.pth', fx.raw_config)


def edit_npz(fx):
  with np.load(fx.dir / 'edit.npz') as z:
    return {k: z[k] for k in z.files}


@functools.lru_cache(maxsize=None)
def greedy_edits(name):
  """The three tasks of edit.npz in one batched Pipeline.edit call (one program)."""
  fx, d = get_fixture(name), edit_npz(get_fixture(name))
  s = fx.raw_config['sampling']
  images = np.concatenate([fx.nhwc('img')] * len(TASKS))
  masks = np.concatenate([d[f'{t}_mask'] for t in TASKS])
  labels = np.concatenate([d[f'{t}_label'] for t in TASKS])
  return pipe_of(name).edit(images, masks, labels, cfg=s['cfg'], top_k=1, top_p=0.0, seed=0)


# --- parity --------------------------------------------------------------------------
def test_keep_masks_match_reference(fx):
  d = edit_npz(fx)
  for task in TASKS:
    got = sampler.keep_masks(jnp.asarray(d[f'{task}_mask']), fx.config.patch_nums)
    for k, pn in enumerate(fx.config.patch_nums):
      assert got[k].shape == (2, pn * pn) and got[k].dtype == jnp.bool_
      np.testing.assert_array_equal(np.asarray(got[k]), d[f'{task}_keep_{k}'].astype(bool),
                                    err_msg=f'{task} scale {k}')


@pytest.mark.parametrize('name', ['tiny4', pytest.param('tiny10', marks=pytest.mark.slow)])
def test_edit_matches_reference(name):
  """In-painting, out-painting, class-conditional editing, greedy: tokens exactly,
  images within 1e-4 (tiny10 compiles its 10-scale program: ~30 s on 2 cores)."""
  fx, d = get_fixture(name), edit_npz(get_fixture(name))
  images, tokens = greedy_edits(name)
  assert images.shape == (6,) + fx.nhwc('img').shape[1:] and images.dtype == jnp.float32
  for i, task in enumerate(TASKS):
    rows = slice(2 * i, 2 * i + 2)
    for k in range(len(fx.config.patch_nums)):
      assert tokens[k].dtype == jnp.int32
      np.testing.assert_array_equal(np.asarray(tokens[k][rows]), d[f'{task}_idx_{k}'],
                                    err_msg=f'{task} scale {k}')
    want = np.transpose(d[f'{task}_img'], (0, 2, 3, 1))
    np.testing.assert_allclose(np.asarray(images[rows]), want, atol=1e-4, rtol=0, err_msg=task)


def test_box_mask_is_the_reference_box(fx):
  """The fixtures' in-/out-painting masks are the notebook's box 0.1 .. 0.8."""
  d, h = edit_npz(fx), fx.config.patch_nums[-1]
  for b in range(2):
    np.testing.assert_array_equal(var_jax.box_mask(h, .1, .1, .8, .8), d['inpaint_mask'][b])
    np.testing.assert_array_equal(edit.box_mask(h, .1, .1, .8, .8, inpainting=False),
                                  d['outpaint_mask'][b])
  with pytest.raises(ValueError, match='y0 < y1'):
    edit.box_mask(h, .5, .1, .5, .8)
  with pytest.raises(ValueError, match=r'\[0, 1\]'):
    edit.box_mask(h, .1, .1, 1.5, .8)


# --- the bilinear rule -------------------------------------------------------------------
def _exact_bilinear(n_in, n_out):
  """Rational weights of torch's bilinear (align_corners=False) from its definition."""
  w = [[Fraction(0)] * n_in for _ in range(n_out)]
  for i in range(n_out):
    src = max(Fraction(n_in, n_out) * (i + Fraction(1, 2)) - Fraction(1, 2), Fraction(0))
    i0 = min(int(src), n_in - 1)
    lam = src - i0
    w[i][i0] += 1 - lam
    w[i][min(i0 + 1, n_in - 1)] += lam
  return np.array([[float(v) for v in row] for row in w])


@pytest.mark.parametrize('n_in,n_out', [(16, 13), (16, 10), (16, 5), (16, 3), (8, 6), (4, 2),
                                        (3, 7), (16, 16), (1, 4)])
def test_bilinear_weights_are_torchs(n_in, n_out):
  np.testing.assert_allclose(bilinear_matrix(n_in, n_out), _exact_bilinear(n_in, n_out),
                             atol=1e-6, rtol=0)
  assert bilinear_matrix(n_in, n_out).dtype == np.float32


def test_bilinear_is_not_jax_linear_and_exactly_half_is_not_kept():
  """jax.image.resize('linear') antialiases when downsampling; the reference does not.
  A value of exactly 0.5 is not kept: columns 1, 2 of a 4-wide mask averaged to 2."""
  x = np.random.default_rng(0).random((1, 16, 16, 1)).astype(np.float32)
  ours = np.asarray(bilinear_resize(jnp.asarray(x), (5, 5)))
  want = np.einsum('hH,BHWC,wW->BhwC', _exact_bilinear(16, 5), x, _exact_bilinear(16, 5))
  np.testing.assert_allclose(ours, want, atol=1e-6)
  theirs = np.asarray(jax.image.resize(jnp.asarray(x), (1, 5, 5, 1), 'linear'))
  assert np.abs(theirs - ours).max() > 0.05
  m = np.zeros((1, 4, 4), np.float32)
  m[:, :, 2:] = 1                                    # scale 2x2: 0 | 1 in each row
  m2 = np.zeros((1, 4, 4), np.float32)
  m2[:, :, 1:3] = 1                                  # scale 2x2: exactly 0.5 everywhere
  k = sampler.keep_masks(jnp.asarray(np.concatenate([m, m2])), (1, 2, 4))
  np.testing.assert_array_equal(np.asarray(k[1]), [[0, 1, 0, 1], [0, 0, 0, 0]])
  np.testing.assert_array_equal(np.asarray(k[0]), [[1], [1]])    # one token: always kept


# --- masks at pixel resolution ---------------------------------------------------------
def test_pixel_masks_average_each_tokens_patch():
  fx = get_fixture('tiny4')
  cfg, f = fx.config, fx.config.image_size // fx.config.patch_nums[-1]
  tok = edit_npz(fx)['classedit_mask']
  pix = np.repeat(np.repeat(tok, f, axis=1), f, axis=2)
  np.testing.assert_array_equal(edit.token_mask(pix, cfg, 2), tok)
  np.testing.assert_array_equal(edit.token_mask(tok[0], cfg, 2), tok[[0, 0]])
  # one token's patch with exactly half, and with one more than half, of its pixels kept
  half = np.zeros((cfg.image_size,) * 2, np.float32)
  half[:f // 2, :f] = 1
  more = half.copy()
  more[f // 2, 0] = 1
  got = edit.token_mask(np.stack([half, more]), cfg, 2)
  assert got[0, 0, 0] == 0.5 and got[1, 0, 0] > 0.5 and got[:, 1:].sum() == 0
  last = sampler.keep_masks(jnp.asarray(got), cfg.patch_nums)[-1]
  assert not bool(last[0, 0]) and bool(last[1, 0])


def test_pixel_and_token_masks_edit_alike():
  """The fixtures' token masks given as pixels (each token's patch repeated): the same
  edit as greedy_edits (the same compiled program)."""
  fx, d = get_fixture('tiny4'), edit_npz(get_fixture('tiny4'))
  f = fx.config.image_size // fx.config.patch_nums[-1]
  tok = np.concatenate([d[f'{t}_mask'] for t in TASKS])
  pix = np.repeat(np.repeat(tok, f, axis=1), f, axis=2).astype(bool)
  labels = np.concatenate([d[f'{t}_label'] for t in TASKS])
  _, b = pipe_of('tiny4').edit(np.concatenate([fx.nhwc('img')] * 3), pix, labels, cfg=2.0,
                               top_k=1, top_p=0.0)
  for x, y in zip(greedy_edits('tiny4')[1], b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# --- behaviour -----------------------------------------------------------------------
@pytest.mark.slow
def test_all_zero_mask_is_sampling_but_for_the_first_scales():
  """An all-zero mask regenerates every scale of more than 3 tokens; the first scale (1
  token) is the image's, as in the reference. Where the image's first token is the one
  sampling draws, editing = plain sampling with the same seed, token for token (digits
  model; two programs to compile: ~25 s of CPU)."""
  from var_jax import demo
  pipe = demo.load()
  labels = np.arange(8, dtype=np.int32)
  kw = dict(cfg=2.0, top_k=0, top_p=0.0, seed=3)
  sampled, toks = pipe.sample(labels, **kw)
  images = np.asarray(sampled) * 2 - 1                    # the samples themselves
  first = np.asarray(pipe.encode(images)[0])
  h = pipe.config.patch_nums[-1]
  _, edited = pipe.edit(images, np.zeros((h, h), np.float32), labels, **kw)
  np.testing.assert_array_equal(np.asarray(edited[0]), first)
  same = (first == np.asarray(toks[0]))[:, 0]
  assert same.sum() >= 4
  for k in range(len(toks)):
    np.testing.assert_array_equal(np.asarray(edited[k])[same], np.asarray(toks[k])[same])


def _stochastic_batch():
  fx, d = get_fixture('tiny4'), edit_npz(get_fixture('tiny4'))
  images = np.concatenate([fx.nhwc('img')] * 4)
  masks = np.concatenate([d['classedit_mask'], d['inpaint_mask']] * 2)
  return images, masks, [1, 2, 10, 10, 3, 4, 10, 10]


STOCHASTIC = dict(cfg=1.5, top_k=20, top_p=0.8, more_smooth=True)


@pytest.mark.slow
def test_kept_tokens_survive_stochastic_sampling():
  """top-k/top-p + more_smooth: every kept position holds the image's token at every
  scale; the rest varies with the seed."""
  pipe = pipe_of('tiny4')
  images, masks, labels = _stochastic_batch()
  one = pipe.edit(images, masks, labels, seed=5, **STOCHASTIC)
  other = pipe.edit(images, masks, labels, seed=6, **STOCHASTIC)
  given = pipe.encode(images)
  keep = sampler.keep_masks(jnp.asarray(masks), pipe.config.patch_nums)
  for k in range(len(given)):
    kk = np.asarray(keep[k])
    assert kk.any() and not kk.all() or k == 0
    np.testing.assert_array_equal(np.asarray(one[1][k])[kk], np.asarray(given[k])[kk])
    np.testing.assert_array_equal(np.asarray(other[1][k])[kk], np.asarray(given[k])[kk])
  assert any((np.asarray(a) != np.asarray(b)).any() for a, b in zip(one[1], other[1]))
  img = np.asarray(one[0])
  assert img.shape == (8, 64, 64, 3) and 0 <= img.min() and img.max() <= 1


@pytest.mark.slow
def test_one_device_and_eight_devices_edit_alike():
  """Sharded over the batch like sample: same seed, same tokens and images (~40 s)."""
  pipe = pipe_of('tiny4')
  images, masks, labels = _stochastic_batch()
  one = pipe.edit(images, masks, labels, seed=5, **STOCHASTIC)
  eight = pipe.edit(images, masks, labels, seed=5, mesh=parallel.make_mesh(data=8), **STOCHASTIC)
  assert eight[0].sharding.shard_shape(eight[0].shape)[0] == 1
  for a, b in zip(one[1], eight[1]):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_allclose(np.asarray(one[0]), np.asarray(eight[0]), atol=1e-4, rtol=0)


@pytest.mark.parametrize('kw,msg', [
    (dict(mask=np.ones((3, 3))), r'keep_mask must have shape \(4, 4\)'),
    (dict(mask=np.ones((3, 4, 4))), 'keep_mask has batch 3'),
    (dict(mask=np.full((4, 4), 2.0)), r'in \[0, 1\]'),
    (dict(mask=np.full((4, 4), np.nan)), r'in \[0, 1\]'),
    (dict(mask=np.array([['a'] * 4] * 4)), 'dtype'),
    (dict(labels=[11]), r'class ids in \[0, 10\) or 10'),
    (dict(labels=[-1, 2]), 'class ids'),
    (dict(labels=[1, 2, 3]), '3 labels for 2 images'),
    (dict(images=np.zeros((2, 32, 32, 3), np.float32)), 'NHWC'),
    (dict(images=np.full((2, 64, 64, 3), 3.0, np.float32)), r'\[-1, 1\]'),
    (dict(top_p=1.0), 'top_p'), (dict(cfg=-1), 'cfg'),
])
def test_bad_arguments_are_named(kw, msg):
  fx = get_fixture('tiny4')
  args = dict(images=fx.nhwc('img'), mask=np.ones((4, 4)), labels=[1, 10], cfg=1.0, top_k=5,
              top_p=0.5)
  args.update(kw)
  with pytest.raises(ValueError, match=msg):
    edit.edit(fx.config, {}, {}, args.pop('images'), args.pop('mask'), args.pop('labels'), **args)


def test_mesh_must_split_the_batch():
  fx = get_fixture('tiny4')
  with pytest.raises(ValueError, match='divisible'):
    edit.edit_args(fx.config, fx.nhwc('img'), np.ones((4, 4)), 3, 1.0, 0, 0.0,
                   parallel.make_mesh(data=8))
