"""The released tokenizer's structure: f16, Cvae 32, vocab 4096, ch 160, 10 scales at 256 px.

Command (ImageNet in folder layout under $DATA/train, $DATA/val):
  var-jax train-vqvae --config configs/vqvae_f16_release.py --workdir /ckpt/vq_f16 \
      --config.data.path=$DATA [--config.loss.lpips_weights=vgg16.pth,lpips_vgg.pth]

Hardware/time: not run here (this repository only trained the digits tokenizer); the
structure matches vae_ch160v4096z32.pth key for key (var_jax.convert maps one onto the
other), so a run's export is a drop-in for the reference tokenizer. The recipe is the
VQGAN one: L1 + LPIPS + VQ, a PatchGAN with hinge loss and adaptive weight from step
50k, Adam(0.5, 0.9), EMA 0.9999, dead-code restarts during the first half.
Expected result: unmeasured.
"""
from var_jax.config_loader import import_sibling

vq = import_sibling(__file__, 'vqvae_common')


def get_config():
  c = vq.vqvae_config()
  c.data = vq.common.data_section(kind='folder', mid_reso=1.125, hflip=True)
  c.loss.update(dict(l1=1.0, lpips=1.0, vq=1.0, disc=0.1, disc_start=50_000))
  c.optim.update(dict(lr=4e-4 * 256 / 256, warmup_steps=5000, schedule='cos'))
  c.ema = 0.9999
  c.codebook.update(dict(restart_every=1000, restart_until=250_000))
  c.batch_size = 256
  c.total_steps = 500_000
  c.dtype = 'bfloat16'
  c.run = vq.common.run_section(log_every=100, save_every=5000, eval_every=10_000, eval_batches=40)
  return c
