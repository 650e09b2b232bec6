"""Exponential moving average of model parameters (Score SDE's `ExponentialMovingAverage`).

Partially based on TensorFlow's `moving_averages.py` and https://github.com/fadel/pytorch_ema. The state
dict format is Score SDE's (`decay`, `num_updates`, `shadow_params`), so its checkpoints load unchanged.
`ema_weights` runs code (the evaluation step) with the averaged weights swapped into the model.
"""

import contextlib

import torch


def _trainable(parameters):
  return [p for p in parameters if p.requires_grad]


class ExponentialMovingAverage:
  """Maintains (exponential) moving average of a set of parameters.

  Only parameters with `requires_grad` are averaged (e.g. NCSN++'s fixed Fourier features are not), as in
  Score SDE.
  """

  def __init__(self, parameters, decay, use_num_updates=True):
    """Construct the moving average.

    Args:
      parameters: Iterable of `torch.nn.Parameter`; usually the result of `model.parameters()`.
      decay: The exponential decay, in [0, 1].
      use_num_updates: Whether to use number of updates when computing averages (a warm-up: the
        effective decay is min(decay, (1 + n) / (10 + n)) at the n-th update).
    """
    if not 0.0 <= decay <= 1.0:
      raise ValueError(f'Decay must be between 0 and 1, got {decay!r}.')
    self.decay = decay
    self.num_updates = 0 if use_num_updates else None
    self.shadow_params = [p.clone().detach() for p in _trainable(parameters)]
    self.collected_params = []

  def _check_fits(self, params, what):
    if len(params) != len(self.shadow_params):
      raise ValueError(f'ExponentialMovingAverage.{what}: got {len(params)} trainable parameters, but the '
                       f'average holds {len(self.shadow_params)}.')
    for i, (s, p) in enumerate(zip(self.shadow_params, params)):
      if s.shape != p.shape:
        raise ValueError(f'ExponentialMovingAverage.{what}: parameter {i} has shape {tuple(p.shape)}, but '
                         f'its average has shape {tuple(s.shape)}.')

  def update(self, parameters):
    """Update currently maintained parameters.

    Call this every time the parameters are updated, such as the result of the `optimizer.step()` call.

    Args:
      parameters: Iterable of `torch.nn.Parameter`; usually the same set of parameters used to initialize
        this object.
    """
    decay = self.decay
    if self.num_updates is not None:
      self.num_updates += 1
      decay = min(decay, (1 + self.num_updates) / (10 + self.num_updates))
    one_minus_decay = 1.0 - decay
    params = _trainable(parameters)
    self._check_fits(params, 'update')
    with torch.no_grad():
      for s_param, param in zip(self.shadow_params, params):
        s_param.sub_(one_minus_decay * (s_param - param))

  def copy_to(self, parameters):
    """Copy the moving averages into the given (trainable) parameters.

    Args:
      parameters: Iterable of `torch.nn.Parameter`; the parameters to be updated with the stored moving
        averages.
    """
    params = _trainable(parameters)
    self._check_fits(params, 'copy_to')
    with torch.no_grad():
      for s_param, param in zip(self.shadow_params, params):
        param.copy_(s_param)

  def store(self, parameters):
    """Save the current parameters for restoring later.

    Args:
      parameters: Iterable of `torch.nn.Parameter`; the parameters to be temporarily stored.
    """
    self.collected_params = [param.detach().clone() for param in parameters]

  def restore(self, parameters):
    """Restore the parameters stored with the `store` method.

    Useful to validate the model with EMA parameters without affecting the original optimization process.
    Store the parameters before the `copy_to` method. After validation (or model saving), use this to
    restore the former parameters.

    Args:
      parameters: Iterable of `torch.nn.Parameter`; the parameters to be updated with the stored parameters.
    """
    params = list(parameters)
    if len(params) != len(self.collected_params):
      raise ValueError(f'ExponentialMovingAverage.restore: got {len(params)} parameters, but '
                       f'{len(self.collected_params)} were stored (call store() first).')
    with torch.no_grad():
      for c_param, param in zip(self.collected_params, params):
        param.copy_(c_param)

  def state_dict(self):
    """Score SDE's format: `{'decay', 'num_updates', 'shadow_params'}`."""
    return dict(decay=self.decay, num_updates=self.num_updates, shadow_params=self.shadow_params)

  def load_state_dict(self, state_dict):
    """Loads `state_dict()`'s output; raises `ValueError` if its shadow parameters do not fit."""
    missing = {'decay', 'num_updates', 'shadow_params'} - set(state_dict)
    if missing:
      raise ValueError(f'ExponentialMovingAverage.load_state_dict: missing keys {sorted(missing)}.')
    shadow = list(state_dict['shadow_params'])
    if len(shadow) != len(self.shadow_params):
      raise ValueError(f'ExponentialMovingAverage.load_state_dict: the state holds {len(shadow)} shadow '
                       f'parameters, the model has {len(self.shadow_params)} trainable parameters.')
    bad = [f'{i}: {tuple(s.shape)} vs {tuple(m.shape)}' for i, (s, m) in enumerate(zip(shadow, self.shadow_params))
           if s.shape != m.shape]
    if bad:
      raise ValueError('ExponentialMovingAverage.load_state_dict: shadow parameter shapes (state vs model) '
                       f'do not match: {"; ".join(bad)}.')
    self.decay = state_dict['decay']
    self.num_updates = state_dict['num_updates']
    # Keep each average on the device and dtype of the model's parameter it follows.
    self.shadow_params = [s.detach().to(device=m.device, dtype=m.dtype).clone()
                          for s, m in zip(shadow, self.shadow_params)]


@contextlib.contextmanager
def ema_weights(state, *, freeze_grads=True):
  """Runs the body with the EMA weights in the model, then puts back the training weights.

  Args:
    state: Score SDE's training state, a dict with 'model' (a `torch.nn.Module`) and 'ema' (its
      `ExponentialMovingAverage`).
    freeze_grads: turn off the parameters' `requires_grad` for the body (no parameter graph; the score-FPE term
      enables autograd in x by itself) and restore the flags after. False leaves them alone: flipping them would
      make a compiled model recompile at every use (the training loop's sampling snapshots).
  """
  model, ema = state['model'], state['ema']
  params = list(model.parameters())
  flags = [p.requires_grad for p in params]
  ema.store(params)
  ema.copy_to(params)
  if freeze_grads:
    for p in params:
      p.requires_grad_(False)
  try:
    yield
  finally:
    if freeze_grads:
      for p, flag in zip(params, flags):
        p.requires_grad_(flag)
    ema.restore(params)
