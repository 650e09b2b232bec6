"""Bits/dim of the probability flow ODE against the exact answer for Gaussian data.

For data N(mu, diag(s0^2)) and the exact score, the probability flow is affine per dimension,
x(t) - m_t = sqrt(v_t / v_s) (x(s) - m_s), so the latent is z = m_T + sqrt(v_T / v_eps) (x - m_eps) and the
integrated divergence is 1/2 sum log(v_T / v_eps). `likelihood_fn` returns log prior(z) + that integral; with
the exact score both are known in closed form.
"""

import math
import re

import ml_collections
import numpy as np
import pytest
import torch

import likelihood
import sde_lib
from helpers import SDE_KINDS, ExactScoreModel, GaussianData, make_sde
from ode_checks import (DeviceCheckingModel, NaNAfter, RecordingModel, count_live_saved_tensors, no_host_copies,
                        smooth_tiny_ncsnpp)

BACKENDS = ('scipy', 'torch')


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


@pytest.mark.parametrize('backend', BACKENDS)
@pytest.mark.parametrize('kind', SDE_KINDS)
@pytest.mark.parametrize('hutchinson_type', ['Rademacher', 'exact'])
def test_continuous_bpd_is_exact(kind, hutchinson_type, backend):
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
                                               discrete_data=False, backend=backend)
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


@pytest.mark.parametrize('backend', BACKENDS)
def test_gaussian_probe_gives_the_known_stochastic_estimate(backend):
  # With equal variances the drift's Jacobian is c(t) I, so one Gaussian probe e (fixed along the ODE, as
  # Score SDE) estimates the integrated divergence as (e^T e / D) times the exact one: the bits/dim error is
  # known exactly once the probe is known.
  sde = make_sde('vp')
  data = GaussianData(torch.zeros(1, 2, 2), 0.5 * torch.ones(1, 2, 2))
  x = data.sample(5, generator=torch.Generator().manual_seed(0))
  fn = likelihood.get_likelihood_fn(sde, lambda v: v, hutchinson_type='Gaussian', eps=1e-3,
                                    discrete_data=False, backend=backend)
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


def test_backends_agree_on_tiny_ncsnpp():
  net, sde, inverse_scaler = smooth_tiny_ncsnpp()
  data = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1  # centered, as configured
  results = {}
  for backend in BACKENDS:
    fn = likelihood.get_likelihood_fn(sde, inverse_scaler, rtol=1e-3, atol=1e-3, eps=sde.sampling_eps,
                                      backend=backend)
    torch.manual_seed(0)  # the same Rademacher probe for both
    results[backend] = fn(net, data)
  for bpd, z, nfe in results.values():
    assert bpd.shape == (2,) and torch.isfinite(bpd).all() and z.shape == data.shape and 50 < nfe < 300
  # Same tolerance, different steps (see ode_backends): the backends differ by their solver errors. Measured:
  # 0.02 bits/dim at rtol = atol = 1e-3 (each 0.004 to 0.02 from its own solution at 1e-4, where the two are
  # 0.008 apart), of bits/dim near 10.7. A wrong drift, divergence, probe or time would be off by far more.
  assert torch.allclose(results['torch'][0], results['scipy'][0], atol=0.05, rtol=0)
  # Not compared: single latent components, which converge slowly on this network (std 1.7; the largest
  # difference is 0.4 between the backends at 1e-3, and 0.18 between scipy at 1e-3 and at 1e-4).
  # test_continuous_bpd_is_exact checks the latents of both against the exact ones.


@pytest.mark.parametrize('method', ['RK45', 'RK23'])
def test_torch_methods_are_scipys_explicit_pairs(method):
  torch.manual_seed(5)
  sde = make_sde('vp')
  data = GaussianData([0.2, -0.3], [0.4, 0.6])
  x = data.sample(4)
  nfes = {}
  for backend in BACKENDS:
    fn = likelihood.get_likelihood_fn(sde, lambda v: v, hutchinson_type='exact', method=method, eps=1e-3,
                                      discrete_data=False, backend=backend)
    bpd, _, nfes[backend] = fn(ExactScoreModel(sde, data), x)
    expected, _ = exact_bpd_and_latent(sde, data, x, 1e-3)
    assert torch.allclose(bpd, expected, atol=1e-3, rtol=0)
  # Same pair, same error control: about the same number of evaluations (RK23 takes about 4x RK45's).
  assert 0.7 < nfes['torch'] / nfes['scipy'] < 1.3, nfes


def test_torch_solve_keeps_everything_on_the_device(monkeypatch):
  sde = make_sde('vp')
  data = GaussianData([0.2, -0.3], [0.4, 0.6])
  x = data.sample(3).float()
  model = DeviceCheckingModel(ExactScoreModel(sde, data), 'cpu', torch.float32)
  fn = likelihood.get_likelihood_fn(sde, lambda v: v, eps=1e-3, discrete_data=False, backend='torch')
  with no_host_copies(monkeypatch):
    # The solve itself: the few scalars that decide each step are compared on the host by `bool()`, which the
    # patches leave alone; the state never is.
    zp, nfe = likelihood.ode_backends.solve(lambda t, y: -y, x.reshape(-1).double(), (0., 1.), 1e-5, 1e-5)
  assert torch.allclose(zp, x.reshape(-1).double() * math.exp(-1), atol=1e-5) and nfe > 0
  with no_host_copies(monkeypatch):
    torch.manual_seed(0)
    bpd, _, nfe = fn(model, x)
  assert model.calls == nfe > 0 and bpd.dtype == torch.float32
  # The check can fail: Score SDE's path copies the state through numpy at every evaluation.
  scipy_fn = likelihood.get_likelihood_fn(sde, lambda v: v, eps=1e-3, discrete_data=False, backend='scipy')
  with no_host_copies(monkeypatch), pytest.raises(AssertionError, match='called in the solve'):
    scipy_fn(model, x)


@pytest.mark.parametrize('backend', BACKENDS)
def test_no_graph_is_kept_through_the_solve(backend):
  # A graph kept through the solve grows with every evaluation (the solver's arithmetic on tensors that carry
  # the network's graph): memory would grow with NFE. Count what autograd holds at every model call.
  sde = make_sde('ve')
  data = GaussianData([0.2, -0.3], [0.4, 0.6])
  x = data.sample(3).float()
  counts = []
  fn = likelihood.get_likelihood_fn(sde, lambda v: v, eps=1e-3, discrete_data=False, backend=backend)
  with count_live_saved_tensors(counts) as record:
    model = RecordingModel(ExactScoreModel(sde, data), record)
    with torch.enable_grad():  # even when the caller tracks gradients
      bpd, z, nfe = fn(model, x)
  assert len(counts) >= nfe > 20
  # Nothing of one evaluation's graph is left at the next.
  assert max(counts) == 0, counts
  assert bpd.grad_fn is None and z.grad_fn is None and not bpd.requires_grad


@pytest.mark.parametrize('backend', BACKENDS)
def test_solver_failure_names_the_time_reached(backend):
  sde = make_sde('vp')
  data = GaussianData([0.2, -0.3], [0.4, 0.6])
  fn = likelihood.get_likelihood_fn(sde, lambda v: v, eps=1e-3, discrete_data=False, backend=backend)
  with pytest.raises(RuntimeError, match='solver failed at t=') as info:
    fn(NaNAfter(sde, data, 0.5, above=True), data.sample(2))
  # The last accepted step ends before the model's output turns NaN at t = 0.5 (integrating up from eps).
  t_reached = float(re.search(r'failed at t=([0-9.e+-]+)', str(info.value)).group(1))
  assert 0.2 < t_reached <= 0.5, str(info.value)


def test_backend_and_method_are_checked_up_front():
  sde = make_sde('vp')
  with pytest.raises(ValueError, match=r"backend='jax' is not allowed; choose one of \('scipy', 'torch'\)"):
    likelihood.get_likelihood_fn(sde, lambda v: v, backend='jax')
  with pytest.raises(ValueError, match=r"method='LSODA' has no torch solver.*'RK45', 'RK23'"):
    likelihood.get_likelihood_fn(sde, lambda v: v, method='LSODA', backend='torch')
  likelihood.get_likelihood_fn(sde, lambda v: v, method='LSODA', backend='scipy')  # scipy's own methods


@pytest.mark.parametrize('value', ['torch', 'scipy', 'Torch', None])
def test_likelihood_fn_from_config(value):
  sde = make_sde('vp')
  data = GaussianData([0.2, -0.3], [0.4, 0.6])
  config = ml_collections.ConfigDict({'eval': {'ode_backend': value}})
  if value not in BACKENDS:
    with pytest.raises(ValueError, match=f"config.eval.ode_backend={value!r} is not allowed"):
      likelihood.likelihood_fn_from_config(config, sde, lambda v: v)
    return
  fn = likelihood.likelihood_fn_from_config(config, sde, lambda v: v, hutchinson_type='exact',
                                            discrete_data=False)
  x = data.sample(3)
  bpd, _, _ = fn(ExactScoreModel(sde, data), x)
  # Score SDE's eps = 1e-5 and tolerances 1e-5, as run_lib has always used them.
  assert torch.allclose(bpd, exact_bpd_and_latent(sde, data, x, 1e-5)[0], atol=1e-3, rtol=0)


def test_bpd_summary():
  # Three passes of four images: pass means 1, 2, 3, so the mean is 2 and the standard error is
  # std([1, 2, 3], ddof=1) / sqrt(3) = 1 / sqrt(3), whatever the spread of the images within a pass.
  bpds = np.concatenate([[0., 2., 0., 2.], [1., 3., 1., 3.], [-8., 14., 0., 6.]])
  mean, se = likelihood.bpd_summary(bpds, 3)
  assert mean == pytest.approx(2.) and se == pytest.approx(1 / math.sqrt(3))
  mean, se = likelihood.bpd_summary(list(bpds), 1)  # one pass: no estimate of the error
  assert mean == pytest.approx(2.) and math.isnan(se)
  # Simulated passes: the standard error predicts the spread of the mean over independent evaluations.
  rng = np.random.default_rng(0)
  images = rng.normal(3., 1., size=1000)  # image-to-image spread, common to every pass
  means, ses = [], []
  for _ in range(400):
    passes = images + rng.normal(0., 0.05, size=(4, 1000))  # estimator noise, new in every pass
    m, s = likelihood.bpd_summary(passes.reshape(-1), 4)
    means.append(m)
    ses.append(s)
  true_se = 0.05 / math.sqrt(1000 * 4)
  assert np.std(means) == pytest.approx(true_se, rel=0.15)
  assert np.sqrt(np.mean(np.square(ses))) == pytest.approx(true_se, rel=0.15)
  for bad, repeats in (([], 1), ([1., 2., 3.], 2), ([1., 2.], 0), ([1., 2.], True)):
    with pytest.raises(ValueError):
      likelihood.bpd_summary(bad, repeats)


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
    (dict(num_levels=1), r'num_levels=1 .*2'),
    (dict(num_levels=16.5), r'num_levels=16.5 '),
])
def test_likelihood_refuses_bad_arguments(kwargs, message):
  with pytest.raises(ValueError, match=message):
    likelihood.get_likelihood_fn(make_sde('vp'), lambda v: v, **kwargs)


class UniformModelSDE(sde_lib.VESDE):
  """A "diffusion" that does not move (f = g = 0) with a prior uniform on the scaled image of [0, 1]^D.

  Its probability flow is x(t) = x, so `likelihood_fn`'s model density is exactly that prior: a model whose
  density is uniform on [0, 1]^D (in data space). Every dequantization bin of [0, 1] with L levels per
  dimension then has probability L^-D: exactly log2(L) bits per dimension, whatever the scaler.
  """

  def __init__(self, low, high):
    super().__init__(sigma_min=0.01, sigma_max=1., N=10)
    self.low, self.high = low, high

  def diffusion(self, t):
    return torch.zeros_like(t)

  def prior_logp(self, z):
    inside = ((z >= self.low) & (z <= self.high)).reshape(z.shape[0], -1).all(1)
    log_density = -z[0].numel() * math.log(self.high - self.low)
    return torch.where(inside, torch.full_like(inside, log_density, dtype=z.dtype), -math.inf)


class Identity(torch.nn.Module):

  def forward(self, x, labels):
    del labels
    return x


@pytest.mark.parametrize('backend', BACKENDS)
@pytest.mark.parametrize('centered', [True, False])
@pytest.mark.parametrize('num_levels', [17, 256])
def test_discrete_bpd_of_a_uniform_density_is_log2_of_the_levels(num_levels, centered, backend):
  # The exact answer for the model uniform on [0, 1]^D: log2(17) = 4.0875 bits/dim for the digits' 17 grey
  # levels, 8 for 8-bit images, for dequantized data in [0, 1] and in [-1, 1] alike.
  scaler = (lambda v: 2. * v - 1.) if centered else (lambda v: v)
  inverse_scaler = (lambda v: (v + 1.) / 2.) if centered else (lambda v: v)
  sde = UniformModelSDE(scaler(0.), scaler(1.))
  generator = torch.Generator().manual_seed(2)
  levels = torch.randint(0, num_levels, (5, 1, 3, 2), generator=generator).double()
  x = scaler((levels + torch.rand(levels.shape, generator=generator, dtype=torch.float64)) / num_levels)
  fn = likelihood.get_likelihood_fn(sde, inverse_scaler, eps=1e-3, backend=backend, num_levels=num_levels)
  bpd, z, _ = fn(Identity(), x)
  torch.testing.assert_close(z, x)
  torch.testing.assert_close(bpd, torch.full_like(bpd, math.log2(num_levels)), rtol=0, atol=1e-12)


@pytest.mark.parametrize('centered, num_levels, offset', [(True, 17, math.log2(17) - 1), (False, 17, math.log2(17)),
                                                          (True, 256, 7.), (False, 256, 8.)])
def test_discrete_offset(centered, num_levels, offset):
  inverse_scaler = (lambda v: (v + 1.) / 2.) if centered else (lambda v: v)
  # Score SDE's 8-bit offsets to the last bit (the default), and log2(L / r) for L levels and data range r.
  assert likelihood.discrete_offset(inverse_scaler, num_levels) == offset
  if num_levels == 256:
    assert likelihood.discrete_offset(inverse_scaler) == 7. - inverse_scaler(-1.)


def test_likelihood_fn_from_config_passes_num_levels():
  sde = UniformModelSDE(0., 1.)
  config = ml_collections.ConfigDict({'eval': {'ode_backend': 'torch'}})
  fn = likelihood.likelihood_fn_from_config(config, sde, lambda v: v, num_levels=17)
  bpd, _, _ = fn(Identity(), torch.full((2, 1, 2, 2), 0.5, dtype=torch.float64))
  torch.testing.assert_close(bpd, torch.full_like(bpd, math.log2(17)), rtol=0, atol=1e-12)
