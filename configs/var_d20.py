"""VAR-20 on ImageNet 256 px: the reference recipe (README: --depth=20 --bs=768 --ep=250 --fp16=1 --alng=1e-3 --wpe=0.1).

Command (8 hosts x 8 accelerators or any mesh; batch is global):
  var-jax train --config configs/var_d20.py --workdir /shared/ckpt/var_d20 \
    --config.data.path=/data/imagenet   # train/<class>/*.JPEG, val/<class>/*.JPEG
  # /shared: a file system every host mounts at that path (NFS/Filestore, gcsfuse), not a gs:// URL
  # TFDS instead: --config.data.kind=tfds --config.data.tfds_name=imagenet2012 --config.data.path=TFDS_DIR
  # bigger models: --config.mesh.fsdp=8 (FSDP) and/or --config.mesh.tensor=N

Hardware/time: not run at full scale in this repository. The reference trained it
on A100 nodes in fp16; this port uses bf16 compute with f32 master weights.
Expected result (reference model zoo, 50k samples, cfg 1.5): FID 2.95, about 600M params.
The frozen tokenizer is the released vae_ch160v4096z32.pth (config.vae.checkpoint).
"""
from var_jax.config_loader import import_sibling

common = import_sibling(__file__, 'common')


def get_config():
  return common.var_config(
      depth=20, patch_nums=common.PN_256,
      **{'batch_size': 768, 'ep': 250, 'optim.base_lr': 1e-4, 'init.adaln_gamma': 1e-3,
         'optim.final_lr': 0.1, 'optim.weight_decay_end': -1.0, 'model.shared_aln': False,
         'run.save_every': 2000, 'run.log_every': 100})
