"""2-D demo, VP SDE, denoising score matching alone."""

from configs.toy.default_toy_configs import get_default_configs


def get_config():
  config = get_default_configs()
  config.training.sde = 'vpsde'
  model = config.model
  # Continuous VP labels are 999 t: sinusoidal features of the label; the SDE divides the output by std(t).
  model.embedding_type = 'positional'
  model.scale_by_sigma = False
  return config
