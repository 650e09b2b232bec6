"""Small NCSN++ on DIGITS, VE SDE, continuous time: DSM pretraining (Score SDE's NCSN++ VE recipe, scaled down)."""

from configs.digits.default_digits_configs import get_default_configs, small_ncsnpp


def get_config():
  config = small_ncsnpp(get_default_configs())
  training = config.training
  training.sde = 'vesde'
  training.continuous = True
  config.model.scale_by_sigma = True
  config.model.embedding_type = 'fourier'
  sampling = config.sampling
  sampling.method = 'pc'
  sampling.predictor = 'reverse_diffusion'
  sampling.corrector = 'langevin'
  # Score SDE's 1000 noise levels cost 2000 network evaluations per sample; 200 suffice for 8x8 digits.
  config.model.num_scales = 200
  return config
