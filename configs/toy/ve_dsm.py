"""2-D demo, VE SDE, denoising score matching alone."""

from configs.toy.default_toy_configs import get_default_configs


def get_config():
  config = get_default_configs()
  config.training.sde = 'vesde'
  model = config.model
  # Continuous VE labels are sigma(t): embed log(sigma), divide the output by sigma (as NCSN++).
  model.embedding_type = 'fourier'
  model.scale_by_sigma = True
  return config
