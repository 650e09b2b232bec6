"""Forward SDEs of Score SDE (Song et al., ICLR 2021): VE, VP and sub-VP, and their reverses.

Each SDE object carries everything its callers need, so no caller dispatches on the SDE's class:
  - the drift f(x, t), the diffusion g(t) and the divergence of the drift div_x f(x, t), used by the score
    Fokker-Planck regularizer (`score_fpe.py`);
  - how the network's time label is formed from t and how the network's output becomes a score
    (`network_time_label`, `score_from_output`, used by `models.utils.get_score_fn`);
  - the smallest time used for sampling and likelihoods (`sampling_eps`).

Tensors may have any shape (B, ...): per-sample coefficients are broadcast over the trailing dimensions.
"""

import abc
import math
import numbers

import numpy as np
import torch

import utils


class SDE(abc.ABC):
  """SDE abstract class. Functions are designed for a mini-batch of inputs.

  A subclass defines `T`, `marginal_prob`, `prior_sampling`, `prior_logp`, and the SDE itself either as
  `drift(x, t)` and `diffusion(t)` (as the SDEs here do) or as Score SDE's `sde(x, t)` returning both; each
  form defaults to the other, so SDE classes written for Score SDE work unchanged. The score-FPE regularizer
  also needs `drift_divergence`, and `models.utils.get_score_fn` needs `network_time_label` and
  `score_from_output` (Score SDE's `get_score_fn` supports only VE, VP and sub-VP SDEs, too).
  """

  # Smallest time used for sampling and likelihood computation (Score SDE's `sampling_eps`).
  sampling_eps = 1e-3

  def __init__(self, N):
    """Construct an SDE.

    Args:
      N: number of discretization time steps.
    """
    super().__init__()
    cls = type(self)
    if cls.sde is SDE.sde and (cls.drift is SDE.drift or cls.diffusion is SDE.diffusion):
      raise TypeError(f'{cls.__name__} must define sde(x, t), or drift(x, t) and diffusion(t).')
    self.N = N

  @property
  @abc.abstractmethod
  def T(self):
    """End time of the SDE."""

  def check_eps(self, eps):
    """Returns `eps`, the smallest time a loss evaluates the score at; `ValueError` unless it is in [0, T)."""
    return utils.check_number('eps', eps, low=0., high=self.T, high_open=True)

  def sde(self, x, t):
    """Returns (f(x, t), g(t))."""
    return self.drift(x, t), self.diffusion(t)

  def drift(self, x, t):
    """The drift f(x, t), shape of x."""
    return self.sde(x, t)[0]

  def diffusion(self, t):
    """The diffusion coefficient g(t), shape (B,)."""
    # Score SDE's diffusion depends on t only: any x of batch size B gives it.
    return self.sde(torch.zeros((t.shape[0], 1), dtype=t.dtype, device=t.device), t)[1]

  def drift_divergence(self, x, t):
    """div_x f(x, t), shape (B,); needed by the score-FPE regularizer only."""
    raise NotImplementedError(f'{type(self).__name__} does not define drift_divergence(x, t), which the '
                              'score-FPE regularizer (training.alpha or training.beta > 0) needs.')

  @abc.abstractmethod
  def marginal_prob(self, x, t):
    """Parameters (mean, std) of the perturbation kernel p_t(x(t) | x(0) = x)."""

  @abc.abstractmethod
  def prior_sampling(self, shape):
    """Generate one sample from the prior distribution, $p_T(x)$."""

  @abc.abstractmethod
  def prior_logp(self, z):
    """Compute log-density of the prior distribution, per sample of the batch z."""

  def network_time_label(self, t, continuous):
    """The time conditioning the network is trained with, for times t of shape (B,)."""
    raise NotImplementedError(f'SDE class {type(self).__name__} not yet supported: define '
                              'network_time_label(t, continuous) and score_from_output(output, x, t, continuous), '
                              'or derive from VESDE, VPSDE or subVPSDE.')

  def score_from_output(self, output, x, t, continuous):
    """Turns the network's output at (x, t) into the score."""
    raise NotImplementedError(f'SDE class {type(self).__name__} not yet supported: define '
                              'network_time_label(t, continuous) and score_from_output(output, x, t, continuous), '
                              'or derive from VESDE, VPSDE or subVPSDE.')

  def discretize(self, x, t):
    """Discretize the SDE in the form: x_{i+1} = x_i + f_i(x_i) + G_i z_i.

    Useful for reverse diffusion sampling and probabiliy flow sampling.
    Defaults to Euler-Maruyama discretization.

    Args:
      x: a torch tensor
      t: a torch float representing the time step (from 0 to `self.T`)

    Returns:
      f, G
    """
    dt = 1 / self.N
    drift, diffusion = self.sde(x, t)
    f = drift * dt
    G = diffusion * math.sqrt(dt)
    return f, G

  def reverse(self, score_fn, probability_flow=False):
    """Create the reverse-time SDE/ODE.

    Args:
      score_fn: A time-dependent score-based model that takes x and t and returns the score.
      probability_flow: If `True`, create the reverse-time ODE used for probability flow sampling.
    """
    return ReverseSDE(self, score_fn, probability_flow)


class ReverseSDE:
  """The reverse-time SDE dx = [f - g^2 s] dt + g dw_bar, or with `probability_flow` the ODE
  dx = [f - g^2 s / 2] dt (Song et al., 2021, eqs. 6 and 13)."""

  def __init__(self, forward_sde, score_fn, probability_flow=False):
    self.forward_sde = forward_sde
    self.score_fn = score_fn
    self.probability_flow = probability_flow
    self.N = forward_sde.N

  @property
  def T(self):
    return self.forward_sde.T

  def _score_weight(self):
    return 0.5 if self.probability_flow else 1.

  def sde(self, x, t):
    """Create the drift and diffusion functions for the reverse SDE/ODE."""
    drift, diffusion = self.forward_sde.sde(x, t)
    score = self.score_fn(x, t)
    drift = drift - utils.expand_batch(diffusion, x) ** 2 * score * self._score_weight()
    diffusion = torch.zeros_like(diffusion) if self.probability_flow else diffusion
    return drift, diffusion

  def discretize(self, x, t):
    """Create discretized iteration rules for the reverse diffusion sampler."""
    f, G = self.forward_sde.discretize(x, t)
    rev_f = f - utils.expand_batch(G, x) ** 2 * self.score_fn(x, t) * self._score_weight()
    rev_G = torch.zeros_like(G) if self.probability_flow else G
    return rev_f, rev_G


def _standard_normal_logp(z):
  D = utils.data_dim(z)
  return -D / 2. * math.log(2 * math.pi) - utils.sum_except_batch(z ** 2) / 2.


class _LinearBetaSDE(SDE):
  """What the VP and sub-VP SDEs share: beta(t) linear in t, the drift -1/2 beta(t) x and the N(0, I) prior.

  Private: in Score SDE, `VPSDE` and `subVPSDE` are unrelated subclasses of `SDE`, so
  `isinstance(sde, VPSDE)` is false for the sub-VP SDE, here too.
  """

  def __init__(self, beta_min=0.1, beta_max=20, N=1000):
    super().__init__(N)
    self.beta_0 = beta_min
    self.beta_1 = beta_max
    self.N = N

  @property
  def T(self):
    return 1

  def beta(self, t):
    return self.beta_0 + t * (self.beta_1 - self.beta_0)

  def _log_mean_coeff(self, t):
    return -0.25 * t ** 2 * (self.beta_1 - self.beta_0) - 0.5 * t * self.beta_0

  def drift(self, x, t):
    return -0.5 * utils.expand_batch(self.beta(t), x) * x

  def drift_divergence(self, x, t):
    return -0.5 * self.beta(t) * utils.data_dim(x)

  def prior_sampling(self, shape):
    return torch.randn(*shape)

  def prior_logp(self, z):
    return _standard_normal_logp(z)

  def _continuous_score(self, output, x, t):
    std = self.marginal_prob(torch.zeros_like(x), t)[1]
    return -output / utils.expand_batch(std, output)


class VPSDE(_LinearBetaSDE):
  """Variance preserving SDE: dx = -1/2 beta(t) x dt + sqrt(beta(t)) dw, beta linear in t."""

  sampling_eps = 1e-3

  def __init__(self, beta_min=0.1, beta_max=20, N=1000):
    """Construct a Variance Preserving SDE.

    Args:
      beta_min: value of beta(0)
      beta_max: value of beta(1)
      N: number of discretization steps
    """
    super().__init__(beta_min, beta_max, N)
    self.discrete_betas = torch.linspace(beta_min / N, beta_max / N, N)
    self.alphas = 1. - self.discrete_betas
    self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
    self.sqrt_alphas_cumprod = torch.sqrt(self.alphas_cumprod)
    self.sqrt_1m_alphas_cumprod = torch.sqrt(1. - self.alphas_cumprod)

  def diffusion(self, t):
    return torch.sqrt(self.beta(t))

  def marginal_prob(self, x, t):
    log_mean_coeff = self._log_mean_coeff(t)
    mean = utils.expand_batch(torch.exp(log_mean_coeff), x) * x
    std = torch.sqrt(1. - torch.exp(2. * log_mean_coeff))
    return mean, std

  def network_time_label(self, t, continuous):
    # Continuously trained VP models see t scaled to [0, 999]; discrete (DDPM) ones see the step index.
    return t * 999 if continuous else t * (self.N - 1)

  def score_from_output(self, output, x, t, continuous):
    if continuous:
      return self._continuous_score(output, x, t)
    labels = self.network_time_label(t, continuous)
    std = self.sqrt_1m_alphas_cumprod.to(labels.device)[labels.long()]
    return -output / utils.expand_batch(std, output)

  def discretize(self, x, t):
    """DDPM discretization."""
    timestep = (t * (self.N - 1) / self.T).long()
    beta = self.discrete_betas.to(x.device)[timestep]
    alpha = self.alphas.to(x.device)[timestep]
    sqrt_beta = torch.sqrt(beta)
    f = utils.expand_batch(torch.sqrt(alpha), x) * x - x
    G = sqrt_beta
    return f, G


class subVPSDE(_LinearBetaSDE):
  """Sub-VP SDE: dx = -1/2 beta(t) x dt + sqrt(beta(t) (1 - e^{-2 int_0^t beta})) dw.

  Its discretization is the default Euler-Maruyama one, as in Score SDE (there is no DDPM chain for it).
  """

  sampling_eps = 1e-3

  def __init__(self, beta_min=0.1, beta_max=20, N=1000):
    """Construct the sub-VP SDE that excels at likelihoods.

    Args:
      beta_min: value of beta(0)
      beta_max: value of beta(1)
      N: number of discretization steps
    """
    super().__init__(beta_min, beta_max, N)

  def diffusion(self, t):
    discount = 1. - torch.exp(-2 * self.beta_0 * t - (self.beta_1 - self.beta_0) * t ** 2)
    return torch.sqrt(self.beta(t) * discount)

  def marginal_prob(self, x, t):
    log_mean_coeff = self._log_mean_coeff(t)
    mean = utils.expand_batch(torch.exp(log_mean_coeff), x) * x
    std = 1 - torch.exp(2. * log_mean_coeff)
    return mean, std

  def network_time_label(self, t, continuous):
    # Score SDE trains sub-VP models in continuous time only; discrete labels would be meaningless.
    return t * 999

  def score_from_output(self, output, x, t, continuous):
    return self._continuous_score(output, x, t)


class VESDE(SDE):
  """Variance exploding SDE: dx = sqrt(d sigma^2(t) / dt) dw, sigma(t) = sigma_min (sigma_max/sigma_min)^t."""

  sampling_eps = 1e-5

  def __init__(self, sigma_min=0.01, sigma_max=50, N=1000):
    """Construct a Variance Exploding SDE.

    Args:
      sigma_min: smallest sigma.
      sigma_max: largest sigma.
      N: number of discretization steps
    """
    super().__init__(N)
    self.sigma_min = sigma_min
    self.sigma_max = sigma_max
    self.discrete_sigmas = torch.exp(torch.linspace(np.log(self.sigma_min), np.log(self.sigma_max), N))
    self.N = N

  @property
  def T(self):
    return 1

  def sigma(self, t):
    return self.sigma_min * (self.sigma_max / self.sigma_min) ** t

  def drift(self, x, t):
    return torch.zeros_like(x)

  def diffusion(self, t):
    return self.sigma(t) * math.sqrt(2 * (math.log(self.sigma_max) - math.log(self.sigma_min)))

  def drift_divergence(self, x, t):
    return torch.zeros_like(t)

  def marginal_prob(self, x, t):
    std = self.sigma(t)
    mean = x
    return mean, std

  def prior_sampling(self, shape):
    return torch.randn(*shape) * self.sigma_max

  def prior_logp(self, z):
    D = utils.data_dim(z)
    return -D / 2. * math.log(2 * math.pi * self.sigma_max ** 2) - utils.sum_except_batch(z ** 2) / (
        2 * self.sigma_max ** 2)

  def network_time_label(self, t, continuous):
    if continuous:
      # Continuously trained VE models are conditioned on sigma(t) itself.
      return self.sigma(t)
    # Discrete (SMLD) models index noise levels from the largest (label 0) to the smallest.
    return torch.round((self.T - t) * (self.N - 1)).long()

  def score_from_output(self, output, x, t, continuous):
    return output

  def discretize(self, x, t):
    """SMLD(NCSN) discretization."""
    timestep = (t * (self.N - 1) / self.T).long()
    sigmas = self.discrete_sigmas.to(t.device)
    sigma = sigmas[timestep]
    adjacent_sigma = torch.where(timestep == 0, torch.zeros_like(t), sigmas[(timestep - 1).clamp(min=0)])
    f = torch.zeros_like(x)
    G = torch.sqrt(sigma ** 2 - adjacent_sigma ** 2)
    return f, G


def check_eps(sde, eps):
  """Raises `ValueError` unless 0 < eps < sde.T: the time samplers and the likelihood integrate down to.

  Returns:
    `eps`, unchanged.
  """
  if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not 0 < eps < sde.T:
    raise ValueError(f'eps={eps!r}: the smallest time of the integration must be a number in (0, T={sde.T}).')
  return eps


SDE_NAMES = ('vesde', 'vpsde', 'subvpsde')


def sde_from_config(config):
  """Builds the forward SDE named by `config.training.sde` from `config.model`'s noise schedule.

  Returns:
    An `SDE`; its `sampling_eps` is the smallest time for sampling and likelihoods.
  """
  name = utils.check_choice('training.sde', str(config.training.sde).lower(), SDE_NAMES)
  model = config.model
  N = utils.config_value(config, 'model.num_scales')
  if name == 'vesde':
    sigma_min = utils.config_value(config, 'model.sigma_min')
    sigma_max = utils.config_value(config, 'model.sigma_max', low=sigma_min)
    return VESDE(sigma_min=sigma_min, sigma_max=sigma_max, N=N)
  beta_min = utils.check_number('model.beta_min', model.beta_min, low=0, low_open=True)
  beta_max = utils.check_number('model.beta_max', model.beta_max, low=beta_min)
  cls = VPSDE if name == 'vpsde' else subVPSDE
  return cls(beta_min=beta_min, beta_max=beta_max, N=N)
