"""Shared recipe for the VAR configs (imported by configs/var_*.py via import_sibling).

`var_config(**overrides)` returns the full ConfigDict with the reference defaults
(utils/arg_util.py + train.py): AdamW(0.9, 0.95), lr = base_lr * batch_size / 256,
weight decay 0.05 (cosine to weight_decay_end), warm-up warmup_epochs (0: ep/50) from
warmup_start, 'lin0' decay to final_lr, grad clip 2, class dropout 0.1, drop path
0.1*depth/24, init multipliers init.adaln/adaln_gamma/head. Sizes: width = 64*depth,
heads = depth (the release convention). Each readable name keeps the reference's in a
comment; the reference's names are still accepted (var_jax.config_loader.RENAMED).

Sections: model = VARConfig's fields but patch_nums (+ attention, remat, scan_blocks), vae =
VQVAEConfig's structural fields, patch_nums for v_patch_nums (beta, using_znorm, quant_conv_ks,
default_qresi_counts, in_channels, dropout: from a native vae.checkpoint, else the defaults;
+ checkpoint, dtype, precision), init, optim, progressive, data, mesh, run.
The tokenizer-training configs reuse `mesh_section`, `data_section`, `run_section`.
"""
import ml_collections

from var_jax.config import PATCH_NUMS_256 as PN_256, PATCH_NUMS_512 as PN_512  # noqa: F401
from var_jax.config_loader import set_value


def mesh_section(data=-1, fsdp=1, tensor=1):
  """Device mesh axis sizes (-1: all devices left over) and logical axis rules (() = parallel.LOGICAL_RULES)."""
  return ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor))


def data_section(kind='folder', path='', **kw):
  d = dict(
      kind=kind,                 # folder (path/train/<class>/*.JPEG, path/val/...), tfds, synthetic,
                                 # digits, tokens (a `var-jax tokenize --out` folder: no encoder in the step)
      path=path,                 # folder root, TFDS data_dir ('' = default), or the tokens folder
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
  """Sets dotted keys ('optim.base_lr': 8e-5) of a ConfigDict; returns it."""
  for k, v in over.items():
    set_value(c, k, v)
  return c


def var_config(depth=16, patch_nums=PN_256, **over):
  c = ml_collections.ConfigDict()
  c.task = 'var'                 # the trainer: 'var' (this) or 'vqvae' (configs/vqvae_common.py)
  c.seed = 0
  c.model = ml_collections.ConfigDict(dict(   # VARConfig's fields, plus attention, remat, scan_blocks
      depth=depth, embed_dim=64 * depth, num_heads=depth, mlp_ratio=4.0,
      drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.1 * depth / 24,
      norm_eps=1e-6, shared_aln=False, attn_l2_norm=True, cond_drop_rate=0.1,
      num_classes=1000,
      # Attention kernel (var_jax.transformer.attention): 'auto' = cuDNN flash attention on
      # NVIDIA GPUs and splash on TPUs for bf16/fp16 compute, XLA einsums otherwise (float32,
      # parity). On one H100, d16 B64: cuDNN fwd+bwd 2.95 ms and 0.34 GiB against XLA's
      # 8.77 ms and 4.41 GiB (the materialised (B, H, L, L) logits). Logged at start.
      attention='auto',
      # Rematerialisation of each block in the backward pass: 'none', 'block' (keep only the
      # block inputs: least memory, ~1/3 more FLOPs), a jax.checkpoint_policies name such
      # as 'dots_saveable' (keep the matmul outputs, recompute the elementwise work), or
      # 'dots_attention_saveable' (dots_saveable that also keeps the fused attention's
      # output and softmax statistics, so the backward pass does not rerun the attention
      # forward: 16 cuDNN forward calls, ~10.6 ms of the d16 step, for +1.4 GiB at B64).
      # Compiled temporary memory of the d16 B64 gradient with cuDNN attention on an H100:
      # none 70.1 GiB, dots_saveable 18.4 GiB, block 5.3 GiB; with dots_saveable the whole
      # d16 B64 step ran at 228 images/s in 22 GiB, 309 from tokens (benchmarks/RESULTS.md).
      # dots_attention_saveable (the default) is the same program minus those 16 calls
      # (tests/test_attention.py); its GPU step time is not yet measured. With the xla
      # attention (float32, CPU) it equals dots_saveable. 'dots_inputs_attention_saveable'
      # also keeps the bf16 matmul inputs (+8 GiB at d16 B64; not yet timed).
      remat='dots_attention_saveable',
      # The depth loop of the training step: True = one lax.scan over the blocks' stacked
      # parameters (compiles the block once); False = unrolled (compiles `depth` blocks,
      # slower to compile, but the step no longer stacks the parameters, writes each
      # block's saved activations into (depth, ...) buffers or slices the gradients back
      # out of them; same numbers, dropout included). Sampling chooses its own
      # (`var-jax sample --unrolled`). Not yet timed on a GPU (benchmarks/RESULTS.md).
      scan_blocks=True,
  ))
  c.init = ml_collections.ConfigDict(dict(   # init_weights multipliers
      adaln=0.5,                 # aln: AdaLN linear weights x adaln
      adaln_gamma=1e-5,          # alng: AdaLN gamma rows x adaln_gamma
      head=0.02,                 # hd: head weights x head
      std=-1.0,                  # ini: weight init std; < 0: sqrt(1 / (3 * embed_dim))
  ))
  c.vae = ml_collections.ConfigDict(dict(    # VQVAEConfig's fields, plus checkpoint/dtype/precision
      checkpoint='vae_ch160v4096z32.pth',   # reference .pth or native dir; '' = random init
      vocab_size=4096, z_channels=32, ch=160, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2,
      using_sa=True, using_mid_sa=True, quant_resi=0.5, share_quant_resi=4,
      patch_nums=tuple(patch_nums),
      # The frozen tokenizer's cost in each step. Measured on one H100, encoding a batch of
      # 64 at 256 px (random weights; token agreement with float32 'highest'):
      #   dtype float32, precision 'highest'   463 ms   100% (exact: the parity path)
      #   dtype float32, precision 'default'   73.8 ms  99.5% (TF32 convs: what the reference
      #                                                      trainer runs, torch allow_tf32)
      #   dtype bfloat16                       45.4 ms  94.7%
      # 'default' on TPUs means one bfloat16 pass for float32 convs (about the bfloat16
      # row). The quantizer always runs in float32 at 'highest'. data.kind=tokens removes
      # the encoder from the step altogether (var-jax tokenize).
      dtype='float32',
      precision='default',
  ))
  c.data = data_section()
  c.optim = ml_collections.ConfigDict(dict(
      base_lr=1e-4,              # tblr: peak lr per 256 images (lr = base_lr * batch_size / 256)
      lr=-1.0,                   # > 0: the peak lr itself (base_lr ignored)
      weight_decay=0.05,         # twd
      weight_decay_end=-1.0,     # twde: cosine to this at the end; -1: constant (twde=0 in the reference)
      grad_clip=2.0,             # tclip: global-norm clip (<= 0: none)
      b1=0.9, b2=0.95, eps=1e-8,
      schedule='lin0',           # sche: lr decay after warm-up (cos, lin, lin0, lin00, lin<T>, exp)
      warmup_epochs=0.0,         # wp: linear warm-up (0: ep/50)
      warmup_start=0.005,        # wp0: lr factor at step 0
      final_lr=0.01,             # wpe: lr factor at the end
      label_smoothing=0.0,       # ls
      grad_accum=1,              # ac: micro-batches per optimizer step
  ))
  c.progressive = ml_collections.ConfigDict(dict(
      until=0.0,                 # pg: progressive training during [0, until] of training (0: off)
      start_stage=4,             # pg0: the first scale stage trained
      warmup_epochs=0.0,         # pgwp: warm-up of each new stage's weight (0: ep/300)
  ))
  c.batch_size = 768             # global, per optimizer step
  c.ep = 250
  c.total_steps = -1             # > 0 overrides ep * steps_per_epoch
  c.mesh = mesh_section()
  c.logical_axis_rules = ()      # () -> var_jax.parallel.LOGICAL_RULES
  c.dtype = 'bfloat16'           # compute
  c.param_dtype = 'float32'      # master weights
  c.run = run_section()
  return apply_overrides(c, over)
