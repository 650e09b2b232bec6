"""2-D demo, VP SDE, denoising score matching alone."""

from configs.toy.default_toy_configs import get_default_configs


def get_config():
  config = get_default_configs()
  config.training.sde = 'vpsde'
  # The VP model needs twice the VE model's DSM steps to converge on the GMM (measured, seed 42, test NLL above
  # the true one after 3000 / 4500 / 6000 / 9000 steps: 0.57 / 0.25 / 0.056 / 0.025 bits/dim; docs/demo.md):
  # demo.py pretrains for 6000 steps (n_iters minus its 500 fine-tuning steps) and evaluates the last snapshot.
  config.training.n_iters = 6500
  config.training.snapshot_freq = 6500
  model = config.model
  # Continuous VP labels are 999 t: sinusoidal features of the label; the SDE divides the output by std(t).
  model.embedding_type = 'positional'
  model.scale_by_sigma = False
  return config
