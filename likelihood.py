"""Log-likelihoods (bits/dim) through the probability flow ODE, as Score SDE (Song et al., ICLR 2021).

The log-density of x(eps) is log p_T(x(T)) + int_eps^T div_x f~(x(t), t) dt, where f~ = f - g^2 s / 2 is the
drift of the probability flow ODE and p_T is the SDE's prior. The divergence is Score SDE's Hutchinson-Skilling
estimate (Rademacher or Gaussian probes, one probe per call, fixed along the ODE), or, for small data
dimensions, exact ('exact': D backward passes per evaluation).
"""

import math

import numpy as np
import torch
from scipy import integrate

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
      fn_eps = torch.sum(fn(x, t) * eps)
      grad_fn_eps = torch.autograd.grad(fn_eps, x)[0]
    # Not a sum over dims 1..: data of shape (B,) have no such dims.
    return utils.sum_except_batch(grad_fn_eps * eps)

  return div_fn


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
      out = fn(x, t).reshape(x.shape[0], -1)
      flat_dim = out.shape[1]
      div = torch.zeros(x.shape[0], device=x.device, dtype=x.dtype)
      for i in range(flat_dim):
        # Samples are independent, so the gradient of the batch sum of component i gives d out_i / d x_i
        # of every sample at once.
        grad = torch.autograd.grad(out[:, i].sum(), x, retain_graph=i < flat_dim - 1)[0]
        div = div + grad.reshape(x.shape[0], -1)[:, i]
    return div

  return div_fn


def get_likelihood_fn(sde, inverse_scaler, hutchinson_type='Rademacher',
                      rtol=1e-5, atol=1e-5, method='RK45', eps=1e-5, discrete_data=True):
  """Create a function to compute the unbiased log-likelihood estimate of a given data point.

  Args:
    sde: A `sde_lib.SDE` object that represents the forward SDE.
    inverse_scaler: The inverse data normalizer.
    hutchinson_type: 'Rademacher' or 'Gaussian' (the noise of the Hutchinson-Skilling trace estimator), or
      'exact' (the exact divergence, with D backward passes per ODE step: small data dimensions only).
    rtol: A `float` number. The relative tolerance level of the black-box ODE solver.
    atol: A `float` number. The absolute tolerance level of the black-box ODE solver.
    method: A `str`. The algorithm for the black-box ODE solver.
      See documentation for `scipy.integrate.solve_ivp`.
    eps: A `float` number. The probability flow ODE is integrated to `eps` for numerical stability.
    discrete_data: If `True`, add Score SDE's offset 7 - inverse_scaler(-1) to the bits/dim, which turns
      the density of the scaled data into bits/dim of 8-bit data (8 for data in [0, 1], 7 for data in
      [-1, 1]). If `False`, return the bits/dim of the continuous density of the data as given.

  Returns:
    `likelihood_fn(model, data)`: takes a score model and a batch of data, already scaled by the data scaler
    (the space the model works in), and returns the log-likelihoods in bits/dim, shape (B,), the latent code
    and the number of function evaluations of the ODE solver. With `discrete_data=False` the bits/dim are
    -log2 p(data) / D for the model's continuous density p of the scaled data.

  Raises:
    ValueError: if `hutchinson_type` is not one of 'Gaussian', 'Rademacher', 'exact', `eps` is not in
      (0, sde.T), or `discrete_data` is not a bool.
  """
  if hutchinson_type not in HUTCHINSON_TYPES:
    raise ValueError(f'hutchinson_type={hutchinson_type!r} is not allowed; choose one of {HUTCHINSON_TYPES}.')
  sde_lib.check_eps(sde, eps)
  if not isinstance(discrete_data, bool):
    # A truthy string such as 'no' would silently add the 8-bit offset.
    raise ValueError(f'discrete_data={discrete_data!r} must be True or False.')

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
      batch = shape[0]
      if hutchinson_type == 'Gaussian':
        epsilon = torch.randn_like(data)
      elif hutchinson_type == 'Rademacher':
        epsilon = torch.randint_like(data, low=0, high=2) * 2 - 1.
      else:
        epsilon = None

      def ode_func(t, y):
        sample = from_flattened_numpy(y[:-batch], shape).to(device=data.device, dtype=data.dtype)
        vec_t = torch.ones(batch, device=data.device, dtype=data.dtype) * t
        drift = to_flattened_numpy(drift_fn(model, sample, vec_t))
        logp_grad = to_flattened_numpy(div_fn(model, sample, vec_t, epsilon))
        return np.concatenate([drift, logp_grad], axis=0)

      init = np.concatenate([to_flattened_numpy(data), np.zeros((batch,))], axis=0)
      solution = integrate.solve_ivp(ode_func, (eps, sde.T), init, rtol=rtol, atol=atol, method=method)
      if not solution.success:
        raise RuntimeError(f'The probability flow ODE solver failed: {solution.message}')
      nfe = solution.nfev
      zp = solution.y[:, -1]
      z = from_flattened_numpy(zp[:-batch], shape).to(device=data.device, dtype=data.dtype)
      delta_logp = from_flattened_numpy(zp[-batch:], (batch,)).to(device=data.device, dtype=data.dtype)
      prior_logp = sde.prior_logp(z)
      bpd = -(prior_logp + delta_logp) / math.log(2)
      bpd = bpd / math.prod(shape[1:])
      if discrete_data:
        # Score SDE's conversion to bits/dim of 8-bit data: log2(256 / r) bits per dimension, r the range of
        # the scaled data (8 for [0, 1], 7 for [-1, 1]); 7 - inverse_scaler(-1) gives both for its scalers.
        offset = 7. - float(inverse_scaler(-1.))
        bpd = bpd + offset
      return bpd, z, nfe

  return likelihood_fn
