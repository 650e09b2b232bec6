"""FP-Diffusion fine-tuning of `ve_ncsnpp_continuous.py` (DIGITS): DSM with likelihood weighting + alpha R_vec + beta R_sc.

The architecture and SDE are the base's, so the pretrained checkpoint fits. With `--config.training.alpha=0
--config.training.beta=0` it is the DSM-alone fine-tuning of the same schedule (the paired baseline).
"""

from configs.digits.ve_ncsnpp_continuous import get_config as get_base_config
from configs.digits.fp_finetuning import digits_fine_tune


def get_config():
  return digits_fine_tune(get_base_config())
