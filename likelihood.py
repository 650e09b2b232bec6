"""Log-likelihoods (bits/dim) through the probability flow ODE, as Score SDE (Song et al., ICLR 2021).

The log-density of x(eps) is log p_T(x(T)) + int_eps^T div_x f~(x(t), t) dt, where f~ = f - g^2 s / 2 is the
drift of the probability flow ODE and p_T is the SDE's prior. The divergence is Score SDE's Hutchinson-Skilling
estimate (Rademacher or Gaussian probes, one probe per call, fixed along the ODE), or, for small data
dimensions, exact ('exact': D backward passes per evaluation).

The ODE is solved by scipy on the CPU (`backend='scipy'`, Score SDE's path and the default) or in torch on the
data's device (`backend='torch'`); see `ode_backends`. `likelihood_fn_from_config` reads the backend from
`config.eval.ode_backend`, and `bpd_summary` gives the mean bits/dim over evaluation passes with its standard
error.
"""

import math
import numbers

import numpy as np
import torch
from scipy import integrate

import ode_backends
import sde_lib
import utils
from models import utils as mutils
from models.utils import from_flattened_numpy, to_flattened_numpy

HUTCHINSON_TYPES = ('Gaussian', 'Rademacher', 'exact')


def get_div_fn(fn):
  """Create the divergence function of `fn` using the Hutchinson-Skilling trace estimator.

  Args:
    fn: a function (x, t) -> tensor of the shape of x.

  Returns:
    `div_fn(x, t, eps)`: the estimate eps^T (d fn / dx) eps per sample, shape (B,), for the probe `eps`.
  """

  def div_fn(x, t, eps):
    with torch.enable_grad():
      x = x.detach().requires_grad_(True)
      return _hutchinson_divergence(fn(x, t), x, eps)

  return div_fn


def _hutchinson_divergence(out, x, eps):
  """eps^T (d out / dx) eps per sample, shape (B,), for `out` computed from `x` (which requires grad)."""
  grad_fn_eps = torch.autograd.grad(torch.sum(out * eps), x)[0]
  # Not a sum over dims 1..: data of shape (B,) have no such dims.
  return utils.sum_except_batch(grad_fn_eps * eps)


def _exact_divergence(out, x):
  """sum_i d out_i / d x_i per sample, shape (B,), for `out` computed from `x` (which requires grad)."""
  out = out.reshape(x.shape[0], -1)
  flat_dim = out.shape[1]
  div = torch.zeros(x.shape[0], device=x.device, dtype=x.dtype)
  for i in range(flat_dim):
    # Samples are independent, so the gradient of the batch sum of component i gives d out_i / d x_i of every
    # sample at once.
    grad = torch.autograd.grad(out[:, i].sum(), x, retain_graph=i < flat_dim - 1)[0]
    div = div + grad.reshape(x.shape[0], -1)[:, i]
  return div


def get_exact_div_fn(fn):
  """Create the exact divergence function of `fn`: one forward pass and D backward passes, D the data
  dimension. Meant for small D (e.g. 2-D toy data).

  Args:
    fn: a function (x, t) -> tensor of the shape of x.

  Returns:
    `div_fn(x, t)`: sum_i d fn_i / d x_i per sample, shape (B,).
  """

  def div_fn(x, t):
    with torch.enable_grad():
      x = x.detach().requires_grad_(True)
      return _exact_divergence(fn(x, t), x)

  return div_fn


def get_likelihood_fn(sde, inverse_scaler, hutchinson_type='Rademacher',
                      rtol=1e-5, atol=1e-5, method='RK45', eps=1e-5, discrete_data=True, backend='scipy', *,
                      num_levels=256):
  """Create a function to compute the unbiased log-likelihood estimate of a given data point.

  Args:
    sde: A `sde_lib.SDE` object that represents the forward SDE.
    inverse_scaler: The inverse data normalizer.
    hutchinson_type: 'Rademacher' or 'Gaussian' (the noise of the Hutchinson-Skilling trace estimator), or
      'exact' (the exact divergence, with D backward passes per ODE step: small data dimensions only).
    rtol: A `float` number. The relative tolerance level of the black-box ODE solver.
    atol: A `float` number. The absolute tolerance level of the black-box ODE solver.
    method: A `str`. The algorithm for the black-box ODE solver.
      See documentation for `scipy.integrate.solve_ivp`. With `backend='torch'`, 'RK45' (Dormand-Prince,
      torchdiffeq's 'dopri5') or 'RK23' (Bogacki-Shampine, 'bosh3'), with scipy's step-size control.
    eps: A `float` number. The probability flow ODE is integrated to `eps` for numerical stability.
    discrete_data: If `True`, add the offset log2(num_levels) - 1 - inverse_scaler(-1) to the bits/dim, which
      turns the density of the scaled data into bits/dim of data with `num_levels` levels per dimension,
      dequantized into [0, 1] (for 256 levels Score SDE's 7 - inverse_scaler(-1): 8 for data in [0, 1], 7 for
      data in [-1, 1]). If `False`, return the bits/dim of the continuous density of the data as given.
    backend: 'scipy' (Score SDE's: `scipy.integrate.solve_ivp` on the CPU, the state copied to and from the
      model's device at every function evaluation) or 'torch' (the solve runs on the data's device; each
      function evaluation shares one forward pass between the drift and the divergence, where Score SDE's
      path runs two). See `ode_backends`.
    num_levels: keyword only, not in Score SDE: how many levels each dimension of the discrete data has (256
      for 8-bit images, 17 for scikit-learn's digits), each dequantized to a bin of width 1 / num_levels of
      [0, 1]. Only read with `discrete_data=True`.

  Returns:
    `likelihood_fn(model, data)`: takes a score model and a batch of data, already scaled by the data scaler
    (the space the model works in), and returns the log-likelihoods in bits/dim, shape (B,), the latent code
    and the number of function evaluations of the ODE solver. With `discrete_data=False` the bits/dim are
    -log2 p(data) / D for the model's continuous density p of the scaled data. The whole batch is one ODE
    solve, with one step-size control, as in Score SDE. No gradients are tracked through the solve.

  Raises:
    ValueError: if `hutchinson_type` is not one of 'Gaussian', 'Rademacher', 'exact', `eps` is not in
      (0, sde.T), `discrete_data` is not a bool, `num_levels` is not an integer >= 2, `backend` is not 'scipy'
      or 'torch', or `method` has no torch solver with `backend='torch'`.
    RuntimeError (from `likelihood_fn`): the ODE solver failed; the message names the time reached.
  """
  if hutchinson_type not in HUTCHINSON_TYPES:
    raise ValueError(f'hutchinson_type={hutchinson_type!r} is not allowed; choose one of {HUTCHINSON_TYPES}.')
  sde_lib.check_eps(sde, eps)
  if not isinstance(discrete_data, bool):
    # A truthy string such as 'no' would silently add the 8-bit offset.
    raise ValueError(f'discrete_data={discrete_data!r} must be True or False.')
  utils.check_number('num_levels', num_levels, low=2, integer=True)
  ode_backends.check_backend(backend, method)

  def drift_fn(model, x, t):
    """The drift function of the reverse-time SDE."""
    score_fn = mutils.get_score_fn(sde, model, train=False, continuous=True)
    # Probability flow ODE is a special case of Reverse SDE
    rsde = sde.reverse(score_fn, probability_flow=True)
    return rsde.sde(x, t)[0]

  def div_fn(model, x, t, noise):
    fn = lambda xx, tt: drift_fn(model, xx, tt)
    if noise is None:
      return get_exact_div_fn(fn)(x, t)
    return get_div_fn(fn)(x, t, noise)

  def drift_and_div_fn(model, x, t, noise):
    """The drift and its divergence from one forward pass (Score SDE's `ode_func` runs two)."""
    with torch.enable_grad():
      x = x.detach().requires_grad_(True)
      drift = drift_fn(model, x, t)
      div = _exact_divergence(drift, x) if noise is None else _hutchinson_divergence(drift, x, noise)
    # Detached: nothing of the network's graph may outlive the evaluation.
    return drift.detach(), div.detach()

  def solve_scipy(model, data, epsilon):
    """Score SDE's solve: scipy on the CPU, the state copied to the data's device at every evaluation."""
    shape = data.shape
    batch = shape[0]

    def ode_func(t, y):
      sample = from_flattened_numpy(y[:-batch], shape).to(device=data.device, dtype=data.dtype)
      vec_t = torch.ones(batch, device=data.device, dtype=data.dtype) * t
      drift = to_flattened_numpy(drift_fn(model, sample, vec_t))
      logp_grad = to_flattened_numpy(div_fn(model, sample, vec_t, epsilon))
      return np.concatenate([drift, logp_grad], axis=0)

    init = np.concatenate([to_flattened_numpy(data), np.zeros((batch,))], axis=0)
    solution = integrate.solve_ivp(ode_func, (eps, sde.T), init, rtol=rtol, atol=atol, method=method)
    if not solution.success:
      raise ode_backends.failure(solution.t[-1], (eps, sde.T), solution.nfev, solution.message)
    nfe = solution.nfev
    zp = solution.y[:, -1]
    z = from_flattened_numpy(zp[:-batch], shape).to(device=data.device, dtype=data.dtype)
    delta_logp = from_flattened_numpy(zp[-batch:], (batch,)).to(device=data.device, dtype=data.dtype)
    return z, delta_logp, nfe

  def solve_torch(model, data, epsilon):
    """The same ODE solved on the data's device: one state vector (x, then the log-density increments)."""
    shape = data.shape
    batch = shape[0]

    def ode_func(t, y):
      sample = y[:-batch].reshape(shape).to(data.dtype)
      vec_t = torch.ones(batch, device=data.device, dtype=data.dtype) * t.to(data.dtype)
      drift, logp_grad = drift_and_div_fn(model, sample, vec_t, epsilon)
      return torch.cat([drift.reshape(-1), logp_grad.reshape(-1)]).to(y.dtype)

    init = torch.cat([data.reshape(-1), torch.zeros(batch, device=data.device, dtype=data.dtype)])
    zp, nfe = ode_backends.solve(ode_func, init.to(ode_backends.STATE_DTYPE), (eps, sde.T), rtol, atol, method)
    z = zp[:-batch].reshape(shape).to(data.dtype)
    delta_logp = zp[-batch:].to(data.dtype)
    return z, delta_logp, nfe

  solve = solve_scipy if backend == 'scipy' else solve_torch

  def likelihood_fn(model, data):
    """Compute an unbiased estimate to the log-likelihood in bits/dim.

    Args:
      model: A score model.
      data: A PyTorch tensor of shape (B, ...), scaled as the model's training data.

    Returns:
      bpd: A PyTorch tensor of shape [batch size]. The log-likelihoods on `data` in bits/dim.
      z: A PyTorch tensor of the same shape as `data`. The latent representation of `data` under the
        probability flow ODE.
      nfe: An integer. The number of function evaluations used for running the black-box ODE solver.
    """
    with torch.no_grad():
      shape = data.shape
      if hutchinson_type == 'Gaussian':
        epsilon = torch.randn_like(data)
      elif hutchinson_type == 'Rademacher':
        epsilon = torch.randint_like(data, low=0, high=2) * 2 - 1.
      else:
        epsilon = None
      z, delta_logp, nfe = solve(model, data, epsilon)
      prior_logp = sde.prior_logp(z)
      bpd = -(prior_logp + delta_logp) / math.log(2)
      bpd = bpd / math.prod(shape[1:])
      if discrete_data:
        bpd = bpd + discrete_offset(inverse_scaler, num_levels)
      return bpd, z, nfe

  return likelihood_fn


def discrete_offset(inverse_scaler, num_levels=256):
  """The bits/dim that turn the density of the scaled data into bits/dim of data with `num_levels` levels.

  A level k of [0, 1] data dequantizes to the bin [k, k + 1) / num_levels, so a density p on [0, 1]^D gives
  the bin about p / num_levels^D: log2(num_levels) bits per dimension. The scaler maps [0, 1] onto a range of
  width r, dividing the density by r per dimension: log2(r) bits less. Score SDE's `7 - inverse_scaler(-1)`
  is this for 256 levels and its two scalers (r = 1: inverse_scaler(-1) = -1; r = 2: inverse_scaler(-1) = 0),
  and is kept in that form so that 8-bit bits/dim are Score SDE's to the last bit.

  Args:
    inverse_scaler: the inverse data normalizer (Score SDE's: identity, or [-1, 1] -> [0, 1]).
    num_levels: levels per dimension of the discrete data.

  Returns:
    The offset, a float: log2(num_levels) - 1 - inverse_scaler(-1).
  """
  return (math.log2(num_levels) - 1.) - float(inverse_scaler(-1.))


def likelihood_fn_from_config(config, sde, inverse_scaler, hutchinson_type='Rademacher', discrete_data=True, *,
                              num_levels=256):
  """`get_likelihood_fn` with the solver backend of `config.eval.ode_backend` ('scipy' or 'torch', validated).

  The tolerances, `method` and `eps` are Score SDE's defaults (rtol = atol = 1e-5, 'RK45', eps = 1e-5), as
  Score SDE's `run_lib.evaluate` uses them.

  Args:
    config: the config; reads `eval.ode_backend`.
    sde, inverse_scaler, hutchinson_type, discrete_data, num_levels: as `get_likelihood_fn`.

  Returns:
    `likelihood_fn(model, data)`, as `get_likelihood_fn`.
  """
  backend = utils.check_choice('eval.ode_backend', config.eval.ode_backend, ode_backends.BACKENDS)
  return get_likelihood_fn(sde, inverse_scaler, hutchinson_type=hutchinson_type, discrete_data=discrete_data,
                           backend=backend, num_levels=num_levels)


def bpd_summary(bpds, num_repeats):
  """The mean bits/dim over `num_repeats` evaluation passes and the standard error of that mean.

  Each pass over the bpd split draws new randomness: the Hutchinson probes and, for images, the dequantization
  noise (and, with a shuffled split whose last partial batch is dropped, which images are seen). The standard
  error is that of the mean from this randomness, estimated from the spread of the per-pass means:
  std(pass means, ddof=1) / sqrt(num_repeats). It is what more passes reduce (as 1 / sqrt(num_repeats)), and
  what two evaluations of models on the same split must be compared against. It is not the spread of the
  per-image values over sqrt(N): that is dominated by how much images differ from each other, which is the
  same for every model evaluated on the split, and repeats of one image are not independent draws.

  Args:
    bpds: every image's bits/dim, pass after pass (`num_repeats` passes of equal length, concatenated), as
      `run_lib.evaluate` accumulates them (the last bpd file's `all_bpds`).
    num_repeats: the number of passes, an integer >= 1.

  Returns:
    `(mean, standard_error)`, floats: the mean of all values (the mean of the per-pass means) and its standard
    error; the standard error is NaN for one pass, which gives no estimate of it.

  Raises:
    ValueError: `num_repeats` is not an integer >= 1, or `bpds` is empty or does not split into
      `num_repeats` equal passes.
  """
  if isinstance(num_repeats, bool) or not isinstance(num_repeats, numbers.Integral) or num_repeats < 1:
    raise ValueError(f'num_repeats={num_repeats!r} must be an integer >= 1.')
  values = np.asarray(bpds, dtype=np.float64).reshape(-1)
  if values.size == 0 or values.size % num_repeats:
    raise ValueError(f'{values.size} bits/dim values do not split into {num_repeats} passes of equal length.')
  pass_means = values.reshape(num_repeats, -1).mean(axis=1)
  standard_error = float(pass_means.std(ddof=1) / math.sqrt(num_repeats)) if num_repeats > 1 else float('nan')
  return float(values.mean()), standard_error
