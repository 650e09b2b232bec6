"""Tests of score_fpe.conservativity: the relative asymmetry ||J - J^T||_F / ||J||_F of a score's Jacobian.

Ground truth: any gradient field (the exact score of Gaussian data under every SDE, the gradient of a random
smooth potential) has a symmetric Jacobian, so 0; a linear field x -> A x has J = A, so ||A - A^T|| / ||A||.
"""

import math

import numpy as np
import pytest
import torch

import score_fpe
from tests import helpers


def _linear_field(A):
  def score_fn(x, t):
    return (x.reshape(x.shape[0], -1) @ A.T).reshape(x.shape)
  return score_fn


class PotentialGradient(torch.nn.Module):
  """s = grad_x phi(x, t) for a random tiny MLP potential phi: a gradient field with a dense, x-dependent J."""

  def __init__(self, dim, hidden=8):
    super().__init__()
    self.phi = torch.nn.Sequential(torch.nn.Linear(dim + 1, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 1))

  def forward(self, x, t):
    with torch.enable_grad():
      if not x.requires_grad:
        x = x.requires_grad_(True)
      h = torch.cat([x.reshape(x.shape[0], -1), t[:, None]], dim=1)
      (grad,) = torch.autograd.grad(self.phi(h).sum(), x, create_graph=True)
    return grad


class TinyMLPScore(torch.nn.Module):
  """A smooth, not conservative field of (x, t): an MLP on the flattened x and t."""

  def __init__(self, dim, hidden=16):
    super().__init__()
    self.net = torch.nn.Sequential(torch.nn.Linear(dim + 1, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, dim))

  def forward(self, x, t):
    h = torch.cat([x.reshape(x.shape[0], -1), t[:, None].to(x.dtype)], dim=1)
    return self.net(h).reshape(x.shape)


def _full_covariance_gaussian_score(sde, mu, cov0):
  """Exact score of p_t for data N(mu, cov0): -(a^2 cov0 + sigma^2 I)^{-1} (x - a mu), a dense symmetric J."""
  def score_fn(x, t):
    ones = torch.ones_like(x)
    a, sigma = sde.marginal_prob(ones, t)
    a = a[:, 0]
    cov = a[:, None, None] ** 2 * cov0 + sigma[:, None, None] ** 2 * torch.eye(x.shape[1], dtype=x.dtype)
    return -torch.linalg.solve(cov, x - a[:, None] * mu)
  return score_fn


@pytest.mark.parametrize('kind', helpers.SDE_KINDS)
@pytest.mark.parametrize('num_probes', [0, 3])
def test_exact_gaussian_scores_are_conservative_at_every_t(kind, num_probes):
  sde = helpers.make_sde(kind)
  gen = torch.Generator().manual_seed(0)
  t = torch.tensor([1e-5, 1e-3, 0.1, 0.5, 0.9, 1.], dtype=torch.float64)
  # Image-shaped data with a per-pixel variance (diagonal J) ...
  data = helpers.GaussianData(mu=torch.rand(2, 2, 2, generator=gen), s0=0.2 + torch.rand(2, 2, 2, generator=gen))
  x = data.sample(len(t), gen) * 3
  c = score_fpe.conservativity(lambda x, t: data.score(sde, x, t), x, t, num_probes, generator=gen)
  assert c.shape == (len(t),) and c.dtype == torch.float64
  assert c.abs().max() < 1e-10, c
  # ... and a full covariance (dense symmetric J).
  L = torch.randn(4, 4, dtype=torch.float64, generator=gen)
  score_fn = _full_covariance_gaussian_score(sde, torch.randn(4, dtype=torch.float64, generator=gen), L @ L.T)
  x = torch.randn(len(t), 4, dtype=torch.float64, generator=gen)
  c = score_fpe.conservativity(score_fn, x, t, num_probes, generator=gen)
  assert c.abs().max() < 1e-10, c
  # The same score made non-conservative is detected: a rotation added at every t.
  rotation = torch.tensor([[0., -1., 0., 0.], [1., 0., 0., 0.], [0.] * 4, [0.] * 4], dtype=torch.float64)
  c_bad = score_fpe.conservativity(lambda x, t: score_fn(x, t) + x @ rotation.T, x, t, num_probes, generator=gen)
  assert (c_bad > 1e-3).all(), c_bad


@pytest.mark.parametrize('num_probes', [0, 2])
def test_gradient_of_a_random_potential_is_conservative(num_probes):
  torch.manual_seed(0)
  model = PotentialGradient(5).double()
  x = torch.randn(7, 5, dtype=torch.float64)
  t = torch.rand(7, dtype=torch.float64)
  c = score_fpe.conservativity(model, x, t, num_probes, generator=torch.Generator().manual_seed(1))
  assert c.abs().max() < 1e-10, c
  # Its Jacobian is not trivial (so the zero above is a symmetry, not an empty J).
  _, norm = score_fpe.jacobian_asymmetry_exact(model(x.requires_grad_(True), t), x)
  assert (norm > 1e-3).all()


@pytest.mark.parametrize('num_probes', [0, 1, 5])
def test_rotation_field_has_asymmetry_two(num_probes):
  # J = [[0, -1], [1, 0]]: ||J - J^T||_F = sqrt(8), ||J||_F = sqrt(2). Every Rademacher probe is exact here
  # (|2 J v|^2 = 8 and |J v|^2 = 2 for v in {-1, 1}^2).
  J = torch.tensor([[0., -1.], [1., 0.]], dtype=torch.float64)
  x = torch.randn(4, 2, dtype=torch.float64)
  c = score_fpe.conservativity(_linear_field(J), x, torch.ones(4, dtype=torch.float64), num_probes)
  torch.testing.assert_close(c, torch.full((4,), 2., dtype=torch.float64), rtol=0, atol=1e-12)
  if num_probes:
    # The probe averages themselves are the squared norms (not sums over probes).
    x = x.requires_grad_(True)
    asym, norm = score_fpe.jacobian_asymmetry_probes(_linear_field(J)(x, None), x, num_probes)
    torch.testing.assert_close(asym, torch.full((4,), 8., dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(norm, torch.full((4,), 2., dtype=torch.float64), rtol=0, atol=1e-12)


def test_general_linear_field_matches_the_matrix_formula():
  gen = torch.Generator().manual_seed(2)
  A = torch.randn(6, 6, dtype=torch.float64, generator=gen)
  x = torch.randn(3, 2, 3, dtype=torch.float64, generator=gen)  # flattened per sample to D = 6
  c = score_fpe.conservativity(_linear_field(A), x, torch.zeros(3, dtype=torch.float64))
  expected = torch.linalg.norm(A - A.T) / torch.linalg.norm(A)
  torch.testing.assert_close(c, expected.expand(3), rtol=1e-12, atol=0)
  assert 0.5 < expected < 2  # a random matrix is far from symmetric (2: antisymmetric)
  # A constant field (J = 0) is the gradient of a linear potential: 0, not NaN.
  const = score_fpe.conservativity(lambda x, t: torch.ones_like(x) + 0 * x, x, torch.zeros(3), num_probes=2)
  assert torch.equal(const, torch.zeros(3, dtype=torch.float64))


def test_probe_estimates_of_both_squared_norms_are_unbiased():
  # One fixed nonlinear field at one point, repeated n times; one Rademacher probe per copy. Each mean must be
  # within 4 standard errors of the exact squared norm (seeded: the draw is fixed, the bound is the test).
  torch.manual_seed(0)
  model = TinyMLPScore(4).double()
  n = 4000
  x0 = torch.randn(1, 4, dtype=torch.float64)
  x = x0.repeat(n, 1).requires_grad_(True)
  t = torch.full((n,), 0.3, dtype=torch.float64)
  s = model(x, t)
  exact_asym, exact_norm = score_fpe.jacobian_asymmetry_exact(s, x)
  gen = torch.Generator().manual_seed(3)
  asym, norm = score_fpe.jacobian_asymmetry_probes(s, x, 1, generator=gen)
  for est, exact in ((asym, exact_asym[0]), (norm, exact_norm[0])):
    stderr = est.std() / math.sqrt(n)
    assert stderr > 0
    assert abs(est.mean() - exact) < 4 * stderr, (est.mean(), exact, stderr)
  # Exact squared norms against the autograd Jacobian.
  jac = torch.autograd.functional.jacobian(lambda v: model(v, t[:1]), x0).reshape(4, 4)
  torch.testing.assert_close(exact_asym[0], (jac - jac.T).square().sum())
  torch.testing.assert_close(exact_norm[0], jac.square().sum())
  # Consistency: the ratio of the averaged estimates approaches the exact value as probes accumulate.
  c_exact = score_fpe.conservativity(model, x0, t[:1])
  assert 0.1 < c_exact < 1.5
  c_probes = torch.sqrt(asym.mean() / norm.mean())
  assert abs(c_probes - c_exact) < 0.03 * c_exact, (c_probes, c_exact)
  c_many = score_fpe.conservativity(model, x0, t[:1], num_probes=400, generator=gen)
  assert abs(c_many - c_exact) < 0.1 * c_exact, (c_many, c_exact)


def test_image_shaped_conv_net_exact_matches_autograd_jacobian():
  torch.manual_seed(0)
  net = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3, padding=1), torch.nn.SiLU(),
                            torch.nn.Conv2d(4, 2, 3, padding=1)).double()

  def score_fn(x, t):
    return net(x) * (1 + t[:, None, None, None])

  x = torch.randn(3, 2, 3, 3, dtype=torch.float64)
  t = torch.tensor([0.1, 0.5, 1.], dtype=torch.float64)
  c = score_fpe.conservativity(score_fn, x, t)
  for b in range(3):
    jac = torch.autograd.functional.jacobian(lambda v: score_fn(v, t[b:b + 1]), x[b:b + 1]).reshape(18, 18)
    expected = torch.linalg.norm(jac - jac.T) / torch.linalg.norm(jac)
    torch.testing.assert_close(c[b], expected, rtol=1e-10, atol=0)
  assert (c > 0.01).all()


def test_tiny_ncsnpp_with_probes_is_finite_and_keeps_no_graph():
  from models import utils as mutils
  net, sde, _ = helpers.tiny_ncsnpp_with_sde('vesde', continuous=True)
  net.eval()
  score_fn = mutils.get_score_fn(sde, net, train=False, continuous=True)
  x = torch.randn(2, 3, 8, 8)
  t = torch.tensor([0.2, 0.8])
  c = score_fpe.conservativity(score_fn, x, t, num_probes=1, generator=torch.Generator().manual_seed(0))
  assert c.shape == (2,) and torch.isfinite(c).all() and (c > 0).all()
  assert not c.requires_grad
  assert all(p.grad is None for p in net.parameters())


def test_conservativity_vs_time_uses_the_residual_samples_and_averages():
  sde = helpers.make_sde('vp')
  torch.manual_seed(0)
  model = TinyMLPScore(3).double()
  x0 = torch.randn(5, 3, dtype=torch.float64)
  ts = np.linspace(1e-3, 1., 3)
  seen = {}

  def recording(name):
    def score_fn(x, t):
      seen.setdefault(name, x.detach().clone())
      return model(x, t)
    return score_fn

  out = score_fpe.conservativity_vs_time(recording('conservativity'), sde, x0, ts, batch_size=2,
                                         generator=torch.Generator().manual_seed(4))
  assert isinstance(out, np.ndarray) and out.shape == (3,) and out.dtype == np.float64
  assert np.isfinite(out).all() and (out > 0).all()
  # The first chunk's x_t is the one residual_vs_time draws with the same seed.
  fpe = score_fpe.ScoreFPE(sde, eps=1e-3, divergence='exact')
  score_fpe.residual_vs_time(recording('residual'), sde, x0, ts, fpe=fpe, batch_size=2,
                             generator=torch.Generator().manual_seed(4))
  torch.testing.assert_close(seen['conservativity'], seen['residual'], rtol=0, atol=0)
  # The value at a t is the mean of the per-sample metric over the x_t drawn there.
  gen = torch.Generator().manual_seed(4)
  per_sample = torch.cat([score_fpe.conservativity(model, x_t, t)
                          for x_t, t in score_fpe.perturbed_batches(sde, x0, ts[0], 2, gen)])
  assert per_sample.shape == (5,)
  np.testing.assert_allclose(out[0], per_sample.mean().item(), rtol=1e-12)
  # The exact score of N(0, I) data: zero at every t.
  data = helpers.GaussianData(torch.zeros(3), torch.ones(3))
  zero = score_fpe.conservativity_vs_time(lambda x, t: data.score(sde, x, t), sde, x0, ts, num_probes=2)
  assert np.abs(zero).max() < 1e-10


@pytest.mark.parametrize('bad', [-1, 1.5, True, '2'])
def test_invalid_num_probes_raise(bad):
  x = torch.randn(2, 2, dtype=torch.float64)
  with pytest.raises(ValueError, match='num_probes'):
    score_fpe.conservativity(lambda x, t: x, x, torch.zeros(2), num_probes=bad)
