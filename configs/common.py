"""Shared recipe for the VAR configs (imported by configs/var_*.py via import_sibling).

`var_config(**overrides)` returns the full ConfigDict with the reference defaults
(utils/arg_util.py + train.py): AdamW(0.9, 0.95), lr = tblr * batch_size / 256,
wd 0.05 (cosine to twde), warm-up wp epochs (0: ep/50) from wp0, 'lin0' decay to wpe,
grad clip 2, class dropout 0.1, drop path 0.1*depth/24, init multipliers aln/alng/hd.
Sizes: width = 64*depth, heads = depth (the release convention).
The tokenizer-training configs may reuse `mesh_section`, `data_section`, `run_section`.
"""
import ml_collections

from var_jax.config_loader import set_value

PN_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
PN_512 = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)


def mesh_section(data=-1, fsdp=1, tensor=1):
  """Device mesh axis sizes (-1: all devices left over) and logical axis rules (() = parallel.LOGICAL_RULES)."""
  return ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor))


def data_section(kind='folder', path='', **kw):
  d = dict(
      kind=kind,                 # folder (path/train/<class>/*.JPEG, path/val/...), tfds, synthetic
      path=path,                 # folder root, or TFDS data_dir ('' = default)
      tfds_name='imagenet2012',  # any image data set with 'image' and 'label' features
      train_split='train', eval_split='validation', image_key='image', label_key='label',
      mid_reso=1.125,            # shorter side resized to round(mid_reso * size), then crop
      hflip=False,
      num_threads=16,            # grain read threads per process
      worker_count=0,            # grain worker processes per host (0: threads only)
      prefetch=2,                # batches prefetched per thread pool
      synthetic_examples=1024,   # kind=synthetic only
      num_classes=1000,          # kind=synthetic only (labels)
  )
  d.update(kw)
  return ml_collections.ConfigDict(d)


def run_section(**kw):
  d = dict(
      log_every=100, save_every=5000, keep=3, async_checkpoint=True,
      eval_every=-1,             # steps; -1: every 10 epochs and at the end (reference), 0: never
      eval_batches=-1,           # -1: the whole eval split
      nan_policy='stop',         # 'stop': raise on non-finite loss/grad; 'skip': drop the update
      peak_flops_per_device=0.0, # for MFU; 0: from the device kind (unknown -> MFU not reported)
      export=True,               # at the end: workdir/export, a native checkpoint for var_jax.load
  )
  d.update(kw)
  return ml_collections.ConfigDict(d)


def apply_overrides(c, over):
  """Sets dotted keys ('optim.tblr': 8e-5) of a ConfigDict; returns it."""
  for k, v in over.items():
    set_value(c, k, v)
  return c


def var_config(depth=16, patch_nums=PN_256, **over):
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = ml_collections.ConfigDict(dict(
      depth=depth, embed_dim=64 * depth, num_heads=depth, mlp_ratio=4.0,
      drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.1 * depth / 24,
      norm_eps=1e-6, shared_aln=False, attn_l2_norm=True, cond_drop_rate=0.1,
      num_classes=1000,
      aln=0.5, alng=1e-5, hd=0.02, ini=-1.0,   # init_weights multipliers; ini<0: sqrt(1/3C)
  ))
  c.vae = ml_collections.ConfigDict(dict(
      checkpoint='vae_ch160v4096z32.pth',   # reference .pth or native dir; '' = random init
      vocab_size=4096, z_channels=32, ch=160, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2,
      using_sa=True, using_mid_sa=True, quant_resi=0.5, share_quant_resi=4,
      patch_nums=tuple(patch_nums),
      dtype='float32',           # tokenizer compute dtype (float32 keeps the tokens exact)
  ))
  c.data = data_section()
  c.optim = ml_collections.ConfigDict(dict(
      tblr=1e-4, lr=-1.0,        # peak lr = tblr * batch_size / 256 unless lr > 0
      twd=0.05, twde=0.0,        # wd start / end (twde=0: = twd)
      tclip=2.0, b1=0.9, b2=0.95, eps=1e-8,
      sche='lin0', wp=0.0, wp0=0.005, wpe=0.01,   # wp in epochs (0: ep/50)
      ls=0.0,                    # label smoothing
      ac=1,                      # gradient accumulation micro-steps per update
  ))
  c.batch_size = 768             # global, per optimizer step
  c.ep = 250
  c.total_steps = -1             # > 0 overrides ep * steps_per_epoch
  c.pg = 0.0                     # progressive training during [0, pg] of training (0: off)
  c.pg0 = 4
  c.pgwp = 0.0                   # warm-up epochs per progressive stage (0: ep/300)
  c.mesh = mesh_section()
  c.logical_axis_rules = ()      # () -> var_jax.parallel.LOGICAL_RULES
  c.dtype = 'bfloat16'           # compute
  c.param_dtype = 'float32'      # master weights
  c.run = run_section()
  return apply_overrides(c, over)
