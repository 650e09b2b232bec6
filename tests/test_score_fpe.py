"""Tests of score_fpe.py: the score-FPE residuals and their estimators against exact answers."""

import inspect
import math

import numpy as np
import pytest
import torch

import score_fpe
import sde_lib
from configs.default_cifar10_configs import get_default_configs

SDES = {
    've': lambda: sde_lib.VESDE(sigma_min=0.01, sigma_max=50., N=1000),
    'vp': lambda: sde_lib.VPSDE(beta_min=0.1, beta_max=20., N=1000),
    'subvp': lambda: sde_lib.subVPSDE(beta_min=0.1, beta_max=20., N=1000),
}


def gaussian_score(sde, x, t, mu, s0):
  """Exact score of p_t when the data are N(mu, s0^2 I): -(x - a(t) mu) / (a(t)^2 s0^2 + std(t)^2)."""
  a, std = sde.marginal_prob(torch.ones_like(x), t)
  var = a ** 2 * s0 ** 2 + std.reshape(-1, *([1] * (x.dim() - 1))) ** 2
  return -(x - a * mu) / var


class TinyMLP(torch.nn.Module):
  """A smooth score function of (x, t) for any shape of x: an MLP on the flattened x and t."""

  def __init__(self, dim, hidden=16):
    super().__init__()
    self.net = torch.nn.Sequential(torch.nn.Linear(dim + 1, hidden), torch.nn.Tanh(),
                                   torch.nn.Linear(hidden, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, dim))

  def forward(self, x, t):
    h = torch.cat([x.reshape(x.shape[0], -1), t[:, None].to(x.dtype)], dim=1)
    return self.net(h).reshape(x.shape)


def _tiny_mlp(dim, seed=0):
  torch.manual_seed(seed)
  return TinyMLP(dim).double()


@pytest.mark.parametrize('name', sorted(SDES))
@pytest.mark.parametrize('shape', [(2, 5, 3), (2, 1, 1)])
@pytest.mark.parametrize('time_derivative', ['finite_difference', 'forward_ad'])
def test_exact_score_satisfies_score_fpe(name, shape, time_derivative):
  sde = SDES[name]()
  torch.manual_seed(1)
  B = 6
  mu, s0 = 0.3, 0.7
  x = torch.randn(B, *shape, dtype=torch.float64) * 2
  t = torch.tensor([1e-5, 1e-3, 0.1, 0.5, 0.999, 1.], dtype=torch.float64)

  def exact(x, t):
    return gaussian_score(sde, x, t, mu, s0)

  def inconsistent(x, t):
    return exact(x, t) * (1 + 0.3 * t.reshape(-1, *([1] * len(shape))))

  kwargs = dict(time_derivative=time_derivative, divergence='hutchinson')
  r_exact = score_fpe.score_fpe_residuals(exact, sde, x, t, scalar=False, **kwargs)['vector']
  r_bad = score_fpe.score_fpe_residuals(inconsistent, sde, x, t, scalar=False, **kwargs)['vector']
  assert torch.isfinite(r_exact).all() and torch.isfinite(r_bad).all()
  per_sample_exact = r_exact.reshape(B, -1).norm(dim=1)
  per_sample_bad = r_bad.reshape(B, -1).norm(dim=1)
  tol = 1e-3 if time_derivative == 'finite_difference' else 1e-10
  assert (per_sample_exact <= tol * per_sample_bad).all(), (per_sample_exact, per_sample_bad)


def test_finite_difference_is_exact_for_quadratics_and_stays_in_range():
  eps, T = 1e-5, 1.
  seen = []

  def score_fn(x, t):
    seen.append(t.detach().clone())
    tt = t[:, None]
    return x * (tt ** 2 - 3 * tt + 1)

  t = torch.tensor([eps, 2e-5, 5e-4, 1e-3, 0.5, 1 - 4e-4, 1 - 1e-5, 1.], dtype=torch.float64)
  x = torch.randn(len(t), 3, dtype=torch.float64)
  dsdt = score_fpe.finite_difference_time_derivative(score_fn, x, t, eps=eps, T=T)
  torch.testing.assert_close(dsdt, x * (2 * t[:, None] - 3), rtol=1e-8, atol=1e-8)
  all_t = torch.cat(seen)
  assert all_t.min() >= eps and all_t.max() <= T
  # The released stencil's weights where it fits.
  t_a, a, t_b, b = score_fpe.finite_difference_nodes(torch.tensor([0.5], dtype=torch.float64), 1e-3, 5e-4, eps, T)
  w_a, w_0, w_b = score_fpe.finite_difference_weights(a, b)
  hs, hd = 1e-3, 5e-4
  den = hs * hd * (hs + hd)
  torch.testing.assert_close(torch.cat([w_a, w_0, w_b]),
                             torch.tensor([-hd ** 2 / den, (hd ** 2 - hs ** 2) / den, hs ** 2 / den],
                                          dtype=torch.float64))


@pytest.mark.parametrize('name', ['vp', 've'])
def test_forward_ad_and_finite_difference_agree(name):
  sde = SDES[name]()
  model = _tiny_mlp(6)
  x = torch.randn(5, 2, 3, dtype=torch.float64, requires_grad=True)
  t = torch.tensor([1e-5, 3e-4, 0.3, 0.9998, 1.], dtype=torch.float64)
  s, dsdt_ad = score_fpe.score_and_time_derivative(model, x, t)
  torch.testing.assert_close(s, model(x, t))
  dsdt_fd = score_fpe.finite_difference_time_derivative(model, x, t, s=s, eps=1e-5, T=sde.T)
  torch.testing.assert_close(dsdt_fd, dsdt_ad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('hutchinson_type', ['gaussian', 'rademacher'])
def test_hutchinson_divergence_is_unbiased(hutchinson_type):
  model = _tiny_mlp(4)
  n = 4000
  x0 = torch.randn(1, 4, dtype=torch.float64)
  x = x0.repeat(n, 1).requires_grad_(True)
  t = torch.full((n,), 0.4, dtype=torch.float64)
  s = model(x, t)
  exact = score_fpe.exact_divergence(s, x)
  assert torch.allclose(exact, exact[0].expand(n))
  gen = torch.Generator().manual_seed(3)
  est = score_fpe.hutchinson_divergence(s, x, num_probes=1, hutchinson_type=hutchinson_type, generator=gen)
  stderr = est.std() / math.sqrt(n)
  assert stderr > 0
  assert abs(est.mean() - exact[0]) < 4 * stderr
  # Exact divergence against the trace of the autograd Jacobian.
  jac = torch.autograd.functional.jacobian(lambda v: model(v, t[:1]), x0)
  torch.testing.assert_close(exact[0], jac.reshape(4, 4).trace())


def test_probes_have_identity_covariance():
  x = torch.zeros(20000, 3, dtype=torch.float64)
  for kind in ('gaussian', 'rademacher'):
    v = score_fpe.hutchinson_probe(x, kind, torch.Generator().manual_seed(0))
    cov = v.T @ v / v.shape[0]
    torch.testing.assert_close(cov, torch.eye(3, dtype=torch.float64), atol=0.05, rtol=0)
  v = score_fpe.hutchinson_probe(x, 'rademacher')
  assert set(v.unique().tolist()) == {-1., 1.}


def _functional_score(x, t, w1, w2):
  h = torch.tanh(x @ w1 + t[:, None])
  return h @ w2


@pytest.mark.parametrize('time_derivative', ['finite_difference', 'forward_ad'])
def test_residual_gradcheck(time_derivative):
  sde = SDES['vp']()
  torch.manual_seed(0)
  x = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
  w1 = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
  w2 = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
  t = torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64)
  fpe = score_fpe.ScoreFPE(sde, time_derivative=time_derivative, divergence='exact')

  def residual(x, w1, w2):
    def score_fn(y, tt):
      return _functional_score(y, tt, w1, w2)
    ev = fpe.evaluate_score(score_fn, x, t)
    res = fpe.residuals(score_fn, x, t, ev, create_graph=True)
    return res['vector'], res['scalar']

  assert torch.autograd.gradcheck(residual, (x, w1, w2))
  assert torch.autograd.gradgradcheck(residual, (x, w1, w2))


def test_residual_matches_closed_form_for_linear_score():
  """s = -c(t) x (VE): div s = -c D, Phi = g^2/2 (-c D + c^2 |x|^2), grad Phi = g^2 c^2 x, d_t s = -c' x."""
  sde = SDES['ve']()
  D = 3

  def c(t):
    return 1 + t ** 2

  def score_fn(x, t):
    return -c(t)[:, None] * x

  x = torch.randn(4, D, dtype=torch.float64)
  t = torch.tensor([0.1, 0.3, 0.6, 0.9], dtype=torch.float64)
  res = score_fpe.score_fpe_residuals(score_fn, sde, x, t, time_derivative='forward_ad', divergence='exact')
  g2 = sde.diffusion(t) ** 2
  expected_r = -2 * t[:, None] * x - (g2 * c(t) ** 2)[:, None] * x
  torch.testing.assert_close(res['vector'], expected_r)
  expected_sc = 0.5 * g2 * (-c(t) * D + c(t) ** 2 * (x ** 2).sum(1))
  torch.testing.assert_close(res['scalar'], expected_sc)


def test_vp_drift_terms_enter_the_residual():
  """Linear score s = -x/v(t) of N(0, v(t) I) under VP: r = 0 exactly iff v' = -beta v + beta."""
  sde = SDES['vp']()

  def v(t):
    a2 = torch.exp(2 * sde._log_mean_coeff(t))
    return a2 * 0.25 + (1 - a2)

  def score_fn(x, t):
    return -x / v(t)[:, None]

  x = torch.randn(4, 2, dtype=torch.float64)
  t = torch.tensor([0.01, 0.2, 0.5, 0.9], dtype=torch.float64)
  res = score_fpe.score_fpe_residuals(score_fn, sde, x, t, time_derivative='forward_ad', divergence='exact')
  assert res['vector'].abs().max() < 1e-9 * res['time_derivative'].abs().max()


def test_dropout_masks_are_replayed_by_the_finite_difference():
  torch.manual_seed(0)
  model = torch.nn.Sequential(torch.nn.Linear(3, 32), torch.nn.Dropout(0.5), torch.nn.Linear(32, 2)).double()
  model.train()

  def score_fn(x, t):
    return model(torch.cat([x, t[:, None]], 1))

  x = torch.randn(4, 2, dtype=torch.float64)
  t = torch.full((4,), 0.5, dtype=torch.float64)
  fpe = score_fpe.ScoreFPE(SDES['vp'](), time_derivative='finite_difference')
  ev = fpe.evaluate_score(score_fn, x, t)
  dsdt = fpe.time_derivative_of(score_fn, x, t, ev)
  # With the same masks, a network affine in t has d_t s equal to the masked weight path; bounded by the weights.
  model.eval()
  bound = (model[2].weight.abs() @ (2 * model[0].weight[:, 2:].abs())).sum()
  assert dsdt.abs().max() < bound


class _MaskRecordingScore:
  """s(x, t) = (1 + t) m * x with a dropout mask m drawn at each call (recorded): d_t s = m * x."""

  def __init__(self):
    self.masks = []

  def __call__(self, x, t):
    mask = torch.nn.functional.dropout(torch.ones_like(x), p=0.5, training=True)
    self.masks.append(mask)
    return (1 + t)[:, None] * mask * x


@pytest.mark.parametrize('dropout_masks', ['shared', 'independent'])
def test_dropout_masks_shared_are_replayed_independent_are_drawn_anew(dropout_masks):
  torch.manual_seed(0)
  score_fn = _MaskRecordingScore()
  x = torch.randn(8, 16, dtype=torch.float64)
  t = torch.full((8,), 0.5, dtype=torch.float64)
  fpe = score_fpe.ScoreFPE(SDES['vp'](), dropout_masks=dropout_masks)
  ev = fpe.evaluate_score(score_fn, x, t)
  dsdt = fpe.time_derivative_of(score_fn, x, t, ev)
  at_t, *others = score_fn.masks
  assert len(others) == 2
  if dropout_masks == 'shared':
    assert all(torch.equal(m, at_t) for m in others)
    # The three-point formula is exact for s affine in t: d_t s = m * x for the one mask m.
    torch.testing.assert_close(dsdt, at_t * x, rtol=1e-9, atol=1e-9)
  else:
    assert not any(torch.equal(m, at_t) for m in others) and not torch.equal(*others)
    # Mask differences over steps of ~1e-3: the released estimate is ~1e3 times d_t s.
    assert (dsdt - at_t * x).abs().max() > 100 * (at_t * x).abs().max()


def test_independent_dropout_masks_need_the_finite_difference():
  with pytest.raises(ValueError, match=r"config\.training\.fp_dropout_masks='independent'.*forward_ad"):
    score_fpe.ScoreFPE(SDES['vp'](), time_derivative='forward_ad', dropout_masks='independent')


def test_residual_vs_time_reports_finite_arrays():
  sde = SDES['vp']()
  model = _tiny_mlp(2)
  x0 = torch.randn(10, 2, dtype=torch.float64)
  ts = np.linspace(1e-3, 1., 4)
  out = score_fpe.residual_vs_time(model, sde, x0, ts, batch_size=4, generator=torch.Generator().manual_seed(0))
  for key in ('t', 'residual', 'residual_weighted', 'scalar', 'time_derivative'):
    assert out[key].shape == (4,) and np.isfinite(out[key]).all()
  np.testing.assert_allclose(out['t'], ts)
  # The exact score has (numerically) zero residual.
  exact = score_fpe.residual_vs_time(lambda x, t: gaussian_score(sde, x, t, 0., 1.), sde, x0, ts)
  assert exact['residual'].max() < 1e-10 * max(exact['time_derivative'].max(), 1.)
  assert out['residual'].min() > 1e-3


def test_invalid_estimator_options_raise():
  sde = SDES['vp']()
  for kwargs, field in [(dict(time_derivative='exact'), 'fp_time_derivative'), (dict(fd_hs=0.), 'fp_fd_hs'),
                        (dict(fd_hd=0.5), 'fp_fd_hd'), (dict(divergence='trace'), 'fp_divergence'),
                        (dict(hutchinson_type='normal'), 'fp_hutchinson_type'),
                        (dict(num_probes=0), 'fp_num_probes'), (dict(num_probes=1.5), 'fp_num_probes'),
                        (dict(dropout_masks='replayed'), 'fp_dropout_masks')]:
    with pytest.raises(ValueError, match=f'config.training.{field}'):
      score_fpe.ScoreFPE(sde, **kwargs)


# ----- The regularizer's options: one definition -----

def test_fp_options_are_the_config_fields_with_their_defaults():
  config = get_default_configs()
  assert score_fpe.fp_options_from_config(config) == dict(score_fpe.FP_OPTIONS)
  fp_fields = {name for name in config.training if name in ('scalar_fp', 'alpha', 'beta', 'm') or
               name.startswith('fp_')}
  # training.fp_every schedules the terms over optimizer steps (the step's option, losses.LazyRegularization),
  # not what they penalize: a loss function has no step to apply it to.
  assert fp_fields == set(score_fpe.FP_OPTIONS) | {'fp_every'}


def _keyword_defaults(fn):
  return {name: p.default for name, p in inspect.signature(fn).parameters.items()}


def test_each_option_sets_one_constructor_keyword_with_the_same_default():
  assert set(score_fpe.FP_OPTIONS) == set(score_fpe.ESTIMATOR_OPTIONS) | set(score_fpe.REGULARIZER_OPTIONS)
  assert not set(score_fpe.ESTIMATOR_OPTIONS) & set(score_fpe.REGULARIZER_OPTIONS)
  estimator = _keyword_defaults(score_fpe.ScoreFPE.__init__)
  for name, default in score_fpe.ESTIMATOR_OPTIONS.items():
    assert estimator[name[len('fp_'):]] == default, name
  regularizer = _keyword_defaults(score_fpe.ScoreFPERegularizer.__init__)
  for name, default in score_fpe.REGULARIZER_OPTIONS.items():
    assert regularizer[name] == default, name


def test_from_options_sets_every_option():
  sde = SDES['vp']()
  values = dict(scalar_fp='False', fp_dist='x', fp_wgt_type='constant', alpha=0.3, beta=0.2, m=1,
                fp_batch_fraction=0.5, fp_time_derivative='finite_difference', fp_fd_hs=2e-3, fp_fd_hd=1e-3,
                fp_divergence='hutchinson', fp_hutchinson_type='rademacher', fp_num_probes=3,
                fp_dropout_masks='independent')
  assert set(values) == set(score_fpe.FP_OPTIONS)
  reg = score_fpe.ScoreFPERegularizer.from_options(sde, continuous=True, eps=1e-3, **values)
  for name in score_fpe.REGULARIZER_OPTIONS:
    assert getattr(reg, name) == values[name], name
  for name in score_fpe.ESTIMATOR_OPTIONS:
    assert getattr(reg.fpe, name[len('fp_'):]) == values[name], name
  assert reg.fpe.eps == 1e-3
  # Missing options take FP_OPTIONS' defaults.
  default = score_fpe.ScoreFPERegularizer.from_options(sde, continuous=True)
  assert default.fpe.dropout_masks == 'shared' and default.alpha == 0. and not default.active


def test_unknown_option_names_the_closest_and_all():
  with pytest.raises(TypeError, match=r"'fp_dropout_mask'.*Did you mean 'fp_dropout_masks'\?.*fp_num_probes"):
    score_fpe.ScoreFPERegularizer.from_options(SDES['vp'](), continuous=True, fp_dropout_mask='shared')
  with pytest.raises(TypeError, match=r"'nonsense'\. The options"):
    score_fpe.fpe_from_options(SDES['vp'](), nonsense=1)


def test_an_option_is_validated_where_it_is_consumed():
  with pytest.raises(ValueError, match='config.training.fp_dropout_masks'):
    score_fpe.ScoreFPERegularizer.from_options(SDES['vp'](), continuous=True, fp_dropout_masks='same')
  with pytest.raises(ValueError, match='training.continuous'):
    score_fpe.ScoreFPERegularizer.from_options(SDES['vp'](), continuous=False, alpha=0.1)
