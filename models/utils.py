"""Model registry and the functions that turn a score model into a score function (Score SDE's API)."""

import numpy as np
import torch

import utils

_MODELS = {}


def register_model(cls=None, *, name=None):
  """A decorator for registering model classes under `name` (default: the class name)."""

  def _register(cls):
    local_name = cls.__name__ if name is None else name
    if local_name in _MODELS:
      raise ValueError(f'Already registered model with name: {local_name}')
    _MODELS[local_name] = cls
    return cls

  if cls is None:
    return _register
  return _register(cls)


def get_model(name):
  """Returns the model class registered under `name`; raises `ValueError` listing the registered names."""
  utils.check_choice('model.name', name, sorted(_MODELS))
  return _MODELS[name]


def get_sigmas(config):
  """Get sigmas --- the set of noise levels for SMLD from config files.

  Args:
    config: A ConfigDict object parsed from the config file

  Returns:
    sigmas: a numpy array of `config.model.num_scales` noise levels, geometric from sigma_max down to sigma_min.
  """
  num_scales = utils.config_value(config, 'model.num_scales')
  sigma_min = utils.config_value(config, 'model.sigma_min')
  sigma_max = utils.config_value(config, 'model.sigma_max')
  return np.exp(np.linspace(np.log(sigma_max), np.log(sigma_min), num_scales))


def get_ddpm_params(config):
  """Get betas and alphas --- parameters used in the original DDPM paper."""
  # As Score SDE: 1000 steps, with betas scaled by num_scales (adapt both if num_scales differs from 1000).
  num_diffusion_timesteps = 1000
  num_scales = utils.config_value(config, 'model.num_scales')
  beta_start = config.model.beta_min / num_scales
  beta_end = config.model.beta_max / num_scales
  betas = np.linspace(beta_start, beta_end, num_diffusion_timesteps, dtype=np.float64)

  alphas = 1. - betas
  alphas_cumprod = np.cumprod(alphas, axis=0)
  return {
      'betas': betas,
      'alphas': alphas,
      'alphas_cumprod': alphas_cumprod,
      'sqrt_alphas_cumprod': np.sqrt(alphas_cumprod),
      'sqrt_1m_alphas_cumprod': np.sqrt(1. - alphas_cumprod),
      'beta_min': beta_start * (num_diffusion_timesteps - 1),
      'beta_max': beta_end * (num_diffusion_timesteps - 1),
      'num_diffusion_timesteps': num_diffusion_timesteps,
  }


def create_model(config):
  """Create the score model named `config.model.name`, on `config.device`, wrapped in `nn.DataParallel`."""
  score_model = get_model(config.model.name)(config)
  score_model = score_model.to(config.device)
  # DataParallel as Score SDE, so that state_dict keys carry its 'module.' prefix and checkpoints load.
  return torch.nn.DataParallel(score_model)


def get_model_fn(model, train=False):
  """Create a function to give the output of the score-based model.

  Args:
    model: The score model.
    train: `True` for training and `False` for evaluation.

  Returns:
    A model function `model_fn(x, labels)`.
  """

  def model_fn(x, labels):
    """Compute the output of the score-based model.

    Args:
      x: A mini-batch of input data.
      labels: A mini-batch of conditioning variables for time steps. Should be interpreted differently
        for different models.

    Returns:
      The model output.
    """
    model.train(train)
    return model(x, labels)

  return model_fn


def get_score_fn(sde, model, train=False, continuous=False):
  """Wraps `model` so that its output is the score of the time-dependent marginal of `sde`.

  The SDE says how the time label is formed and how the output becomes a score
  (`sde.network_time_label`, `sde.score_from_output`), so any SDE works without dispatch here.

  Args:
    sde: An `sde_lib.SDE` object that represents the forward SDE.
    model: A score model.
    train: `True` for training and `False` for evaluation.
    continuous: If `True`, the score-based model is expected to directly take continuous time steps.

  Returns:
    A score function `score_fn(x, t)`.
  """
  model_fn = get_model_fn(model, train=train)

  def score_fn(x, t):
    labels = sde.network_time_label(t, continuous)
    return sde.score_from_output(model_fn(x, labels), x, t, continuous)

  return score_fn


def to_flattened_numpy(x):
  """Flatten a torch tensor `x` and convert it to numpy."""
  return x.detach().cpu().numpy().reshape((-1,))


def from_flattened_numpy(x, shape):
  """Form a torch tensor with the given `shape` from a flattened numpy array `x`."""
  return torch.from_numpy(x.reshape(shape))
