"""FP-Diffusion fine-tuning of a deep DDPM++ (VP SDE, continuous time) on ImageNet 32x32.

The model and SDE are Score SDE's configs/vp/cifar10_ddpmpp_deep_continuous.py, with the data set replaced.

The paper's setting (docs/score_fpe.md): DSM with likelihood weighting + 0.15 R_vec + 0.01 R_sc, batch 48.
"""

from configs.vp.cifar10_ddpmpp_deep_continuous import get_config as get_base_config
from configs.fp.fp_finetuning import fine_tune


def get_config():
  config = fine_tune(get_base_config())
  # ImageNet 32x32 (tfds 'downsampled_imagenet/32x32'); the architecture is the CIFAR-10 deep DDPM++ one.
  # No Score SDE checkpoint exists for it. Pretrain with DSM in the same workdir first, with Score SDE's
  # schedule for the base config (docs/score_fpe.md):
  #   --config.training.alpha=0 --config.training.beta=0 --config.training.likelihood_weighting=False
  #   --config.training.batch_size=128 --config.training.n_iters=1300001 --config.training.snapshot_freq=50000
  # then run this config unchanged: it resumes at step 1300001 and fine-tunes to 1400001.
  data = config.data
  data.dataset = 'IMAGENET32'
  data.image_size = 32
  data.num_channels = 3
  return config
