"""2-D demo, VP SDE, denoising score matching + the score-FPE regularizer (FP-Diffusion).

Everything but the regularizer's weight is `vp_dsm.py`'s, so the two runs are a paired comparison.
"""

from configs.toy import vp_dsm


def get_config():
  config = vp_dsm.get_config()
  config.training.alpha = 0.01
  return config
