"""Samplers against exact answers for Gaussian data, with the exact score as the "model".

The probability flow of Gaussian data is affine per dimension, x(t) - m_t = sqrt(v_t / v_s) (x(s) - m_s), so
the ODE sampler's map from latents to samples is known exactly. The PC samplers are checked for the mean and
variance of p_eps within sampling error plus their O(1/N) discretization error.
"""


import ml_collections
import numpy as np
import pytest
import torch

import sampling
from helpers import SDE_KINDS, ExactScoreModel, GaussianData, make_sde, tiny_ncsnpp_with_sde
from ode_checks import DeviceCheckingModel, NaNAfter, no_host_copies, smooth_tiny_ncsnpp

DATA = GaussianData([1.0, -0.5], [0.5, 0.8])
IDENTITY = lambda v: v
BACKENDS = ('scipy', 'torch')


def exact_ode_map(sde, data, z, eps):
  B = z.shape[0]
  m_eps, v_eps = data.marginal(sde, torch.full((B,), eps, dtype=torch.float64))
  m_T, v_T = data.marginal(sde, torch.full((B,), float(sde.T), dtype=torch.float64))
  return m_eps + torch.sqrt(v_eps / v_T) * (z - m_T)


def p_eps_moments(sde, data, eps):
  m, v = data.marginal(sde, torch.full((1,), eps, dtype=torch.float64))
  return m[0], v[0]


# ---------------------------------------------------------------------------------------------------------
# ODE sampler


@pytest.mark.parametrize('backend', BACKENDS)
@pytest.mark.parametrize('kind', SDE_KINDS)
def test_ode_sampler_maps_latents_exactly(kind, backend):
  torch.manual_seed(0)
  sde = make_sde(kind)
  data = GaussianData(torch.tensor([1.0, -0.5, 0.3, 2.]).reshape(1, 2, 2),
                      torch.tensor([0.5, 0.8, 1.2, 0.2]).reshape(1, 2, 2))
  z = sde.prior_sampling((5, 1, 2, 2)).double()
  eps = sde.sampling_eps
  sampler = sampling.get_ode_sampler(sde, (5, 1, 2, 2), IDENTITY, denoise=False, eps=eps, device='cpu',
                                     backend=backend)
  x, nfe = sampler(ExactScoreModel(sde, data), z=z)
  expected = exact_ode_map(sde, data, z, eps)
  assert x.shape == z.shape and x.dtype == torch.float64
  assert isinstance(nfe, int) and nfe > 0
  assert torch.allclose(x, expected, atol=1e-3 * float(expected.abs().max()), rtol=0)


@pytest.mark.parametrize('backend', BACKENDS)
@pytest.mark.parametrize('kind', SDE_KINDS)
def test_ode_sampler_from_prior_has_data_moments(kind, backend):
  torch.manual_seed(1)
  sde = make_sde(kind)
  B = 4000
  eps = sde.sampling_eps
  sampler = sampling.get_ode_sampler(sde, (B, 2), lambda v: 2. * v + 1., denoise=True, eps=eps, device='cpu',
                                     backend=backend)
  x, _ = sampler(ExactScoreModel(sde, DATA))
  assert x.shape == (B, 2) and x.dtype == torch.float32
  x = (x.double() - 1.) / 2.  # undo the inverse scaler
  # The prior is N(0, sigma_p^2 I); its exact push-forward is N(m_eps - r m_T, r^2 sigma_p^2), r = sqrt(v_eps/v_T).
  m_eps, v_eps = p_eps_moments(sde, DATA, eps)
  m_T, v_T = p_eps_moments(sde, DATA, float(sde.T))
  r2 = v_eps / v_T
  prior_var = 100. if kind == 've' else 1.
  mean, var = m_eps - torch.sqrt(r2) * m_T, r2 * prior_var
  se = torch.sqrt(var / B)
  assert torch.all((x.mean(0) - mean).abs() < 5 * se)
  # Relative s.e. of a variance over 4000 draws: sqrt(2 / 4000) = 2.2%; denoising shrinks it by O(eps).
  assert torch.all((x.var(0) / var - 1).abs() < 0.09)
  # ... and the push-forward is close to the data themselves (the prior nearly equals p_T).
  if kind != 've':  # VP and sub-VP priors nearly equal p_T (VE's p_T keeps the data mean)
    assert torch.allclose(mean, DATA.mu, atol=0.02) and torch.allclose(var, DATA.s0 ** 2, rtol=0.02)


# ---------------------------------------------------------------------------------------------------------
# PC samplers


PC_CASES = [(kind, 'reverse_diffusion', 'langevin') for kind in SDE_KINDS] + \
           [(kind, 'euler_maruyama', 'none') for kind in SDE_KINDS] + \
           [('ve', 'ancestral_sampling', 'none'), ('vp', 'ancestral_sampling', 'none'),
            ('subvp', 'reverse_diffusion', 'none')]


@pytest.mark.parametrize('kind, predictor, corrector', PC_CASES)
def test_pc_sampler_moments(kind, predictor, corrector):
  torch.manual_seed(2)
  sde = make_sde(kind, N=200)
  B = 10000
  eps = sde.sampling_eps
  sampler = sampling.get_pc_sampler(sde, (B, 2), sampling.get_predictor(predictor),
                                    sampling.get_corrector(corrector), IDENTITY, snr=0.16, n_steps=1,
                                    continuous=True, eps=eps, device='cpu')
  x, nfe = sampler(ExactScoreModel(sde, DATA))
  assert nfe == 200 * 2
  assert x.shape == (B, 2)
  m, v = p_eps_moments(sde, DATA, eps)
  x = x.double()
  # Sampling error: mean s.e. <= 0.008, variance relative s.e. 1.4%; 200-step discretization error (and the
  # Langevin corrector's own bias) measured at 2-5% of the variance, shrinking with N.
  assert torch.all((x.mean(0) - m).abs() < 0.03)
  assert torch.all((x.var(0) / v - 1).abs() < 0.08)


@pytest.mark.parametrize('kind', SDE_KINDS)
@pytest.mark.parametrize('predictor', ['reverse_diffusion', 'euler_maruyama'])
def test_pc_sampler_probability_flow_converges_to_the_exact_map(kind, predictor):
  # The predictor steps the probability flow ODE: deterministic given the prior sample, so each sample can be
  # compared with the exact flow map; the error is first order in 1/N.
  B = 1000
  errors = []
  for N in (100, 200):
    sde = make_sde(kind, N=N)
    sampler = sampling.get_pc_sampler(sde, (B, 2), sampling.get_predictor(predictor), None, IDENTITY,
                                      snr=0.16, probability_flow=True, continuous=True, eps=sde.sampling_eps,
                                      device='cpu')
    torch.manual_seed(3)
    x, _ = sampler(ExactScoreModel(sde, DATA))
    torch.manual_seed(3)
    z = sde.prior_sampling((B, 2)).double()
    expected = exact_ode_map(sde, DATA, z, sde.sampling_eps)
    errors.append(float(((x.double() - expected).pow(2).mean(0).sqrt() / expected.std(0)).max()))
  assert errors[1] < 0.12  # relative RMS error at N = 200 (measured: 0.1% to 10%, by SDE and predictor)
  assert errors[1] < 0.65 * errors[0]


@pytest.mark.parametrize('kind', SDE_KINDS)
@pytest.mark.parametrize('corrector', ['langevin', 'ald'])
def test_correctors_sample_the_marginal_at_fixed_time(kind, corrector):
  # Langevin MCMC x' = x + h s(x) + sqrt(2h) z at a fixed t, run long from a wrong start. For the Gaussian
  # p_t = N(m, v) its stationary law is exactly N(m, v / (1 - h / (2v))) (the unadjusted chain's bias). ALD's
  # step h = 2 alpha (snr std(t))^2 is deterministic, so its stationary variance is known exactly; Langevin's
  # step depends on the batch's norms, so it is checked against v with the bias as tolerance.
  torch.manual_seed(4)
  sde = make_sde(kind)
  t_val = 0.5
  B = 20000 if corrector == 'ald' else 10000
  t = torch.full((B,), t_val)
  m, v = p_eps_moments(sde, DATA, t_val)
  score_fn = lambda x, tt: DATA.score(sde, x, tt)
  snr = 0.16 if corrector == 'langevin' else 0.5
  obj = sampling.get_corrector(corrector)(sde, score_fn, snr=snr, n_steps=300)
  # Start every chain two standard deviations off, with no spread.
  x, x_mean = obj.update_fn((m + 2 * torch.sqrt(v)).repeat(B, 1), t)
  assert torch.all((x.mean(0) - m).abs() < 0.03 * torch.sqrt(v))
  if corrector == 'ald':
    alpha = sde.alphas[int(t_val * (sde.N - 1))] if hasattr(sde, 'alphas') else 1.
    h = 2 * float(alpha) * (snr * float(sde.marginal_prob(x[:1], t[:1])[1])) ** 2
    target = v / (1 - h / (2 * v))
    assert float((target / v - 1).max()) > 0.06  # the bias is resolved by the tolerance below
    tol = 0.04  # 4 s.e. of a variance over 20000 draws
  else:
    target, tol = v, 0.06
  assert torch.all((x.var(0) / target - 1).abs() < tol)


def test_denoise_returns_the_noise_free_last_step():
  sde = make_sde('ve', N=20)
  kwargs = dict(sde=sde, shape=(500, 2), predictor=sampling.ReverseDiffusionPredictor,
                corrector=sampling.NoneCorrector, inverse_scaler=IDENTITY, snr=0.16, continuous=True,
                eps=sde.sampling_eps, device='cpu')
  model = ExactScoreModel(sde, DATA)
  torch.manual_seed(5)
  noisy, _ = sampling.get_pc_sampler(denoise=False, **kwargs)(model)
  torch.manual_seed(5)
  clean, _ = sampling.get_pc_sampler(denoise=True, **kwargs)(model)
  # The last step (at eps, SMLD's first noise level sigma_min) adds sigma_min * z to the denoised sample.
  diff = (noisy - clean).double()
  assert 0 < float(diff.std()) and abs(float(diff.std()) / sde.sigma_min - 1) < 0.1


# ---------------------------------------------------------------------------------------------------------
# Registries, supported pairs and config validation


def test_registries():
  for name in ('euler_maruyama', 'reverse_diffusion', 'ancestral_sampling', 'none'):
    assert issubclass(sampling.get_predictor(name), sampling.Predictor)
  for name in ('langevin', 'ald', 'none'):
    assert issubclass(sampling.get_corrector(name), sampling.Corrector)
  assert sampling.get_predictor('reverse_diffusion') is sampling.ReverseDiffusionPredictor
  assert sampling.get_corrector('ald') is sampling.AnnealedLangevinDynamics
  with pytest.raises(ValueError, match='euler_maruyama'):
    sampling.get_predictor('bogus')
  with pytest.raises(ValueError, match='langevin'):
    sampling.get_corrector('bogus')
  with pytest.raises(ValueError, match='Already registered'):
    sampling.register_predictor(sampling.EulerMaruyamaPredictor, name='euler_maruyama')


def test_ddpm_betas_must_stay_below_one():
  # beta_max / N >= 1 makes DDPM's sqrt(1 - beta) NaN: refuse instead of sampling NaNs.
  sde = make_sde('vp', N=10)
  for predictor, corrector in ((sampling.AncestralSamplingPredictor, None),
                               (sampling.ReverseDiffusionPredictor, None), (None, sampling.LangevinCorrector)):
    with pytest.raises(ValueError, match='N > beta_max'):
      sampling.get_pc_sampler(sde, (2, 2), predictor, corrector, IDENTITY, 0.16, device='cpu')
  sampling.get_pc_sampler(make_sde('vp', N=21), (2, 2), sampling.AncestralSamplingPredictor,
                          sampling.LangevinCorrector, IDENTITY, 0.16, device='cpu')


def test_ancestral_sampling_support():
  with pytest.raises(NotImplementedError, match='subVPSDE'):
    sampling.get_pc_sampler(make_sde('subvp'), (2, 2), sampling.AncestralSamplingPredictor, None, IDENTITY,
                            0.16, device='cpu')
  with pytest.raises(ValueError, match='Probability flow'):
    sampling.get_pc_sampler(make_sde('vp'), (2, 2), sampling.AncestralSamplingPredictor, None, IDENTITY,
                            0.16, probability_flow=True, device='cpu')


def _config(**sampling_fields):
  config = ml_collections.ConfigDict()
  config.training = ml_collections.ConfigDict({'continuous': True})
  fields = dict(method='pc', predictor='reverse_diffusion', corrector='langevin', snr=0.16, n_steps_each=1,
                probability_flow=False, noise_removal=True, ode_backend='scipy')
  fields.update(sampling_fields)
  config.sampling = ml_collections.ConfigDict(fields)
  config.device = torch.device('cpu')
  return config


@pytest.mark.parametrize('method, ode_backend', [('pc', 'torch'), ('ode', 'scipy'), ('ode', 'torch'),
                                                 ('PC', 'scipy')])
def test_get_sampling_fn_builds_working_samplers(method, ode_backend):
  torch.manual_seed(6)
  sde = make_sde('vp', N=25)
  fn = sampling.get_sampling_fn(_config(method=method, ode_backend=ode_backend), sde, (3, 2), IDENTITY,
                                eps=sde.sampling_eps)
  x, nfe = fn(ExactScoreModel(sde, DATA))
  assert x.shape == (3, 2) and torch.isfinite(x).all() and nfe > 0


def test_get_sampling_fn_passes_the_ode_backend(monkeypatch):
  calls = []
  monkeypatch.setattr(sampling, 'get_ode_sampler', lambda **kwargs: calls.append(kwargs['backend']))
  for backend in BACKENDS:
    sampling.get_sampling_fn(_config(method='ode', ode_backend=backend), make_sde('vp'), (3, 2), IDENTITY,
                             eps=1e-3)
  assert calls == list(BACKENDS)
  # PC sampling does not read the field: Score SDE configs without it keep working.
  config = _config(method='pc')
  del config.sampling['ode_backend']
  sampling.get_sampling_fn(config, make_sde('vp'), (3, 2), IDENTITY, eps=1e-3)


@pytest.mark.parametrize('field, value', [
    ('method', 'sde'), ('predictor', 'euler'), ('corrector', 'mala'), ('snr', -0.1), ('n_steps_each', 0),
    ('n_steps_each', 1.5), ('probability_flow', 'True'), ('noise_removal', 1), ('ode_backend', 'cuda')])
def test_get_sampling_fn_validates_config(field, value):
  sde = make_sde('vp', N=25)
  method = 'ode' if field == 'ode_backend' else 'pc'
  with pytest.raises(ValueError, match=f'config.sampling.{field}'):
    sampling.get_sampling_fn(_config(**{'method': method, field: value}), sde, (3, 2), IDENTITY, eps=1e-3)


def test_get_sampling_fn_validates_continuous_and_device():
  sde = make_sde('vp', N=25)
  config = _config()
  config.training = ml_collections.ConfigDict({'continuous': 'yes'})
  with pytest.raises(ValueError, match='config.training.continuous'):
    sampling.get_sampling_fn(config, sde, (3, 2), IDENTITY, eps=1e-3)
  config = _config()
  del config['device']
  config.device = 'gpu0'
  with pytest.raises(ValueError, match='config.device'):
    sampling.get_sampling_fn(config, sde, (3, 2), IDENTITY, eps=1e-3)


# ---------------------------------------------------------------------------------------------------------
# End to end on a tiny NCSN++ (random weights: shapes, finiteness and the label paths, not sample quality)


@pytest.mark.parametrize('sde_name, continuous, method, predictor, corrector', [
    ('vesde', True, 'pc', 'reverse_diffusion', 'langevin'),
    ('vesde', False, 'pc', 'ancestral_sampling', 'ald'),
    ('vpsde', False, 'pc', 'ancestral_sampling', 'langevin'),
    ('subvpsde', True, 'pc', 'euler_maruyama', 'none'),
])
def test_samplers_run_on_tiny_ncsnpp(sde_name, continuous, method, predictor, corrector):
  import datasets
  net, sde, config = tiny_ncsnpp_with_sde(sde_name, continuous)
  config.sampling.method = method
  config.sampling.predictor = predictor
  config.sampling.corrector = corrector
  shape = (2, 3, 8, 8)
  fn = sampling.get_sampling_fn(config, sde, shape, datasets.get_data_inverse_scaler(config), sde.sampling_eps)
  x, nfe = fn(net)
  # float32 in, float32 out: discrete VE NCSN++ once promoted to float64 through its `sigmas` buffer.
  assert x.shape == shape and x.dtype == torch.float32 and torch.isfinite(x).all()
  assert nfe > 0


@pytest.mark.parametrize('sde_name', ['vesde'])
def test_ode_sampler_runs_on_tiny_ncsnpp(sde_name):
  # Loose tolerances: a random network's probability flow is not smooth enough for Score SDE's 1e-5 to be cheap.
  net, sde, _ = tiny_ncsnpp_with_sde(sde_name, True)
  sampler = sampling.get_ode_sampler(sde, (2, 3, 8, 8), IDENTITY, denoise=True, rtol=1e-2, atol=1e-2,
                                     eps=sde.sampling_eps, device='cpu')
  x, nfe = sampler(net)
  assert x.shape == (2, 3, 8, 8) and x.dtype == torch.float32 and torch.isfinite(x).all() and nfe > 0


def test_ode_sampler_backends_agree_on_a_fixed_latent():
  net, sde, _ = smooth_tiny_ncsnpp()
  torch.manual_seed(3)
  z = sde.prior_sampling((2, 3, 8, 8))
  samples = {}
  for backend in BACKENDS:
    sampler = sampling.get_ode_sampler(sde, (2, 3, 8, 8), IDENTITY, denoise=False, rtol=1e-4, atol=1e-4,
                                       eps=sde.sampling_eps, device='cpu', backend=backend)
    samples[backend], _ = sampler(net, z=z)
  # Solver error at rtol = atol = 1e-4 (measured 0.017 of samples up to 15 in size; 0.08 at 1e-3). A wrong
  # drift, direction or end time would be off by O(1).
  assert samples['torch'].dtype == torch.float32 and torch.isfinite(samples['torch']).all()
  assert float((samples['torch'] - samples['scipy']).abs().max()) < 0.05


@pytest.mark.parametrize('backend', BACKENDS)
def test_ode_sampler_failure_names_the_time_reached(backend):
  sde = make_sde('vp')
  sampler = sampling.get_ode_sampler(sde, (2, 2), IDENTITY, eps=1e-3, device='cpu', backend=backend)
  with pytest.raises(RuntimeError, match=r'solver failed at t=0\.[5-7]'):
    # Integrating down from T = 1, the output turns NaN below t = 0.5.
    sampler(NaNAfter(sde, DATA, 0.5, above=False))


def test_torch_ode_sampler_keeps_everything_on_the_device(monkeypatch):
  sde = make_sde('ve')
  model = DeviceCheckingModel(ExactScoreModel(sde, DATA), 'cpu', torch.float32)
  sampler = sampling.get_ode_sampler(sde, (3, 2), IDENTITY, eps=1e-3, device='cpu', backend='torch')
  with no_host_copies(monkeypatch):
    x, nfe = sampler(model)
  assert model.calls == nfe > 0 and x.dtype == torch.float32
  scipy_sampler = sampling.get_ode_sampler(sde, (3, 2), IDENTITY, eps=1e-3, device='cpu', backend='scipy')
  with no_host_copies(monkeypatch), pytest.raises(AssertionError, match='called in the solve'):
    scipy_sampler(model)


def test_ode_sampler_checks_the_denoising_step_at_construction():
  # Before: the whole ODE solve ran, then the denoising step raised.
  with pytest.raises(ValueError, match='N > beta_max'):
    sampling.get_ode_sampler(make_sde('vp', N=10), (2, 2), IDENTITY, denoise=True, device='cpu')
  sampling.get_ode_sampler(make_sde('vp', N=10), (2, 2), IDENTITY, denoise=False, device='cpu')


@pytest.mark.parametrize('eps', [0., -1e-3, 1., 1.5, True, '1e-3'])
def test_samplers_refuse_eps_outside_0_T(eps):
  for build in (
      lambda: sampling.get_pc_sampler(make_sde('ve'), (2, 2), sampling.ReverseDiffusionPredictor, None,
                                      IDENTITY, 0.16, eps=eps, device='cpu'),
      lambda: sampling.get_ode_sampler(make_sde('vp'), (2, 2), IDENTITY, eps=eps, device='cpu')):
    with pytest.raises(ValueError, match=r'eps=.*must be a number in \(0, T=1\)'):
      build()


def test_correctors_take_numpy_integer_steps():
  # Config values may be numpy integers; Score SDE accepts them.
  sampler = sampling.get_pc_sampler(make_sde('ve', N=3), (2, 2), None, sampling.LangevinCorrector, IDENTITY,
                                    0.16, n_steps=np.int64(2), continuous=True, device='cpu')
  x, nfe = sampler(ExactScoreModel(make_sde('ve', N=3), GaussianData([0., 0.], [1., 1.])))
  assert nfe == 3 * 3 and torch.isfinite(x).all()
  with pytest.raises(ValueError, match='n_steps=True'):
    sampling.get_pc_sampler(make_sde('ve'), (2, 2), None, sampling.LangevinCorrector, IDENTITY, 0.16,
                            n_steps=True, device='cpu')
