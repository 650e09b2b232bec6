"""Bits/dim of the probability flow ODE against the exact answer for Gaussian data.

For data N(mu, diag(s0^2)) and the exact score, the probability flow is affine per dimension,
x(t) - m_t = sqrt(v_t / v_s) (x(s) - m_s), so the latent is z = m_T + sqrt(v_T / v_eps) (x - m_eps) and the
integrated divergence is 1/2 sum log(v_T / v_eps). `likelihood_fn` returns log prior(z) + that integral; with
the exact score both are known in closed form.
"""

import math

import pytest
import torch

import likelihood
from helpers import SDE_KINDS, ExactScoreModel, GaussianData, make_sde, tiny_ncsnpp_with_sde


def exact_bpd_and_latent(sde, data, x, eps):
  B = x.shape[0]
  m_eps, v_eps = data.marginal(sde, torch.full((B,), eps, dtype=torch.float64))
  m_T, v_T = data.marginal(sde, torch.full((B,), float(sde.T), dtype=torch.float64))
  z = m_T + torch.sqrt(v_T / v_eps) * (x - m_eps)
  delta_logp = 0.5 * torch.log(v_T / v_eps).reshape(B, -1).sum(1)
  D = x[0].numel()
  bpd = -(sde.prior_logp(z) + delta_logp) / (D * math.log(2))
  # The same, written as the log-density of x under p_eps corrected by the prior's mismatch with p_T.
  logp_eps = data.logp(sde, x, torch.full((B,), eps, dtype=torch.float64))
  logp_T = data.logp(sde, z, torch.full((B,), float(sde.T), dtype=torch.float64))
  assert torch.allclose(bpd, -(logp_eps + sde.prior_logp(z) - logp_T) / (D * math.log(2)))
  return bpd, z


@pytest.mark.parametrize('kind', SDE_KINDS)
@pytest.mark.parametrize('hutchinson_type', ['Rademacher', 'exact'])
def test_continuous_bpd_is_exact(kind, hutchinson_type):
  torch.manual_seed(0)
  sde = make_sde(kind)
  # Per-sample shape (1, 2, 2): exercises the broadcasting over (B, C, H, W).
  data = GaussianData(torch.tensor([0.5, -1., 0.2, 1.5]).reshape(1, 2, 2),
                      torch.tensor([0.3, 0.7, 1.0, 0.5]).reshape(1, 2, 2))
  model = ExactScoreModel(sde, data)
  x = data.sample(6)
  eps = 1e-5
  # The drift's Jacobian is diagonal, so the Rademacher estimate of its trace is exact too.
  likelihood_fn = likelihood.get_likelihood_fn(sde, lambda v: v, hutchinson_type=hutchinson_type, eps=eps,
                                               discrete_data=False)
  bpd, z, nfe = likelihood_fn(model, x)
  expected_bpd, expected_z = exact_bpd_and_latent(sde, data, x, eps)
  assert bpd.shape == (6,) and z.shape == x.shape and bpd.dtype == torch.float64
  assert isinstance(nfe, int) and nfe > 0
  assert torch.allclose(bpd, expected_bpd, atol=1e-3, rtol=0)
  assert torch.allclose(z, expected_z, atol=1e-3 * float(expected_z.abs().max()), rtol=0)


@pytest.mark.parametrize('centered, offset', [(True, 7.), (False, 8.)])
def test_discrete_data_offset(centered, offset):
  # Score SDE's 7 - inverse_scaler(-1): 7 bits for data in [-1, 1], 8 for data in [0, 1].
  torch.manual_seed(1)
  sde = make_sde('vp')
  data = GaussianData([0.2, -0.3], [0.4, 0.6])
  inverse_scaler = (lambda v: (v + 1.) / 2.) if centered else (lambda v: v)
  x = data.sample(4)
  kwargs = dict(hutchinson_type='Rademacher', eps=1e-3)
  continuous_fn = likelihood.get_likelihood_fn(sde, inverse_scaler, discrete_data=False, **kwargs)
  discrete_fn = likelihood.get_likelihood_fn(sde, inverse_scaler, **kwargs)  # discrete_data=True default
  bpd_c, _, _ = continuous_fn(ExactScoreModel(sde, data), x)
  bpd_d, _, _ = discrete_fn(ExactScoreModel(sde, data), x)
  assert torch.allclose(bpd_d - bpd_c, torch.full_like(bpd_c, offset), atol=1e-6)
  expected, _ = exact_bpd_and_latent(sde, data, x, 1e-3)
  assert torch.allclose(bpd_d, expected + offset, atol=1e-3, rtol=0)


def test_gaussian_probe_gives_the_known_stochastic_estimate():
  # With equal variances the drift's Jacobian is c(t) I, so one Gaussian probe e (fixed along the ODE, as
  # Score SDE) estimates the integrated divergence as (e^T e / D) times the exact one: the bits/dim error is
  # known exactly once the probe is known.
  sde = make_sde('vp')
  data = GaussianData(torch.zeros(1, 2, 2), 0.5 * torch.ones(1, 2, 2))
  x = data.sample(5, generator=torch.Generator().manual_seed(0))
  fn = likelihood.get_likelihood_fn(sde, lambda v: v, hutchinson_type='Gaussian', eps=1e-3,
                                    discrete_data=False)
  torch.manual_seed(2)
  bpd, _, _ = fn(ExactScoreModel(sde, data), x)
  torch.manual_seed(2)
  probe = torch.randn_like(x)  # the probe likelihood_fn drew
  expected, _ = exact_bpd_and_latent(sde, data, x, 1e-3)
  B, D = 5, 4
  _, v_eps = data.marginal(sde, torch.full((B,), 1e-3, dtype=torch.float64))
  _, v_T = data.marginal(sde, torch.full((B,), 1., dtype=torch.float64))
  exact_delta = 0.5 * torch.log(v_T / v_eps).reshape(B, -1).sum(1)
  ete = (probe ** 2).reshape(B, -1).sum(1)
  expected = expected - (ete / D - 1) * exact_delta / (D * math.log(2))
  assert torch.allclose(bpd, expected, atol=1e-3, rtol=0)
  assert float((ete / D - 1).abs().min()) > 0.05  # the probe noise is visible at this tolerance


def test_hutchinson_div_fn_is_unbiased_and_exact_div_fn_is_exact():
  torch.manual_seed(3)
  A = torch.randn(3, 3, dtype=torch.float64)
  fn = lambda x, t: x @ A.T * t[:, None]  # Jacobian t * A; divergence t * trace(A)
  x = torch.randn(20000, 3, dtype=torch.float64)
  t = torch.full((20000,), 0.5, dtype=torch.float64)
  trace = 0.5 * float(torch.trace(A))
  exact = likelihood.get_exact_div_fn(fn)(x, t)
  assert torch.allclose(exact, torch.full_like(exact, trace))
  for probe in (torch.randn_like(x), torch.randint_like(x, 0, 2) * 2 - 1):
    est = likelihood.get_div_fn(fn)(x, t, probe)
    assert est.shape == (20000,)
    assert abs(float(est.mean()) - trace) < 5 * float(est.std()) / math.sqrt(20000)
    assert float(est.std()) > 0.01  # off-diagonal terms make single-probe estimates vary


def test_exact_div_fn_with_nonlinear_coupled_function():
  torch.manual_seed(4)
  fn = lambda x, t: torch.tanh(x.flip(-1) * x) * t[:, None, None]
  x = torch.randn(4, 2, 3, dtype=torch.float64)
  t = torch.rand(4, dtype=torch.float64)
  expected = torch.stack([
      torch.autograd.functional.jacobian(lambda xb: fn(xb[None], t[b:b + 1])[0], x[b]).reshape(6, 6).trace()
      for b in range(4)])
  assert torch.allclose(likelihood.get_exact_div_fn(fn)(x, t), expected)


def test_invalid_hutchinson_type():
  with pytest.raises(ValueError, match="'Gaussian', 'Rademacher', 'exact'"):
    likelihood.get_likelihood_fn(make_sde('vp'), lambda v: v, hutchinson_type='rademacher')


@pytest.mark.parametrize('sde_name', ['vesde'])
def test_likelihood_runs_on_tiny_ncsnpp(sde_name):
  import datasets
  net, sde, config = tiny_ncsnpp_with_sde(sde_name, True)
  fn = likelihood.get_likelihood_fn(sde, datasets.get_data_inverse_scaler(config), rtol=1e-2, atol=1e-2,
                                    eps=sde.sampling_eps)
  data = torch.rand(2, 3, 8, 8) * 2 - 1  # centered data, as the config says
  bpd, z, nfe = fn(net, data)
  assert bpd.shape == (2,) and torch.isfinite(bpd).all() and z.shape == data.shape and nfe > 0


def test_hutchinson_divergence_of_one_dimensional_data():
  # Data of shape (B,): the per-sample sum has no trailing dimensions to run over.
  div_fn = likelihood.get_div_fn(lambda x, t: 2. * x)
  x = torch.randn(4)
  probe = torch.randint(0, 2, (4,)).float() * 2 - 1
  torch.testing.assert_close(div_fn(x, torch.zeros(4), probe), torch.full((4,), 2.))


@pytest.mark.parametrize('kwargs, message', [
    (dict(eps=0.), r'eps=0.0: .*\(0, T=1\)'),
    (dict(eps=1.5), r'eps=1.5: .*\(0, T=1\)'),
    (dict(discrete_data='no'), "discrete_data='no' must be True or False"),
])
def test_likelihood_refuses_bad_arguments(kwargs, message):
  with pytest.raises(ValueError, match=message):
    likelihood.get_likelihood_fn(make_sde('vp'), lambda v: v, **kwargs)
