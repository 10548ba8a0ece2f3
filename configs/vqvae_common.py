"""Shared recipe for the VQVAE-training configs (imported by configs/vqvae_*.py, digits_vqvae.py).

`vqvae_config(**overrides)` returns the full ConfigDict. The model section holds
VQVAEConfig's fields, 1:1 (defaults: the released vae_ch160v4096z32, f16, 10 scales);
mesh, data and run sections are the VAR trainer's (configs/common.py), and the optim
section uses the VAR configs' names where the meaning is shared. Loss defaults are
reconstruction (L1) + the multi-scale VQ loss only; LPIPS and the discriminator are
opt-in (loss.lpips > 0 with loss.lpips_weights, loss.disc > 0).
"""
import ml_collections

from var_jax.config_loader import import_sibling

common = import_sibling(__file__, 'common')


def vqvae_config(**over):
  c = ml_collections.ConfigDict()
  c.task = 'vqvae'               # the trainer (configs/common.py: 'var')
  c.seed = 0
  c.model = ml_collections.ConfigDict(dict(   # VQVAEConfig's fields
      vocab_size=4096, z_channels=32, ch=160, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2,
      using_sa=True, using_mid_sa=True, in_channels=3, dropout=0.0,
      beta=0.25,                 # commitment weight inside the VQ loss
      using_znorm=False, quant_conv_ks=3, quant_resi=0.5, share_quant_resi=4,
      default_qresi_counts=0, patch_nums=common.PN_256,
  ))
  c.init = ml_collections.ConfigDict(dict(
      codebook=0.0,              # eini: >0 trunc-normal std, <0 uniform +-|e|/V, 0 N(0,1)
  ))
  c.data = common.data_section(mid_reso=1.125, hflip=True)
  c.loss = ml_collections.ConfigDict(dict(
      l1=1.0, l2=0.0,            # reconstruction
      vq=1.0,                    # weight of the multi-scale VQ loss
      lpips=0.0,                 # perceptual weight; needs lpips_weights
      lpips_weights='',          # .pth/.npz: torchvision vgg16 features.* (+ lpips lin*.model.1.weight); comma-separated
      disc=0.0,                  # GAN weight (0: no discriminator)
      disc_start=0,              # step at which the discriminator (and its loss) starts
      disc_adaptive=True,        # VQGAN adaptive weight at the decoder's last conv
      disc_max_weight=1e4,
      disc_ndf=64, disc_layers=3,
  ))
  c.optim = ml_collections.ConfigDict(dict(
      lr=1e-4, b1=0.5, b2=0.9, eps=1e-8,
      weight_decay=0.0,
      weight_decay_end=-1.0,     # cosine to this at the end; -1: constant
      grad_clip=0.0,             # global-norm clip (<= 0: none)
      schedule='cos',            # lr decay after warm-up (cos, lin, lin0, lin00, lin<T>, exp)
      warmup_steps=0,
      warmup_start=0.005,        # lr factor at step 0
      final_lr=0.1,              # lr factor at the end
      disc_lr=-1.0,              # < 0: same as lr
  ))
  c.ema = 0.0                    # EMA decay of the weights (0: off)
  c.codebook = ml_collections.ConfigDict(dict(
      restart_every=0,           # steps between dead-code restarts (0: never)
      restart_until=-1,          # no restarts after this step (-1: until the end)
      restart_threshold=0.1,     # dead: hit EMA below this at every scale
      restart_noise=0.01,        # noise (x std of the latents) added to restarted codes
  ))
  c.batch_size = 256
  c.ep = 0                       # epochs, used when total_steps <= 0
  c.total_steps = 100_000
  c.mesh = common.mesh_section()
  c.logical_axis_rules = ()
  c.dtype = 'float32'            # compute (bfloat16 for speed on accelerators)
  c.param_dtype = 'float32'
  c.run = common.run_section(eval_every=5000, eval_batches=20)
  return common.apply_overrides(c, over)
