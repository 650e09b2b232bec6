"""Small DDPM++ on DIGITS, VP SDE, continuous time: DSM pretraining (Score SDE's DDPM++ VP recipe, scaled down).

DDPM++ is NCSN++'s network without FIR, without input skip connections, with positional time embedding and
the data in [-1, 1] (Score SDE's `vp/cifar10_ddpmpp_continuous.py`).
"""

from configs.digits.default_digits_configs import get_default_configs, small_ncsnpp


def get_config():
  config = small_ncsnpp(get_default_configs())
  training = config.training
  training.sde = 'vpsde'
  training.continuous = True
  training.reduce_mean = True
  config.data.centered = True
  model = config.model
  model.scale_by_sigma = False
  model.fir = False
  model.progressive_input = 'none'
  model.embedding_type = 'positional'
  sampling = config.sampling
  sampling.method = 'pc'
  sampling.predictor = 'euler_maruyama'
  sampling.corrector = 'none'
  model.num_scales = 200
  return config
