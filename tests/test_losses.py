"""Tests of losses.py: Score SDE's losses and step functions, and the FP-Diffusion term through them."""

import ast
import copy
import inspect
import math

import ml_collections
import numpy as np
import pytest
import torch

import losses
import score_fpe
import sde_lib
from configs.default_cifar10_configs import get_default_configs
from models.ema import ExponentialMovingAverage

SDES = {
    've': lambda: sde_lib.VESDE(sigma_min=0.01, sigma_max=50., N=1000),
    'vp': lambda: sde_lib.VPSDE(beta_min=0.1, beta_max=20., N=1000),
    'subvp': lambda: sde_lib.subVPSDE(beta_min=0.1, beta_max=20., N=1000),
}


def time_from_label(sde, labels):
  """Inverts `sde.network_time_label(t, continuous=True)`."""
  if isinstance(sde, sde_lib.VESDE):
    return torch.log(labels / sde.sigma_min) / math.log(sde.sigma_max / sde.sigma_min)
  return labels / 999


class GaussianScoreModel(torch.nn.Module):
  """Network whose score (through `sde.score_from_output`) is the exact score of N(mu, s0^2 I) data, times
  (1 + inconsistency * t): inconsistency = 0 satisfies the score FPE, anything else does not."""

  def __init__(self, sde, mu=0.3, s0=0.7, inconsistency=0.):
    super().__init__()
    self.sde, self.mu, self.s0, self.inconsistency = sde, mu, s0, inconsistency
    self.scale = torch.nn.Parameter(torch.ones((), dtype=torch.float64))

  def forward(self, x, labels):
    t = time_from_label(self.sde, labels)
    a, std = self.sde.marginal_prob(torch.ones_like(x), t)
    std = std.reshape(-1, *([1] * (x.dim() - 1)))
    score = -(x - a * self.mu) / (a ** 2 * self.s0 ** 2 + std ** 2)
    score = score * (1 + self.inconsistency * t.reshape(std.shape)) * self.scale
    return score if isinstance(self.sde, sde_lib.VESDE) else -std * score


class LabelMLP(torch.nn.Module):
  """A tiny network (x, label) -> output of x's shape, for any shape; the label enters as log(1 + label)."""

  def __init__(self, dim, hidden=32, dropout=0.):
    super().__init__()
    self.net = torch.nn.Sequential(torch.nn.Linear(dim + 1, hidden), torch.nn.SiLU(), torch.nn.Dropout(dropout),
                                   torch.nn.Linear(hidden, hidden), torch.nn.SiLU(), torch.nn.Linear(hidden, dim))

  def forward(self, x, labels):
    h = torch.cat([x.reshape(x.shape[0], -1), torch.log1p(labels.to(x.dtype))[:, None]], dim=1)
    return self.net(h).reshape(x.shape)


def _mlp(dim, seed=0, dtype=torch.float64, dropout=0.):
  torch.manual_seed(seed)
  return LabelMLP(dim, dropout=dropout).to(dtype)


def _fixed_t_z(batch, seed=0):
  gen = torch.Generator().manual_seed(seed)
  t = torch.rand(batch.shape[0], generator=gen, dtype=batch.dtype) * 0.98 + 0.01
  z = torch.randn(batch.shape, generator=gen, dtype=batch.dtype)
  return t, z


DETERMINISTIC = dict(fp_time_derivative='forward_ad', fp_divergence='exact')


def _terms(sde, model, batch, t, z, **kwargs):
  kwargs = {'likelihood_weighting': False, 'reduce_mean': True, **kwargs}
  loss_fn = losses.get_sde_loss_fn(sde, train=False, return_terms=True, **kwargs)
  return loss_fn(model, batch, t=t, z=z)


# ----- Score SDE's parts -----

@pytest.mark.parametrize('name', sorted(SDES))
@pytest.mark.parametrize('likelihood_weighting', [False, True])
def test_dsm_of_exact_score_equals_its_minimum(name, likelihood_weighting):
  """E|s std + z|^2 per dimension is a^2 s0^2 / v for the exact score (v = a^2 s0^2 + std^2), times g^2/std^2
  with likelihood weighting."""
  sde = SDES[name]()
  model = GaussianScoreModel(sde)
  n, t_value = 20000, 0.3
  torch.manual_seed(0)
  batch = model.mu + model.s0 * torch.randn(n, 2, dtype=torch.float64)
  t = torch.full((n,), t_value, dtype=torch.float64)
  z = torch.randn_like(batch)
  loss = losses.get_sde_loss_fn(sde, train=False, reduce_mean=True, likelihood_weighting=likelihood_weighting)(
      model, batch, t=t, z=z)
  a, std = sde.marginal_prob(torch.ones(1, dtype=torch.float64), t[:1])
  v = a ** 2 * model.s0 ** 2 + std ** 2
  expected = a ** 2 * model.s0 ** 2 / v
  if likelihood_weighting:
    expected = expected * sde.diffusion(t[:1]) ** 2 / std ** 2
  assert abs(loss.item() / expected.item() - 1) < 0.03
  # reduce_mean=False sums over the D = 2 dimensions with Score SDE's factor 1/2.
  loss_sum = losses.get_sde_loss_fn(sde, train=False, reduce_mean=False,
                                    likelihood_weighting=likelihood_weighting)(model, batch, t=t, z=z)
  torch.testing.assert_close(loss_sum, loss)


def test_optimizer_and_optimization_manager():
  config = get_default_configs()
  model = torch.nn.Linear(3, 1)
  opt = losses.get_optimizer(config, model.parameters())
  assert isinstance(opt, torch.optim.Adam) and opt.defaults['betas'] == (0.9, 0.999)
  config.optim.warmup = 10
  config.optim.grad_clip = 0.5
  optimize_fn = losses.optimization_manager(config)
  model.weight.grad = torch.full_like(model.weight, 100.)
  model.bias.grad = torch.zeros_like(model.bias)
  optimize_fn(opt, model.parameters(), step=3)
  assert opt.param_groups[0]['lr'] == pytest.approx(config.optim.lr * 0.3)
  assert model.weight.grad.norm().item() == pytest.approx(0.5, rel=1e-5)
  optimize_fn(opt, model.parameters(), step=50)
  assert opt.param_groups[0]['lr'] == pytest.approx(config.optim.lr)
  # Without warmup the config's rate still applies, e.g. to an optimizer restored with another rate.
  config.optim.warmup = 0
  for g in opt.param_groups:
    g['lr'] = 0.123
  losses.optimization_manager(config)(opt, model.parameters(), step=1)
  assert opt.param_groups[0]['lr'] == config.optim.lr
  config.optim.optimizer = 'SGD'
  with pytest.raises(ValueError, match=r"config.optim.optimizer='SGD'.*'Adam'"):
    losses.get_optimizer(config, model.parameters())


def test_cosine_schedule_after_warmup():
  config = get_default_configs()
  model = torch.nn.Linear(3, 1)
  opt = losses.get_optimizer(config, model.parameters())
  model.weight.grad, model.bias.grad = torch.zeros_like(model.weight), torch.zeros_like(model.bias)
  config.optim.warmup, config.training.n_iters, config.optim.schedule = 10, 100, 'cosine'
  optimize_fn = losses.optimization_manager(config)
  # step 5: warmup 5/10 times the cosine at 5/100; step 25: cos(pi / 4) = 1/sqrt(2); from n_iters on: 0.
  for step, factor in ((5, 0.5 * 0.5 * (1 + math.cos(math.pi / 20))), (25, 0.5 * (1 + 2 ** -0.5)), (50, 0.5),
                       (100, 0.), (150, 0.)):
    optimize_fn(opt, model.parameters(), step=step)
    assert opt.param_groups[0]['lr'] == pytest.approx(config.optim.lr * factor, abs=1e-12), step
  config.optim.schedule = 'linear'
  with pytest.raises(ValueError, match=r"config.optim.schedule='linear'.*'constant', 'cosine'"):
    losses.optimization_manager(config)


def _state(model, lr=1e-3):
  return {'model': model, 'optimizer': torch.optim.Adam(model.parameters(), lr=lr),
          'ema': ExponentialMovingAverage(model.parameters(), decay=0.9), 'step': 0}


def _optimize_fn(optimizer, params, step):
  optimizer.step()


def test_discrete_losses_and_their_restrictions():
  batch = torch.rand(8, 1, 2, 2)
  for name in ('ve', 'vp'):
    step = losses.get_step_fn(SDES[name](), train=True, optimize_fn=_optimize_fn, continuous=False)
    state = _state(_mlp(4, dtype=torch.float32))
    loss = step(state, batch)
    assert loss.dim() == 0 and torch.isfinite(loss) and state['step'] == 1
  with pytest.raises(ValueError, match='subVPSDE'):
    losses.get_step_fn(SDES['subvp'](), train=True, optimize_fn=_optimize_fn, continuous=False)
  with pytest.raises(ValueError, match='training.alpha'):
    losses.get_step_fn(SDES['vp'](), train=True, optimize_fn=_optimize_fn, continuous=False, alpha=0.1)
  with pytest.raises(ValueError, match='Likelihood weighting'):
    losses.get_step_fn(SDES['vp'](), train=True, optimize_fn=_optimize_fn, continuous=False,
                       likelihood_weighting=True)


# ----- The FP term through the loss -----

@pytest.mark.parametrize('name', sorted(SDES))
@pytest.mark.parametrize('shape', [(2, 5, 3), (2, 1, 1)])
def test_vector_term_vanishes_for_exact_score(name, shape):
  sde = SDES[name]()
  torch.manual_seed(0)
  batch = 0.3 + 0.7 * torch.randn(6, *shape, dtype=torch.float64)
  t, z = _fixed_t_z(batch)
  t[0], t[-1] = 1e-5, 1.
  for estimator in (dict(), DETERMINISTIC):
    kwargs = dict(scalar_fp='False', alpha=1., **estimator)
    exact = _terms(sde, GaussianScoreModel(sde), batch, t, z, **kwargs)
    bad = _terms(sde, GaussianScoreModel(sde, inconsistency=0.3), batch, t, z, **kwargs)
    assert torch.isfinite(exact['loss']) and torch.isnan(exact['fp_scalar'])
    tol = 1e-10 if estimator else 1e-5
    assert exact['fp_vector'] <= tol * bad['fp_vector'], (exact['fp_vector'], bad['fp_vector'])


def _expected_vector_term(sde, model, x, t, wgt, m):
  score_fn = lambda y, tt: sde.score_from_output(model(y, sde.network_time_label(tt, True)), y, tt, True)
  r = score_fpe.score_fpe_residuals(score_fn, sde, x, t, scalar=False, time_derivative='forward_ad',
                                    divergence='exact')['vector']
  lam = {'constant': torch.ones_like(t), 'convention': sde.diffusion(t), 'll': sde.diffusion(t) ** 2}[wgt]
  D = r[0].numel()
  return torch.mean(lam * r.reshape(r.shape[0], -1).norm(dim=1) ** m) / D ** m


def test_knobs_change_the_loss_as_they_should():
  sde = SDES['vp']()
  model = _mlp(3)
  torch.manual_seed(0)
  batch = torch.randn(6, 3, 1, 1, dtype=torch.float64)
  t, z = _fixed_t_z(batch)
  mean, std = sde.marginal_prob(batch, t)
  x_t = mean + std[:, None, None, None] * z
  base = dict(DETERMINISTIC, alpha=1., beta=1., scalar_fp='both')
  ref = _terms(sde, model, batch, t, z, **base)
  torch.testing.assert_close(ref['loss'], ref['dsm'] + ref['fp_vector'] + ref['fp_scalar'])
  # DSM is unchanged by the FP term.
  torch.testing.assert_close(ref['dsm'], _terms(sde, model, batch, t, z)['dsm'])
  # alpha and beta scale their terms.
  scaled = _terms(sde, model, batch, t, z, **dict(base, alpha=2.5, beta=0.1))
  torch.testing.assert_close(scaled['loss'], ref['dsm'] + 2.5 * ref['fp_vector'] + 0.1 * ref['fp_scalar'])
  # scalar_fp selects the terms; a term with weight 0 is not computed.
  vec_only = _terms(sde, model, batch, t, z, **dict(base, scalar_fp='False'))
  sc_only = _terms(sde, model, batch, t, z, **dict(base, scalar_fp='True'))
  off = _terms(sde, model, batch, t, z, **dict(base, alpha=0., beta=0.))
  torch.testing.assert_close(vec_only['loss'], ref['dsm'] + ref['fp_vector'])
  torch.testing.assert_close(sc_only['loss'], ref['dsm'] + ref['fp_scalar'])
  assert torch.isnan(vec_only['fp_scalar']) and torch.isnan(sc_only['fp_vector'])
  assert torch.isnan(off['fp_vector']) and torch.isnan(off['fp_scalar'])
  torch.testing.assert_close(off['loss'], ref['dsm'])
  # fp_wgt_type and m: lambda(t) |r|^m / D^m against the residual computed directly at x_t.
  for wgt in ('constant', 'convention', 'll'):
    for m in (1, 2, 3):
      terms = _terms(sde, model, batch, t, z, **dict(base, scalar_fp='False', fp_wgt_type=wgt, m=m))
      torch.testing.assert_close(terms['fp_vector'], _expected_vector_term(sde, model, x_t, t, wgt, m))
  # The scalar term is the L2 norm over the batch of 1/2 g^2 (div s + |s|^2) - <f, s>.
  score_fn = lambda y, tt: sde.score_from_output(model(y, sde.network_time_label(tt, True)), y, tt, True)
  sc = score_fpe.score_fpe_residuals(score_fn, sde, x_t, t, vector=False, divergence='exact')['scalar']
  torch.testing.assert_close(ref['fp_scalar'], sc.norm())
  # fp_dist: 'x' evaluates at the clean data (same t), 'random' inside the batch's range.
  at_x = _terms(sde, model, batch, t, z, **dict(base, scalar_fp='False', fp_dist='x'))
  torch.testing.assert_close(at_x['fp_vector'], _expected_vector_term(sde, model, batch, t, 'll', 2))
  assert not torch.isclose(at_x['fp_vector'], ref['fp_vector'])


def test_random_fp_dist_stays_in_the_data_range():
  sde = SDES['ve']()
  seen = []
  model = _mlp(4)
  hook = model.register_forward_pre_hook(lambda mod, inputs: seen.append(inputs[0].detach().clone()))
  batch = torch.rand(5, 1, 2, 2, dtype=torch.float64) * 0.5 + 0.2
  t, z = _fixed_t_z(batch)
  terms = _terms(sde, model, batch, t, z, scalar_fp='True', beta=1., fp_dist='random', **DETERMINISTIC)
  hook.remove()
  assert torch.isfinite(terms['fp_scalar'])
  fp_inputs = seen[-1]  # the FP evaluation comes after the DSM's
  assert fp_inputs.min() >= batch.min() and fp_inputs.max() <= batch.max()
  assert not torch.allclose(fp_inputs, batch)


def test_batch_fraction_uses_the_first_samples():
  sde = SDES['subvp']()
  model = _mlp(4)
  torch.manual_seed(0)
  batch = torch.randn(8, 4, dtype=torch.float64)
  t, z = _fixed_t_z(batch)
  base = dict(DETERMINISTIC, alpha=1., beta=1.)
  seen = []
  hook = model.register_forward_pre_hook(lambda mod, inputs: seen.append(inputs[0].shape[0]))
  quarter = _terms(sde, model, batch, t, z, fp_batch_fraction=0.25, **base)
  hook.remove()
  assert max(seen) == 6 and 2 in seen  # FP part (2 samples) and the rest (6) are evaluated separately
  first = _terms(sde, model, batch[:2], t[:2], z[:2], **base)
  full = _terms(sde, model, batch, t, z, **base)
  torch.testing.assert_close(quarter['fp_vector'], first['fp_vector'])
  torch.testing.assert_close(quarter['fp_scalar'], first['fp_scalar'] * 2)  # sqrt(B / k) = 2
  torch.testing.assert_close(quarter['dsm'], full['dsm'])
  assert not torch.isclose(quarter['fp_vector'], full['fp_vector'])
  # ceil: 0.3 of 8 samples is 3.
  seen.clear()
  hook = model.register_forward_pre_hook(lambda mod, inputs: seen.append(inputs[0].shape[0]))
  _terms(sde, model, batch, t, z, fp_batch_fraction=0.3, **base)
  hook.remove()
  assert 3 in seen and 5 in seen


@pytest.mark.parametrize('fp_time_derivative', ['finite_difference', 'forward_ad'])
def test_three_network_evaluations_at_most(fp_time_derivative):
  sde = SDES['vp']()
  model = _mlp(4, dtype=torch.float32)
  calls = []
  model.register_forward_pre_hook(lambda mod, inputs: calls.append(1))
  step = losses.get_step_fn(sde, train=True, optimize_fn=_optimize_fn, alpha=0.1, beta=0.1,
                            fp_time_derivative=fp_time_derivative)
  step(_state(model), torch.randn(4, 4))
  assert len(calls) == (3 if fp_time_derivative == 'finite_difference' else 1)


def test_vp_is_nan_free_at_eps_and_T():
  sde = SDES['vp']()
  model = _mlp(3, dtype=torch.float32)
  batch = torch.rand(4, 3) * 2 - 1
  for t_value in (1e-5, 1.):
    t = torch.full((4,), t_value)
    for scalar_fp in ('False', 'True', 'both'):
      loss_fn = losses.get_sde_loss_fn(sde, train=True, alpha=0.15, beta=0.01, scalar_fp=scalar_fp,
                                       likelihood_weighting=True, reduce_mean=False)
      loss = loss_fn(model, batch, t=t)
      assert torch.isfinite(loss)
      loss.backward()
      assert all(torch.isfinite(p.grad).all() for p in model.parameters())
      model.zero_grad()


def test_train_and_eval_steps_report_terms():
  sde = SDES['ve']()
  model = _mlp(4, dtype=torch.float32, dropout=0.1)
  state = _state(model)
  batch = torch.rand(6, 1, 2, 2)
  kwargs = dict(alpha=0.15, beta=0.01, likelihood_weighting=True, return_terms=True)
  train_step = losses.get_step_fn(sde, train=True, optimize_fn=_optimize_fn, **kwargs)
  eval_step = losses.get_step_fn(sde, train=False, **kwargs)
  before = [p.detach().clone() for p in model.parameters()]
  terms = train_step(state, batch)
  assert state['step'] == 1
  assert set(terms) == {'loss', 'dsm', 'fp_vector', 'fp_scalar'}
  for value in terms.values():
    assert value.dim() == 0 and not value.requires_grad and torch.isfinite(value)
  assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
  # EMA was updated towards the new weights.
  assert any(not torch.equal(b, s) for b, s in zip(before, state['ema'].shadow_params))
  params = [p.detach().clone() for p in model.parameters()]
  with torch.no_grad():  # as run_lib may call it
    eval_terms = eval_step(state, batch)
  for value in eval_terms.values():
    assert value.dim() == 0 and not value.requires_grad and torch.isfinite(value)
  # Evaluation leaves the weights, their grad flags and their .grad untouched.
  for p, q in zip(model.parameters(), params):
    assert torch.equal(p, q) and p.requires_grad
  grads = [p.grad for p in model.parameters()]
  eval_step(state, batch)
  assert all(g is None or torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))
  # Without return_terms the step returns the loss tensor.
  loss = losses.get_step_fn(sde, train=False, alpha=0.15)(state, batch)
  assert loss.dim() == 0


def test_eval_step_uses_ema_weights():
  sde = SDES['vp']()
  model = GaussianScoreModel(sde)
  state = _state(model)
  state['ema'].shadow_params[0].fill_(2.)  # EMA score = 2 x exact score
  batch = torch.randn(64, 2, dtype=torch.float64)
  eval_step = losses.get_step_fn(sde, train=False, return_terms=True, alpha=1., scalar_fp='False',
                                 fp_time_derivative='forward_ad')
  terms = eval_step(state, batch)
  assert terms['fp_vector'] > 1e-6  # 2 x the exact score does not satisfy the FPE
  assert model.scale.item() == 1.
  state['ema'].shadow_params[0].fill_(1.)
  assert eval_step(state, batch)['fp_vector'] < 1e-8 * terms['fp_vector']


def _config(**training):
  config = get_default_configs()
  # A plain dict round trip, so that a field may be set to a value of another type (e.g. a bool).
  fields = config.training.to_dict()
  fields.update(sde='vpsde', **training)
  config.training = ml_collections.ConfigDict(fields)
  return config


@pytest.mark.parametrize('field, value', [
    ('scalar_fp', False), ('scalar_fp', 'yes'), ('fp_wgt_type', 'g2'), ('alpha', -0.1), ('beta', float('nan')),
    ('m', 0), ('fp_dist', 'data'), ('fp_time_derivative', 'exact'), ('fp_fd_hs', 0.), ('fp_fd_hd', -1e-3),
    ('fp_divergence', 'trace'), ('fp_hutchinson_type', 'Gaussian'), ('fp_num_probes', 0),
    ('fp_dropout_masks', 'released'),
    ('fp_batch_fraction', 0.), ('fp_batch_fraction', 1.5), ('continuous', 'yes'), ('likelihood_weighting', 2),
])
def test_invalid_knobs_raise_naming_the_field(field, value):
  config = _config(**{field: value})
  with pytest.raises(ValueError, match=f'config.training.{field}'):
    losses.step_fn_from_config(config, SDES['vp'](), train=False)


def test_step_fn_from_config_reads_every_knob():
  sde = SDES['vp']()
  model = _mlp(3)
  torch.manual_seed(0)
  batch = torch.randn(4, 3, dtype=torch.float64)
  config = _config(alpha=0.5, beta=0.2, scalar_fp='False', fp_wgt_type='constant', m=1,
                   fp_time_derivative='forward_ad', fp_divergence='exact', fp_batch_fraction=0.5)
  state = _state(model)
  torch.manual_seed(1)
  terms = losses.step_fn_from_config(config, sde, train=False, return_terms=True)(state, batch)
  torch.manual_seed(1)
  direct = losses.get_step_fn(sde, train=False, return_terms=True, alpha=0.5, beta=0.2, scalar_fp='False',
                              fp_wgt_type='constant', m=1, fp_time_derivative='forward_ad', fp_divergence='exact',
                              fp_batch_fraction=0.5, reduce_mean=False, likelihood_weighting=False)(state, batch)
  for key in terms:
    torch.testing.assert_close(terms[key], direct[key], equal_nan=True)
  assert torch.isnan(terms['fp_scalar'])
  with pytest.raises(ValueError, match='optimize_fn'):
    losses.step_fn_from_config(config, sde, train=True)


def test_fine_tuning_with_fp_lowers_the_residual():
  """A DSM-pretrained MLP on 2-D Gaussian data (VP), fine-tuned for 60 steps with and without the FP term.

  Times are drawn from [0.05, 1] in training and in the measurement: near t = 0 the VP score model's output
  is divided by std(t) -> 0, its residual is orders of magnitude larger there and would dominate both.
  """
  sde = SDES['vp']()
  eps = 0.05
  torch.manual_seed(0)
  mean = torch.tensor([1., -0.5], dtype=torch.float64)
  scale = torch.tensor([0.6, 0.3], dtype=torch.float64)

  def data(n):
    return mean + scale * torch.randn(n, 2, dtype=torch.float64)

  def fit(model, steps, lr, **fp):
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = losses.get_sde_loss_fn(sde, True, reduce_mean=True, likelihood_weighting=False, eps=eps,
                                     return_terms=True, **fp)
    for _ in range(steps):
      optimizer.zero_grad()
      terms = loss_fn(model, data(128))
      terms['loss'].backward()
      optimizer.step()
    return terms

  model = _mlp(2)
  threads = torch.get_num_threads()
  torch.set_num_threads(1)  # tiny matrices: a second thread only adds synchronisation
  try:
    fit(model, 200, 3e-3)
    results = _fine_tune_and_measure(sde, model, data, fit, eps)
  finally:
    torch.set_num_threads(threads)
  # Measured when written: 8.0 (DSM alone) and 4.4 (DSM + FP).
  assert results[0.1] < 0.75 * results[0.], results


def _fine_tune_and_measure(sde, model, data, fit, eps):
  results = {}
  for alpha in (0., 0.1):
    tuned = copy.deepcopy(model)
    torch.manual_seed(1)
    fit(tuned, 60, 1e-3, alpha=alpha, scalar_fp='False', fp_wgt_type='ll', fp_time_derivative='forward_ad',
        fp_divergence='exact')
    score_fn = lambda y, tt, net=tuned: sde.score_from_output(net(y, sde.network_time_label(tt, True)), y, tt,
                                                              True)
    fpe = score_fpe.ScoreFPE(sde, eps=eps, time_derivative='forward_ad', divergence='exact')
    torch.manual_seed(2)
    out = score_fpe.residual_vs_time(score_fn, sde, data(256), np.linspace(eps, 1., 8), fpe=fpe,
                                     generator=torch.Generator().manual_seed(3))
    results[alpha] = out['residual'].mean()
  return results


# ----- The FP options through the Score SDE-style wrappers -----

def _dropout_terms(fp_dropout_masks, wrapper):
  """The train-mode terms of an MLP with dropout, the finite difference's masks shared or independent."""
  sde = SDES['vp']()
  model = _mlp(4, dtype=torch.float32, dropout=0.5)
  batch = torch.rand(6, 4)
  kwargs = dict(alpha=1., scalar_fp='False', fp_divergence='exact', fp_dropout_masks=fp_dropout_masks,
                return_terms=True)
  torch.manual_seed(3)
  if wrapper == 'loss_fn':
    return losses.get_sde_loss_fn(sde, True, **kwargs)(model, batch)
  return losses.get_step_fn(sde, True, _optimize_fn, **kwargs)(_state(model), batch)


@pytest.mark.parametrize('wrapper', ['loss_fn', 'step_fn'])
def test_fp_dropout_masks_reaches_both_wrappers(wrapper):
  shared, independent = _dropout_terms('shared', wrapper), _dropout_terms('independent', wrapper)
  # Same draws of t, z and the DSM's masks; the finite difference of independent masks divides the difference
  # of two dropout draws by a step of ~1e-3.
  torch.testing.assert_close(shared['dsm'], independent['dsm'], rtol=0, atol=0)
  assert independent['fp_vector'] > 100 * shared['fp_vector']
  with pytest.raises(ValueError, match='config.training.fp_dropout_masks'):
    _dropout_terms('same', wrapper)


def test_wrappers_refuse_an_unknown_fp_option():
  sde = SDES['vp']()
  with pytest.raises(TypeError, match="'fp_num_probe'.*Did you mean 'fp_num_probes'"):
    losses.get_sde_loss_fn(sde, True, fp_num_probe=2)
  with pytest.raises(TypeError, match="'alhpa'.*Did you mean 'alpha'"):
    losses.get_step_fn(sde, True, _optimize_fn, alhpa=0.1)


def test_score_sde_positional_parameters():
  sde = SDES['vp']()
  params = list(inspect.signature(losses.get_sde_loss_fn).parameters)
  assert params[:6] == ['sde', 'train', 'reduce_mean', 'continuous', 'likelihood_weighting', 'eps']
  params = list(inspect.signature(losses.get_step_fn).parameters)
  assert params[:6] == ['sde', 'train', 'optimize_fn', 'reduce_mean', 'continuous', 'likelihood_weighting']
  model = _mlp(4, dtype=torch.float32)
  batch = torch.rand(4, 4)
  assert losses.get_sde_loss_fn(sde, True, False, True, False, 1e-3)(model, batch).dim() == 0
  state = _state(model)
  assert losses.get_step_fn(sde, True, _optimize_fn, True, True, False)(state, batch).dim() == 0
  assert state['step'] == 1


def test_losses_sits_below_the_trainer():
  """losses.py imports nothing from the trainer or above it (not even inside a function)."""
  with open(losses.__file__) as f:
    tree = ast.parse(f.read())
  imported = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      imported.update(alias.name.split('.')[0] for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      imported.add((node.module or '').split('.')[0])
  assert not imported & {'trainer', 'run_lib', 'main', 'distributed', 'demo', 'study', 'digits_study'}


def test_train_step_without_optimize_fn_refuses_before_touching_the_state():
  model = _mlp(4, dtype=torch.float32)
  state = _state(model)
  step = losses.get_step_fn(SDES['vp'](), train=True)
  with pytest.raises(ValueError, match='optimize_fn'):
    step(state, torch.rand(4, 4))
  assert state['step'] == 0 and all(p.grad is None for p in model.parameters())
