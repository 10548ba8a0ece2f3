"""Reference state dicts <-> Flax parameter trees, checked key by key.

`state_dict_to_params` walks a torch state dict, places every parameter at the
Flax path given by `naming.resolve_path` (transposing Linear/Conv weights) and
checks it against the expected (abstract, `jax.eval_shape`) tree: a missing,
unexpected or mis-shaped key is a ValueError naming the key and both shapes in
torch layout. The buffers the reference stores beside its parameters
(`lvl_1L`, `attn_bias_for_masking`, `blocks.N.attn.zero_k_bias`,
`quantize.ema_vocab_hit_SV`) are not Flax parameters: they are shape-checked and
returned separately, so that `params_to_state_dict` can write them back and a
torch -> flax -> torch round trip is bit-identical (same keys, order, dtypes,
bytes). When they are not kept, `make_buffers` regenerates them from the config.
"""
from __future__ import annotations

import collections
import re
from typing import Any, Dict, List, Mapping, Sequence, Tuple

import numpy as np

from var_jax.convert import naming

VQVAE, VAR = 'VQVAE', 'VAR'
_MAX_LISTED = 12


def _shape(x) -> Tuple[int, ...]:
  return tuple(int(d) for d in x.shape)


def _torch_shape(path: naming.Path, flax_shape: Tuple[int, ...]) -> Tuple[int, ...]:
  """The torch-layout shape of a Flax leaf (kernels are transposed)."""
  if path[-1] == 'kernel' and len(flax_shape) == 2:
    return flax_shape[::-1]
  if path[-1] == 'kernel' and len(flax_shape) == 4:
    h, w, i, o = flax_shape
    return (o, i, h, w)
  return flax_shape


def detect_kind(tree_or_keys) -> str:
  """'VQVAE' or 'VAR' from a param tree or state-dict keys."""
  keys = [k if isinstance(k, str) else '.'.join(k) for k in tree_or_keys]
  heads = {k.split('/')[0].split('.')[0] for k in keys}
  if 'encoder' in heads or 'quantize' in heads:
    return VQVAE
  if 'word_embed' in heads or 'class_emb' in heads:
    return VAR
  raise ValueError('cannot tell whether these weights are a VQVAE or a VAR '
                   f'(top-level names: {sorted(heads)[:8]})')


# --- buffers -----------------------------------------------------------------

def expected_buffers(abstract_params: Mapping[str, Any], *, what: str, config=None
                     ) -> Dict[str, Tuple[Tuple[int | None, ...], np.dtype]]:
  """{buffer key: (torch shape, dtype)}; None in a shape means 'not determined'.

  `config` (VQVAEConfig / VARConfig) pins the number of scales of
  `quantize.ema_vocab_hit_SV`; everything else follows from the parameters.
  """
  if what == VQVAE:
    vocab = _shape(abstract_params['quantize']['embedding']['embedding'])[0]
    scales = len(config.v_patch_nums) if config is not None else None
    return {'quantize.ema_vocab_hit_SV': ((scales, vocab), np.dtype(np.float32))}
  _, seq, width = _shape(abstract_params['pos_1LC'])
  out = {'lvl_1L': ((1, seq), np.dtype(np.int64)),
         'attn_bias_for_masking': ((1, 1, seq, seq), np.dtype(np.float32))}
  for name in sorted(abstract_params, key=_natural):
    if re.fullmatch(r'blocks_\d+', name):
      out[f'blocks.{name[7:]}.attn.zero_k_bias'] = ((width,), np.dtype(np.float32))
  return out


def make_buffers(config, *, what: str) -> Dict[str, np.ndarray]:
  """The reference's buffers regenerated from a VQVAEConfig / VARConfig."""
  if what == VQVAE:
    return {'quantize.ema_vocab_hit_SV':
            np.zeros((len(config.v_patch_nums), config.vocab_size), np.float32)}
  lvl_L = np.concatenate([np.full(pn * pn, i, np.int64) for i, pn in enumerate(config.patch_nums)])
  bias_LL = np.where(lvl_L[:, None] >= lvl_L[None, :], np.float32(0), np.float32(-np.inf))
  out = {'lvl_1L': lvl_L[None], 'attn_bias_for_masking': bias_LL.astype(np.float32)[None, None]}
  for i in range(config.depth):
    out[f'blocks.{i}.attn.zero_k_bias'] = np.zeros((config.embed_dim,), np.float32)
  return out


def _fits(shape, want) -> bool:
  return len(shape) == len(want) and all(w is None or s == w for s, w in zip(shape, want))


# --- torch -> flax -----------------------------------------------------------

def state_dict_to_params(sd: Mapping[str, Any], abstract_params: Mapping[str, Any], *,
                         what: str = VQVAE, config=None
                         ) -> Tuple[Dict[str, Any], Dict[str, np.ndarray]]:
  """Returns (params, buffers) for a reference state dict.

  `abstract_params`: the unboxed expected tree (arrays or ShapeDtypeStructs, e.g.
  from `jax.eval_shape(module.init, ...)`). Params come back as numpy arrays in
  the expected dtypes; buffers as the state dict's own arrays, in its order.
  Shape-only values (e.g. jax.ShapeDtypeStruct) give ShapeDtypeStructs: the
  mapping of a billion-parameter release file is checked without allocating it.
  Raises ValueError listing every missing, unexpected or mis-shaped key.
  """
  expected = naming.flatten(abstract_params)
  buffer_spec = expected_buffers(abstract_params, what=what, config=config)
  flat: Dict[naming.Path, np.ndarray] = {}
  buffers: Dict[str, np.ndarray] = collections.OrderedDict()
  problems: List[str] = []
  reported = set()
  for key, value in sd.items():
    shape = _shape(value)
    if key in buffer_spec:
      want, dtype = buffer_spec[key]
      if not _fits(shape, want):
        problems.append(f'{key}: checkpoint shape {shape}, expected {_fmt(want)}')
      else:
        buffers[key] = value
      continue
    path = naming.resolve_path(key, expected)
    if path is None:
      problems.append(f'{key}: unexpected key (shape {shape}) that the {what} config has no place for')
      continue
    want = _torch_shape(path, _shape(expected[path]))
    if shape != want:
      problems.append(f'{key}: checkpoint shape {shape}, expected {want}')
      reported.add(path)
      continue
    flat[path] = _to_flax(path, value, expected[path])
  for path, leaf in expected.items():
    if path not in flat and path not in reported:
      problems.append(f'{naming.path_to_torch_key(path)}: missing from the checkpoint '
                      f'(expected shape {_torch_shape(path, _shape(leaf))})')
  if problems:
    listed = '\n  '.join(problems[:_MAX_LISTED])
    more = f'\n  ... and {len(problems) - _MAX_LISTED} more' if len(problems) > _MAX_LISTED else ''
    raise ValueError(f'{what} state dict does not match the config ({len(problems)} problem(s)):'
                     f'\n  {listed}{more}')
  return naming.unflatten(flat), buffers


def _to_flax(path: naming.Path, value: Any, leaf: Any):
  """Torch array -> Flax layout and dtype; a shape-only value (ShapeDtypeStruct) stays abstract."""
  dtype = np.dtype(leaf.dtype)
  if not hasattr(value, '__array__'):
    import jax
    return jax.ShapeDtypeStruct(_shape(leaf), dtype)
  return naming.torch_to_flax_array(path[-1], np.asarray(value)).astype(dtype, copy=False)


def _fmt(shape) -> str:
  return '(' + ', '.join('*' if d is None else str(d) for d in shape) + (',)' if len(shape) == 1 else ')')


# --- flax -> torch -----------------------------------------------------------

def params_to_state_dict(params: Mapping[str, Any], buffers: Mapping[str, Any] | None = None,
                         key_order: Sequence[str] | None = None, *, config=None,
                         what: str | None = None) -> 'collections.OrderedDict[str, np.ndarray]':
  """The reference state dict of a Flax param tree (numpy arrays, torch layout).

  `buffers`: the kept buffers (from `state_dict_to_params`); any buffer not given
  is regenerated from `config` (a VQVAEConfig / VARConfig), which is then
  required. `key_order`: the order to write keys in (e.g. the original file's);
  keys it does not list follow in the reference's own order.
  """
  flat = naming.flatten(params)
  what = what or detect_kind(flat)
  out: Dict[str, np.ndarray] = {}
  for path, value in flat.items():
    out[naming.path_to_torch_key(path)] = np.require(
        naming.flax_to_torch_array(path[-1], np.asarray(value)), requirements='C')
  spec = expected_buffers(params, what=what, config=config)
  given = dict(buffers or {})
  missing = [k for k in spec if k not in given]
  regenerated = make_buffers(config, what=what) if missing and config is not None else {}
  for key, (want, _) in spec.items():
    if key in given:
      value = np.asarray(given[key])
    elif key in regenerated:
      value = regenerated[key]
    else:
      raise ValueError(f'buffer {key} was not kept and no config was given to regenerate it')
    if not _fits(_shape(value), want):
      raise ValueError(f'buffer {key}: shape {_shape(value)}, expected {_fmt(want)}')
    out[key] = value
  keys = sorted(out, key=reference_sort_key)
  if key_order is not None:
    listed = [k for k in key_order if k in out]
    keys = listed + [k for k in keys if k not in set(listed)]
  return collections.OrderedDict((k, out[k]) for k in keys)


# The reference registers, per module, its own parameters, then its buffers,
# then its children; this table is that registration order across the VQVAE
# and VAR modules (names only compared among siblings).
_ORDER = [
    # VQVAE top level, encoder / decoder, their levels and blocks
    'encoder', 'decoder', 'quantize', 'quant_conv', 'post_quant_conv',
    'conv_in', 'down', 'mid', 'up', 'norm_out', 'conv_out',
    'block', 'attn', 'ffn', 'ada_lin', 'downsample', 'upsample',
    'norm1', 'conv1', 'norm2', 'conv2', 'nin_shortcut', 'norm', 'qkv', 'proj_out',
    'block_1', 'attn_1', 'block_2', 'conv',
    # quantizer
    'ema_vocab_hit_SV', 'quant_resi', 'qresi_ls', 'qresi', 'embedding',
    # VAR
    'pos_start', 'pos_1LC', 'lvl_1L', 'attn_bias_for_masking',
    'word_embed', 'class_emb', 'lvl_embed', 'shared_ada_lin', 'blocks', 'head_nm', 'head',
    'ada_gss', 'scale_mul_1H11', 'q_bias', 'v_bias', 'zero_k_bias', 'mat_qkv', 'proj', 'fc1', 'fc2',
    'weight', 'bias',
]
_RANK = {n: i for i, n in enumerate(_ORDER)}


def reference_sort_key(key: str):
  """Sort key putting state-dict keys in the reference's registration order."""
  parts = key.split('.')
  out = []
  for i, p in enumerate(parts):
    is_child = i < len(parts) - 1
    if p.isdigit():
      out.append((int(is_child), 0, int(p), ''))
    else:
      out.append((int(is_child), 1, _RANK.get(p, len(_RANK)), p))
  return out


def _natural(name: str):
  return [int(t) if t.isdigit() else t for t in re.split(r'(\d+)', name)]


# --- expected trees ----------------------------------------------------------

def abstract_params(config, *, what: str):
  """The unboxed parameter tree of the VQVAE or VAR of a ModelConfig, as
  ShapeDtypeStructs (`jax.eval_shape` of init: nothing is allocated)."""
  import jax
  import jax.numpy as jnp
  from flax.linen import meta
  if what == VQVAE:
    from var_jax.tokenizer.vqvae import VQVAE as Module
    size, cin = config.vae.image_size, config.vae.in_channels
    model, args = Module(config.vae), (jnp.zeros((1, size, size, cin), jnp.float32),)
  else:
    if config.var is None:
      raise ValueError('the config has no VAR section')
    from var_jax.transformer.model import VAR as Module
    model = Module(config.var, vocab_size=config.vae.vocab_size, Cvae=config.vae.Cvae)
    args = (jnp.zeros((1,), jnp.int32),
            jnp.zeros((1, config.var.L - config.var.first_l, config.vae.Cvae), jnp.float32))
  variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *args))
  return meta.unbox(variables['params'])
