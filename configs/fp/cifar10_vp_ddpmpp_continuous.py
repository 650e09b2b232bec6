"""FP-Diffusion fine-tuning of Score SDE's DDPM++ on CIFAR-10, VP SDE, continuous time.

The base config is configs/vp/cifar10_ddpmpp_continuous.py.
The paper's setting (docs/score_fpe.md): DSM with likelihood weighting + 0.15 R_vec + 0.01 R_sc, batch 48.
"""

from configs.vp.cifar10_ddpmpp_continuous import get_config as get_base_config
from configs.fp.fp_finetuning import fine_tune


def get_config():
  config = fine_tune(get_base_config())
  return config
