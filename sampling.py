"""Predictor-Corrector and probability-flow ODE samplers of Score SDE (Song et al., ICLR 2021).

Names, signatures and semantics are Score SDE's. Differences from the released code, all deliberate:
  - any data shape (B, ...) works: per-sample coefficients broadcast over the trailing dimensions;
  - no dispatch on SDE classes: predictors and correctors read the discrete schedules the SDE object carries
    (`discrete_sigmas` for SMLD/VE, `discrete_betas`/`alphas` for DDPM/VP) and raise a clear error where the
    SDE lacks what they need;
  - unknown predictor/corrector names raise `ValueError` listing the registered names, and every config field
    `get_sampling_fn` reads is validated;
  - the ODE sampler keeps the dtype of its latent (float32 for prior samples, as Score SDE) and accepts a
    latent `z` of any batch size;
  - the ODE sampler can solve the probability flow ODE in torch on the model's device (`backend='torch'`,
    `config.sampling.ode_backend`) instead of with scipy on the CPU (Score SDE's, the function's default).
"""

import abc
import functools
import math
import numbers

import torch
from scipy import integrate

import ode_backends
import sde_lib
import utils
from models import utils as mutils
# Score SDE's sampling.py imports these names; code that reads them from here keeps working.
from models.utils import from_flattened_numpy, get_score_fn, to_flattened_numpy  # noqa: F401

_CORRECTORS = {}
_PREDICTORS = {}


def _register(registry, kind, cls, name):
  def _do_register(cls):
    local_name = cls.__name__ if name is None else name
    if local_name in registry:
      raise ValueError(f'Already registered {kind} with name: {local_name}')
    registry[local_name] = cls
    return cls

  return _do_register if cls is None else _do_register(cls)


def register_predictor(cls=None, *, name=None):
  """A decorator for registering predictor classes."""
  return _register(_PREDICTORS, 'predictor', cls, name)


def register_corrector(cls=None, *, name=None):
  """A decorator for registering corrector classes."""
  return _register(_CORRECTORS, 'corrector', cls, name)


def get_predictor(name):
  """Returns the predictor class registered under `name`.

  Raises:
    ValueError: if no predictor has that name; the message lists the registered ones.
  """
  if name not in _PREDICTORS:
    raise ValueError(f'Unknown predictor {name!r}; registered predictors: {sorted(_PREDICTORS)}.')
  return _PREDICTORS[name]


def get_corrector(name):
  """Returns the corrector class registered under `name`.

  Raises:
    ValueError: if no corrector has that name; the message lists the registered ones.
  """
  if name not in _CORRECTORS:
    raise ValueError(f'Unknown corrector {name!r}; registered correctors: {sorted(_CORRECTORS)}.')
  return _CORRECTORS[name]


def _check_device(value):
  try:
    return torch.device(value)
  except (TypeError, RuntimeError) as e:
    raise ValueError(f'config.device={value!r} is not a torch device (e.g. "cpu", "cuda:0").') from e


def get_sampling_fn(config, sde, shape, inverse_scaler, eps):
  """Create a sampling function.

  Reads and validates `config.sampling.method` ('pc' or 'ode', case-insensitive), and for PC sampling
  `sampling.predictor`, `sampling.corrector`, `sampling.snr`, `sampling.n_steps_each`,
  `sampling.probability_flow`, `training.continuous`; for ODE sampling `sampling.ode_backend` ('scipy' or
  'torch', see `get_ode_sampler`); for both `sampling.noise_removal` and `config.device`.

  Args:
    config: A `ml_collections.ConfigDict` object that contains all configuration information.
    sde: A `sde_lib.SDE` object that represents the forward SDE.
    shape: A sequence of integers representing the expected shape of a single sample.
    inverse_scaler: The inverse data normalizer function.
    eps: A `float` number. The reverse-time SDE is only integrated to `eps` for numerical stability.

  Returns:
    A function that takes a score model and returns (samples, number of function evaluations); the ODE
    sampler also takes an optional latent `z`.
  """
  method = utils.check_choice('sampling.method', str(config.sampling.method).lower(), ('pc', 'ode'))
  denoise = utils.check_bool('sampling.noise_removal', config.sampling.noise_removal)
  device = _check_device(config.device)
  # Probability flow ODE sampling with black-box ODE solvers
  if method == 'ode':
    backend = utils.check_choice('sampling.ode_backend', config.sampling.ode_backend, ode_backends.BACKENDS)
    return get_ode_sampler(sde=sde, shape=shape, inverse_scaler=inverse_scaler, denoise=denoise, eps=eps,
                           device=device, backend=backend)
  # Predictor-Corrector sampling. Predictor-only and Corrector-only samplers are special cases.
  predictor = get_predictor(utils.check_choice('sampling.predictor', str(config.sampling.predictor).lower(),
                                               sorted(_PREDICTORS)))
  corrector = get_corrector(utils.check_choice('sampling.corrector', str(config.sampling.corrector).lower(),
                                               sorted(_CORRECTORS)))
  snr = utils.check_number('sampling.snr', config.sampling.snr, low=0)
  n_steps = utils.check_number('sampling.n_steps_each', config.sampling.n_steps_each, low=1, integer=True)
  probability_flow = utils.check_bool('sampling.probability_flow', config.sampling.probability_flow)
  continuous = utils.config_value(config, 'training.continuous')
  return get_pc_sampler(sde=sde, shape=shape, predictor=predictor, corrector=corrector,
                        inverse_scaler=inverse_scaler, snr=snr, n_steps=n_steps,
                        probability_flow=probability_flow, continuous=continuous, denoise=denoise, eps=eps,
                        device=device)


class Predictor(abc.ABC):
  """The abstract class for a predictor algorithm."""

  def __init__(self, sde, score_fn, probability_flow=False):
    super().__init__()
    self.sde = sde
    # Compute the reverse SDE/ODE
    self.rsde = sde.reverse(score_fn, probability_flow)
    self.score_fn = score_fn

  @abc.abstractmethod
  def update_fn(self, x, t):
    """One update of the predictor.

    Args:
      x: A PyTorch tensor representing the current state
      t: A PyTorch tensor representing the current time step, shape (B,).

    Returns:
      x: A PyTorch tensor of the next state.
      x_mean: A PyTorch tensor. The next state without random noise. Useful for denoising.
    """


class Corrector(abc.ABC):
  """The abstract class for a corrector algorithm."""

  def __init__(self, sde, score_fn, snr, n_steps):
    super().__init__()
    self.sde = sde
    self.score_fn = score_fn
    self.snr = snr
    self.n_steps = n_steps

  @abc.abstractmethod
  def update_fn(self, x, t):
    """One update of the corrector.

    Args:
      x: A PyTorch tensor representing the current state
      t: A PyTorch tensor representing the current time step, shape (B,).

    Returns:
      x: A PyTorch tensor of the next state.
      x_mean: A PyTorch tensor. The next state without random noise. Useful for denoising.
    """


def _timestep(sde, t):
  """Index of the discrete noise level at time t, as Score SDE rounds it."""
  return (t * (sde.N - 1) / sde.T).long()


@register_predictor(name='euler_maruyama')
class EulerMaruyamaPredictor(Predictor):
  """Euler-Maruyama step of the reverse SDE (or Euler step of the probability flow ODE), dt = -1/N."""

  def update_fn(self, x, t):
    dt = -1. / self.rsde.N
    z = torch.randn_like(x)
    drift, diffusion = self.rsde.sde(x, t)
    x_mean = x + drift * dt
    x = x_mean + utils.batch_mul(diffusion * math.sqrt(-dt), z)
    return x, x_mean


def _is_variance_preserving(sde):
  """Whether mean_coeff(t)^2 + std(t)^2 = 1, the property that makes DDPM's ancestral step exact."""
  t = torch.tensor([0.5 * sde.T], dtype=torch.float64)
  mean, std = sde.marginal_prob(torch.ones(1, 1, dtype=torch.float64), t)
  return abs(float(mean.flatten()[0] ** 2 + std.flatten()[0] ** 2) - 1.) < 1e-6


def _check_ddpm_betas(sde):
  """DDPM's discrete betas (beta(t) / N) must stay below 1, or sqrt(1 - beta) is NaN: N > beta_max."""
  betas = getattr(sde, 'discrete_betas', None)
  if betas is not None and float(betas.max()) >= 1:
    raise ValueError(f'{type(sde).__name__} with N={sde.N} has discrete betas up to {float(betas.max()):.3g} '
                     f'>= 1; its DDPM discretization needs N > beta_max (model.num_scales).')


@register_predictor(name='reverse_diffusion')
class ReverseDiffusionPredictor(Predictor):
  """One step of the reverse of the SDE's own discretization (`sde.discretize`)."""

  def __init__(self, sde, score_fn, probability_flow=False):
    super().__init__(sde, score_fn, probability_flow)
    if hasattr(sde, 'discrete_betas') and _is_variance_preserving(sde):
      _check_ddpm_betas(sde)  # the VP SDE's discretization is DDPM's

  def update_fn(self, x, t):
    f, G = self.rsde.discretize(x, t)
    z = torch.randn_like(x)
    x_mean = x - f
    x = x_mean + utils.batch_mul(G, z)
    return x, x_mean


@register_predictor(name='ancestral_sampling')
class AncestralSamplingPredictor(Predictor):
  """The ancestral sampling predictor: SMLD's for SDEs with `discrete_sigmas` (VE), DDPM's for
  variance-preserving SDEs with `discrete_betas` (VP).

  Other SDEs (sub-VP included) raise `NotImplementedError`, as in Score SDE.
  """

  def __init__(self, sde, score_fn, probability_flow=False):
    super().__init__(sde, score_fn, probability_flow)
    if probability_flow:
      raise ValueError('Probability flow is not supported by ancestral sampling.')
    if hasattr(sde, 'discrete_sigmas'):
      self._update = self.vesde_update_fn
    elif hasattr(sde, 'discrete_betas') and _is_variance_preserving(sde):
      _check_ddpm_betas(sde)
      self._update = self.vpsde_update_fn
    else:
      raise NotImplementedError(
          f'Ancestral sampling supports the VE SDE (SMLD) and the VP SDE (DDPM) only, not '
          f'{type(sde).__name__}; use the reverse_diffusion or euler_maruyama predictor.')

  def vesde_update_fn(self, x, t):
    sde = self.sde
    timestep = _timestep(sde, t)
    sigmas = sde.discrete_sigmas.to(device=t.device, dtype=x.dtype)
    sigma = sigmas[timestep]
    adjacent_sigma = torch.where(timestep == 0, torch.zeros_like(sigma), sigmas[(timestep - 1).clamp(min=0)])
    score = self.score_fn(x, t)
    x_mean = x + utils.batch_mul(sigma ** 2 - adjacent_sigma ** 2, score)
    # Posterior std of SMLD's chain: sigma_{i-1}^2 (sigma_i^2 - sigma_{i-1}^2) / sigma_i^2.
    std = torch.sqrt((adjacent_sigma ** 2 * (sigma ** 2 - adjacent_sigma ** 2)) / (sigma ** 2))
    noise = torch.randn_like(x)
    x = x_mean + utils.batch_mul(std, noise)
    return x, x_mean

  def vpsde_update_fn(self, x, t):
    sde = self.sde
    timestep = _timestep(sde, t)
    beta = sde.discrete_betas.to(device=t.device, dtype=x.dtype)[timestep]
    score = self.score_fn(x, t)
    x_mean = utils.batch_mul(1. / torch.sqrt(1. - beta), x + utils.batch_mul(beta, score))
    noise = torch.randn_like(x)
    x = x_mean + utils.batch_mul(torch.sqrt(beta), noise)
    return x, x_mean

  def update_fn(self, x, t):
    return self._update(x, t)


@register_predictor(name='none')
class NonePredictor(Predictor):
  """An empty predictor that does nothing."""

  def __init__(self, sde, score_fn, probability_flow=False):  # pylint: disable=super-init-not-called
    # No reverse SDE is needed (Score SDE builds none either).
    self.sde = sde
    self.score_fn = score_fn

  def update_fn(self, x, t):
    return x, x


def _langevin_alpha(sde, t, like):
  """Score SDE's step-size factor alpha_i: the DDPM alphas where the SDE has them, else 1."""
  alphas = getattr(sde, 'alphas', None)
  if alphas is None:
    return torch.ones_like(t, dtype=like.dtype)
  return alphas.to(device=t.device, dtype=like.dtype)[_timestep(sde, t)]


def _check_n_steps(n_steps):
  """Correctors need at least one step (and Score SDE's step sizes use the DDPM alphas, hence the betas)."""
  if isinstance(n_steps, bool) or not isinstance(n_steps, numbers.Integral) or n_steps < 1:
    raise ValueError(f'n_steps={n_steps!r}: a corrector needs an integer number of steps >= 1.')


@register_corrector(name='langevin')
class LangevinCorrector(Corrector):
  """Langevin MCMC with the step size set by the target signal-to-noise ratio `snr` (Algorithms 4/5)."""

  def __init__(self, sde, score_fn, snr, n_steps):
    super().__init__(sde, score_fn, snr, n_steps)
    _check_n_steps(n_steps)
    _check_ddpm_betas(sde)

  def update_fn(self, x, t):
    alpha = _langevin_alpha(self.sde, t, x)
    for _ in range(self.n_steps):
      grad = self.score_fn(x, t)
      noise = torch.randn_like(x)
      # Score SDE averages the norms over the batch, so every sample takes the same step.
      grad_norm = torch.norm(grad.reshape(grad.shape[0], -1), dim=-1).mean()
      noise_norm = torch.norm(noise.reshape(noise.shape[0], -1), dim=-1).mean()
      step_size = (self.snr * noise_norm / grad_norm) ** 2 * 2 * alpha
      x_mean = x + utils.batch_mul(step_size, grad)
      x = x_mean + utils.batch_mul(torch.sqrt(step_size * 2), noise)
    return x, x_mean


@register_corrector(name='ald')
class AnnealedLangevinDynamics(Corrector):
  """The original annealed Langevin dynamics of NCSN/NCSNv2 (step size (snr * std(t))^2 * 2 * alpha).

  Included for completeness, as in Score SDE.
  """

  def __init__(self, sde, score_fn, snr, n_steps):
    super().__init__(sde, score_fn, snr, n_steps)
    _check_n_steps(n_steps)
    _check_ddpm_betas(sde)

  def update_fn(self, x, t):
    alpha = _langevin_alpha(self.sde, t, x)
    std = self.sde.marginal_prob(x, t)[1]
    for _ in range(self.n_steps):
      grad = self.score_fn(x, t)
      noise = torch.randn_like(x)
      step_size = (self.snr * std) ** 2 * 2 * alpha
      x_mean = x + utils.batch_mul(step_size, grad)
      x = x_mean + utils.batch_mul(torch.sqrt(step_size * 2), noise)
    return x, x_mean


@register_corrector(name='none')
class NoneCorrector(Corrector):
  """An empty corrector that does nothing."""

  def __init__(self, sde, score_fn, snr, n_steps):  # pylint: disable=super-init-not-called
    self.sde = sde
    self.score_fn = score_fn
    self.snr = snr
    self.n_steps = n_steps

  def update_fn(self, x, t):
    return x, x


def shared_predictor_update_fn(x, t, sde, model, predictor, probability_flow, continuous):
  """A wrapper that configures and returns the update function of predictors."""
  score_fn = mutils.get_score_fn(sde, model, train=False, continuous=continuous)
  if predictor is None:
    # Corrector-only sampler
    predictor_obj = NonePredictor(sde, score_fn, probability_flow)
  else:
    predictor_obj = predictor(sde, score_fn, probability_flow)
  return predictor_obj.update_fn(x, t)


def shared_corrector_update_fn(x, t, sde, model, corrector, continuous, snr, n_steps):
  """A wrapper that configures and returns the update function of correctors."""
  score_fn = mutils.get_score_fn(sde, model, train=False, continuous=continuous)
  if corrector is None:
    # Predictor-only sampler
    corrector_obj = NoneCorrector(sde, score_fn, snr, n_steps)
  else:
    corrector_obj = corrector(sde, score_fn, snr, n_steps)
  return corrector_obj.update_fn(x, t)


def get_pc_update_fns(sde, predictor, corrector, snr, n_steps, probability_flow, continuous):
  """The predictor and corrector update functions of a PC sampler (shared with `controllable_generation`).

  Args:
    sde: An `sde_lib.SDE` object representing the forward SDE.
    predictor: A subclass of `sampling.Predictor`, or `None` for a corrector-only sampler.
    corrector: A subclass of `sampling.Corrector`, or `None` for a predictor-only sampler.
    snr: A `float` number. The signal-to-noise ratio for configuring correctors.
    n_steps: An integer. The number of corrector steps per predictor update.
    probability_flow: If `True`, the predictor solves the reverse-time probability flow ODE.
    continuous: `True` indicates that the score model was continuously trained.

  Returns:
    `(predictor_update_fn, corrector_update_fn)`, each called as `fn(x, t, model=model)` and returning
    `(x, x_mean)`.
  """
  predictor_update_fn = functools.partial(shared_predictor_update_fn,
                                          sde=sde,
                                          predictor=predictor,
                                          probability_flow=probability_flow,
                                          continuous=continuous)
  corrector_update_fn = functools.partial(shared_corrector_update_fn,
                                          sde=sde,
                                          corrector=corrector,
                                          continuous=continuous,
                                          snr=snr,
                                          n_steps=n_steps)
  return predictor_update_fn, corrector_update_fn


def get_pc_sampler(sde, shape, predictor, corrector, inverse_scaler, snr,
                   n_steps=1, probability_flow=False, continuous=False,
                   denoise=True, eps=1e-3, device='cuda'):
  """Create a Predictor-Corrector (PC) sampler.

  Args:
    sde: An `sde_lib.SDE` object representing the forward SDE.
    shape: A sequence of integers. The expected shape of a batch of samples, (B, ...).
    predictor: A subclass of `sampling.Predictor` representing the predictor algorithm, or `None`.
    corrector: A subclass of `sampling.Corrector` representing the corrector algorithm, or `None`.
    inverse_scaler: The inverse data normalizer.
    snr: A `float` number. The signal-to-noise ratio for configuring correctors.
    n_steps: An integer. The number of corrector steps per predictor update.
    probability_flow: If `True`, solve the reverse-time probability flow ODE when running the predictor.
    continuous: `True` indicates that the score model was continuously trained.
    denoise: If `True`, add one-step denoising to the final samples.
    eps: A `float` number. The reverse-time SDE and ODE are integrated to `epsilon` to avoid numerical issues.
    device: PyTorch device.

  Returns:
    A sampling function `pc_sampler(model)` that returns samples and the number of function evaluations.
  """
  # Fail at construction, not N steps into sampling, on unsupported predictor/corrector and SDE pairs.
  sde_lib.check_eps(sde, eps)
  if predictor is not None:
    predictor(sde, lambda x, t: x, probability_flow)
  if corrector is not None:
    corrector(sde, lambda x, t: x, snr, n_steps)
  predictor_update_fn, corrector_update_fn = get_pc_update_fns(sde, predictor, corrector, snr, n_steps,
                                                               probability_flow, continuous)

  def pc_sampler(model):
    """The PC sampler function.

    Args:
      model: A score model.

    Returns:
      Samples, number of function evaluations.
    """
    with torch.no_grad():
      # Initial sample
      x = sde.prior_sampling(shape).to(device)
      timesteps = torch.linspace(sde.T, eps, sde.N, device=device)
      x_mean = x
      for i in range(sde.N):
        vec_t = torch.ones(shape[0], device=device) * timesteps[i]
        x, x_mean = corrector_update_fn(x, vec_t, model=model)
        x, x_mean = predictor_update_fn(x, vec_t, model=model)

      return inverse_scaler(x_mean if denoise else x), sde.N * (n_steps + 1)

  return pc_sampler


def get_ode_sampler(sde, shape, inverse_scaler,
                    denoise=False, rtol=1e-5, atol=1e-5,
                    method='RK45', eps=1e-3, device='cuda', backend='scipy'):
  """Probability flow ODE sampler with the black-box ODE solver.

  As in Score SDE, the model is queried as a continuously trained one (`continuous=True`).

  Args:
    sde: An `sde_lib.SDE` object that represents the forward SDE.
    shape: A sequence of integers. The expected shape of a batch of samples, (B, ...).
    inverse_scaler: The inverse data normalizer.
    denoise: If `True`, add one-step denoising to final samples.
    rtol: A `float` number. The relative tolerance level of the ODE solver.
    atol: A `float` number. The absolute tolerance level of the ODE solver.
    method: A `str`. The algorithm used for the black-box ODE solver.
      See the documentation of `scipy.integrate.solve_ivp`. With `backend='torch'`, 'RK45' (Dormand-Prince,
      torchdiffeq's 'dopri5') or 'RK23' (Bogacki-Shampine, 'bosh3'), with scipy's step-size control.
    eps: A `float` number. The reverse-time SDE/ODE will be integrated to `eps` for numerical stability.
    device: PyTorch device.
    backend: 'scipy' (Score SDE's: `scipy.integrate.solve_ivp` on the CPU, the state copied to and from
      `device` at every function evaluation) or 'torch' (the solve runs on the latent's device). See
      `ode_backends`.

  Returns:
    A sampling function `ode_sampler(model, z=None)` that returns samples and the number of function
    evaluations. The ODE runs in the dtype of `z` (float32 for prior samples). The whole batch is one solve, as
    in Score SDE; a failed solve raises `RuntimeError` naming the time reached.

  Raises:
    ValueError: `eps` is not in (0, sde.T), `backend` is not 'scipy' or 'torch', `method` has no torch solver
      with `backend='torch'`, or (with `denoise`) the denoising step does not support `sde`.
  """
  sde_lib.check_eps(sde, eps)
  ode_backends.check_backend(backend, method)
  if denoise:
    # The denoising step's predictor checks the SDE (e.g. DDPM's betas) now, not after the whole ODE solve.
    ReverseDiffusionPredictor(sde, lambda x, t: x, probability_flow=False)

  def denoise_update_fn(model, x):
    score_fn = mutils.get_score_fn(sde, model, train=False, continuous=True)
    # Reverse diffusion predictor for denoising
    predictor_obj = ReverseDiffusionPredictor(sde, score_fn, probability_flow=False)
    vec_eps = torch.ones(x.shape[0], device=x.device, dtype=x.dtype) * eps
    _, x = predictor_obj.update_fn(x, vec_eps)
    return x

  def drift_fn(model, x, t):
    """Get the drift function of the reverse-time SDE."""
    score_fn = mutils.get_score_fn(sde, model, train=False, continuous=True)
    rsde = sde.reverse(score_fn, probability_flow=True)
    return rsde.sde(x, t)[0]

  def solve_scipy(model, x):
    """Score SDE's solve: scipy on the CPU, the state copied to the latent's device at every evaluation."""
    x_shape = x.shape

    def ode_func(t, y):
      xt = from_flattened_numpy(y, x_shape).to(device=x.device, dtype=x.dtype)
      vec_t = torch.ones(x_shape[0], device=x.device, dtype=x.dtype) * t
      return to_flattened_numpy(drift_fn(model, xt, vec_t))

    # Black-box ODE solver for the probability flow ODE
    solution = integrate.solve_ivp(ode_func, (sde.T, eps), to_flattened_numpy(x),
                                   rtol=rtol, atol=atol, method=method)
    if not solution.success:
      raise ode_backends.failure(solution.t[-1], (sde.T, eps), solution.nfev, solution.message)
    nfe = solution.nfev
    return from_flattened_numpy(solution.y[:, -1], x_shape).to(device=x.device, dtype=x.dtype), nfe

  def solve_torch(model, x):
    """The same ODE solved on the latent's device."""
    x_shape = x.shape

    def ode_func(t, y):
      xt = y.reshape(x_shape).to(x.dtype)
      vec_t = torch.ones(x_shape[0], device=x.device, dtype=x.dtype) * t.to(x.dtype)
      return drift_fn(model, xt, vec_t).reshape(-1).to(y.dtype)

    y, nfe = ode_backends.solve(ode_func, x.reshape(-1).to(ode_backends.STATE_DTYPE), (sde.T, eps), rtol, atol,
                                method)
    return y.reshape(x_shape).to(x.dtype), nfe

  solve = solve_scipy if backend == 'scipy' else solve_torch

  def ode_sampler(model, z=None):
    """The probability flow ODE sampler with black-box ODE solver.

    Args:
      model: A score model.
      z: If present, generate samples from latent code `z` (any batch size); else from the prior.

    Returns:
      samples, number of function evaluations.
    """
    with torch.no_grad():
      # Initial sample
      x = sde.prior_sampling(shape).to(device) if z is None else z.to(device)
      x, nfe = solve(model, x)

      # Denoising is equivalent to running one predictor step without adding noise
      if denoise:
        x = denoise_update_fn(model, x)

      x = inverse_scaler(x)
      return x, nfe

  return ode_sampler
