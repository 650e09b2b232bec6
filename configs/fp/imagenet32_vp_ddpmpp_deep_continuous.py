"""FP-Diffusion fine-tuning of a deep DDPM++ (VP SDE, continuous time) on ImageNet 32x32.

The model and SDE are Score SDE's configs/vp/cifar10_ddpmpp_deep_continuous.py, with the data set replaced.

The paper's setting (docs/score_fpe.md): DSM with likelihood weighting + 0.15 R_vec + 0.01 R_sc, batch 48.

No Score SDE checkpoint exists for ImageNet 32x32, so the recipe has two steps in one workdir:
  1. pretrain with DSM, on Score SDE's schedule for the base config: this config plus the command-line
     overrides of `pretraining_overrides()` (alpha = beta = 0, no likelihood weighting, batch 128,
     `training.n_iters` = the base's 950001, snapshots every 50000 steps: checkpoints 1 to 19);
  2. run this config unchanged: it resumes at step 950001, fine-tunes to 1050001 and evaluates the
     fine-tuned checkpoints 191 to 210 (every 5000 steps).
"""

from configs.vp.cifar10_ddpmpp_deep_continuous import get_config as get_base_config
from configs.fp.fp_finetuning import fine_tune


def pretraining_overrides():
  """The `--config.<field>=<value>` overrides of step 1 (DSM pretraining), as {field: value}.

  Derived from the base config, so that fine-tuning (whose `training.n_iters` is the base's plus
  `fp_finetuning.FINE_TUNING_STEPS`) resumes exactly where pretraining stops.
  """
  base = get_base_config().training
  return {'training.alpha': 0, 'training.beta': 0,
          'training.likelihood_weighting': base.likelihood_weighting,
          'training.batch_size': base.batch_size,
          'training.n_iters': base.n_iters,
          'training.snapshot_freq': base.snapshot_freq}


def get_config():
  config = fine_tune(get_base_config())
  # ImageNet 32x32 (tfds 'downsampled_imagenet/32x32'); the architecture is the CIFAR-10 deep DDPM++ one.
  data = config.data
  data.dataset = 'IMAGENET32'
  data.image_size = 32
  data.num_channels = 3
  return config
