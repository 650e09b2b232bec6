"""Model zoo: Score SDE's state_dict layouts, reproduction of Score SDE's outputs, derivatives to third
order of a tiny NCSN++, and errors on bad configs."""

import glob
import importlib.util
import json
import os

import ml_collections
import numpy as np
import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

import models  # noqa: F401  (registers every architecture)
import sde_lib
from configs.default_cifar10_configs import get_default_configs
from helpers import tiny_ncsnpp_config
from models import utils as mutils

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Copies of the compatibility spec, carried by the repository (tests/data/README.md says how they were made).
SPEC = os.path.join(ROOT, 'tests', 'data')
MANIFEST = os.path.join(SPEC, 'state_dict_manifests.json')
REFERENCE_FILES = ('tiny_ve_ncsnpp_cont.pt', 'tiny_vp_ddpm_cont.pt')


def load_config(rel_path):
  path = os.path.join(ROOT, 'configs', rel_path)
  spec = importlib.util.spec_from_file_location('config_under_test', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def build_on_meta(config):
  # The 'meta' device allocates no memory and draws no random numbers: full-size models build in ms.
  with torch.device('meta'):
    return mutils.get_model(config.model.name)(config)


def _manifest(path=MANIFEST):
  with open(path) as f:
    return json.load(f)


def _built_like(config, expected):
  """The model `config` builds (on 'meta'), checked against a manifest entry: name, keys, shapes, order."""
  assert config.model.name == expected['model.name']
  model = build_on_meta(config)
  layout = [[k, list(v.shape)] for k, v in model.state_dict().items()]
  assert layout == expected['keys']  # same keys, shapes and order
  assert sum(p.numel() for p in model.parameters()) == expected['n_params']
  return model


@pytest.mark.parametrize('rel_path', sorted(_manifest()))
def test_state_dict_layout_matches_score_sde(rel_path):
  _built_like(load_config(rel_path), _manifest()[rel_path])


NCSNV2_MANIFEST = os.path.join(SPEC, 'ncsnv2_manifests.json')


def _ncsnv2_config(entry):
  config = load_config(entry['config'])
  for dotted, value in entry['overrides'].items():
    section, field = dotted.split('.')
    setattr(getattr(config, section), field, value)
  return config


@pytest.mark.parametrize('label', sorted(_manifest(NCSNV2_MANIFEST)))
def test_ncsnv2_layout_matches_score_sde_and_loads_strictly(label):
  # Score SDE's NCSNv2 registers `sigmas` as a persistent buffer: its checkpoints hold 'module.sigmas'.
  expected = _manifest(NCSNV2_MANIFEST)[label]
  config = _ncsnv2_config(expected)
  model = _built_like(config, expected)
  assert expected['keys'][0] == ['sigmas', [config.model.num_scales]]
  # A checkpoint in Score SDE's layout (nn.DataParallel's 'module.' prefix) loads with strict=True.
  checkpoint = {'module.' + k: torch.empty(shape, device='meta') for k, shape in expected['keys']}
  torch.nn.DataParallel(model).load_state_dict(checkpoint, strict=True)
  # Without 'sigmas' (the layout this project wrote before) the strict load refuses it.
  del checkpoint['module.sigmas']
  with pytest.raises(RuntimeError, match='module.sigmas'):
    torch.nn.DataParallel(model).load_state_dict(checkpoint, strict=True)


def test_ncsnv2_sigmas_buffer_holds_score_sde_values_and_ncsn_v1_has_none():
  config = _tiny_ncsnv2_config('ncsnv2_64', 8)
  state = mutils.get_model('ncsnv2_64')(config).state_dict()
  assert state['sigmas'].dtype == torch.float64
  np.testing.assert_allclose(state['sigmas'].numpy(), np.geomspace(5, 0.1, 10), rtol=1e-12)
  # NCSN (v1) divides by no sigma and keeps none, in Score SDE and here.
  assert not any('sigmas' in k for k in mutils.get_model('ncsn')(_tiny_ncsnv2_config('ncsn', 8)).state_dict())


# Configs of the NCSN/NCSNv2/DDPM families that crash in Score SDE (config.data.channels) or are not in
# the manifest: they build here.
OTHER_CONFIGS = sorted(os.path.relpath(p, os.path.join(ROOT, 'configs'))
                       for pattern in ('ve/ncsn/*.py', 've/ncsnv2/*.py', 'vp/ddpm/*.py')
                       for p in glob.glob(os.path.join(ROOT, 'configs', pattern)))


@pytest.mark.parametrize('rel_path', OTHER_CONFIGS)
def test_other_score_sde_configs_build(rel_path):
  config = load_config(rel_path)
  model = build_on_meta(config)
  assert sum(p.numel() for p in model.parameters()) > 0


def test_other_configs_were_found():
  assert len(OTHER_CONFIGS) >= 8, OTHER_CONFIGS


def _config_from_dict(d):
  """The reference files store the config as a plain dict with lists for tuples."""
  def convert(v):
    if isinstance(v, dict):
      return ml_collections.ConfigDict({k: convert(x) for k, x in v.items()})
    if isinstance(v, list):
      return tuple(v)
    return v
  config = convert(d)
  config.device = torch.device('cpu')
  return config


@pytest.mark.parametrize('filename', REFERENCE_FILES)
def test_reproduces_score_sde_outputs(filename):
  ref = torch.load(os.path.join(SPEC, 'reference_outputs', filename), weights_only=True)
  config = _config_from_dict(ref['config'])
  model = mutils.create_model(config)
  assert isinstance(model, torch.nn.DataParallel)
  model.load_state_dict(ref['checkpoint']['model'], strict=True)
  sde = sde_lib.sde_from_config(config)
  score_fn = mutils.get_score_fn(sde, model, train=False, continuous=True)
  with torch.no_grad():
    score = score_fn(ref['x'], ref['t'])
  rel = (score - ref['score']).norm() / ref['score'].norm()
  assert rel < 1e-4
  # Elementwise too, relative to the output's scale at each time.
  scale = ref['score'].flatten(1).abs().amax(1)[:, None, None, None]
  assert torch.all((score - ref['score']).abs() <= 1e-4 * scale)


def _randomize(model, seed=0):
  # Score SDE zero-initializes output convs (init_scale=0): perturb every weight so nothing is trivial.
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def tiny_ncsnpp(**model_overrides):
  torch.manual_seed(0)
  model = mutils.get_model('ncsnpp')(tiny_ncsnpp_config(**model_overrides)).double().eval()
  _randomize(model)
  return model


@pytest.mark.parametrize('overrides', [
    {},
    dict(resblock_type='ddpm', fir=False, progressive='residual', progressive_input='residual',
         embedding_type='positional', scale_by_sigma=False),
    dict(progressive='none', progressive_input='residual', progressive_combine='cat', ch_mult=(1, 2, 2)),
])
def test_tiny_ncsnpp_variants_run(overrides):
  model = tiny_ncsnpp(**overrides)
  x = torch.rand(2, 2, 8, 8, dtype=torch.float64)
  labels = torch.tensor([0.5, 2.], dtype=torch.float64)
  if model.embedding_type == 'positional':
    labels = torch.tensor([3., 500.], dtype=torch.float64)
  out = model(x, labels)
  assert out.shape == x.shape and torch.isfinite(out).all()
  if model.scale_by_sigma:
    # The net is conditioned on sigma beyond the 1/sigma output scaling.
    out2 = model(x, labels * 2)
    assert not torch.allclose(out * labels[:, None, None, None], out2 * 2 * labels[:, None, None, None])


def test_tiny_ncsnpp_gradcheck_and_gradgradcheck_in_input():
  model = tiny_ncsnpp()
  sigma = torch.tensor([0.7], dtype=torch.float64)
  x = torch.rand(1, 2, 8, 8, dtype=torch.float64, requires_grad=True)

  def fn(x):
    return model(x, sigma)

  assert gradcheck(fn, (x,), fast_mode=True)
  assert gradgradcheck(fn, (x,), fast_mode=True)


def test_third_order_parameter_gradient_of_divergence_gradient():
  """d/dtheta <v, grad_x div_x s_theta(x)>, with a Hutchinson divergence, vs central finite differences
  in theta: three nested derivatives through NCSN++ (FIR up/downsampling, attention, GroupNorm)."""
  model = tiny_ncsnpp()
  gen = torch.Generator().manual_seed(5)
  x0 = torch.rand(1, 2, 8, 8, generator=gen, dtype=torch.float64)
  eps = torch.randn(x0.shape, generator=gen, dtype=torch.float64)  # fixed probe
  v = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
  sigma = torch.tensor([0.5], dtype=torch.float64)

  def objective():
    x = x0.clone().requires_grad_(True)
    s = model(x, sigma)
    div = (torch.autograd.grad((s * eps).sum(), x, create_graph=True)[0] * eps).sum()
    grad_div = torch.autograd.grad(div, x, create_graph=True)[0]
    return (grad_div * v).sum()

  # A weight in the FIR-downsampling BigGAN block and one in the output head.
  named = dict(model.named_parameters())
  params = [named['all_modules.5.Conv_0.weight'], named['all_modules.%d.weight' % (len(model.all_modules) - 1)]]
  grads = torch.autograd.grad(objective(), params)
  h = 1e-5
  # One entry per parameter tensor (each finite difference costs two third-order passes).
  for p, g, idx in zip(params, grads, [(1, 1, 0, 2), (0, 1, 1, 1)]):
    with torch.no_grad():
      p[idx] += h
    plus = objective().item()
    with torch.no_grad():
      p[idx] -= 2 * h
    minus = objective().item()
    with torch.no_grad():
      p[idx] += h
    fd = (plus - minus) / (2 * h)
    assert abs(g[idx].item() - fd) <= 1e-6 + 1e-5 * abs(fd), (idx, g[idx].item(), fd)
    assert abs(fd) > 1e-6  # the check is not vacuous


def _tiny_ncsnv2_config(name, image_size):
  config = get_default_configs()
  config.training.sde = 'vesde'
  config.training.continuous = False
  config.data.image_size = image_size
  config.data.num_channels = 3
  config.model.name = name
  config.model.normalization = 'InstanceNorm++'
  config.model.nonlinearity = 'elu'
  config.model.nf = 4
  config.model.num_scales = 10
  config.model.sigma_max = 5
  config.model.sigma_min = 0.1
  config.device = torch.device('cpu')
  return config


@pytest.mark.parametrize('name,image_size', [('ncsnv2_64', 8), ('ncsnv2_128', 8), ('ncsnv2_256', 16), ('ncsn', 8)])
def test_ncsn_family_runs(name, image_size):
  torch.manual_seed(0)
  model = mutils.get_model(name)(_tiny_ncsnv2_config(name, image_size)).eval()
  x = torch.rand(2, 3, image_size, image_size)
  y = torch.tensor([0, 7])
  out = model(x, y)
  assert out.shape == x.shape and torch.isfinite(out).all()
  if name != 'ncsn':
    # NCSNv2 is an unconditional net divided by sigma_y: out(y) * sigma_y does not depend on y.
    out2 = model(x, torch.tensor([7, 0]))
    torch.testing.assert_close(out * model.sigmas[y].view(-1, 1, 1, 1).float(),
                               out2 * model.sigmas[torch.tensor([7, 0])].view(-1, 1, 1, 1).float())
  else:
    # NCSN conditions every normalization on y: the outputs differ.
    assert not torch.allclose(out, model(x, torch.tensor([7, 0])))


def test_ddpm_unconditional_builds_and_runs():
  config = _tiny_ncsnv2_config('ddpm', 8)
  config.model.nf = 32
  config.model.ch_mult = (1, 2)
  config.model.num_res_blocks = 1
  config.model.attn_resolutions = (4,)
  config.model.resamp_with_conv = True
  config.model.conditional = False
  config.model.scale_by_sigma = False
  config.model.normalization = 'GroupNorm'
  config.model.nonlinearity = 'swish'
  model = mutils.get_model('ddpm')(config).eval()
  x = torch.rand(2, 3, 8, 8)
  assert model(x, torch.tensor([1, 2])).shape == x.shape


def test_get_score_fn_uses_the_sde():
  model = tiny_ncsnpp(embedding_type='positional', scale_by_sigma=False)
  x = torch.rand(2, 2, 8, 8, dtype=torch.float64)
  t = torch.tensor([0.2, 0.7], dtype=torch.float64)
  vp = sde_lib.VPSDE()
  score = mutils.get_score_fn(vp, model, train=False, continuous=True)(x, t)
  std = vp.marginal_prob(torch.zeros_like(x), t)[1]
  torch.testing.assert_close(score, -model(x, t * 999) / std[:, None, None, None])
  assert not model.training


def test_sigmas_ddpm_params_and_numpy_helpers():
  config = get_default_configs()
  sigmas = mutils.get_sigmas(config)
  assert sigmas.shape == (1000,)
  np.testing.assert_allclose(sigmas[[0, -1]], [50., 0.01])
  np.testing.assert_allclose(sigmas[1:] / sigmas[:-1], (0.01 / 50.) ** (1 / 999) * np.ones(999))
  params = mutils.get_ddpm_params(config)
  np.testing.assert_allclose(params['betas'][[0, -1]], [0.1 / 1000, 20. / 1000])
  np.testing.assert_allclose(params['alphas_cumprod'], np.cumprod(1 - params['betas']))
  np.testing.assert_allclose(params['sqrt_1m_alphas_cumprod'] ** 2 + params['sqrt_alphas_cumprod'] ** 2, 1.)
  x = torch.randn(2, 3, 4)
  flat = mutils.to_flattened_numpy(x)
  assert flat.shape == (24,)
  assert torch.equal(mutils.from_flattened_numpy(flat, (2, 3, 4)), x)


@pytest.mark.parametrize('field,value,allowed', [
    ('name', 'unet', "'ncsnpp'"),
    ('normalization', 'BatchNorm', "'GroupNorm'"),
    ('nonlinearity', 'gelu', "'swish'"),
    ('progressive', 'skip', "'output_skip'"),
    ('progressive_input', 'skip', "'input_skip'"),
    ('progressive_combine', 'max', "'cat'"),
    ('resblock_type', 'resnet', "'biggan'"),
    ('embedding_type', 'learned', "'fourier'"),
    ('attention_type', 'flash', "'ddpm'"),
])
def test_bad_model_fields_raise(field, value, allowed):
  config = tiny_ncsnpp_config(**{field: value})
  with pytest.raises(ValueError) as err:
    mutils.create_model(config)
  msg = str(err.value)
  assert f'config.model.{field}' in msg and repr(value) in msg and allowed in msg


def test_bad_normalization_in_ncsnv2_raises():
  config = _tiny_ncsnv2_config('ncsnv2_64', 8)
  config.model.normalization = 'LayerNorm'
  with pytest.raises(ValueError, match=r"config\.model\.normalization='LayerNorm'.*InstanceNorm\+\+"):
    mutils.create_model(config)
  # GroupNorm is a known normalization, but not one NCSNv2's blocks can build.
  config.model.normalization = 'GroupNorm'
  with pytest.raises(ValueError, match=r"config\.model\.normalization='GroupNorm' is not allowed; choose one of "
                                       r"\('InstanceNorm', 'InstanceNorm\+\+', 'VarianceNorm'\)"):
    mutils.create_model(config)


@pytest.mark.parametrize('changes,match', [
    (dict(image_size=12, ch_mult=(1, 2, 2, 2)), r'config\.data\.image_size=12.*multiple of 8'),
    (dict(attn_resolutions=(16,)), r'config\.model\.attn_resolutions=\(16,\).*never reached'),
    (dict(continuous=False), r'config\.training\.continuous'),
])
def test_unsupported_sizes_raise_in_constructor(changes, match):
  config = tiny_ncsnpp_config()
  if 'image_size' in changes:
    config.data.image_size = changes['image_size']
    config.model.ch_mult = changes['ch_mult']
  if 'attn_resolutions' in changes:
    config.model.attn_resolutions = changes['attn_resolutions']
  if 'continuous' in changes:
    config.training.continuous = False
  with pytest.raises(ValueError, match=match):
    mutils.get_model('ncsnpp')(config)


def test_ncsnv2_odd_image_size_raises():
  with pytest.raises(ValueError, match=r'config\.data\.image_size=9'):
    mutils.get_model('ncsnv2_64')(_tiny_ncsnv2_config('ncsnv2_64', 9))
