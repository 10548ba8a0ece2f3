"""The FID InceptionV3 in Flax (NHWC), jitted and batch-sharded: FID, sFID and IS features.

    net = load('pt_inception-2015-12-05-6726825d.pth')     # pytorch-fid's weights file
    out = net(images_NHWC_uint8)   # {'pool3': (N, 2048), 'logits': (N, 1008),
                                   #  'logits_unbiased': (N, 1008), 'spatial': (N, 17, 17, 7)}

The network is pytorch-fid's (also torch-fidelity's): torchvision's Inception3 with 1008
classes, no auxiliary head, and the blocks of TensorFlow's 2015 graph: the A, C and first
E blocks average-pool without counting the padding, the last E block max-pools. Images of
any size are resized to 299 x 299 as pytorch-fid does (bilinear, align_corners=False, no
antialiasing: exact (out x in) weight matrices, as in var_jax/ops/resize.py; note that
jax.image.resize would antialias when downsampling) and scaled to [-1, 1].

Outputs: `pool3` the 2048 average-pooled features (FID, precision/recall); `logits` the
final fully-connected layer on pool3; `logits_unbiased` the same without its bias, which
is what the Inception Score of the original code and of ADM's evaluator uses (they read
the graph's `softmax/logits/MatMul`); `spatial` the output of Mixed_6d's 1x1 branch
convolution before its batch norm, first 7 channels (ADM's sFID `mixed_6/conv`).

Float32 runs at full precision (Precision.HIGHEST: no TF32 on GPUs) by default;
`load(..., dtype=jnp.bfloat16)` is faster and less exact.
"""
from __future__ import annotations

import functools
import hashlib
import os
from typing import Any, Dict, Mapping, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import traverse_util

from var_jax import parallel

FID_WEIGHTS_NAME = 'pt_inception-2015-12-05-6726825d.pth'
FID_WEIGHTS_URL = ('https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/'
                   + FID_WEIGHTS_NAME)
INPUT_SIZE = 299
NUM_CLASSES = 1008
SPATIAL_CHANNELS = 7
POOL3_DIM = 2048
SPATIAL_DIM = 17 * 17 * SPATIAL_CHANNELS  # flattened HWC, as ADM's sFID
BN_EPS = 1e-3


def _precision(dtype):
  return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


# --- network -----------------------------------------------------------------------

class BasicConv(nn.Module):
  """Conv (no bias) -> batch norm (running statistics, eps 1e-3) -> ReLU."""
  features: int
  kernel: Tuple[int, int] = (1, 1)
  strides: int = 1
  padding: Tuple[int, int] = (0, 0)
  tap: bool = False  # sow the conv output before the batch norm as intermediates/pre_bn
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    (ph, pw), s = self.padding, self.strides
    y = nn.Conv(self.features, self.kernel, (s, s), padding=((ph, ph), (pw, pw)), use_bias=False,
                dtype=self.dtype, precision=_precision(self.dtype), name='conv')(x)
    if self.tap:
      self.sow('intermediates', 'pre_bn', y)
    y = nn.BatchNorm(use_running_average=True, epsilon=BN_EPS, dtype=self.dtype, name='bn')(y)
    return nn.relu(y)


def _avg_pool3(x):  # the FID blocks' average pool: padding does not count
  return nn.avg_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool3(x, stride):
  pad = ((1, 1), (1, 1)) if stride == 1 else 'VALID'
  return nn.max_pool(x, (3, 3), (stride, stride), padding=pad)


class InceptionA(nn.Module):
  pool_features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    C = functools.partial(BasicConv, dtype=self.dtype)
    b1 = C(64, name='branch1x1')(x)
    b5 = C(48, name='branch5x5_1')(x)
    b5 = C(64, (5, 5), padding=(2, 2), name='branch5x5_2')(b5)
    bd = C(64, name='branch3x3dbl_1')(x)
    bd = C(96, (3, 3), padding=(1, 1), name='branch3x3dbl_2')(bd)
    bd = C(96, (3, 3), padding=(1, 1), name='branch3x3dbl_3')(bd)
    bp = C(self.pool_features, name='branch_pool')(_avg_pool3(x))
    return jnp.concatenate([b1, b5, bd, bp], axis=-1)


class InceptionB(nn.Module):
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    C = functools.partial(BasicConv, dtype=self.dtype)
    b3 = C(384, (3, 3), strides=2, name='branch3x3')(x)
    bd = C(64, name='branch3x3dbl_1')(x)
    bd = C(96, (3, 3), padding=(1, 1), name='branch3x3dbl_2')(bd)
    bd = C(96, (3, 3), strides=2, name='branch3x3dbl_3')(bd)
    return jnp.concatenate([b3, bd, _max_pool3(x, 2)], axis=-1)


class InceptionC(nn.Module):
  channels_7x7: int
  tap: bool = False  # sow branch1x1's pre-batch-norm output (sFID features)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    C = functools.partial(BasicConv, dtype=self.dtype)
    c7 = self.channels_7x7
    row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
    b1 = C(192, tap=self.tap, name='branch1x1')(x)
    b7 = C(c7, name='branch7x7_1')(x)
    b7 = C(c7, **row, name='branch7x7_2')(b7)
    b7 = C(192, **col, name='branch7x7_3')(b7)
    bd = C(c7, name='branch7x7dbl_1')(x)
    bd = C(c7, **col, name='branch7x7dbl_2')(bd)
    bd = C(c7, **row, name='branch7x7dbl_3')(bd)
    bd = C(c7, **col, name='branch7x7dbl_4')(bd)
    bd = C(192, **row, name='branch7x7dbl_5')(bd)
    bp = C(192, name='branch_pool')(_avg_pool3(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    C = functools.partial(BasicConv, dtype=self.dtype)
    b3 = C(192, name='branch3x3_1')(x)
    b3 = C(320, (3, 3), strides=2, name='branch3x3_2')(b3)
    b7 = C(192, name='branch7x7x3_1')(x)
    b7 = C(192, (1, 7), padding=(0, 3), name='branch7x7x3_2')(b7)
    b7 = C(192, (7, 1), padding=(3, 0), name='branch7x7x3_3')(b7)
    b7 = C(192, (3, 3), strides=2, name='branch7x7x3_4')(b7)
    return jnp.concatenate([b3, b7, _max_pool3(x, 2)], axis=-1)


class InceptionE(nn.Module):
  pool: str  # 'avg' (Mixed_7b) or 'max' (Mixed_7c), as in the FID graph
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    C = functools.partial(BasicConv, dtype=self.dtype)
    row, col = dict(kernel=(1, 3), padding=(0, 1)), dict(kernel=(3, 1), padding=(1, 0))
    b1 = C(320, name='branch1x1')(x)
    b3 = C(384, name='branch3x3_1')(x)
    b3 = jnp.concatenate([C(384, **row, name='branch3x3_2a')(b3),
                          C(384, **col, name='branch3x3_2b')(b3)], axis=-1)
    bd = C(448, name='branch3x3dbl_1')(x)
    bd = C(384, (3, 3), padding=(1, 1), name='branch3x3dbl_2')(bd)
    bd = jnp.concatenate([C(384, **row, name='branch3x3dbl_3a')(bd),
                          C(384, **col, name='branch3x3dbl_3b')(bd)], axis=-1)
    pooled = _avg_pool3(x) if self.pool == 'avg' else _max_pool3(x, 1)
    bp = C(192, name='branch_pool')(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class FIDInceptionV3(nn.Module):
  """(B, 299, 299, 3) in [-1, 1] -> pool3, logits, logits_unbiased; sows sFID's tap."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BHWC):
    C = functools.partial(BasicConv, dtype=self.dtype)
    x = x_BHWC.astype(self.dtype)
    x = C(32, (3, 3), strides=2, name='Conv2d_1a_3x3')(x)
    x = C(32, (3, 3), name='Conv2d_2a_3x3')(x)
    x = C(64, (3, 3), padding=(1, 1), name='Conv2d_2b_3x3')(x)
    x = _max_pool3(x, 2)
    x = C(80, name='Conv2d_3b_1x1')(x)
    x = C(192, (3, 3), name='Conv2d_4a_3x3')(x)
    x = _max_pool3(x, 2)
    x = InceptionA(32, dtype=self.dtype, name='Mixed_5b')(x)
    x = InceptionA(64, dtype=self.dtype, name='Mixed_5c')(x)
    x = InceptionA(64, dtype=self.dtype, name='Mixed_5d')(x)
    x = InceptionB(dtype=self.dtype, name='Mixed_6a')(x)
    x = InceptionC(128, dtype=self.dtype, name='Mixed_6b')(x)
    x = InceptionC(160, dtype=self.dtype, name='Mixed_6c')(x)
    x = InceptionC(160, tap=True, dtype=self.dtype, name='Mixed_6d')(x)
    x = InceptionC(192, dtype=self.dtype, name='Mixed_6e')(x)
    x = InceptionD(dtype=self.dtype, name='Mixed_7a')(x)
    x = InceptionE('avg', dtype=self.dtype, name='Mixed_7b')(x)
    x = InceptionE('max', dtype=self.dtype, name='Mixed_7c')(x)
    pool3 = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    hi = jax.lax.Precision.HIGHEST
    fc = nn.Dense(NUM_CLASSES, precision=hi, name='fc')
    logits = fc(pool3)
    unbiased = jnp.dot(pool3, fc.variables['params']['kernel'], precision=hi)
    return {'pool3': pool3, 'logits': logits, 'logits_unbiased': unbiased}


# --- preprocessing -------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
  """(n_out, n_in) float32 weights of torch's bilinear interpolation, align_corners=False,
  no antialiasing: source index (i + 0.5) * in/out - 0.5, clamped at 0, two taps."""
  src = np.maximum((np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5, 0.0)
  i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
  i1 = np.minimum(i0 + 1, n_in - 1)
  frac = src - i0
  w = np.zeros((n_out, n_in), np.float64)
  rows = np.arange(n_out)
  np.add.at(w, (rows, i0), 1.0 - frac)
  np.add.at(w, (rows, i1), frac)
  return w.astype(np.float32)


def preprocess(images_BHWC: jax.Array, dtype=jnp.float32) -> jax.Array:
  """uint8 NHWC of any size -> (B, 299, 299, 3) in [-1, 1], as pytorch-fid feeds its net."""
  x = images_BHWC.astype(jnp.float32) / 255.0
  hi = jax.lax.Precision.HIGHEST
  _, H, W, _ = x.shape
  x = jnp.einsum('hH,BHWC->BhWC', jnp.asarray(bilinear_matrix(H, INPUT_SIZE)), x, precision=hi)
  x = jnp.einsum('wW,BhWC->BhwC', jnp.asarray(bilinear_matrix(W, INPUT_SIZE)), x, precision=hi)
  return (2.0 * x - 1.0).astype(dtype)


# --- weights -------------------------------------------------------------------------

_TORCH_LEAF = {('params', 'kernel'): 'weight', ('params', 'scale'): 'weight',
               ('params', 'bias'): 'bias', ('batch_stats', 'mean'): 'running_mean',
               ('batch_stats', 'var'): 'running_var'}


def _torch_key(path: Tuple[str, ...]) -> str:
  return '.'.join(path[1:-1] + (_TORCH_LEAF[(path[0], path[-1])],))


def _torch_shape(shape: Tuple[int, ...], path: Tuple[str, ...]) -> Tuple[int, ...]:
  if path[-1] != 'kernel':
    return tuple(shape)
  if len(shape) == 2:
    return tuple(shape[::-1])                       # (in, out) -> (out, in)
  return (shape[3], shape[2], shape[0], shape[1])   # HWIO -> OIHW


def _from_torch_layout(value: np.ndarray, path: Tuple[str, ...]) -> np.ndarray:
  if path[-1] != 'kernel':
    return value
  return value.T if value.ndim == 2 else value.transpose(2, 3, 1, 0)  # OIHW -> HWIO


@functools.lru_cache(maxsize=None)
def _abstract_variables():
  x = jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
  v = jax.eval_shape(lambda x: FIDInceptionV3().init(jax.random.PRNGKey(0), x), x)
  return {c: v[c] for c in ('params', 'batch_stats')}


def expected_shapes() -> Dict[str, Tuple[int, ...]]:
  """{torch state-dict key: shape} of the FID Inception weights (num_batches_tracked aside)."""
  flat = traverse_util.flatten_dict(_abstract_variables())
  return {_torch_key(path): _torch_shape(leaf.shape, path) for path, leaf in flat.items()}


def variables_from_state_dict(sd: Mapping[str, np.ndarray], source: str = 'state dict'
                              ) -> Dict[str, Any]:
  """pytorch-fid's state dict -> Flax variables {'params', 'batch_stats'} (float32 numpy).

  Raises CheckpointError naming the first missing, unexpected, misshapen or non-finite key."""
  from var_jax.errors import CheckpointError
  hint = f'is it the FID Inception weights ({FID_WEIGHTS_NAME})?'
  flat = traverse_util.flatten_dict(_abstract_variables())
  want = {_torch_key(p): p for p in flat}
  missing = [k for k in want if k not in sd]
  if missing:
    raise CheckpointError(f'{source}: missing key {missing[0]!r} ({len(missing)} of {len(want)} '
                          f'missing); {hint}')
  extra = [k for k in sd if k not in want and not k.endswith('num_batches_tracked')]
  if extra:
    raise CheckpointError(f'{source}: unexpected key {extra[0]!r} ({len(extra)} unexpected); {hint}')
  out = {}
  for key, path in want.items():
    value = np.asarray(sd[key])
    shape = _torch_shape(flat[path].shape, path)
    if value.shape != shape:
      raise CheckpointError(f'{source}: {key!r} has shape {tuple(value.shape)}, expected '
                            f'{tuple(shape)}; {hint}')
    if not np.issubdtype(value.dtype, np.floating):
      raise CheckpointError(f'{source}: {key!r} has dtype {value.dtype}, expected floats')
    value = value.astype(np.float32)
    if not np.all(np.isfinite(value)):
      raise CheckpointError(f'{source}: {key!r} holds non-finite values (corrupt file?)')
    out[path] = _from_torch_layout(value, path)
  return traverse_util.unflatten_dict(out)


# --- the callable network ---------------------------------------------------------------

def _fingerprint(variables: Mapping[str, Any], dtype) -> str:
  """sha256 of the weights (names, shapes, values) and the compute dtype: tells caches of
  features apart whatever file format the weights came in."""
  h = hashlib.sha256(str(jnp.dtype(dtype)).encode())
  for path, value in sorted(traverse_util.flatten_dict(dict(variables)).items()):
    value = np.ascontiguousarray(np.asarray(value, np.float32))
    h.update(f'{"/".join(path)}{value.shape}'.encode())
    h.update(value.tobytes())
  return h.hexdigest()


@functools.lru_cache(maxsize=None)
def _jitted(dtype_name: str, mesh) -> Tuple[Any, Any]:
  """(preprocess, forward) jitted for a dtype and mesh; shared by every FIDInception on
  them, so a second network (e.g. another weights file) reuses the compiled programs."""
  dtype = jnp.dtype(dtype_name)
  module = FIDInceptionV3(dtype=dtype)
  shard4, shard2 = (parallel.batch_sharding(mesh, n) for n in (4, 2))

  def forward(variables, x_BHWC):
    out, state = module.apply(variables, x_BHWC, mutable=['intermediates'])
    tap = state['intermediates']['Mixed_6d']['branch1x1']['pre_bn'][0]
    return dict(out, spatial=tap[..., :SPATIAL_CHANNELS].astype(jnp.float32))

  outs = {'pool3': shard2, 'logits': shard2, 'logits_unbiased': shard2, 'spatial': shard4}
  return (jax.jit(functools.partial(preprocess, dtype=dtype), in_shardings=shard4,
                  out_shardings=shard4),
          jax.jit(forward, in_shardings=(parallel.replicated(mesh), shard4), out_shardings=outs))


class FIDInception:
  """FID Inception weights on a device mesh; call it on uint8 NHWC images of any size."""

  def __init__(self, variables: Mapping[str, Any], *, dtype=jnp.float32, mesh=None):
    self.dtype = jnp.dtype(dtype)
    self.mesh = mesh if mesh is not None else parallel.make_mesh()
    self.fingerprint = _fingerprint(variables, self.dtype)
    self.variables = jax.device_put(dict(variables), parallel.replicated(self.mesh))
    self.num_shards = self.mesh.shape['data'] * self.mesh.shape['fsdp']
    self._preprocess, self._forward = _jitted(self.dtype.name, self.mesh)

  def dispatch(self, images_BHWC) -> Tuple[Dict[str, jax.Array], int]:
    """Starts the features of a batch on the devices; returns (padded device arrays, N).

    The batch is padded to a multiple of the mesh's batch shards. Every distinct input
    shape compiles the resize once and every distinct padded batch size the network once."""
    x = np.asarray(images_BHWC)
    if x.dtype != np.uint8:
      raise ValueError(f'the Inception network takes uint8 images (0..255), got {x.dtype}')
    if x.ndim != 4 or x.shape[-1] not in (1, 3) or 0 in x.shape:
      raise ValueError(f'images must be non-empty NHWC with 1 or 3 channels, got shape {x.shape}')
    if x.shape[-1] == 1:
      x = np.repeat(x, 3, axis=-1)
    n = x.shape[0]
    pad = -n % self.num_shards
    if pad:
      x = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)])
    x = jax.device_put(x, parallel.batch_sharding(self.mesh, 4))
    return self._forward(self.variables, self._preprocess(x)), n

  def __call__(self, images_BHWC) -> Dict[str, np.ndarray]:
    """{'pool3', 'logits', 'logits_unbiased', 'spatial'} as float32 numpy arrays."""
    out, n = self.dispatch(images_BHWC)
    return {k: np.asarray(v)[:n] for k, v in out.items()}


def load(path: str | os.PathLike, *, dtype=jnp.float32, mesh=None) -> FIDInception:
  """The FID Inception from pytorch-fid's weights file (read without torch, no pickle code)."""
  from var_jax.convert.torch_io import load_pth
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f'Inception weights not found: {path} (download {FID_WEIGHTS_NAME} once, '
        f"pytorch-fid's FID weights, from {FID_WEIGHTS_URL})")
  return FIDInception(variables_from_state_dict(load_pth(path), path), dtype=dtype, mesh=mesh)
