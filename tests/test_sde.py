"""The SDEs against exact answers: simulation, closed forms, autograd, Score SDE's discretizations.

The exact Gaussian helpers these tests share with the sampler, likelihood and controllable-generation tests
live in `helpers.py`.
"""

import math

import ml_collections
import numpy as np
import pytest
import torch

import sde_lib
from helpers import SDE_KINDS, ExactScoreModel, GaussianData, make_sde

# ---------------------------------------------------------------------------------------------------------
# marginal_prob against a simulation of the SDE


@pytest.mark.parametrize('kind', SDE_KINDS)
def test_marginal_prob_matches_euler_maruyama_simulation(kind):
  torch.manual_seed(0)
  sde = make_sde(kind)
  B, steps = 20000, 200
  x0 = torch.tensor([1.5, -2.0], dtype=torch.float64)
  x = x0.repeat(B, 1)
  if kind == 've':
    # Score SDE's VE marginal has std sigma(t), not sqrt(sigma(t)^2 - sigma_min^2): it treats x(0) as already
    # perturbed with sigma_min. Start the simulation the same way.
    x = x + sde.sigma_min * torch.randn_like(x)
  t_end = 0.6
  dt = t_end / steps
  for i in range(steps):
    t = torch.full((B,), i * dt, dtype=torch.float64)
    f, g = sde.sde(x, t)
    x = x + f * dt + g[:, None] * math.sqrt(dt) * torch.randn_like(x)
  mean, std = sde.marginal_prob(x0.repeat(B, 1), torch.full((B,), t_end, dtype=torch.float64))
  std = float(std[0])
  se = std / math.sqrt(B)
  assert torch.allclose(x.mean(0), mean[0], atol=5 * se + 1e-3)
  # Relative standard error of a sample std over 2 x 20000 draws is 0.35%; Euler-Maruyama adds O(dt).
  assert abs(float(x.std(0).mean()) / std - 1) < 0.015


@pytest.mark.parametrize('kind', ('vp', 'subvp'))
def test_vp_marginal_closed_forms(kind):
  sde = make_sde(kind)
  t = torch.tensor([0.0, 0.1, 0.5, 1.0], dtype=torch.float64)
  a = torch.exp(-0.25 * t ** 2 * (20. - 0.1) - 0.5 * t * 0.1)
  mean, std = sde.marginal_prob(torch.ones(4, 3, dtype=torch.float64), t)
  assert torch.allclose(mean[:, 0], a)
  # VP: std^2 = 1 - a^2; sub-VP: std = 1 - a^2 (Score SDE's sub-VP, Song et al. eq. 31).
  expected = torch.sqrt(1 - a ** 2) if kind == 'vp' else 1 - a ** 2
  assert torch.allclose(std, expected)


def test_ve_marginal_closed_form():
  sde = make_sde('ve')
  t = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
  x = torch.randn(3, 2, 2, dtype=torch.float64)
  mean, std = sde.marginal_prob(x, t)
  assert torch.equal(mean, x)
  assert torch.allclose(std, torch.tensor([0.01, 0.01 * 1000 ** 0.5, 10.], dtype=torch.float64))


# ---------------------------------------------------------------------------------------------------------
# Priors


@pytest.mark.parametrize('kind', SDE_KINDS)
@pytest.mark.parametrize('shape', [(5, 2), (3, 2, 4, 4)])
def test_prior_logp_matches_torch_distributions(kind, shape):
  torch.manual_seed(1)
  sde = make_sde(kind)
  z = sde.prior_sampling(shape).double()
  scale = 10. if kind == 've' else 1.
  expected = torch.distributions.Normal(0., scale).log_prob(z).reshape(shape[0], -1).sum(1)
  logp = sde.prior_logp(z)
  assert logp.shape == (shape[0],)
  assert torch.allclose(logp, expected)


@pytest.mark.parametrize('kind', SDE_KINDS)
def test_prior_sampling_has_prior_moments(kind):
  torch.manual_seed(2)
  sde = make_sde(kind)
  z = sde.prior_sampling((40000, 2))
  scale = 10. if kind == 've' else 1.
  assert z.shape == (40000, 2)
  assert abs(float(z.mean())) < 5 * scale / math.sqrt(80000)
  assert abs(float(z.std()) / scale - 1) < 0.02


# ---------------------------------------------------------------------------------------------------------
# Reverse SDE / probability flow ODE, drift divergence


@pytest.mark.parametrize('kind', SDE_KINDS)
def test_reverse_sde_and_ode_drifts(kind):
  torch.manual_seed(3)
  sde = make_sde(kind)
  x = torch.randn(4, 2, 3, dtype=torch.float64)
  t = torch.tensor([0.01, 0.3, 0.7, 1.0], dtype=torch.float64)
  score_fn = lambda xx, tt: torch.sin(xx) * tt[:, None, None]
  f, g = sde.sde(x, t)
  s = score_fn(x, t)
  drift, diffusion = sde.reverse(score_fn).sde(x, t)
  assert torch.allclose(drift, f - g[:, None, None] ** 2 * s)
  assert torch.allclose(diffusion, g)
  drift, diffusion = sde.reverse(score_fn, probability_flow=True).sde(x, t)
  assert torch.allclose(drift, f - 0.5 * g[:, None, None] ** 2 * s)
  assert torch.equal(diffusion, torch.zeros_like(g))
  # Discretized reverse: f_i - G_i^2 s (and half of it for the ODE), no noise for the ODE.
  fd, G = sde.discretize(x, t)
  rev_f, rev_G = sde.reverse(score_fn).discretize(x, t)
  assert torch.allclose(rev_f, fd - G[:, None, None] ** 2 * s)
  assert torch.allclose(rev_G, G)
  rev_f, rev_G = sde.reverse(score_fn, probability_flow=True).discretize(x, t)
  assert torch.allclose(rev_f, fd - 0.5 * G[:, None, None] ** 2 * s)
  assert torch.equal(rev_G, torch.zeros_like(G))


@pytest.mark.parametrize('kind', SDE_KINDS)
def test_drift_divergence_equals_autograd_divergence(kind):
  torch.manual_seed(4)
  sde = make_sde(kind)
  x = torch.randn(3, 2, 2, 2, dtype=torch.float64)
  t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
  div = torch.zeros(3, dtype=torch.float64)
  for b in range(3):
    jac = torch.autograd.functional.jacobian(lambda xb: sde.drift(xb[None], t[b:b + 1])[0], x[b])
    div[b] = jac.reshape(8, 8).trace()
  out = sde.drift_divergence(x, t)
  assert out.shape == (3,)
  assert torch.allclose(out.double(), div)


@pytest.mark.parametrize('kind', SDE_KINDS)
def test_diffusion_matches_variance_growth(kind):
  # For a linear SDE, d Var / dt = 2 f_coef Var + g^2 with Var = sigma(t)^2 (x0 = 0): a check of g(t)
  # against marginal_prob, independent of the simulation above.
  sde = make_sde(kind)
  t = torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64)
  h = 1e-6
  var = lambda tt: sde.marginal_prob(torch.zeros(3, 1, dtype=torch.float64), tt)[1] ** 2
  dvar = (var(t + h) - var(t - h)) / (2 * h)
  f_coef = sde.drift(torch.ones(3, 1, dtype=torch.float64), t)[:, 0]
  g = sde.diffusion(t)
  assert torch.allclose(dvar, 2 * f_coef * var(t) + g ** 2, rtol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# Score SDE's discretizations


def test_vp_discretize_is_ddpm():
  N = 50
  sde = sde_lib.VPSDE(beta_min=0.1, beta_max=20., N=N)
  x = torch.randn(4, 3)
  t = torch.tensor([1e-3, 0.25, 0.6, 1.0])
  f, G = sde.discretize(x, t)
  i = np.floor(t.numpy().astype(np.float64) * (N - 1)).astype(int)
  beta = 0.1 / N + i / (N - 1) * (20. - 0.1) / N
  expected_f = (np.sqrt(1 - beta)[:, None] - 1) * x.numpy()
  np.testing.assert_allclose(f.numpy(), expected_f, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(G.numpy(), np.sqrt(beta), rtol=1e-5)


def test_ve_discretize_is_smld():
  N = 50
  sde = sde_lib.VESDE(sigma_min=0.01, sigma_max=50., N=N)
  x = torch.randn(4, 3)
  t = torch.tensor([1e-5, 0.25, 0.6, 1.0])
  f, G = sde.discretize(x, t)
  i = np.floor(t.numpy().astype(np.float64) * (N - 1)).astype(int)
  sigma = lambda j: 0.01 * (50. / 0.01) ** (j / (N - 1))
  expected = np.sqrt(sigma(i) ** 2 - np.where(i == 0, 0., sigma(i - 1)) ** 2)
  assert torch.equal(f, torch.zeros_like(x))
  np.testing.assert_allclose(G.numpy(), expected, rtol=1e-4)
  assert abs(float(G[0]) - 0.01) < 1e-7  # the first step adds sigma_min's noise


def test_subvp_discretize_is_euler_maruyama():
  N = 50
  sde = sde_lib.subVPSDE(N=N)
  x = torch.randn(4, 3, dtype=torch.float64)
  t = torch.tensor([1e-3, 0.25, 0.6, 1.0], dtype=torch.float64)
  f, G = sde.discretize(x, t)
  assert torch.allclose(f, sde.drift(x, t) / N)
  assert torch.allclose(G, sde.diffusion(t) / math.sqrt(N))


# ---------------------------------------------------------------------------------------------------------
# Time labels and network outputs


def test_time_labels_and_score_from_output():
  t = torch.tensor([0.001, 0.5, 1.0], dtype=torch.float64)
  x = torch.randn(3, 2, dtype=torch.float64)
  out = torch.randn(3, 2, dtype=torch.float64)
  ve = make_sde('ve', N=11)
  assert torch.allclose(ve.network_time_label(t, True), ve.sigma(t))
  assert ve.network_time_label(t, False).tolist() == [10, 5, 0]
  assert torch.equal(ve.score_from_output(out, x, t, True), out)
  for kind in ('vp', 'subvp'):
    sde = make_sde(kind)
    assert torch.allclose(sde.network_time_label(t, True), 999 * t)
    std = sde.marginal_prob(x, t)[1]
    assert torch.allclose(sde.score_from_output(out, x, t, True), -out / std[:, None])
  vp = make_sde('vp', N=11)
  assert torch.allclose(vp.network_time_label(t, False), 10 * t)
  std = vp.sqrt_1m_alphas_cumprod[torch.tensor([0, 5, 10])].double()
  assert torch.allclose(vp.score_from_output(out, x, t, False), -out / std[:, None])


@pytest.mark.parametrize('kind', SDE_KINDS)
def test_exact_score_model_gives_exact_score(kind):
  # The helper used by the sampler tests: through models.utils.get_score_fn it returns the exact score, which
  # is the gradient of the exact log-density.
  from models import utils as mutils
  sde = make_sde(kind)
  data = GaussianData([0.5, -1.], [0.3, 0.7])
  score_fn = mutils.get_score_fn(sde, ExactScoreModel(sde, data), train=False, continuous=True)
  x = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
  t = torch.tensor([1e-3, 0.2, 0.6, 1.0], dtype=torch.float64)
  grad = torch.autograd.grad(data.logp(sde, x, t).sum(), x)[0]
  assert torch.allclose(score_fn(x, t), grad)


# ---------------------------------------------------------------------------------------------------------
# sde_from_config


def _config(**model):
  config = ml_collections.ConfigDict()
  config.training = ml_collections.ConfigDict({'sde': 'vpsde'})
  defaults = dict(sigma_min=0.01, sigma_max=50., num_scales=1000, beta_min=0.1, beta_max=20.)
  defaults.update(model)
  config.model = ml_collections.ConfigDict(defaults)
  return config


def test_sde_from_config_builds_each_sde():
  config = _config(num_scales=10)
  for name, cls in (('vesde', sde_lib.VESDE), ('vpsde', sde_lib.VPSDE), ('subvpsde', sde_lib.subVPSDE)):
    config.training.sde = name
    sde = sde_lib.sde_from_config(config)
    assert type(sde) is cls and sde.N == 10
  assert sde_lib.sde_from_config(config).sampling_eps == 1e-3
  config.training.sde = 'VESDE'  # case-insensitive, as Score SDE's run_lib
  assert sde_lib.sde_from_config(config).sampling_eps == 1e-5


@pytest.mark.parametrize('sde_name, model, match', [
    ('bogus', {}, 'training.sde'),
    ('vesde', {'sigma_min': 0.}, 'model.sigma_min'),
    ('vesde', {'sigma_max': 0.001}, 'model.sigma_max'),
    ('vpsde', {'num_scales': 0}, 'model.num_scales'),
    ('vpsde', {'num_scales': 10.5}, 'model.num_scales'),
    ('vpsde', {'beta_min': -1.}, 'model.beta_min'),
    ('subvpsde', {'beta_max': 0.01}, 'model.beta_max'),
])
def test_sde_from_config_errors(sde_name, model, match):
  config = _config(**model)
  config.training.sde = sde_name
  with pytest.raises(ValueError, match=match):
    sde_lib.sde_from_config(config)


class ScoreSDEStyleVE(sde_lib.SDE):
  """A user SDE written against Score SDE's interface: `sde(x, t)` only, no drift/diffusion methods."""

  def __init__(self, sigma_min=0.01, sigma_max=5., N=100):
    super().__init__(N)
    self.sigma_min, self.sigma_max = sigma_min, sigma_max

  @property
  def T(self):
    return 1

  def sde(self, x, t):
    sigma = self.sigma_min * (self.sigma_max / self.sigma_min) ** t
    diffusion = sigma * math.sqrt(2 * (math.log(self.sigma_max) - math.log(self.sigma_min)))
    return torch.zeros_like(x), diffusion

  def marginal_prob(self, x, t):
    return x, self.sigma_min * (self.sigma_max / self.sigma_min) ** t

  def prior_sampling(self, shape):
    return torch.randn(*shape) * self.sigma_max

  def prior_logp(self, z):
    return torch.zeros(z.shape[0])


def test_score_sde_style_subclass_works_unchanged():
  user, ours = ScoreSDEStyleVE(), sde_lib.VESDE(sigma_min=0.01, sigma_max=5., N=100)
  x, t = torch.randn(3, 2, 4, 4), torch.rand(3)
  torch.testing.assert_close(user.drift(x, t), ours.drift(x, t))
  torch.testing.assert_close(user.diffusion(t), ours.diffusion(t))
  f, G = user.discretize(x, t)  # Score SDE's default Euler-Maruyama discretization
  torch.testing.assert_close(G, ours.diffusion(t) * math.sqrt(1 / 100))
  drift, diffusion = user.reverse(lambda x, t: -x, probability_flow=True).sde(x, t)
  torch.testing.assert_close(drift, 0.5 * ours.diffusion(t)[:, None, None, None] ** 2 * x)
  # What Score SDE never had says so when it is needed.
  with pytest.raises(NotImplementedError, match='ScoreSDEStyleVE does not define drift_divergence'):
    user.drift_divergence(x, t)
  with pytest.raises(NotImplementedError, match='SDE class ScoreSDEStyleVE not yet supported'):
    user.network_time_label(t, True)


def test_subclass_without_the_sde_is_refused():
  class NoDynamics(ScoreSDEStyleVE):
    sde = sde_lib.SDE.sde

  with pytest.raises(TypeError, match=r'NoDynamics must define sde\(x, t\), or drift\(x, t\) and diffusion'):
    NoDynamics()


def test_sub_vp_is_not_a_vp_sde():
  # As in Score SDE: code that dispatches with isinstance(sde, VPSDE) must not treat sub-VP as DDPM's chain.
  subvp = sde_lib.subVPSDE()
  assert not isinstance(subvp, sde_lib.VPSDE) and isinstance(subvp, sde_lib.SDE)
  assert not hasattr(subvp, 'discrete_betas')
