"""2-D demo, VE SDE, denoising score matching + the score-FPE regularizer (FP-Diffusion).

Everything but the regularizer's weight is `ve_dsm.py`'s, so the two runs are a paired comparison.
"""

from configs.toy import ve_dsm


def get_config():
  config = ve_dsm.get_config()
  config.training.alpha = 0.01
  return config
